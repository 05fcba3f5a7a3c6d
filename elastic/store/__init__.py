"""Rendezvous stores: the small interface and its backends, registered by name.

``memory`` (in-process), ``embedded`` (our TCP server) and ``etcd`` (etcd v3). A third party
adds one with ``backends.register("name", "module:factory")``; a factory takes
``(endpoint: str, **conf)`` and returns a :class:`Store`.
"""
from __future__ import annotations

from ..registry import Registry
from .api import (Event, KeyValue, LeaseNotFoundError, Store, StoreAuthError, StoreCompactedError,
                  StoreError, StoreUnavailableError)
from .memory import MemoryStore

backends: "Registry[Store]" = Registry("rendezvous backend", entry_point_group="elastic_run.stores")
backends.register("memory", lambda endpoint="", **conf: MemoryStore())
backends.register("embedded", "elastic.store.embedded:create_embedded_store")
backends.register("etcd", "elastic.store.etcd:create_etcd_store", extra="etcd")


def create_store(backend: str, endpoint: str = "", **conf) -> Store:
    """Connect to the store ``backend`` at ``endpoint`` (``host:port[,host:port...]``)."""
    return backends.get(backend)(endpoint, **conf)


__all__ = ["Store", "KeyValue", "Event", "StoreError", "StoreUnavailableError", "StoreAuthError",
           "StoreCompactedError", "LeaseNotFoundError", "MemoryStore", "backends", "create_store"]
