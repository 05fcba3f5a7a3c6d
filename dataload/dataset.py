"""A map-style dataset over shards on any fsspec URL, read directly or through the cache."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, overload

import numpy as np

from ._fs import LazyFS, is_local, join
from .api import INDEX_NAME, Column, DatasetIndex, ShardInfo
from .cache import ShardCache
from .errors import ChecksumError, DatasetIndexError
from .formats import DecodedShard, get_format

__all__ = ["ShardedDataset"]

log = logging.getLogger("dataload")


class ShardedDataset:
    """Samples of a sharded dataset by global index (``dataset[i]`` -> dict of columns).

    With a ``cache`` (or ``cache_dir`` + ``cache_max_bytes``) shards are filled into the
    node-local :class:`ShardCache` and read from there; without one, they are read straight
    from ``url`` (verified against the index unless the URL is local). Each process keeps
    up to ``max_open_shards`` shards open (``.npz`` shards are memory-mapped: the node's page
    cache holds them once for all processes). A cache hit is verified at fill time only; the
    LRU touch is per shard, at most once per ``touch_interval_s`` per process, so reopening a
    shard costs what reading a local file costs.
    """

    touch_interval_s = 10.0

    def __init__(self, url: str, *, storage_options: Optional[Mapping[str, Any]] = None,
                 cache: Optional[ShardCache] = None, cache_dir: Optional[str] = None,
                 cache_max_bytes: Union[int, str, None] = None, verify: bool = True,
                 max_open_shards: int = 8) -> None:
        self.url = url
        self._fs = LazyFS(url, storage_options)
        fs = self._fs.get()
        index_path = join(self._fs.root, INDEX_NAME)
        try:
            text = fs.cat_file(index_path).decode("utf-8")
        except FileNotFoundError:
            raise DatasetIndexError(f"no dataset at {url} ({INDEX_NAME} not found)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetIndexError(f"cannot read {url}/{INDEX_NAME}: {exc}") from None
        self.index = DatasetIndex.from_json(text, where=f"{url}/{INDEX_NAME}")
        self.format = get_format(self.index.shard_format)
        if cache is None and cache_dir is not None:
            if cache_max_bytes is None:
                raise DatasetIndexError("cache_dir needs cache_max_bytes (e.g. '20GiB')")
            cache = ShardCache(cache_dir, cache_max_bytes)
        self.cache = cache
        self.verify = verify
        self.max_open_shards = max(1, int(max_open_shards))
        sizes = np.asarray(self.index.shard_sizes, dtype=np.int64)
        self._ends = np.cumsum(sizes)
        self._starts = self._ends - sizes
        # Writers make equal shards but the last: then a shard number is one division.
        uniform = len(sizes) > 0 and sizes[0] > 0 and bool((sizes[:-1] == sizes[0]).all()) \
            and sizes[-1] <= sizes[0]
        self._per_shard = int(sizes[0]) if uniform else 0
        self._open: "OrderedDict[int, DecodedShard]" = OrderedDict()
        self._pid = os.getpid()
        self._progress_set = False
        self._touched: Dict[int, Tuple[float, str]] = {}  # shard -> (when found, cache path)

    # -- facts -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def columns(self) -> Sequence[Column]:
        return self.index.columns

    @property
    def shards(self) -> Sequence[ShardInfo]:
        return self.index.shards

    @overload
    def shard_of(self, indices: int) -> Union[int, np.integer]: ...
    @overload
    def shard_of(self, indices: np.ndarray) -> np.ndarray: ...
    def shard_of(self, indices: Union[int, np.ndarray]) -> Union[int, np.integer, np.ndarray]:
        """The shard number that holds each global sample index."""
        if self._per_shard:
            return indices // self._per_shard
        return np.searchsorted(self._ends, indices, side="right")

    # -- samples -----------------------------------------------------------------------
    def __getitem__(self, i: int) -> Dict[str, Any]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n}")
        k = int(self.shard_of(i))
        return self._shard(k).row(i - int(self._starts[k]))

    def __getitems__(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        """Torch's batched fetch: a list of sample dicts, read one shard at a time."""
        batch = self.get_batch(indices)
        names = list(batch)
        return [{name: batch[name][j] for name in names} for j in range(len(indices))]

    def get_batch(self, indices: Union[Sequence[int], np.ndarray]) -> Dict[str, Any]:
        """Columns of the samples ``indices``, in that order: arrays stacked, others listed."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range for a dataset of {len(self)}")
        shard_ids = self.shard_of(idx)
        if not idx.size or shard_ids[0] == shard_ids[-1] and (shard_ids == shard_ids[0]).all():
            k = int(shard_ids[0]) if idx.size else 0
            return self._shard(k).take(idx - self._starts[k])
        # Several shards: gather from each, scattered straight into the batch's place.
        by_shard = np.argsort(shard_ids, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_ids[by_shard])) + 1
        out: Dict[str, Any] = {}
        for sel in np.split(by_shard, cuts):
            k = int(shard_ids[sel[0]])
            piece = self._shard(k).take(idx[sel] - self._starts[k])
            for name, values in piece.items():
                if isinstance(values, np.ndarray):
                    dest = out.get(name)
                    if dest is None:
                        dest = out[name] = np.empty((len(idx),) + values.shape[1:], values.dtype)
                    dest[sel] = values
                else:
                    dest = out.setdefault(name, [None] * len(idx))
                    for j, v in zip(sel.tolist(), values):
                        dest[j] = v
        return out

    # -- shards ------------------------------------------------------------------------
    def _shard(self, k: int) -> DecodedShard:
        if self._pid != os.getpid():  # a forked worker starts with its own set
            self._open.clear()
            self._pid = os.getpid()
        shard = self._open.get(k)
        if shard is not None:
            self._open.move_to_end(k)
            return shard
        shard = self._load(k)
        self._open[k] = shard
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return shard

    def prefetch(self, k: int) -> None:
        """Make sure shard ``k`` is in the node cache (a no-op without a cache)."""
        if self.cache is not None:
            self._cached_path(k)

    def is_cached(self, k: int) -> bool:
        """Whether shard ``k`` is in the node cache (``True`` without a cache: nothing to
        fill); one this process found there within ``touch_interval_s`` counts without a
        ``stat`` (if another process evicted it since, the reader fills it again)."""
        return self.cache is None or self._recent_path(k) is not None or \
            self.cache.contains(self.index.shards[k], self.format.suffix)

    def _recent_path(self, k: int) -> Optional[str]:
        """The cache path of shard ``k`` if this process found it there (and touched it for
        LRU) within ``touch_interval_s``: reopening it then costs no lookup at all."""
        hit = self._touched.get(k)
        if hit is not None and time.monotonic() - hit[0] < self.touch_interval_s:
            return hit[1]
        return None

    def _cached_path(self, k: int) -> str:
        info = self.index.shards[k]
        assert self.cache is not None
        if not self._progress_set and self.cache.progress is not None:
            self._progress_set = True
            missing = [s for s in self.index.shards if self.cache.get(s, self.format.suffix) is None]
            if missing:
                self.cache.progress.expect(len(missing), sum(s.size_bytes for s in missing))
        fs = self._fs.get()
        path = join(self._fs.root, info.name)
        local = self.cache.fetch(info, lambda: fs.open(path, "rb"), self.format.suffix)
        self._touched[k] = (time.monotonic(), local)
        return local

    def _load(self, k: int) -> DecodedShard:
        info = self.index.shards[k]
        if self.cache is not None:
            for _ in range(3):
                path = self._recent_path(k) or self._cached_path(k)
                try:
                    return self.format.decode(path, self.index.columns)
                except FileNotFoundError:  # evicted by another process: fill again
                    self._touched.pop(k, None)
            raise DatasetIndexError(f"shard {info.name} keeps being evicted: the cache is too "
                                    "small for the shards in use")
        fs = self._fs.get()
        path = join(self._fs.root, info.name)
        if is_local(fs):
            return self.format.decode(path, self.index.columns)
        data = fs.cat_file(path)
        if self.verify:
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != info.size_bytes or digest != info.sha256:
                raise ChecksumError(f"shard {info.name}: {len(data)} bytes with sha256 "
                                    f"{digest[:12]}…, the index says {info.size_bytes} bytes, "
                                    f"{info.sha256[:12]}…")
        return self.format.decode(data, self.index.columns)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        state["_touched"] = {}
        return state

