"""The elastic sampler: one global order per (seed, epoch), one global position.

The order of an epoch is a deterministic permutation of all samples, shard-aware so that
readers stream: shards are shuffled, then samples are shuffled within blocks of
``block_shards`` consecutive shards (every rank reads from the same few shards at a time,
which the node cache shares). The state is ``(seed, epoch, position)``: ``position`` counts
the samples of ``order[epoch]`` consumed by all ranks together.

A step of a world of ``W`` ranks with per-rank batch ``B`` consumes ``order[P : P + W*B]``:
rank ``r`` takes ``order[P + r*B : P + (r+1)*B]``, and every rank advances the position by
``W*B``, so each computes the same global position locally. The epoch's tail (fewer than
``W*B`` left) is split evenly (the first ``R % W`` ranks take one more sample) and moves the
position to the end; with ``drop_last`` it is skipped. After any change of world size or batch
size at position ``P``, the remaining ``order[P:]`` is split the same way among the new ranks,
so across kill, shrink and grow every sample of an epoch is seen exactly once. Resuming
computes the order and slices it: no sample is replayed.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from elastic.errors import ConfigError
from elastic.world import World

from .errors import SamplerStateError

__all__ = ["ElasticSampler", "rank_slices"]

_STATE_KIND = "elastic-sampler"
_STATE_VERSION = 1


def rank_slices(num_samples: int, position: int, world_size: int, rank: int,
                batch_size: int, drop_last: bool = False) -> Iterator[Tuple[int, int, int]]:
    """``(start, stop, position_after)`` of each batch of ``rank``, from ``position`` on."""
    step = world_size * batch_size
    full = (num_samples - position) // step
    for s in range(full):
        base = position + s * step
        yield base + rank * batch_size, base + (rank + 1) * batch_size, base + step
    tail_start = position + full * step
    rest = num_samples - tail_start
    if rest > 0 and not drop_last:
        share, extra = divmod(rest, world_size)
        start = tail_start + rank * share + min(rank, extra)
        count = share + (1 if rank < extra else 0)
        if count:
            yield start, start + count, num_samples


class ElasticSampler:
    """Per-rank batches of global sample indices, resumable at any world size."""

    def __init__(self, num_samples: int, batch_size: int, *, world: Optional[World] = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 shard_sizes: Optional[Sequence[int]] = None, block_shards: int = 4,
                 fingerprint: Optional[str] = None) -> None:
        if num_samples < 1:
            raise ConfigError(f"the dataset has no samples (num_samples={num_samples})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if block_shards < 0:
            raise ConfigError(f"block_shards must be >= 0, got {block_shards}")
        if shard_sizes is not None and sum(shard_sizes) != num_samples:
            raise ConfigError("shard_sizes do not add up to num_samples")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.world = World.detect() if world is None else world
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.shard_sizes = None if shard_sizes is None else [int(s) for s in shard_sizes]
        self.block_shards = int(block_shards)
        self.fingerprint = fingerprint
        self.epoch = 0
        self.position = 0
        self._order: Optional[Tuple[Any, ...]] = None  # (key, order, shard runs)

    # -- world and epochs --------------------------------------------------------------
    def set_world(self, world: Optional[World] = None, batch_size: Optional[int] = None) -> None:
        """Adopt a new world (default: from the environment) and optionally a new batch size."""
        self.world = World.detect() if world is None else world
        if batch_size is not None:
            if batch_size < 1:
                raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
            self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its start; the current epoch keeps its position."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def finish_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    # -- the order ---------------------------------------------------------------------
    def order(self, epoch: Optional[int] = None) -> np.ndarray:
        """The global order of ``epoch`` (default: the current one); the same on every rank."""
        return self._computed(epoch)[0]

    def shard_runs(self, epoch: Optional[int] = None) -> Optional[Tuple[List[int], List[List[int]]]]:
        """Where the order of ``epoch`` moves to other shards: ``(starts, shards)``, the
        positions where each run of the order begins and the shards its samples come from
        (``None`` without ``shard_sizes``). Readers plan shard prefetch from it, with no
        per-sample work."""
        return self._computed(epoch)[1]

    def _computed(self, epoch: Optional[int]
                  ) -> Tuple[np.ndarray, Optional[Tuple[List[int], List[List[int]]]]]:
        epoch = self.epoch if epoch is None else int(epoch)
        key = (self.seed, epoch, self.shuffle, self.block_shards)
        if self._order is None or self._order[0] != key:
            self._order = (key, *self._compute_order(epoch))
        return self._order[1], self._order[2]

    def _compute_order(self, epoch: int
                       ) -> Tuple[np.ndarray, Optional[Tuple[List[int], List[List[int]]]]]:
        n = self.num_samples
        sizes = None if self.shard_sizes is None else np.asarray(self.shard_sizes, dtype=np.int64)
        if sizes is not None:
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            nonempty = [k for k in range(len(sizes)) if sizes[k] > 0]
        if not self.shuffle:
            runs = None if sizes is None else ([int(starts[k]) for k in nonempty],
                                               [[k] for k in nonempty])
            return np.arange(n, dtype=np.int64), runs
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
        if sizes is None or self.block_shards == 0 or len(sizes) == 1:
            runs = None if sizes is None else ([0], [nonempty])
            return rng.permutation(n).astype(np.int64, copy=False), runs
        perm = rng.permutation(len(sizes))
        # Samples of the shards in shuffled shard order, then shuffled within each block.
        psizes = sizes[perm]
        order = np.repeat(starts[perm] - np.concatenate([[0], np.cumsum(psizes)[:-1]]), psizes)
        order += np.arange(n, dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(psizes)])[:: self.block_shards]
        bounds = np.append(bounds, n) if bounds[-1] != n else bounds
        for a, b in zip(bounds[:-1], bounds[1:]):
            rng.shuffle(order[a:b])
        run_starts, run_shards = [], []
        for i, a in enumerate(bounds[:-1].tolist()):
            block = [int(k) for k in perm[i * self.block_shards:(i + 1) * self.block_shards]
                     if sizes[k] > 0]
            if block:
                run_starts.append(a)
                run_shards.append(block)
        return order, (run_starts, run_shards)

    # -- this rank's batches -------------------------------------------------------------
    def slices(self) -> Iterator[Tuple[int, int, int]]:
        """``(start, stop, position_after)`` into :meth:`order` of this rank's next batches."""
        return rank_slices(self.num_samples, self.position, self.world.world_size,
                           self.world.rank, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[np.ndarray]:
        """This rank's remaining batches of the epoch (position is not moved: see ``advance``)."""
        order = self.order()
        for start, stop, _after in self.slices():
            yield order[start:stop]

    def __len__(self) -> int:
        """This rank's batches left in the epoch."""
        step = self.world.world_size * self.batch_size
        left = self.num_samples - self.position
        full, rest = divmod(left, step)
        if rest and not self.drop_last:
            share, extra = divmod(rest, self.world.world_size)
            full += 1 if (share or self.world.rank < extra) else 0
        return full

    def advance(self, position_after: int) -> None:
        """Record that every rank consumed its batch ending at global ``position_after``."""
        if not self.position <= position_after <= self.num_samples:
            raise ConfigError(f"position {position_after} outside [{self.position}, "
                              f"{self.num_samples}]")
        self.position = int(position_after)

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """A plain JSON-able dict; the same on every rank, and any world size resumes from it."""
        return {
            "kind": _STATE_KIND, "version": _STATE_VERSION,
            "seed": self.seed, "epoch": self.epoch, "position": self.position,
            "num_samples": self.num_samples, "shuffle": self.shuffle,
            "block_shards": self.block_shards, "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Jump to a saved position (no replay); the order's seed and shape come from ``state``."""
        if not isinstance(state, dict) or state.get("kind") != _STATE_KIND:
            raise SamplerStateError("not an elastic sampler state")
        if state.get("version") != _STATE_VERSION:
            raise SamplerStateError(f"unsupported sampler state version {state.get('version')!r}")
        try:
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
            num_samples = int(state["num_samples"])
            shuffle, block_shards = bool(state["shuffle"]), int(state["block_shards"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SamplerStateError(f"malformed sampler state ({exc!r})") from None
        if num_samples != self.num_samples:
            raise SamplerStateError(f"the state is of a dataset of {num_samples} samples, "
                                    f"this one has {self.num_samples}")
        fp = state.get("fingerprint")
        if fp and self.fingerprint and fp != self.fingerprint:
            raise SamplerStateError("the state is of a dataset with another shard layout "
                                    f"(fingerprint {fp} != {self.fingerprint})")
        if epoch < 0 or not 0 <= position <= num_samples or block_shards < 0:
            raise SamplerStateError(f"invalid sampler position: epoch {epoch}, position {position}")
        self.seed, self.epoch, self.position = seed, epoch, position
        self.shuffle, self.block_shards = shuffle, block_shards
