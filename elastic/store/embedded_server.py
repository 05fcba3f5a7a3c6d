"""The embedded rendezvous server: a :class:`MemoryStore` behind an asyncio TCP server.

Speaks the protocol in :mod:`elastic.store._wire` (length-prefixed JSON, HMAC challenge-
response on a shared token, optional TLS). Waits cost nothing while idle: a waiter is a
future filed under its prefix, and each change wakes only the waiters whose prefix is a
prefix of the changed key. Leases expire on a timer even when no request arrives.

A client that breaks the protocol (garbage bytes, an oversized length prefix, invalid JSON,
an unknown op, a handshake that does not finish within ``auth_timeout_s``) is dropped;
everyone else keeps being served.

Without a token the server accepts only loopback clients and logs a warning: a token-less
server reachable from the network would let anyone rewrite the job's membership.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import ssl as _ssl
import threading
import uuid
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

from ..settings import DEFAULT_RDZV_PORT, parse_seconds
from . import _wire as wire
from .api import Event, LeaseNotFoundError, StoreCompactedError, StoreError
from .memory import MemoryStore

__all__ = ["EmbeddedServer", "DEFAULT_PORT"]

log = logging.getLogger("elastic.store.embedded")

DEFAULT_PORT = DEFAULT_RDZV_PORT
_MAX_WAITS_PER_CONNECTION = 4096
_MAX_WAIT_S = 24 * 3600.0
_MAX_KEY_CHARS = 64 * 1024
_MAX_LEASE_ID = (1 << 63) - 1
_DRAIN_ABOVE_BYTES = 256 * 1024


class _Drop(Exception):
    """End this connection (the reason is logged)."""


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
        self.connections = 0  # open connections now
        self.dropped_connections = 0  # connections ended for breaking the protocol
        self.auth_failures = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._handlers: Set[asyncio.Task] = set()
        self._waiters: Dict[str, Dict[asyncio.Future, int]] = {}
        # Encoded wait results of the current store revision: when one change wakes a
        # thousand joiners waiting on the same key, their (identical) reply is encoded once.
        self._encoded_events: Dict[Tuple[str, int], bytes] = {}
        self._encoded_revision = -1

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
            raise RuntimeError("server already started")
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
        self._loop_thread = threading.get_ident()
        self._loop.set_exception_handler(self._loop_exception)
        self._stop_event = asyncio.Event()
        _raise_fd_limit()
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, ssl=self.ssl, backlog=4096,
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
        self.store.add_listener(self._on_event)
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
            self.store.remove_listener(self._on_event)
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5)
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

    # -- waiters -------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        """Store listener (runs under the store's lock): wake matching waiters only."""
        if threading.get_ident() == self._loop_thread:
            self._wake(event.key, event.revision)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, event.key, event.revision)

    def _wake(self, key: str, revision: int) -> None:
        waiters = self._waiters
        if not waiters:
            return
        if len(key) < len(waiters):  # look up each prefix of the key
            groups = [waiters[p] for p in (key[:i] for i in range(len(key) + 1)) if p in waiters]
        else:  # few distinct prefixes: test each
            groups = [g for p, g in waiters.items() if key.startswith(p)]
        for group in groups:
            for future, after in group.items():
                if revision > after and not future.done():
                    future.set_result(None)

    async def _wait(self, prefix: str, after: int, timeout_s: float) -> bytes:
        """The JSON-encoded events under ``prefix`` after ``after``, once there are any."""
        data = self._events_json(prefix, after)
        if data == b"[]" and timeout_s > 0:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            group = self._waiters.setdefault(prefix, {})
            group[future] = after
            timer = loop.call_later(timeout_s, _resolve, future)
            try:
                await future
            finally:
                timer.cancel()
                group.pop(future, None)
                if not group and self._waiters.get(prefix) is group:
                    del self._waiters[prefix]
            data = self._events_json(prefix, after)
        return data

    def _events_json(self, prefix: str, after: int) -> bytes:
        revision = self.store.revision
        if revision != self._encoded_revision:
            self._encoded_events.clear()
            self._encoded_revision = revision
        data = self._encoded_events.get((prefix, after))
        if data is None:
            events = self.store.events_after(prefix, after)
            data = json.dumps([wire.event_to_wire(e) for e in events], separators=(",", ":")).encode()
            self._encoded_events[(prefix, after)] = data
        return data

    # -- connections ---------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.connections += 1
        peer = writer.get_extra_info("peername")
        waits: Set[asyncio.Task] = set()
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                except OSError:
                    pass
            await asyncio.wait_for(self._handshake(reader, writer, peer), self.auth_timeout_s)
            await self._serve(reader, writer, waits)
        except asyncio.TimeoutError:
            self.dropped_connections += 1
            log.warning("dropped %s: no handshake within %.1fs", _peer(peer), self.auth_timeout_s)
        except (wire.ProtocolError, _Drop) as exc:
            self.dropped_connections += 1
            log.warning("dropped %s: %s", _peer(peer), exc)
        except asyncio.IncompleteReadError:
            pass  # the client went away mid-message
        except (ConnectionError, OSError, _ssl.SSLError) as exc:
            log.debug("connection from %s ended: %s", _peer(peer), exc)
        except asyncio.CancelledError:
            pass  # server stopping
        finally:
            for wait in waits:
                wait.cancel()
            self.connections -= 1
            self._handlers.discard(task)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (Exception, asyncio.CancelledError):
                pass

    async def _handshake(self, reader, writer, peer) -> None:
        nonce = wire.new_nonce()
        writer.write(wire.encode({"hello": wire.PROTOCOL, "version": wire.VERSION,
                                  "instance": self.instance, "nonce": wire.b64(nonce),
                                  "auth": self.token is not None}))
        await writer.drain()
        answer = await _read_message(reader, wire.MAX_HANDSHAKE_BYTES)
        client_nonce = wire.unb64(answer.get("nonce"))
        if not 16 <= len(client_nonce) <= 64:
            raise wire.ProtocolError("handshake nonce of the wrong size")
        if self.token is not None:
            if not wire.proof_matches(wire.client_proof(self.token, nonce, client_nonce),
                                      answer.get("proof")):
                self.auth_failures += 1
                await self._refuse(writer, "wrong rendezvous token")
                raise _Drop("wrong token")
            proof = wire.server_proof(self.token, nonce, client_nonce)
        else:
            if not _is_loopback(peer):
                self.auth_failures += 1
                await self._refuse(writer, "this rendezvous server has no token and accepts "
                                           "only loopback clients; give it and the clients a token")
                raise _Drop("not loopback and no token configured")
            proof = None
        writer.write(wire.encode({"ok": True, "proof": proof}))
        await writer.drain()

    @staticmethod
    async def _refuse(writer, message: str) -> None:
        writer.write(wire.encode({"ok": False, "error": "auth", "message": message}))
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _serve(self, reader, writer, waits: Set[asyncio.Task]) -> None:
        while True:
            try:
                message = await _read_message(reader, wire.MAX_MESSAGE_BYTES)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return  # clean end of stream between messages
            request_id = message.get("id")
            if type(request_id) is not int:
                raise wire.ProtocolError("request without an integer id")
            op = message.get("op")
            if op == "wait":
                if len(waits) >= _MAX_WAITS_PER_CONNECTION:
                    raise _Drop(f"more than {_MAX_WAITS_PER_CONNECTION} concurrent waits")
                args = (_str(message, "prefix"), _int(message, "after"),
                        min(_MAX_WAIT_S, _seconds(message, "timeout_s")))
                task = asyncio.create_task(self._answer_wait(writer, request_id, *args))
                waits.add(task)
                task.add_done_callback(waits.discard)
                continue
            handler = self._OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise wire.ProtocolError(f"unknown op {str(op)[:40]!r}")
            try:
                reply = {"id": request_id, "ok": True, "result": handler(self, message)}
            except (LeaseNotFoundError, StoreCompactedError, ValueError) as exc:
                reply = _error_reply(request_id, exc)
            _send(writer, reply)
            if writer.transport.get_write_buffer_size() > _DRAIN_ABOVE_BYTES:
                await writer.drain()  # a client that does not read its replies: stop reading it

    async def _answer_wait(self, writer, request_id: int, prefix: str, after: int,
                           timeout_s: float) -> None:
        try:
            data = wire.encode_result(request_id, await self._wait(prefix, after, timeout_s))
        except (StoreCompactedError, ValueError) as exc:  # ValueError: over the message limit
            data = wire.encode(_error_reply(request_id, exc))
        if writer.is_closing():
            return
        writer.write(data)
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass

    # -- ops (run on the loop thread; each is a short critical section) -----------------
    def _op_ping(self, m):
        return {"revision": self.store.revision}

    def _op_get(self, m):
        return wire.kv_to_wire(self.store.get(_str(m, "key")))

    def _op_get_prefix(self, m):
        kvs, revision = self.store.get_prefix(_str(m, "prefix"))
        return {"kvs": [wire.kv_to_wire(kv) for kv in kvs], "revision": revision}

    def _op_put(self, m):
        return self.store.put(_str(m, "key"), wire.value_from_wire(m.get("value")), _int(m, "lease", 0))

    def _op_cas(self, m):
        expected = m.get("expected")
        if expected is not None:
            expected = _int(m, "expected")
        ok, kv = self.store.compare_and_set(_str(m, "key"), expected, wire.value_from_wire(m.get("value")),
                                            _int(m, "lease", 0))
        return {"ok": ok, "kv": wire.kv_to_wire(kv)}

    def _op_delete(self, m):
        return self.store.delete(_str(m, "key"))

    def _op_grant(self, m):
        return self.store.grant_lease(_seconds(m, "ttl_s"))

    def _op_keep_alive(self, m):
        self.store.keep_alive(_int(m, "lease"))

    def _op_revoke(self, m):
        self.store.revoke_lease(_int(m, "lease"))

    _OPS = {"ping": _op_ping, "get": _op_get, "get_prefix": _op_get_prefix, "put": _op_put,
            "cas": _op_cas, "delete": _op_delete, "grant": _op_grant,
            "keep_alive": _op_keep_alive, "revoke": _op_revoke}


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


