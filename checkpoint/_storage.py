"""Storage access: a local fast path (O_DIRECT, fsync, rename) and any other fsspec filesystem.

Two kinds of writes: *data files*, streamed from memory with a CRC32 computed on another
thread while the bytes go out, and *markers* (part files, manifests), published atomically:
locally a temp file, fsync, rename and fsync of the directory; on an object store one PUT.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import posixpath
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from elastic import fs as _efs
from elastic.fs import is_local, why

from ._crc import crc32, crc32_combine
from .errors import (CheckpointCorruptError, CheckpointError, CheckpointStorageError,
                     CheckpointURLError)

CHUNK_BYTES = 64 << 20
_READ_CHUNK = 16 << 20
_CRC_PART_BYTES = 32 << 20
_ALIGN = 4096


def open_url(url: Any, storage_options: Optional[dict]) -> Tuple[Any, str]:
    """``(filesystem, root)`` by :func:`elastic.fs.open_url`'s rules, with checkpoint errors."""
    return _efs.open_url(url, storage_options, what="checkpoint", bad_url=CheckpointURLError,
                         unavailable=CheckpointStorageError)


def _reads(method: Callable) -> Callable:
    """Storage failures of a read (unreachable, no credentials, no permission) become one
    :class:`CheckpointStorageError` naming the object; a missing object stays
    FileNotFoundError (callers decide what absence means), and our own errors pass."""

    @functools.wraps(method)
    def wrapper(self: "Storage", where: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, where, *args, **kwargs)
        except (FileNotFoundError, CheckpointError):
            raise
        except Exception as exc:
            if self.local and not isinstance(exc, OSError):
                raise  # a bug of ours, not the disk's
            path = where if isinstance(where, str) else where[0][0] if where else self.root
            raise CheckpointStorageError(f"{self.show(path)}: {why(exc)}") from exc

    return wrapper


