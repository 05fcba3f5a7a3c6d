"""The embedded rendezvous server: a :class:`MemoryStore` behind an asyncio TCP server.

Speaks the protocol in :mod:`elastic.store._wire` (length-prefixed JSON, HMAC challenge-
response on a shared token, optional TLS). This module is the server's life cycle: listening
(TLS included), the loop thread, lease expiry on a timer (even when no request arrives) and
stopping; :mod:`.embedded_connections` serves each client connection.

Without a token the server accepts only loopback clients and logs a warning: a token-less
server reachable from the network would let anyone rewrite the job's membership.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl as _ssl
import threading
import uuid
from typing import Any, Callable, Dict, Optional, Union

from ..settings import DEFAULT_RDZV_PORT, parse_seconds
from . import _wire as wire
from .api import StoreError
from .embedded_connections import Connections
from .memory import MemoryStore

__all__ = ["EmbeddedServer", "DEFAULT_PORT"]

log = logging.getLogger("elastic.store.embedded")

DEFAULT_PORT = DEFAULT_RDZV_PORT

class EmbeddedServer:
    """The rendezvous server; ``start()`` runs it on a background thread.

    ``port=0`` picks a free port (read it from :attr:`port` after ``start()``). ``token``
    is the shared secret (str or bytes; None: loopback clients only); ``ssl`` an
    :class:`ssl.SSLContext` for TLS (see :meth:`from_conf` to build both from settings).
    """

    def __init__(self, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 token: Union[str, bytes, None] = None, ssl: Optional[_ssl.SSLContext] = None,
                 store: Optional[MemoryStore] = None, auth_timeout_s: float = 5.0,
                 expiry_interval_s: float = 0.1) -> None:
        self.host = host
        self.port = int(port)
        self.token: Optional[bytes] = token.encode("utf-8") if isinstance(token, str) else token
        self.ssl = ssl
        # Random first lease id: a client of a previous server instance cannot refresh
        # someone else's lease by accident.
        self.store = store if store is not None else MemoryStore(
            first_lease_id=int.from_bytes(os.urandom(4), "big") << 16 | 1)
        self.auth_timeout_s = auth_timeout_s
        self.expiry_interval_s = expiry_interval_s
        self.instance = uuid.uuid4().hex
        self._connections = Connections(self.store, self.token, self.instance, auth_timeout_s)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None

    # -- what the connections did ---------------------------------------------------------
    @property
    def connections(self) -> int:
        """Open connections now."""
        return self._connections.open

    @property
    def dropped_connections(self) -> int:
        """Connections ended for breaking the protocol."""
        return self._connections.dropped

    @property
    def auth_failures(self) -> int:
        return self._connections.auth_failures

    @property
    def _waiters(self) -> Dict[str, Dict[Any, int]]:
        return self._connections.waiters

    # -- construction from settings ------------------------------------------------------
    @classmethod
    def from_conf(cls, host: str = "0.0.0.0", port: int = DEFAULT_PORT, **conf: Any) -> "EmbeddedServer":
        """Build from ``--rdzv-conf``-style settings: ``token``, ``token_file`` (else
        $ELASTIC_RDZV_TOKEN / $ELASTIC_RDZV_TOKEN_FILE), ``tls_cert``, ``tls_key``,
        ``tls_ca`` (require client certificates), ``auth_timeout_s``. Other keys are ignored
        (they belong to the round protocol)."""
        token = wire.resolve_token(conf.get("token"), conf.get("token_file"))
        context = wire.server_ssl_context(conf.get("tls_cert"), conf.get("tls_key"), conf.get("tls_ca"))
        auth_timeout_s = parse_seconds(conf.get("auth_timeout_s", 5.0), "auth_timeout_s")
        return cls(host, port, token=token, ssl=context, auth_timeout_s=auth_timeout_s)

    @property
    def endpoint(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> "EmbeddedServer":
        """Start serving on a background thread; returns once the port is listening."""
        if self._thread is not None:
            raise StoreError("the rendezvous server is already started")
        self._thread = threading.Thread(target=self._thread_main, name="elastic-rendezvous",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the port and every connection; the store's data stays in :attr:`store`."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed meanwhile
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            self._thread = None

    def serve_forever(self, on_ready: Optional[Callable[["EmbeddedServer"], None]] = None) -> None:
        """Serve on this thread until :meth:`stop`, SIGTERM or SIGINT (for the CLI)."""
        _run(self._main(on_ready, handle_signals=True))
        if self._start_error is not None:
            raise self._start_error

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            _run(self._main(None, handle_signals=False))
        except BaseException as exc:  # pragma: no cover - reported through start()
            if not self._ready.is_set():
                self._start_error = exc
        finally:
            self._ready.set()

    async def _main(self, on_ready, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._stop_event = asyncio.Event()
        _raise_fd_limit()
        try:
            self._server = await self._loop.create_server(
                self._connections.protocol, self.host, self.port, ssl=self.ssl, backlog=4096,
                ssl_handshake_timeout=self.auth_timeout_s if self.ssl else None,
                reuse_address=True)
            # uvloop, losing a bind race to another process, can hand back a server whose
            # listening socket is already gone: that is "address in use" (the caller joins it)
            socks = [sock for sock in (self._server.sockets or ()) if sock is not None]
            if not socks:
                self._server.close()
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            port = socks[0].getsockname()[1]
        except OSError as exc:
            self._start_error = StoreError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}")
            self._start_error.__cause__ = exc  # callers check .errno (EADDRINUSE: join it)
            self._ready.set()
            return
        self.port = port
        self._connections.attach()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop_event.set)
        if self.token is None:
            log.warning("rendezvous server on %s:%s has no token: accepting loopback clients "
                        "only (set a token to accept other hosts)", self.host, self.port)
        log.info("rendezvous server listening on %s:%s%s", self.host, self.port,
                 " (TLS)" if self.ssl else "")
        expiry = asyncio.create_task(self._expire_leases())
        self._ready.set()
        if on_ready is not None:
            on_ready(self)
        try:
            await self._stop_event.wait()
        finally:
            expiry.cancel()
            self._server.close()
            await self._connections.close()
            await self._server.wait_closed()
            log.info("rendezvous server on %s:%s stopped", self.host, self.port)

    def _loop_exception(self, loop, context) -> None:
        # TLS handshakes that strangers abandon or botch are expected noise, not errors.
        exc = context.get("exception")
        if isinstance(exc, (_ssl.SSLError, ConnectionError, asyncio.TimeoutError, OSError)):
            log.debug("connection error: %s", exc)
            return
        loop.default_exception_handler(context)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval_s)
            try:
                self.store.expire()
            except Exception:  # pragma: no cover - never let the timer die
                log.exception("lease expiry failed")


# -- helpers -------------------------------------------------------------------------------
def _run(main) -> None:
    """Run the server's coroutine on uvloop when it is installed (the ``rendezvous`` extra):
    accepting and serving a thousand connections at once costs it about half the time."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit toward the hard one (a job may hold 1000s of sockets)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX / not allowed
        pass

