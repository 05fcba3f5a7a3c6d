"""Opening an fsspec URL, once for every package that keeps files behind one (checkpoint, dataload).

fsspec is imported on first use. An object-store URL whose client is not installed becomes a
:class:`~elastic.errors.MissingExtraError` naming the extra; a malformed URL and a filesystem
that cannot start become the caller's own error classes, so each package keeps its documented
hierarchy while the rules (what a root is, what is local, what needs a bucket) live here.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple, Type

from .errors import ConfigError, ElasticError, MissingExtraError, one_line

__all__ = ["open_url", "is_local", "protocol_of", "why", "BUCKETED"]

# Object stores whose URLs must name a bucket (container) before any prefix.
BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
# Protocol -> (client module, setup.py extra) for the stores an extra of ours installs.
_CLIENTS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3")}


def protocol_of(url: str) -> str:
    """The URL's protocol; a plain path is ``file``."""
    return url.split("://", 1)[0] if "://" in url else "file"


def open_url(url: Any, storage_options: Optional[Mapping[str, Any]] = None, *,
             what: str = "storage", bad_url: Type[Exception] = ConfigError,
             unavailable: Type[Exception] = ElasticError) -> Tuple[Any, str]:
    """``(filesystem, root)`` for ``url`` (a string or a path object), the root without a
    trailing slash. ``what`` names the data in messages ("checkpoint", "dataset"); a bad URL
    raises ``bad_url``, a filesystem that fails to start (connect, libraries) ``unavailable``."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise bad_url(f"{what} URL must be a non-empty string or path, got {url!r}")
    from fsspec.core import url_to_fs

    protocol = protocol_of(url)
    try:
        fs, root = url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        if protocol in _CLIENTS:
            module, extra = _CLIENTS[protocol]
            raise MissingExtraError(module, extra, f"{what} on {protocol}:// URLs") from exc
        raise bad_url(f"{url}: no filesystem for {protocol}:// ({exc})") from exc
    except (ValueError, TypeError) as exc:
        raise bad_url(f"bad {what} URL {url!r}: {exc}") from exc
    except Exception as exc:  # the filesystem's own failure to start
        raise unavailable(f"{url}: cannot open the storage: {why(exc)}") from exc
    root = root.rstrip("/") or root
    if protocol in BUCKETED and not root.strip("/"):
        raise bad_url(f"{url}: names no bucket; use {protocol}://BUCKET[/PREFIX]")
    return fs, root


def why(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


def is_local(fs: Any) -> bool:
    """Whether ``fs`` is the local filesystem, whose paths plain ``os`` calls may use."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
