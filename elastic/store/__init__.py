"""Rendezvous stores: the small interface and its backends, registered by name.

``memory`` (in-process), ``embedded`` (our TCP server) and ``etcd`` (etcd v3). A third party
adds one with ``backends.register("name", "module:factory")`` or an ``elastic_run.stores``
entry point; a factory takes ``(endpoint: str, **settings)`` and returns a :class:`Store`,
and declares the settings it takes (and its traits) as ``factory.spec``, a
:class:`BackendSpec`. :mod:`elastic.store.testing` is the contract suite it should pass.
"""
from __future__ import annotations

from typing import Any

from ..registry import Registry
from .api import (BackendSpec, Event, KeyValue, LeaseNotFoundError, Store, StoreArgumentError,
                  StoreAuthError, StoreCompactedError, StoreError, StoreUnavailableError)
from .memory import MemoryStore

backends: "Registry[Store]" = Registry("rendezvous backend", entry_point_group="elastic_run.stores")
backends.register("memory", "elastic.store.memory:create_memory_store")
backends.register("embedded", "elastic.store.embedded:create_embedded_store")
backends.register("etcd", "elastic.store.etcd:create_etcd_store", extra="etcd")

_NO_SETTINGS = BackendSpec()


def backend_spec(backend: str) -> BackendSpec:
    """What ``backend``'s factory declares (no settings, no traits when it declares nothing)."""
    spec = getattr(backends.get(backend), "spec", None)
    return spec if isinstance(spec, BackendSpec) else _NO_SETTINGS


def create_store(backend: str, endpoint: str = "", **conf: Any) -> Store:
    """Connect to the store ``backend`` at ``endpoint`` (``host:port[,host:port...]``).

    ``conf`` are the backend's settings (its ``spec.keys``, or their aliases); an unknown
    one is a :class:`~elastic.errors.ConfigError` naming the keys the backend knows.
    """
    factory = backends.get(backend)
    return factory(endpoint, **backend_spec(backend).settings(backend, conf))


__all__ = ["Store", "KeyValue", "Event", "BackendSpec", "StoreError", "StoreUnavailableError",
           "StoreAuthError", "StoreCompactedError", "LeaseNotFoundError", "StoreArgumentError",
           "MemoryStore", "backends", "backend_spec", "create_store"]
