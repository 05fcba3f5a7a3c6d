"""Name -> implementation registries for pluggable backends.

Modelled on fsspec's ``known_implementations``: a backend is registered as a
``"module:attr"`` path plus an install hint, and imported only when first asked for,
so third parties can add backends without editing our code and unused ones cost nothing.
An installed distribution can also add one through an entry point of the registry's group
(``elastic_run.stores``, ``elastic_run.frameworks``), as torch's rendezvous handlers do::

    [project.entry-points."elastic_run.stores"]
    redis = "my_pkg.store:create_redis_store"

Entry points are read once, on the first lookup of a name not registered in code; a name
registered in code wins over an entry point of the same name.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, TypeVar, Union

from .errors import ConfigError, MissingExtraError

T = TypeVar("T")

__all__ = ["Registry"]


@dataclass(frozen=True)
class _Entry:
    target: Union[str, Callable[..., Any]]
    extra: str = ""


class Registry(Generic[T]):
    """A named set of factories; values are callables or lazily imported ``"module:attr"``."""

    def __init__(self, kind: str, entry_point_group: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: Dict[str, _Entry] = {}
        self._entry_points_loaded = not entry_point_group

    def register(self, name: str, target: Union[str, Callable[..., T]], extra: str = "",
                 *, overwrite: bool = False) -> None:
        if name in self._entries and not overwrite:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = _Entry(target, extra)

    def names(self) -> list:
        self._load_entry_points()
        return sorted(self._entries)

    def _load_entry_points(self) -> None:
        """Add the installed distributions' entry points of our group (once)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        if sys.version_info >= (3, 10):
            found = entry_points(group=self.entry_point_group)
        else:  # Python 3.9: entry_points() takes no arguments and answers a dict by group
            found = entry_points().get(self.entry_point_group, ())
        for ep in found:
            self._entries.setdefault(ep.name, _Entry(ep.value))

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            self._load_entry_points()
        try:
            entry = self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}"
            ) from None
        if callable(entry.target):
            return entry.target
        module_name, _, attr = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if entry.extra:
                raise MissingExtraError(exc.name or module_name, entry.extra,
                                        f"the {self.kind} {name!r}") from exc
            raise
        return getattr(module, attr)
