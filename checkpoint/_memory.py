"""The staging slot, which doubles as the node-local memory tier.

``save()`` copies the state into one memory-mapped slot; the background writer persists it
from there. When the slot is a file in node-local shared memory (``/dev/shm``), it outlives the
process: a worker restarted on the same node finds the last snapshot there and loads it at
memory speed. The slot's ``slot.json`` is removed before the slot is overwritten and written
(atomically) only once a copy is complete, so a process killed mid-copy leaves no snapshot
that claims to be whole.

A restarted worker maps the snapshot copy-on-write instead of copying it, and holds a shared
``flock`` on the slot file for as long as that map lives. A writer takes the lock exclusively
while it fills the slot; when a reader holds the file, the writer leaves it to the reader and
fills a new file in its place, so loaded tensors never change under their owner.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import weakref
from typing import Any, Dict, Optional

import numpy as np

from elastic.locks import try_lock

DEFAULT_MEMORY_DIR = "/dev/shm/elastic-run"
_META = "slot.json"
_DATA = "slot.bin"


def memory_dir_default() -> Optional[str]:
    env = os.environ.get("ELASTIC_CKPT_MEMORY_DIR")
    if env:
        return env
    return DEFAULT_MEMORY_DIR if os.path.isdir("/dev/shm") else None


def slot_dir(memory_dir: str, run_id: str, url_key: str, rank: int) -> str:
    digest = hashlib.sha1(url_key.encode()).hexdigest()[:16]
    return os.path.join(memory_dir, _safe(run_id), digest, f"rank-{rank:05d}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "run"


class Slot:
    """A growable memory-mapped byte buffer: a shared-memory file, or anonymous memory."""

    def __init__(self, directory: Optional[str]) -> None:
        self.directory = directory
        self._fd: Optional[int] = None
        self._map: Optional[mmap.mmap] = None
        self.capacity = 0

    @property
    def persistent(self) -> bool:
        return self.directory is not None

    def reserve(self, nbytes: int) -> memoryview:
        """A writable view of at least ``nbytes``; invalidates any snapshot the slot held."""
        self.invalidate()
        if self.directory is not None and self._fd is not None and not try_lock(self._fd):
            self._release_file()  # a reader maps the snapshot in it: it is theirs now
        if nbytes > self.capacity or self._map is None:
            self._unmap()
            size = max(nbytes, 1)
            size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            if self.directory is not None:
                os.makedirs(self.directory, exist_ok=True)
                if self._fd is None:
                    self._fd = self._open_locked()
                os.ftruncate(self._fd, size)
                self._map = mmap.mmap(self._fd, size)
            else:
                self._map = mmap.mmap(-1, size)
            self.capacity = size
        return memoryview(self._map)

    def _open_locked(self) -> int:
        """The slot file, locked exclusively; a file a reader holds is replaced by a new one."""
        assert self.directory is not None  # only a shared-memory slot has a file
        path = os.path.join(self.directory, _DATA)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if try_lock(fd):
                return fd
            os.close(fd)
            _unlink(path)

    def _release_file(self) -> None:
        self._unmap()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        assert self.directory is not None
        _unlink(os.path.join(self.directory, _DATA))
        self.capacity = 0

    def commit(self, meta: Dict[str, Any]) -> None:
        """Mark the slot's contents as a whole snapshot described by ``meta``; readers may
        map it from now on."""
        if self.directory is None or self._fd is None:
            return
        path = os.path.join(self.directory, _META)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:  # dumps: the C encoder (dump streams through the Python one)
            f.write(json.dumps({**meta, "inode": os.fstat(self._fd).st_ino}, separators=(",", ":")))
        os.replace(tmp, path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def invalidate(self) -> None:
        if self.directory is not None:
            _unlink(os.path.join(self.directory, _META))

    def _unmap(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive (a pending write); let GC close it
                pass
            self._map = None

    def close(self) -> None:
        self._unmap()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.capacity = 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_snapshot(directory: str) -> Optional[tuple]:
    """``(meta, data)`` of the whole snapshot in ``directory``, or None if there is none.

    ``data`` is a uint8 array on a copy-on-write map of the slot file (no copy), which holds a
    shared lock on the file until the last array on it is gone.
    """
    try:
        fd = os.open(os.path.join(directory, _DATA), os.O_RDONLY)
    except OSError:
        return None
    try:
        if not try_lock(fd, shared=True):  # a writer is filling it
            os.close(fd)
            return None
        with open(os.path.join(directory, _META)) as f:
            meta = json.load(f)
        nbytes = int(meta["data_bytes"])
        st = os.fstat(fd)
        if meta.get("inode") != st.st_ino or st.st_size < nbytes:
            os.close(fd)  # the description of another (newer) file
            return None
        if nbytes == 0:
            os.close(fd)
            return meta, np.empty(0, np.uint8)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, KeyError, TypeError):
        os.close(fd)
        return None
    weakref.finalize(m, os.close, fd)  # the lock lasts as long as the map
    return meta, np.frombuffer(m, dtype=np.uint8)


def remove_snapshot(directory: str) -> None:
    for name in (_META, _DATA):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