class Storage:
    """A checkpoint root on one filesystem."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root
        self.local = is_local(fs)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.protocol = "file" if self.local else protocol

    def show(self, path: str) -> str:
        """``path`` as a URL a user recognises."""
        return path if self.local or "://" in path else f"{self.protocol}://{path}"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    # ----- listing
    @_reads
    def listdir(self, path: str) -> List[str]:
        """Base names in ``path`` ([] when it does not exist)."""
        if self.local:
            try:
                return os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            self.fs.invalidate_cache(path)
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    @_reads
    def exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    @_reads
    def size(self, path: str) -> Optional[int]:
        try:
            if self.local:
                return os.stat(path).st_size
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None

    def makedirs(self, path: str) -> None:
        if self.local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    @_reads
    def is_file(self, path: str) -> bool:
        if self.local:
            return os.path.isfile(path)
        try:
            return self.fs.isfile(path)
        except FileNotFoundError:
            return False

    # ----- small objects
    @_reads
    def read_bytes(self, path: str) -> bytes:
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def publish(self, path: str, data: bytes) -> None:
        """Atomically make ``path`` hold ``data``: readers see the old object or the new one."""
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    def remove(self, path: str) -> None:
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        try:
            if self.local:
                shutil.rmtree(path)
            else:
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    # ----- data files
    def write_data(self, path: str, header: bytes, chunks: Iterable[memoryview], aligned: bool,
                   crc_pool: ThreadPoolExecutor) -> Tuple[int, int]:
        """Write ``header`` then ``chunks`` to ``path`` durably; return ``(size, crc32)``.

        Locally, with ``aligned`` (page-aligned chunks that are multiples of 4 KiB but the last)
        the data bypasses the page cache (O_DIRECT), as ``dd oflag=direct`` does: that is
        what reaches the disk's sequential write speed here. The CRC runs on ``crc_pool``
        while the write is in flight (both release the GIL).
        """
        crc = [crc32(header)]

        def update(view: memoryview) -> None:
            crc[0] = crc32(view, crc[0])

        pending = []
        size = len(header)
        if not self.local:
            with self.fs.open(path, "wb") as f:
                f.write(header)
                for chunk in chunks:
                    pending.append(crc_pool.submit(update, chunk))
                    f.write(chunk)
                    size += len(chunk)
            for p in pending:
                p.result()
            return size, crc[0] & 0xFFFFFFFF
        fd, direct = _open_for_write(path, aligned)
        try:
            _write_all(fd, _aligned_copy(header) if direct else memoryview(header))
            for chunk in chunks:
                pending.append(crc_pool.submit(update, chunk))
                n = len(chunk)
                bulk = n - n % _ALIGN if direct else n
                if direct and bulk:
                    try:
                        _write_all(fd, chunk[:bulk])
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        direct = _clear_direct(fd)
                        os.lseek(fd, size, os.SEEK_SET)
                        _write_all(fd, chunk[:bulk])
                elif bulk:
                    _write_all(fd, chunk[:bulk])
                if bulk < n:
                    if direct:
                        direct = _clear_direct(fd)
                    _write_all(fd, chunk[bulk:])
                size += n
            os.fsync(fd)
        finally:
            os.close(fd)
            for p in pending:
                p.result()
        return size, crc[0] & 0xFFFFFFFF

    @_reads
    def read_many(self, specs: Sequence[Tuple[str, int, Optional[int]]], pool: ThreadPoolExecutor,
                  crc_pool: ThreadPoolExecutor) -> List[np.ndarray]:
        """Files ``(path, size, crc32)`` as uint8 arrays, sizes and CRC32s checked, in order.

        Locally each file is memory-mapped copy-on-write (``MAP_PRIVATE``) and checksummed in
        that one pass: the bytes come straight from the page cache, with no copy into fresh
        memory and no zeroing of it; the arrays built on the map are writable, and a write
        copies only the page it touches (as ``torch.load(mmap=True)`` and safetensors do). Our
        writers never change a file in place (a rewrite unlinks first), so a map keeps the
        bytes it verified. The CRC runs in chunks of :data:`_CRC_PART_BYTES` on all of
        ``pool``'s threads at once (chunk CRCs combine into the file's), so loading is not
        bound by one core's CRC speed. Elsewhere (object stores) a file is read
        in large chunks while ``crc_pool`` checksums the previous ones. The first bad file
        raises :class:`CheckpointCorruptError`.
        """
        if not self.local:
            return [self._read_stream(path, size, crc, crc_pool) for path, size, crc in specs]
        maps = [_map_file(path, size) for path, size, _ in specs]
        jobs = []
        for (_path, size, _), m in zip(specs, maps):
            if m is None:
                continue
            # Chunks in file order on a FIFO pool: the threads advance one sequential front
            # through the file, which the kernel's readahead serves as one stream.
            bounds = list(range(0, size, _CRC_PART_BYTES)) + [size]
            jobs.append([(bounds[k + 1] - bounds[k], pool.submit(_crc_range, m, bounds[k], bounds[k + 1]))
                         for k in range(len(bounds) - 1)])
        out: List[np.ndarray] = []
        try:
            it = iter(jobs)
            for (path, size, expect), m in zip(specs, maps):
                if m is None:  # cannot be mapped: read it
                    out.append(self._read_stream(path, size, expect, crc_pool))
                    continue
                crc = 0
                for length, job in next(it):
                    crc = crc32_combine(crc, job.result(), length)
                _check_crc(path, crc, expect)
                m.madvise(mmap.MADV_NORMAL)  # the tensors on it are used at random from now on
                out.append(np.frombuffer(m, dtype=np.uint8))
        finally:
            for parts in jobs:  # never leave a thread reading a map we drop on an error
                for _, job in parts:
                    job.cancel() or job.exception()
        return out

    @_reads
    def _read_stream(self, path: str, expect_size: int, expect_crc: Optional[int],
                     crc_pool: ThreadPoolExecutor) -> np.ndarray:
        buf = alloc_bytes(expect_size)
        view = buf.data
        crc = [0]

        def update(v: memoryview) -> None:
            crc[0] = crc32(v, crc[0])

        pending = []
        got = 0
        try:
            if self.local:
                f = open(path, "rb", buffering=0)
            else:
                f = self.fs.open(path, "rb", block_size=CHUNK_BYTES, cache_type="none")
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path}: missing") from None
        try:
            with f:
                if self.local:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while got < expect_size:
                    part = view[got:got + _READ_CHUNK]
                    n = f.readinto(part)
                    if not n:
                        break
                    pending.append(crc_pool.submit(update, part[:n]))
                    got += n
                extra = f.read(1)
        finally:
            for p in pending:
                p.result()
        _check_size(path, got, expect_size, bool(extra))
        _check_crc(path, crc[0], expect_crc)
        return buf


def _check_size(path: str, got: int, expect_size: int, extra: bool = False) -> None:
    if got != expect_size or extra:
        raise CheckpointCorruptError(
            f"{path}: truncated or resized ({'more than ' if extra else ''}{got} bytes, "
            f"manifest says {expect_size})")


def _check_crc(path: str, crc: int, expect_crc: Optional[int]) -> None:
    if expect_crc is not None and (crc & 0xFFFFFFFF) != expect_crc:
        raise CheckpointCorruptError(
            f"{path}: checksum mismatch (crc32 {crc & 0xFFFFFFFF:08x}, manifest says "
            f"{expect_crc:08x})")


def _map_file(path: str, expect_size: int) -> Optional[mmap.mmap]:
    """``path`` mapped copy-on-write, its size checked, or None where it cannot be mapped
    (an empty file, a filesystem without mmap): the caller then reads it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path}: missing") from None
    try:
        size = os.fstat(fd).st_size
        _check_size(path, size, expect_size, size > expect_size)
        if size == 0:
            return None
        try:
            m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None
    finally:
        os.close(fd)
    # Sequential: each fault reads a whole readahead window ahead of the CRC walking the pages.
    m.madvise(mmap.MADV_SEQUENTIAL)
    return m


def _crc_range(m: mmap.mmap, begin: int, end: int) -> int:
    view = memoryview(m)
    crc = 0
    try:
        for start in range(begin, end, CHUNK_BYTES):
            crc = crc32(view[start:min(end, start + CHUNK_BYTES)], crc)
    finally:
        view.release()
    return crc


def alloc_bytes(nbytes: int) -> np.ndarray:
    """A fresh uint8 buffer to read a file into (one place to tune allocation; transparent
    huge pages were tried and measured no faster here)."""
    return np.empty(nbytes, dtype=np.uint8)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_for_write(path: str, aligned: bool) -> Tuple[int, bool]:
    # A fresh inode, never the old file truncated: a reader may hold the old one mapped.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if aligned and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # the filesystem (tmpfs, ...) refuses O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def _clear_direct(fd: int) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    return False


def _aligned_copy(data: bytes) -> memoryview:
    """``data`` in page-aligned memory (O_DIRECT needs aligned buffers)."""
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]
