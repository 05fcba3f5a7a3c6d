"""The embedded server's side of each client connection: handshake, requests and waits.

Split from :mod:`.embedded_server` (which listens, runs the loop and stops) so each file is
one concept. Waits cost nothing while idle: a waiter is a future filed under its prefix, and
each change wakes only the waiters whose prefix is a prefix of the changed key.

A client that breaks the protocol (garbage bytes, an oversized length prefix, invalid JSON,
an unknown op, a handshake that does not finish within ``auth_timeout_s``) is dropped;
everyone else keeps being served.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import ssl as _ssl
import threading
from typing import Any, Dict, Optional, Set, Tuple

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
        self.waiters: Dict[str, Dict[asyncio.Future, int]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread: Optional[int] = None
        self._tasks: Set[asyncio.Task] = set()
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

    async def close(self) -> None:
        """Stop hearing changes and end every connection."""
        self.store.remove_listener(self._on_event)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

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
            group = self.waiters.setdefault(prefix, {})
            group[future] = after
            timer = loop.call_later(timeout_s, _resolve, future)
            try:
                await future
            finally:
                timer.cancel()
                group.pop(future, None)
                if not group and self.waiters.get(prefix) is group:
                    del self.waiters[prefix]
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

    # -- one connection ------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``asyncio.start_server``'s callback: serve one client until it leaves or misbehaves."""
        task = asyncio.current_task()
        if task is None:  # asyncio.start_server runs every callback in a task of its own
            raise RuntimeError("the connection handler runs outside an asyncio task")
        self._tasks.add(task)
        self.open += 1
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
            self.dropped += 1
            log.warning("dropped %s: no handshake within %.1fs", _peer(peer), self.auth_timeout_s)
        except (wire.ProtocolError, _Drop) as exc:
            self.dropped += 1
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
            self.open -= 1
            self._tasks.discard(task)
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
                await _refuse(writer, "wrong rendezvous token")
                raise _Drop("wrong token")
            proof = wire.server_proof(self.token, nonce, client_nonce)
        else:
            if not _is_loopback(peer):
                self.auth_failures += 1
                await _refuse(writer, "this rendezvous server has no token and accepts "
                                      "only loopback clients; give it and the clients a token")
                raise _Drop("not loopback and no token configured")
            proof = None
        writer.write(wire.encode({"ok": True, "proof": proof}))
        await writer.drain()

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
async def _read_message(reader: asyncio.StreamReader, limit: int) -> Dict[str, Any]:
    header = await reader.readexactly(wire.HEADER.size)
    (length,) = wire.HEADER.unpack(header)
    wire.check_length(length, limit)  # before allocating anything
    return wire.decode(await reader.readexactly(length))


async def _refuse(writer: asyncio.StreamWriter, message: str) -> None:
    writer.write(wire.encode({"ok": False, "error": "auth", "message": message}))
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass


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
