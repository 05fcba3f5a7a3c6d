"""The staging slot, which doubles as the node-local memory tier.

``save()`` copies the state into one memory-mapped slot; the background writer persists it
from there. When the slot is a file in node-local shared memory (``/dev/shm``), it outlives the
process: a worker restarted on the same node finds the last snapshot there and loads it at
memory speed. The slot's ``slot.json`` is removed before the slot is overwritten and written
(atomically) only once a copy is complete, so a process killed mid-copy leaves no snapshot
that claims to be whole.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from typing import Any, Dict, Optional


from ._storage import alloc_bytes

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
        if nbytes > self.capacity or self._map is None:
            self._unmap()
            size = max(nbytes, 1)
            size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            if self.directory is not None:
                os.makedirs(self.directory, exist_ok=True)
                if self._fd is None:
                    self._fd = os.open(os.path.join(self.directory, _DATA),
                                       os.O_RDWR | os.O_CREAT, 0o600)
                os.ftruncate(self._fd, size)
                self._map = mmap.mmap(self._fd, size)
            else:
                self._map = mmap.mmap(-1, size)
            self.capacity = size
        return memoryview(self._map)

    def commit(self, meta: Dict[str, Any]) -> None:
        """Mark the slot's contents as a whole snapshot described by ``meta``."""
        if self.directory is None:
            return
        path = os.path.join(self.directory, _META)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, path)

    def invalidate(self) -> None:
        if self.directory is not None:
            try:
                os.unlink(os.path.join(self.directory, _META))
            except FileNotFoundError:
                pass

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


def read_snapshot(directory: str) -> Optional[tuple]:
    """``(meta, data)`` of the snapshot in ``directory``, or None if there is no whole one."""
    try:
        with open(os.path.join(directory, _META)) as f:
            meta = json.load(f)
        nbytes = int(meta["data_bytes"])
        buf = alloc_bytes(nbytes)
        with open(os.path.join(directory, _DATA), "rb", buffering=0) as f:
            view = memoryview(buf)
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    return None
                got += n
    except (OSError, ValueError, KeyError):
        return None
    return meta, buf


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
