"""fsspec helpers: URL -> (filesystem, path), created lazily and per process (fork-safe)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple

from elastic.lazy import require

from .errors import DatasetIndexError

__all__ = ["url_to_fs", "join", "is_local"]


def url_to_fs(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> Tuple[Any, str]:
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            require("s3fs", f"{protocol}:// URLs")
        raise DatasetIndexError(f"{url}: no filesystem for {protocol}:// ({exc})") from None
    except ValueError as exc:
        raise DatasetIndexError(f"{url}: {exc}") from None
    return fs, path.rstrip("/")


def join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


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
        self.__init__(state["url"], state["storage_options"])
