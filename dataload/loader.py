"""Elastic loaders: torch's DataLoader (workers, pinned memory, collate) and plain NumPy,
over the elastic sampler, with shard prefetch into the node cache and an exact position."""
from __future__ import annotations

import bisect
import logging
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import numpy as np

from elastic._lazy import require
from elastic.world import World

from .dataset import ShardedDataset
from .sampler import ElasticSampler

__all__ = ["ElasticDataLoader", "ElasticNumpyLoader"]

log = logging.getLogger("dataload")


class _Prefetcher(threading.Thread):
    """Fills the node cache with the shards this rank reads next, ``depth`` shards ahead."""

    def __init__(self, dataset: ShardedDataset, rank_indices: Callable[[], np.ndarray],
                 batch_size: int, depth: int) -> None:
        super().__init__(name="dataload-prefetch", daemon=True)
        self._dataset = dataset
        self._rank_indices = rank_indices
        self._batch_size = batch_size
        self._depth = depth
        self._cond = threading.Condition()
        self._consumed = 0
        self._wake_at = 0
        self._stopped = False

    def consumed(self, batches: int) -> None:
        self._consumed = batches
        if batches >= self._wake_at:  # wake the thread only when it has work to do
            with self._cond:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def run(self) -> None:
        try:
            indices = self._rank_indices()
            if not len(indices):
                return
            shard_ids = self._dataset.shard_of(indices)
            uniq, first = np.unique(shard_ids, return_index=True)
            by_first = np.argsort(first)
            seq = uniq[by_first].tolist()
            first_batch = (first[by_first] // self._batch_size).tolist()
            for i, k in enumerate(seq):
                with self._cond:
                    if i >= self._depth:
                        self._wake_at = first_batch[i - self._depth]
                    while not self._stopped and \
                            i >= bisect.bisect_right(first_batch, self._consumed) + self._depth:
                        self._cond.wait(timeout=1.0)
                    if self._stopped:
                        return
                self._dataset.prefetch(int(k))
        except Exception as exc:  # the reader meets the same error and raises it
            log.warning("prefetch stopped: %s", exc)


class _ElasticLoaderBase:
    def __init__(self, dataset: ShardedDataset, batch_size: int, *, world: Optional[World],
                 seed: int, shuffle: bool, drop_last: bool, block_shards: int,
                 prefetch_shards: int) -> None:
        self.dataset = dataset
        index = getattr(dataset, "index", None)
        self.sampler = ElasticSampler(
            len(dataset), batch_size, world=world, seed=seed, shuffle=shuffle,
            drop_last=drop_last, block_shards=block_shards,
            shard_sizes=index.shard_sizes if index is not None else None,
            fingerprint=index.fingerprint if index is not None else None)
        self.prefetch_shards = prefetch_shards
        self._gen = 0

    # -- position ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        """Samples of this epoch consumed by all ranks together."""
        return self.sampler.position

    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON-able state (seed, epoch, global position); equal on every rank."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at a saved position, at any world size; a live iterator stops."""
        self.sampler.load_state_dict(state)
        self._gen += 1

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._gen += 1

    def set_world(self, world: Optional[World] = None, batch_size: Optional[int] = None) -> None:
        """After the world changed (default: re-read the environment); takes effect at ``iter``."""
        self.sampler.set_world(world, batch_size)
        self._gen += 1

    def __len__(self) -> int:
        return len(self.sampler)

    # -- iteration ---------------------------------------------------------------------
    def _rank_indices(self, order: np.ndarray, position: int) -> np.ndarray:
        s = self.sampler
        parts = [order[a:b] for a, b, _ in
                 _slices(s.num_samples, position, s.world.world_size, s.world.rank,
                         s.batch_size, s.drop_last)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _iterate(self, produce: Callable[[Iterable[np.ndarray]], Iterator[Any]]) -> Iterator[Any]:
        s = self.sampler
        step = s.world.world_size * s.batch_size
        left = s.num_samples - s.position
        if left == 0 or (s.drop_last and left < step):
            s.finish_epoch()  # the saved position was the end of an epoch
        self._gen += 1
        mine = self._gen
        start, n = s.position, s.num_samples
        order = s.order()
        prefetcher = None
        if self.prefetch_shards > 0 and getattr(self.dataset, "cache", None) is not None:
            prefetcher = _Prefetcher(self.dataset, lambda: self._rank_indices(order, start),
                                     s.batch_size, self.prefetch_shards)
            prefetcher.start()
        try:
            batches = (order[a:b] for a, b, _ in s.slices())
            for k, batch in enumerate(produce(batches)):
                if mine != self._gen:
                    return
                s.advance(min(start + (k + 1) * step, n))
                if prefetcher is not None:
                    prefetcher.consumed(k + 1)
                yield batch
                if mine != self._gen:
                    return
            if mine == self._gen:
                s.finish_epoch()
        finally:
            if prefetcher is not None:
                prefetcher.stop()


def _slices(*args: Any) -> Iterator:
    from .sampler import rank_slices

    return rank_slices(*args)


class ElasticNumpyLoader(_ElasticLoaderBase):
    """Batches as dicts of NumPy arrays (lists for bytes/str), in this process; no torch."""

    def __init__(self, dataset: ShardedDataset, batch_size: int, *, world: Optional[World] = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 block_shards: int = 4, prefetch_shards: int = 2) -> None:
        super().__init__(dataset, batch_size, world=world, seed=seed, shuffle=shuffle,
                         drop_last=drop_last, block_shards=block_shards,
                         prefetch_shards=prefetch_shards)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        get = self.dataset.get_batch
        return self._iterate(lambda batches: (get(b) for b in batches))


class _ColumnarView:
    """What torch's fetcher sees: ``__getitems__`` returns one dict of stacked columns."""

    def __init__(self, dataset: ShardedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.dataset[i]

    def __getitems__(self, indices: Any) -> Dict[str, Any]:
        return self.dataset.get_batch(indices)


def collate_columns(batch: Dict[str, Any]) -> Dict[str, Any]:
    """Stacked NumPy columns -> torch tensors (one ``from_numpy`` per column); lists stay."""
    torch = require("torch", "ElasticDataLoader")
    out = {}
    for name, values in batch.items():
        if isinstance(values, np.ndarray):
            try:
                out[name] = torch.from_numpy(values)
            except TypeError:  # a dtype torch lacks
                out[name] = values
        else:
            out[name] = values
    return out


class ElasticDataLoader(_ElasticLoaderBase):
    """torch's DataLoader over the elastic sampler, with an exact, world-size-free position.

    ``state_dict()`` counts batches handed to the caller (not those workers prefetched), as
    the global position ``start + batches × world_size × batch_size`` (the tail moves it to
    the end of the epoch). Without ``collate_fn`` a batch is a dict of tensors built with one
    ``torch.from_numpy`` per column; with one, ``collate_fn`` gets a list of sample dicts.
    Other keyword arguments (``timeout``, ``worker_init_fn``, ``multiprocessing_context``,
    ``prefetch_factor``...) go to torch's DataLoader.
    """

    def __init__(self, dataset: ShardedDataset, batch_size: int, *, world: Optional[World] = None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 block_shards: int = 4, prefetch_shards: int = 2, num_workers: int = 0,
                 pin_memory: bool = False, collate_fn: Optional[Callable] = None,
                 **dataloader_kwargs: Any) -> None:
        require("torch", "ElasticDataLoader")
        super().__init__(dataset, batch_size, world=world, seed=seed, shuffle=shuffle,
                         drop_last=drop_last, block_shards=block_shards,
                         prefetch_shards=prefetch_shards)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.collate_fn = collate_fn
        self.dataloader_kwargs = dataloader_kwargs

    def __iter__(self) -> Iterator[Any]:
        torch = require("torch", "ElasticDataLoader")

        def produce(batches: Iterable[np.ndarray]) -> Iterator[Any]:
            columnar = self.collate_fn is None
            loader = torch.utils.data.DataLoader(
                _ColumnarView(self.dataset) if columnar else self.dataset,
                batch_sampler=_OneShot(batches), num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                collate_fn=collate_columns if columnar else self.collate_fn,
                **self.dataloader_kwargs)
            return iter(loader)

        return self._iterate(produce)


class _OneShot:
    """A batch sampler over one pass of precomputed index batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self._batches)
