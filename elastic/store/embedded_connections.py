"""The embedded server's side of each client connection: handshake, requests and waits.

Split from :mod:`.embedded_server` (which listens, runs the loop and stops) so each file is
one concept. Each connection is an :class:`asyncio.Protocol` (no stream reader, writer or
task per connection): the bytes that arrive are cut into messages and answered in the same
callback, so a request costs one pass through the event loop. Waits cost nothing while idle:
a waiter is an entry filed under its prefix, and each change wakes only the waiters whose
prefix is a prefix of the changed key; the events of one revision are encoded once for every
waiter that asked for the same ones (a round's close reaches a thousand joiners as one
encoding, written a thousand times).

A client that breaks the protocol (garbage bytes, an oversized length prefix, invalid JSON,
an unknown op, a handshake that does not finish within ``auth_timeout_s``) is dropped;
everyone else keeps being served. A client that does not read its replies is not read either
until it does (its transport's write buffer bounds what the server holds for it).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import _wire as wire
from .api import Event, LeaseNotFoundError, StoreCompactedError
from .memory import MemoryStore

__all__ = ["Connections"]

log = logging.getLogger("elastic.store.embedded")

_MAX_WAITS_PER_CONNECTION = 4096
_MAX_WAIT_S = 24 * 3600.0
_MAX_KEY_CHARS = 64 * 1024
_MAX_LEASE_ID = (1 << 63) - 1
_DRAIN_ABOVE_BYTES = 256 * 1024


class _Drop(Exception):
    """End this connection (the reason is logged)."""


class _Waiter:
    """One pending ``wait`` of one connection."""

    __slots__ = ("conn", "request_id", "prefix", "after", "timer", "fired")

    def __init__(self, conn: "_Connection", request_id: int, prefix: str, after: int) -> None:
        self.conn = conn
        self.request_id = request_id
        self.prefix = prefix
        self.after = after
        self.timer: Optional[asyncio.TimerHandle] = None
        self.fired = False


class Connections:
    """Serves every connection of one server on its event loop; counts what happened."""

    def __init__(self, store: MemoryStore, token: Optional[bytes], instance: str,
                 auth_timeout_s: float) -> None:
        self.store = store
        self.token = token
        self.instance = instance
        self.auth_timeout_s = auth_timeout_s
        self.open = 0  # open connections now
        self.dropped = 0  # connections ended for breaking the protocol
        self.auth_failures = 0
        self.waiters: Dict[str, Dict[_Waiter, int]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._live: Set["_Connection"] = set()
        self._fired: List[_Waiter] = []  # woken waiters, answered once the change is complete
        # Encoded wait results of the current store revision: when one change wakes a
        # thousand joiners waiting on the same key, their (identical) reply is encoded once.
        self._encoded_events: Dict[Tuple[str, int], bytes] = {}
        self._encoded_revision = -1

    # -- life cycle (called by the server on its loop) ------------------------------------
    def attach(self) -> None:
        """Start hearing the store's changes on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.store.add_listener(self._on_event)

    def protocol(self) -> "_Connection":
        """The protocol factory for ``loop.create_server``: one per accepted connection."""
        return _Connection(self)

    async def close(self) -> None:
        """Stop hearing changes and end every connection."""
        self.store.remove_listener(self._on_event)
        for conn in list(self._live):
            conn.abort()
        for _ in range(50):  # connection_lost runs on a later pass of the loop
            if not self._live:
                break
            await asyncio.sleep(0.01)

    # -- waiters -------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        """Store listener (runs under the store's lock): wake matching waiters only."""
        if threading.get_ident() == self._loop_thread:
            self._wake(event.key, event.revision)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake, event.key, event.revision)

    def _wake(self, key: str, revision: int) -> None:
        waiters = self.waiters
        if not waiters:
            return
        if len(key) < len(waiters):  # look up each prefix of the key
            groups = [waiters[p] for p in (key[:i] for i in range(len(key) + 1)) if p in waiters]
        else:  # few distinct prefixes: test each
            groups = [g for p, g in waiters.items() if key.startswith(p)]
        fired = self._fired
        first = not fired
        for group in groups:
            for waiter, after in group.items():
                if revision > after and not waiter.fired:
                    waiter.fired = True
                    fired.append(waiter)
        if first and fired and self._loop is not None:
            # Answered on the next pass of the loop: an op that changes several keys (a
            # revoked lease) has made all its changes by then, and one reply carries them.
            self._loop.call_soon(self._answer_fired)

    def _answer_fired(self) -> None:
        fired, self._fired = self._fired, []
        for waiter in fired:
            self._answer(waiter)

    def _add_wait(self, conn: "_Connection", request_id: int, prefix: str, after: int,
                  timeout_s: float) -> None:
        """Answer at once when there are events under ``prefix`` after ``after``; else file
        a waiter, answered by the first matching change or the timeout."""
        try:
            data = self._events_json(prefix, after)
            if data != b"[]" or timeout_s <= 0:
                conn.write(wire.encode_result(request_id, data))
                return
        except (StoreCompactedError, ValueError) as exc:  # ValueError: over the message limit
            conn.write(wire.encode(_error_reply(request_id, exc)))
            return
        if len(conn.waits) >= _MAX_WAITS_PER_CONNECTION:
            raise _Drop(f"more than {_MAX_WAITS_PER_CONNECTION} concurrent waits")
        waiter = _Waiter(conn, request_id, prefix, after)
        self.waiters.setdefault(prefix, {})[waiter] = after
        conn.waits.add(waiter)
        assert self._loop is not None
        waiter.timer = self._loop.call_later(timeout_s, self._time_out, waiter)

    def _time_out(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if not waiter.fired:
            waiter.fired = True
            self._answer(waiter)

    def _answer(self, waiter: _Waiter) -> None:
        if not self._forget(waiter):
            return  # its connection ended meanwhile
        try:
            data = wire.encode_result(waiter.request_id, self._events_json(waiter.prefix, waiter.after))
        except (StoreCompactedError, ValueError) as exc:  # ValueError: over the message limit
            data = wire.encode(_error_reply(waiter.request_id, exc))
        waiter.conn.write(data)

    def _forget(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` off the books; False when it was gone already."""
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        if waiter not in waiter.conn.waits:
            return False
        waiter.conn.waits.discard(waiter)
        group = self.waiters.get(waiter.prefix)
        if group is not None:
            group.pop(waiter, None)
            if not group:
                del self.waiters[waiter.prefix]
        return True

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

    # -- handshake and requests (called by _Connection) ----------------------------------
    def _hello(self, nonce: bytes) -> bytes:
        return wire.encode({"hello": wire.PROTOCOL, "version": wire.VERSION, "instance": self.instance,
                            "nonce": wire.b64(nonce), "auth": self.token is not None})

    def _check_answer(self, conn: "_Connection", answer: Dict[str, Any]) -> None:
        """The client's handshake answer: accept it (write ``ok``) or refuse and drop it."""
        client_nonce = wire.unb64(answer.get("nonce"))
        if not 16 <= len(client_nonce) <= 64:
            raise wire.ProtocolError("handshake nonce of the wrong size")
        if self.token is not None:
            if not wire.proof_matches(wire.client_proof(self.token, conn.nonce, client_nonce),
                                      answer.get("proof")):
                self.auth_failures += 1
                conn.write(_refusal("wrong rendezvous token"))
                raise _Drop("wrong token")
            proof: Optional[str] = wire.server_proof(self.token, conn.nonce, client_nonce)
        else:
            if not _is_loopback(conn.peer):
                self.auth_failures += 1
                conn.write(_refusal("this rendezvous server has no token and accepts only "
                                    "loopback clients; give it and the clients a token"))
                raise _Drop("not loopback and no token configured")
            proof = None
        conn.write(wire.encode({"ok": True, "proof": proof}))

    def _request(self, conn: "_Connection", message: Dict[str, Any]) -> None:
        request_id = message.get("id")
        if type(request_id) is not int:
            raise wire.ProtocolError("request without an integer id")
        op = message.get("op")
        if op == "wait":
            self._add_wait(conn, request_id, _str(message, "prefix"), _int(message, "after"),
                           min(_MAX_WAIT_S, _seconds(message, "timeout_s")))
            return
        handler = self._OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise wire.ProtocolError(f"unknown op {str(op)[:40]!r}")
        try:
            reply = {"id": request_id, "ok": True, "result": handler(self, message)}
        except (LeaseNotFoundError, StoreCompactedError, ValueError) as exc:
            reply = _error_reply(request_id, exc)
        conn.write(_encode_reply(reply))

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

    _OPS: Dict[str, Callable[["Connections", Dict[str, Any]], Any]] = {
        "ping": _op_ping, "get": _op_get, "get_prefix": _op_get_prefix, "put": _op_put,
        "cas": _op_cas, "delete": _op_delete, "grant": _op_grant,
        "keep_alive": _op_keep_alive, "revoke": _op_revoke}


class _Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, its waits; dropped on any violation."""

    def __init__(self, server: Connections) -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.peer: Any = None
        self.nonce = wire.new_nonce()
        self.authenticated = False
        self.closing = False
        self.waits: Set[_Waiter] = set()
        self._buf = bytearray()
        self._auth_timer: Optional[asyncio.TimerHandle] = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        server = self.server
        self.transport = transport
        server.open += 1
        server._live.add(self)
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        # Past this much unsent reply data, stop reading the client until it reads.
        transport.set_write_buffer_limits(high=_DRAIN_ABOVE_BYTES)
        self._auth_timer = asyncio.get_running_loop().call_later(
            server.auth_timeout_s, self._auth_deadline)
        transport.write(server._hello(self.nonce))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self._buf
        buf += data
        start, header = 0, wire.HEADER.size
        try:
            while len(buf) - start >= header:
                (length,) = wire.HEADER.unpack_from(buf, start)
                wire.check_length(length, wire.MAX_MESSAGE_BYTES if self.authenticated
                                  else wire.MAX_HANDSHAKE_BYTES)  # before buffering the body
                end = start + header + length
                if len(buf) < end:
                    break
                message = wire.decode(bytes(buf[start + header:end]))
                start = end
                if self.authenticated:
                    self.server._request(self, message)
                else:
                    self.server._check_answer(self, message)
                    self._authenticate()
                if self.closing:
                    return
        except (wire.ProtocolError, _Drop) as exc:
            self._drop(str(exc))
            return
        if start:
            del buf[:start]

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        server = self.server
        self.closing = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        for waiter in list(self.waits):
            server._forget(waiter)
        if self in server._live:
            server._live.discard(self)
            server.open -= 1
        if exc is not None:
            log.debug("connection from %s ended: %s", _peer(self.peer), exc)

    def pause_writing(self) -> None:  # the client does not read its replies: stop reading it
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- helpers -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _authenticate(self) -> None:
        self.authenticated = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def _auth_deadline(self) -> None:
        self._auth_timer = None
        if not self.authenticated and not self.closing:
            self._drop(f"no handshake within {self.server.auth_timeout_s:.1f}s")

    def _drop(self, reason: str) -> None:
        """End this connection for breaking the protocol (what was written still goes out)."""
        if self.closing:
            return
        self.server.dropped += 1
        log.warning("dropped %s: %s", _peer(self.peer), reason)
        self.closing = True
        self._buf.clear()
        if self.transport is not None:
            self.transport.close()


# -- helpers -------------------------------------------------------------------------------
def _refusal(message: str) -> bytes:
    return wire.encode({"ok": False, "error": "auth", "message": message})


def _encode_reply(reply: Dict[str, Any]) -> bytes:
    try:
        return wire.encode(reply)
    except ValueError as exc:  # e.g. a get_prefix larger than the message limit
        return wire.encode({"id": reply["id"], "ok": False, "error": "value", "message": str(exc)})


def _error_reply(request_id: int, exc: Exception) -> Dict[str, Any]:
    kind = ("lease_not_found" if isinstance(exc, LeaseNotFoundError) else
            "compacted" if isinstance(exc, StoreCompactedError) else "value")
    return {"id": request_id, "ok": False, "error": kind, "message": str(exc)}


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
    if not (type(value) is int or type(value) is float) or not math.isfinite(value):
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
