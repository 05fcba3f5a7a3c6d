"""Elastic loaders: torch's DataLoader (workers, pinned memory, collate) and plain NumPy,
over the elastic sampler, with shard prefetch into the node cache and an exact position."""
from __future__ import annotations

import bisect
import collections
import logging
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from elastic.lazy import require
from elastic.world import World

from .dataset import ShardedDataset
from .sampler import ElasticSampler

__all__ = ["ElasticDataLoader", "ElasticNumpyLoader"]

log = logging.getLogger("dataload")


class _Filler(threading.Thread):
    """Fills shards into the node cache in the background, in the order asked.

    One per loader, started on the first miss the lookahead finds and gone after ``idle_s``
    without work: while every shard is cached no thread runs, so the reader never waits for
    the GIL behind one (under load the holder can be preempted for a whole time slice).
    """

    def __init__(self, dataset: ShardedDataset, idle_s: float = 10.0) -> None:
        super().__init__(name="dataload-prefetch", daemon=True)
        self._dataset = dataset
        self._idle_s = idle_s
        self._cond = threading.Condition()
        self._queue: Deque[Tuple[int, int]] = collections.deque()
        self._exited = False

    def submit(self, pass_id: int, k: int) -> bool:
        """Queue shard ``k``; ``False`` when the thread has exited (make a new one)."""
        with self._cond:
            if self._exited:
                return False
            self._queue.append((pass_id, k))
            self._cond.notify()
            return True

    def cancel(self, pass_id: int) -> None:
        """Drop what a finished or abandoned pass still had queued."""
        with self._cond:
            self._queue = collections.deque(q for q in self._queue if q[0] != pass_id)

    def run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self._idle_s
                while not self._queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._exited = True
                        return
                    self._cond.wait(timeout=left)
                _pass_id, k = self._queue.popleft()
            try:
                self._dataset.prefetch(k)
            except Exception as exc:  # the reader meets the same error and raises it
                log.warning("prefetch of shard %d failed: %s", k, exc)


class _Lookahead:
    """Has the shards this rank reads next filled ``depth`` shards ahead of the reader.

    It plans from the sampler's shard runs (where the order moves to other shards), in the
    reader's thread: a batch costs one integer compare; entering a run costs one ``stat`` per
    shard it newly looks after, and a missing shard goes to the background filler.
    """

    def __init__(self, loader: "_ElasticLoaderBase", runs: Tuple[List[int], List[List[int]]],
                 position: int, depth: int, pass_id: int) -> None:
        self._loader = loader
        self._dataset = loader.dataset
        self._depth = depth
        self.pass_id = pass_id
        self._starts, shards = runs
        self._seq: List[int] = []  # shards in run order
        self._run_at: List[int] = []  # where each run begins in _seq
        for run in shards:
            self._run_at.append(len(self._seq))
            self._seq.extend(run)
        # Runs wholly before the position were read before this pass: never ask for them.
        current = max(bisect.bisect_right(self._starts, position) - 1, 0)
        self._asked = self._run_at[current] if self._run_at else 0
        self._entered = current  # runs that begin before the reader's next batch
        self._next_start = self._starts[current] if self._starts else sys.maxsize

    def at_span(self, a: int, b: int) -> None:
        """The reader is about to read positions ``[a, b)`` of the order."""
        if b <= self._next_start:
            return
        while self._entered < len(self._starts) and self._starts[self._entered] < b:
            self._entered += 1
        started = self._run_at[self._entered] if self._entered < len(self._starts) \
            else len(self._seq)
        want = min(started + self._depth, len(self._seq))
        for i in range(self._asked, want):
            if not self._dataset.is_cached(self._seq[i]):
                self._loader._submit_fill(self.pass_id, self._seq[i])
        self._asked = max(self._asked, want)
        self._next_start = self._starts[self._entered] if self._entered < len(self._starts) \
            else sys.maxsize


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
        self._filler: Optional[_Filler] = None
        self._passes = 0

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
        lookahead = None
        runs = s.shard_runs()
        if self.prefetch_shards > 0 and runs is not None and \
                getattr(self.dataset, "cache", None) is not None:
            self._passes += 1
            lookahead = _Lookahead(self, runs, start, self.prefetch_shards, self._passes)
        try:
            batches = self._batches(order, s.slices(), lookahead)
            for k, batch in enumerate(produce(batches)):
                if mine != self._gen:
                    return
                s.advance(min(start + (k + 1) * step, n))
                yield batch
                if mine != self._gen:
                    return
            if mine == self._gen:
                s.finish_epoch()
        finally:
            if lookahead is not None and self._filler is not None:
                self._filler.cancel(lookahead.pass_id)

    @staticmethod
    def _batches(order: np.ndarray, slices: Iterator[Tuple[int, int, int]],
                 lookahead: Optional[_Lookahead]) -> Iterator[np.ndarray]:
        for a, b, _after in slices:
            if lookahead is not None:
                lookahead.at_span(a, b)
            yield order[a:b]

    def _submit_fill(self, pass_id: int, k: int) -> None:
        if self._filler is None or not self._filler.submit(pass_id, k):
            self._filler = _Filler(self.dataset)  # first miss, or the last one idled out
            self._filler.submit(pass_id, k)
            self._filler.start()


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