async def _read_message(reader: asyncio.StreamReader, limit: int) -> Dict[str, Any]:
    header = await reader.readexactly(wire.HEADER.size)
    (length,) = wire.HEADER.unpack(header)
    wire.check_length(length, limit)  # before allocating anything
    return wire.decode(await reader.readexactly(length))


def _send(writer: asyncio.StreamWriter, reply: Dict[str, Any]) -> None:
    try:
        data = wire.encode(reply)
    except ValueError as exc:  # e.g. a get_prefix larger than the message limit
        data = wire.encode({"id": reply["id"], "ok": False, "error": "value", "message": str(exc)})
    writer.write(data)


def _error_reply(request_id: int, exc: Exception) -> Dict[str, Any]:
    kind = ("lease_not_found" if isinstance(exc, LeaseNotFoundError) else
            "compacted" if isinstance(exc, StoreCompactedError) else "value")
    return {"id": request_id, "ok": False, "error": kind, "message": str(exc)}


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _str(message: Dict[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str) or len(value) > _MAX_KEY_CHARS:
        raise wire.ProtocolError(f"field {name!r} must be a string of at most {_MAX_KEY_CHARS} chars")
    return value


def _int(message: Dict[str, Any], name: str, default: Optional[int] = None) -> int:
    value = message.get(name, default)
    if type(value) is not int or not 0 <= value <= _MAX_LEASE_ID:
        raise wire.ProtocolError(f"field {name!r} must be a non-negative integer")
    return value


def _seconds(message: Dict[str, Any], name: str) -> float:
    value = message.get(name)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise wire.ProtocolError(f"field {name!r} must be a finite number")
    return float(value)


def _is_loopback(peer: Any) -> bool:
    if not peer:
        return False
    if isinstance(peer, str):  # a unix socket
        return True
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


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

