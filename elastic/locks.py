"""Advisory file locks (``flock``) shared by the node-local stores (checkpoint memory tier,
dataload cache).

``flock`` is what both need: the kernel drops a dead process's locks, so a crash never leaves
a lock behind, and a lock belongs to an open file, so a process can hold a map of a file and
its lock for exactly as long as the map lives.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Type

from .errors import ElasticError

__all__ = ["try_lock", "is_unlocked", "exclusive", "LockTimeoutError"]


class LockTimeoutError(ElasticError, TimeoutError):
    """A lock was not free within the time allowed."""


def try_lock(fd: int, shared: bool = False) -> bool:
    """Take ``fd``'s lock without waiting; False when another open file holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def is_unlocked(path: str) -> bool:
    """Whether nobody holds the lock file ``path`` (created when missing)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        return try_lock(fd)
    finally:
        os.close(fd)  # closing drops a lock we took


@contextmanager
def exclusive(path: str, timeout_s: Optional[float] = None,
              error: Type[Exception] = LockTimeoutError) -> Iterator[None]:
    """Hold the lock file ``path`` (created when missing) exclusively; wait at most
    ``timeout_s`` for it (None: as long as it takes), else raise ``error``."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            delay = 0.001
            while not try_lock(fd):
                if time.monotonic() > deadline:
                    raise error(f"timed out after {timeout_s}s waiting for {path}")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)
