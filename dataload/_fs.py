"""Dataset filesystems: made lazily and per process (fork-safe), by :mod:`elastic.fs`'s rules."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple

from elastic import fs as _efs
from elastic.fs import is_local

from .errors import DataLoadError, DatasetIndexError

__all__ = ["url_to_fs", "join", "is_local"]


def url_to_fs(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> Tuple[Any, str]:
    """``(filesystem, root)`` by :func:`elastic.fs.open_url`'s rules, with dataload's errors."""
    return _efs.open_url(url, storage_options, what="dataset", bad_url=DatasetIndexError,
                         unavailable=DataLoadError)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if root else name


class LazyFS:
    """A filesystem made on first use in each process (fsspec clients do not survive fork)."""

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._pid = -1
        self._fs: Any = None
        self.root = ""

    def get(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self.root = url_to_fs(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        # Torch workers under spawn copy the dataset; the client is rebuilt on the other side.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        LazyFS.__init__(self, state["url"], state["storage_options"])
