"""The ``embedded`` rendezvous backend: our own server (no etcd needed) and its client.

Run the server with ``elastic-rendezvous serve --port P`` or in-process::

    server = EmbeddedServer.from_conf("0.0.0.0", 29400, token="s3cret").start()
    store = create_store("embedded", "host:29400", token="s3cret")

See :mod:`elastic.store._wire` for the protocol, :mod:`.embedded_client` for the client,
:mod:`.embedded_server` (life cycle, listening, TLS) and :mod:`.embedded_connections` (each
client connection) for the server.
"""
from __future__ import annotations

from typing import Any

from .api import BackendSpec
from .embedded_client import DEFAULT_PORT, EmbeddedStore, parse_endpoint
from .embedded_server import EmbeddedServer

__all__ = ["EmbeddedServer", "EmbeddedStore", "create_embedded_store", "serve_embedded_store",
           "parse_endpoint", "DEFAULT_PORT", "SETTINGS"]

# The client's settings (EmbeddedStore) and the server's (EmbeddedServer.from_conf): every
# node gets them all, since whichever node's endpoint is local hosts the server.
SETTINGS = frozenset({"token", "token_file", "tls", "tls_cert", "tls_key", "tls_ca",
                      "tls_verify_hostname", "timeout_s", "auth_timeout_s"})


def create_embedded_store(endpoint: str = "", **conf: Any) -> EmbeddedStore:
    """Backend factory: connect to the embedded server at ``endpoint`` (``host:port``)."""
    return EmbeddedStore(endpoint, **conf)


def serve_embedded_store(host: str, port: int, **conf: Any) -> EmbeddedServer:
    """Start the server on this node (``port`` 0: a free one); the launcher's hosting node."""
    return EmbeddedServer.from_conf(host, port, **conf).start()


create_embedded_store.spec = BackendSpec(keys=SETTINGS, serve=serve_embedded_store)  # type: ignore[attr-defined]
