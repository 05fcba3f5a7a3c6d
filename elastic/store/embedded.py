"""The ``embedded`` rendezvous backend: our own server (no etcd needed) and its client.

Run the server with ``elastic-rendezvous serve --port P`` or in-process::

    server = EmbeddedServer.from_conf("0.0.0.0", 29400, token="s3cret").start()
    store = create_store("embedded", "host:29400", token="s3cret")

See :mod:`elastic.store._wire` for the protocol, :mod:`.embedded_server` and
:mod:`.embedded_client` for the two halves.
"""
from __future__ import annotations

from typing import Any

from .embedded_client import DEFAULT_PORT, EmbeddedStore, parse_endpoint
from .embedded_server import EmbeddedServer

__all__ = ["EmbeddedServer", "EmbeddedStore", "create_embedded_store", "parse_endpoint",
           "DEFAULT_PORT"]


def create_embedded_store(endpoint: str = "", **conf: Any) -> EmbeddedStore:
    """Backend factory: connect to the embedded server at ``endpoint`` (``host:port``)."""
    return EmbeddedStore(endpoint, **conf)
