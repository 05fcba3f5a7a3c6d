"""Name -> implementation registries for pluggable backends.

Modelled on fsspec's ``known_implementations``: a backend is registered as a
``"module:attr"`` path plus an install hint, and imported only when first asked for,
so third parties can add backends without editing our code and unused ones cost nothing.
"""
from __future__ import annotations

import importlib
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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, _Entry] = {}

    def register(self, name: str, target: Union[str, Callable[..., T]], extra: str = "",
                 *, overwrite: bool = False) -> None:
        if name in self._entries and not overwrite:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = _Entry(target, extra)

    def names(self) -> list:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
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
