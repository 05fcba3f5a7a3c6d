"""The store interface that the rendezvous round protocol is written against.

Small on purpose (as torch's ``RendezvousBackend``): a backend is a key-value store with
revisions, compare-and-set, leases and a blocking wait for changes under a prefix. It holds no
protocol logic; ``elastic.rendezvous`` writes the round protocol once on top of it.

Revisions follow etcd v3: one store-wide counter that every write bumps; each key carries the
revision of its last modification (``mod_revision``). A key put with a lease disappears (a
``delete`` event) when the lease expires or is revoked.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

from ..errors import ConfigError, ElasticError, UserError

__all__ = [
    "KeyValue", "Event", "Store", "BackendSpec",
    "StoreError", "StoreUnavailableError", "StoreAuthError", "StoreCompactedError", "LeaseNotFoundError",
    "StoreArgumentError",
]


class StoreError(ElasticError):
    """Base class of store errors."""


class StoreUnavailableError(StoreError, UserError):
    """The store cannot be reached (wrong endpoint, server down, timeout)."""


class StoreAuthError(StoreError, UserError):
    """The store refused our credentials (wrong token, user or password)."""


class StoreCompactedError(StoreError):
    """A wait asked for history the store no longer keeps; re-read the prefix and wait again."""


class LeaseNotFoundError(StoreError):
    """The lease expired or was revoked."""


class StoreArgumentError(StoreError, ValueError, TypeError):
    """A call no store can take: a key that is not a str, a TTL that is not positive, a
    negative revision, a value over the size limit. A bug in the caller, not a UserError;
    still a ValueError/TypeError, as such calls raised before the store errors were ours."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # "put" or "delete"
    key: str
    value: bytes  # empty for a delete
    revision: int


class Store(abc.ABC):
    """A key-value store with revisions, leases and waits. Thread-safe."""

    @abc.abstractmethod
    def get(self, key: str) -> Optional[KeyValue]:
        """The key's current value, or None."""

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> Tuple[List[KeyValue], int]:
        """All keys under ``prefix``, sorted by key, and the store revision they were read at."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; bound to ``lease`` when non-zero. Returns the new revision."""

    @abc.abstractmethod
    def compare_and_set(self, key: str, expected_revision: Optional[int], value: bytes,
                        lease: int = 0) -> Tuple[bool, Optional[KeyValue]]:
        """Write ``key`` if its ``mod_revision`` equals ``expected_revision`` (None: if absent).

        Returns whether it was written and the key's value after the call (None if absent).
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``; returns whether it existed."""

    @abc.abstractmethod
    def grant_lease(self, ttl_s: float) -> int:
        """A new lease that expires ``ttl_s`` seconds after its last keep-alive."""

    @abc.abstractmethod
    def keep_alive(self, lease: int) -> None:
        """Refresh ``lease``; raises :class:`LeaseNotFoundError` if it is gone."""

    @abc.abstractmethod
    def revoke_lease(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys (a clean leave). Unknown leases are ignored."""

    @abc.abstractmethod
    def wait(self, prefix: str, after_revision: int, timeout_s: float) -> List[Event]:
        """Events under ``prefix`` with revision > ``after_revision``, oldest first.

        Blocks until there is at least one or ``timeout_s`` passes (then returns ``[]``).
        """

    def close(self) -> None:  # noqa: B027 - optional hook: stores holding no connections (memory) keep it
        """Release connections; the store's data is not affected."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class BackendSpec:
    """What a backend's factory declares (as its ``spec`` attribute), so that a launcher
    drives any backend, ours or a third party's, by its traits and never by its name.

    ``keys``: the settings (``--rdzv-conf`` keys) it understands; ``aliases``: other
    spellings of them (torchrun's), as ``(alias, key)`` pairs; ``ignores_unknown``: it has
    nothing to configure, so unknown keys are dropped instead of refused (``memory``);
    ``in_process``: the store lives in this process, so no worker can reach it;
    ``serve(host, port, **settings)``: start the backend's own server on this node and return
    it (with ``port``, ``store`` and ``stop()``); the launcher calls it on the node whose
    endpoint is local (``embedded``). A factory without a ``spec`` takes no settings.
    """

    keys: FrozenSet[str] = frozenset()
    aliases: Tuple[Tuple[str, str], ...] = ()
    ignores_unknown: bool = False
    in_process: bool = False
    serve: Optional[Callable[..., Any]] = None

    @property
    def known(self) -> FrozenSet[str]:
        """Every key it accepts: its own and their aliases."""
        return self.keys | {alias for alias, _ in self.aliases}

    def settings(self, backend: str, conf: Mapping[str, Any], *, where: str = "settings",
                 known_elsewhere: Iterable[str] = ()) -> Dict[str, Any]:
        """``conf`` as the backend takes it: aliases mapped onto their key (the key itself
        wins when both are given), nothing it did not declare. An unknown key is one
        :class:`ConfigError` line naming the backend and what it knows (with
        ``known_elsewhere``, the caller's own keys, which are not passed on)."""
        unknown = sorted(set(conf) - self.known)
        if unknown and not self.ignores_unknown:
            known = ", ".join(sorted(self.known | set(known_elsewhere))) or "none"
            raise ConfigError(f"{where}: unknown key(s) for backend {backend!r}: "
                              f"{', '.join(unknown)} (known: {known})")
        out = {k: v for k, v in conf.items() if k in self.keys}
        for alias, key in self.aliases:
            if alias in conf:
                out.setdefault(key, conf[alias])
        return out
