"""The node-local shard cache: size-bounded (LRU), shared by every process on the node.

Layout under ``cache_dir``::

    shards/<sha256><suffix>            complete, verified shards (content-addressed)
    tmp/<sha256>.<size>.<pid>.<n>.part  fills in progress
    locks/<sha256>.lock                one flock per shard: one filler at a time
    cache.lock                         flock held while space is reserved and evicted

A fill takes the shard's lock, streams the shard into a ``.part`` file while hashing it,
checks size and SHA-256 against the index, then renames it into ``shards/``: a reader sees
a complete, verified file or none. A filler killed midway leaves a ``.part`` file and drops
its lock (the kernel releases flocks of dead processes); the next filler deletes it and
fills again. Space is reserved before a fill, counting fills in progress, so the files under
``cache_dir`` never exceed ``max_bytes``. Hits touch the file's atime, which orders eviction
(the mtime stays: readers key what they parsed of a file by it).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Callable, Iterator, List, Optional, Tuple, Union

from elastic import locks
from elastic.errors import ConfigError

from .api import ShardInfo
from .errors import CacheError, CacheTooSmallError, ChecksumError

__all__ = ["ShardCache", "FillStats", "FillProgress", "parse_size"]

log = logging.getLogger("dataload")
_CHUNK = 4 << 20
_counter = itertools.count()


@dataclass(frozen=True)
class FillStats:
    """Progress of cache fills in this process (``*_total`` when the dataset size is known)."""

    shards_done: int
    bytes_done: int
    elapsed_s: float
    shards_total: Optional[int] = None
    bytes_total: Optional[int] = None

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        mib = 1 << 20
        shards = f"{self.shards_done}" + (f"/{self.shards_total}" if self.shards_total else "")
        size = f"{self.bytes_done / mib:.1f}" + (f"/{self.bytes_total / mib:.1f}"
                                                 if self.bytes_total else "")
        line = f"cache fill: {shards} shards, {size} MiB, {self.bytes_per_s / mib:.1f} MiB/s"
        if self.bytes_total and self.bytes_per_s > 0 and self.bytes_done < self.bytes_total:
            line += f", eta {(self.bytes_total - self.bytes_done) / self.bytes_per_s:.0f} s"
        return line


def _default_report(stats: FillStats) -> None:
    line = stats.describe()
    if logging.getLogger().hasHandlers() or log.hasHandlers():
        log.info("%s", line)
    else:  # logging is not configured: a person still sees the first fill move
        print(f"dataload: {line}", file=sys.stderr, flush=True)


class FillProgress:
    """Counts fill bytes and shards; reports at most every ``interval_s`` and at the end."""

    def __init__(self, report: Optional[Callable[[FillStats], None]] = _default_report,
                 interval_s: float = 2.0) -> None:
        self._report = report
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._start: Optional[float] = None
        self._last = 0.0
        self._shards = 0
        self._bytes = 0
        self._shards_total: Optional[int] = None
        self._bytes_total: Optional[int] = None

    def expect(self, shards_total: int, bytes_total: int) -> None:
        with self._lock:
            self._shards_total, self._bytes_total = shards_total, bytes_total

    def stats(self) -> FillStats:
        elapsed = 0.0 if self._start is None else time.monotonic() - self._start
        return FillStats(self._shards, self._bytes, elapsed, self._shards_total, self._bytes_total)

    def add(self, nbytes: int, shard_done: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self._start is None:
                self._start = self._last = now
            self._bytes += nbytes
            self._shards += int(shard_done)
            finished = shard_done and self._shards_total is not None \
                and self._shards == self._shards_total
            if self._report is None or not (finished or now - self._last >= self.interval_s):
                return
            self._last = now
            stats = self.stats()
        self._report(stats)


def parse_size(text: Union[str, int]) -> int:
    """``'512MiB'``, ``'20GB'``, ``'1.5G'`` or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
             ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
             ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)]
    for suffix, mult in units:
        if s.endswith(suffix):
            s, factor = s[: -len(suffix)], mult
            break
    else:
        factor = 1
    try:
        value = float(s)
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (try 512MiB or 20GB)") from None
    if value < 0:
        raise ConfigError(f"not a size: {text!r}")
    return int(value * factor)


