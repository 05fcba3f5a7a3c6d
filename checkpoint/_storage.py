"""Storage access: a local fast path (O_DIRECT, fsync, rename) and any other fsspec filesystem.

Two kinds of writes: *data files*, streamed from memory with a CRC32 computed on another
thread while the bytes go out, and *markers* (part files, manifests), published atomically:
locally a temp file, fsync, rename and fsync of the directory; on an object store one PUT.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import posixpath
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, List, Optional, Tuple

import numpy as np

from .errors import CheckpointCorruptError, CheckpointURLError

CHUNK_BYTES = 64 << 20
_READ_CHUNK = 16 << 20
_ALIGN = 4096


def open_url(url: str, storage_options: Optional[dict]) -> Tuple[Any, str]:
    """``(filesystem, root path)`` for ``url``; bad URLs and missing extras become one line."""
    if not isinstance(url, str) or not url.strip():
        raise CheckpointURLError(f"checkpoint URL must be a non-empty string, got {url!r}")
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            from elastic.errors import MissingExtraError

            raise MissingExtraError("s3fs", "s3", f"checkpoints on {protocol}:// URLs") from exc
        raise CheckpointURLError(f"{url}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointURLError(f"bad checkpoint URL {url!r}: {exc}") from exc
    root = root.rstrip("/") or root
    return fs, root


def is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class Storage:
    """A checkpoint root on one filesystem."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root
        self.local = is_local(fs)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.local else os.path.join(self.root, *parts)

    # ----- listing
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

    def exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

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

    def is_file(self, path: str) -> bool:
        if self.local:
            return os.path.isfile(path)
        try:
            return self.fs.isfile(path)
        except FileNotFoundError:
            return False

    # ----- small objects
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
        crc = [zlib.crc32(header)]

        def update(view: memoryview) -> None:
            crc[0] = zlib.crc32(view, crc[0])

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

    def read_data(self, path: str, expect_size: int, expect_crc: Optional[int],
                  crc_pool: ThreadPoolExecutor) -> np.ndarray:
        """Read a whole file into a new uint8 array, checking its size and CRC32."""
        buf = alloc_bytes(expect_size)
        view = memoryview(buf)
        crc = [0]

        def update(v: memoryview) -> None:
            crc[0] = zlib.crc32(v, crc[0])

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
                if self.local:  # ask the kernel to read ahead while we copy and checksum
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while got < expect_size:
                    part = view[got:got + _READ_CHUNK]
                    if self.local:
                        os.posix_fadvise(f.fileno(), got + _READ_CHUNK, 2 * _READ_CHUNK,
                                         os.POSIX_FADV_WILLNEED)
                    n = f.readinto(part)
                    if not n:
                        break
                    pending.append(crc_pool.submit(update, part[:n]))
                    got += n
                extra = f.read(1)
        finally:
            for p in pending:
                p.result()
        if got != expect_size or extra:
            raise CheckpointCorruptError(
                f"{path}: truncated or resized ({'more than ' if extra else ''}{got} bytes, "
                f"manifest says {expect_size})")
        if expect_crc is not None and (crc[0] & 0xFFFFFFFF) != expect_crc:
            raise CheckpointCorruptError(
                f"{path}: checksum mismatch (crc32 {crc[0] & 0xFFFFFFFF:08x}, manifest says "
                f"{expect_crc:08x})")
        return buf


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