class ShardCache:
    """A size-bounded, multi-process, crash-safe cache of verified shards in ``cache_dir``."""

    def __init__(self, cache_dir: str, max_bytes: Union[int, str], *,
                 progress: Union[bool, FillProgress, Callable[[FillStats], None], None] = True,
                 lock_timeout_s: float = 600.0, durable: bool = True) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.max_bytes = parse_size(max_bytes)
        if self.max_bytes <= 0:
            raise CacheTooSmallError(f"cache size must be positive, got {max_bytes!r}")
        self.lock_timeout_s = lock_timeout_s
        self.durable = durable
        if isinstance(progress, FillProgress):
            self.progress: Optional[FillProgress] = progress
        elif progress is True:
            self.progress = FillProgress()
        elif callable(progress):
            self.progress = FillProgress(progress)
        else:
            self.progress = None
        for sub in ("shards", "tmp", "locks"):
            os.makedirs(os.path.join(self.cache_dir, sub), exist_ok=True)

    # -- lookups -----------------------------------------------------------------------
    def path_for(self, info: ShardInfo, suffix: str = "") -> str:
        return os.path.join(self.cache_dir, "shards", info.sha256 + suffix)

    def get(self, info: ShardInfo, suffix: str = "") -> Optional[str]:
        """The local path of a complete shard, touched for LRU, or ``None``."""
        path = self.path_for(info, suffix)
        try:
            st = os.stat(path)
            if st.st_size != info.size_bytes:
                return None
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:
            return None
        return path

    def contains(self, info: ShardInfo, suffix: str = "") -> bool:
        """Whether a complete copy of ``info`` is here (one ``stat``; LRU order unchanged)."""
        try:
            return os.stat(self.path_for(info, suffix)).st_size == info.size_bytes
        except FileNotFoundError:
            return False

    def usage_bytes(self) -> int:
        """Bytes held: complete shards plus fills in progress (what the bound applies to)."""
        finals, parts = self._scan()
        return sum(size for _, size, _ in finals) + sum(size for _, size in parts)

    # -- fills -------------------------------------------------------------------------
    def fetch(self, info: ShardInfo, open_source: Callable[[], IO[bytes]],
              suffix: str = "") -> str:
        """The local path of ``info``, filling it from ``open_source()`` on a miss.

        Concurrent callers (threads or processes) for one shard wait for a single fill.
        """
        hit = self.get(info, suffix)
        if hit is not None:
            return hit
        if info.size_bytes > self.max_bytes:
            raise CacheTooSmallError(
                f"shard {info.name} ({info.size_bytes} bytes) is larger than the whole cache "
                f"({self.max_bytes} bytes); raise the cache size")
        with self._shard_lock(info.sha256):
            hit = self.get(info, suffix)
            if hit is not None:
                return hit
            self._drop_stale_parts(info.sha256)
            last: Optional[BaseException] = None
            for _attempt in range(2):
                part = self._reserve(info)
                try:
                    self._fill(info, open_source, part)
                    final = self.path_for(info, suffix)
                    os.rename(part, final)
                    return final
                except (OSError, ChecksumError) as exc:
                    last = exc
                    _unlink(part)
                    log.warning("cache fill of %s failed (%s)%s", info.name, exc,
                                "; retrying" if _attempt == 0 else "")
            if isinstance(last, ChecksumError):
                raise last
            raise CacheError(f"could not fill shard {info.name}: {last}") from last

    def _fill(self, info: ShardInfo, open_source: Callable[[], IO[bytes]], part: str) -> None:
        digest = hashlib.sha256()
        size = 0
        with open(part, "r+b") as out, open_source() as src:
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                if size > info.size_bytes:
                    break
                if self.progress is not None:
                    self.progress.add(len(chunk))
            if size != info.size_bytes or digest.hexdigest() != info.sha256:
                raise ChecksumError(
                    f"shard {info.name}: got {size} bytes with sha256 {digest.hexdigest()[:12]}…,"
                    f" the index says {info.size_bytes} bytes, {info.sha256[:12]}…")
            out.flush()
            if self.durable:
                os.fsync(out.fileno())
        if self.progress is not None:
            self.progress.add(0, shard_done=True)

    # -- space -------------------------------------------------------------------------
    def _reserve(self, info: ShardInfo) -> str:
        """Evict LRU shards until ``info`` fits beside everything held, then create its part."""
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            with self._flock(os.path.join(self.cache_dir, "cache.lock")):
                finals, parts = self._scan(drop_stale=True)
                used = sum(s for _, s, _ in finals) + sum(s for _, s in parts)
                over = used + info.size_bytes - self.max_bytes
                for path, size, _atime in sorted(finals, key=lambda f: f[2]):
                    if over <= 0:
                        break
                    _unlink(path)
                    log.debug("evicted %s (%d bytes)", os.path.basename(path), size)
                    over -= size
                if over <= 0:
                    name = f"{info.sha256}.{info.size_bytes}.{os.getpid()}.{next(_counter)}.part"
                    part = os.path.join(self.cache_dir, "tmp", name)
                    os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                    return part
            if time.monotonic() > deadline:
                raise CacheError(f"no room for shard {info.name} within {self.lock_timeout_s}s:"
                                 " the cache is full of fills in progress")
            time.sleep(0.05)

    def _scan(self, drop_stale: bool = False
              ) -> Tuple[List[Tuple[str, int, float]], List[Tuple[str, int]]]:
        # Fills in progress first, then complete shards: a fill renamed from tmp/ to shards/
        # between the two listings is then counted twice (safe), never missed (over the bound).
        parts = []
        for entry in os.scandir(os.path.join(self.cache_dir, "tmp")):
            fields = entry.name.split(".")
            if len(fields) != 5 or fields[-1] != "part":
                continue
            sha, size = fields[0], int(fields[1])
            if drop_stale and self._is_free(sha):
                _unlink(entry.path)  # its filler died: nobody holds the shard's lock
                continue
            parts.append((entry.path, size))
        finals = []
        for entry in os.scandir(os.path.join(self.cache_dir, "shards")):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            finals.append((entry.path, st.st_size, st.st_atime))
        return finals, parts

    def _drop_stale_parts(self, sha: str) -> None:
        """With ``sha``'s lock held, any part file of it is a dead filler's."""
        for entry in os.scandir(os.path.join(self.cache_dir, "tmp")):
            if entry.name.startswith(sha + "."):
                _unlink(entry.path)

    # -- locks -------------------------------------------------------------------------
    def _lock_path(self, sha: str) -> str:
        return os.path.join(self.cache_dir, "locks", sha + ".lock")

    def _is_free(self, sha: str) -> bool:
        return locks.is_unlocked(self._lock_path(sha))

    @contextmanager
    def _shard_lock(self, sha: str) -> Iterator[None]:
        with self._flock(self._lock_path(sha), timeout_s=self.lock_timeout_s):
            yield

    @staticmethod
    def _flock(path: str, timeout_s: Optional[float] = None):
        return locks.exclusive(path, timeout_s, error=CacheError)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
