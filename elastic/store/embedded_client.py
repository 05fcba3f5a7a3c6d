"""The client of the embedded rendezvous server: a thread-safe, synchronous :class:`Store`.

Each call borrows a connection from a small pool for one request/reply and returns it, so a
thread blocked in :meth:`EmbeddedStore.wait` never holds up another thread's call (the agent
calls from a heartbeat thread, a watcher and its main loop at once); the pool grows to the
number of concurrent callers and keeps a few idle connections. Each connection authenticates
with the shared token by challenge-response (mutual: the server proves it holds the token too).

A dropped connection is replaced on the next call. A request that never reached the server is
retried on a fresh connection; one whose fate is unknown is retried only when repeating it is
harmless (not for ``compare_and_set`` or ``delete``). If the server restarted in between (its
state is gone), calls raise :class:`StoreUnavailableError` instead of talking to a stranger.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import ssl as _ssl
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..settings import DEFAULT_RDZV_PORT, parse_bool, parse_seconds
from . import _args as args
from . import _wire as wire
from .api import (Event, KeyValue, LeaseNotFoundError, Store, StoreArgumentError, StoreAuthError,
                  StoreCompactedError, StoreError, StoreUnavailableError)

__all__ = ["EmbeddedStore", "parse_endpoint", "DEFAULT_PORT"]

DEFAULT_PORT = DEFAULT_RDZV_PORT
# Ops whose repetition is harmless if we cannot tell whether the first attempt ran.
_REPEATABLE = frozenset({"ping", "get", "get_prefix", "put", "grant", "keep_alive", "revoke", "wait"})
_MAX_IDLE = 8


class _Lost(Exception):
    """The connection broke; ``sent`` says whether the server may have seen the request."""

    def __init__(self, reason: str, sent: bool) -> None:
        super().__init__(reason)
        self.sent = sent


def parse_endpoint(endpoint: str, default_port: int = DEFAULT_PORT, *, any_port: bool = False) -> Tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port); empty -> 127.0.0.1.

    The one endpoint parser of the project (etcd's lists and the launcher use it too);
    ``any_port`` admits port 0 ("pick a free one"), for a server about to be started.
    """
    text = (endpoint or "").strip()
    if "," in text:
        raise ConfigError(f"the embedded rendezvous takes one endpoint, not {endpoint!r}")
    if not text:
        return "127.0.0.1", default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid rendezvous endpoint {endpoint!r}; expected host:port")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"invalid rendezvous endpoint {endpoint!r}; expected host:port")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in rendezvous endpoint {endpoint!r}") from None
    if not (0 <= port if any_port else 0 < port) or port >= 65536:
        raise ConfigError(f"invalid port in rendezvous endpoint {endpoint!r}")
    return host, port


class _Connection:
    """One authenticated socket; used by one thread at a time.

    A plain TCP socket runs in blocking mode with the kernel's send and receive timeouts
    (``SO_SNDTIMEO``/``SO_RCVTIMEO``): Python's own socket timeouts poll before every send and
    every receive, and each of those calls lets go of the interpreter lock; with a thousand
    nodes' threads in a few processes, every hand-over of that lock costs futex calls and
    context switches. A TLS socket keeps Python's timeouts (its reads must see whole records).
    """

    def __init__(self, sock: socket.socket, reader: "_Reader", instance: str) -> None:
        self.sock = sock
        self.reader = reader
        self.instance = instance
        self.next_id = 1
        self.kernel_timeouts = reader.kernel

    def request(self, message: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
        request_id = self.next_id
        self.next_id += 1
        message["id"] = request_id
        data = wire.encode(message)
        try:
            if self.kernel_timeouts:
                self.reader.set_send_timeout(timeout_s)
            else:
                self.sock.settimeout(timeout_s)
            self.sock.sendall(data)
        except OSError as exc:  # BlockingIOError: the kernel's send timeout
            raise _Lost(f"send failed: {_reason(exc)}", sent=False) from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self.reader.message(wire.MAX_MESSAGE_BYTES, deadline)
            except socket.timeout:
                raise _Lost(f"no reply within {timeout_s:.1f}s", sent=True) from None
            except (OSError, EOFError, wire.ProtocolError) as exc:
                raise _Lost(_reason(exc), sent=True) from None
            if reply.get("id") == request_id:
                return reply

    def looks_closed(self) -> bool:
        """An idle connection with something to read has been closed (or spoken to) by the
        server: not safe to reuse."""
        if self.reader.buffered() or (isinstance(self.sock, _ssl.SSLSocket) and self.sock.pending()):
            return True
        if self.kernel_timeouts:
            state = _tcp_idle_state(self.sock)
            if state is not None:
                return not state
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class EmbeddedStore(Store):
    """Client of an :class:`~elastic.store.embedded_server.EmbeddedServer` at ``endpoint``.

    Settings (all optional; strings are accepted, as from ``--rdzv-conf``): ``token`` or
    ``token_file`` (else $ELASTIC_RDZV_TOKEN / $ELASTIC_RDZV_TOKEN_FILE); ``tls_ca`` (verify
    the server against this CA; turns TLS on), ``tls`` (TLS with the system CAs),
    ``tls_cert``/``tls_key`` (a client certificate), ``tls_verify_hostname`` (default true);
    ``timeout_s`` (connect and per-request timeout, default 10). Other keys are ignored: they
    belong to the round protocol.

    Connects once at construction so a wrong endpoint or token fails here, in one line.
    """

    def __init__(self, endpoint: str = "", **conf: Any) -> None:
        self.host, self.port = parse_endpoint(endpoint)
        self.endpoint = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self._token = wire.resolve_token(conf.get("token"), conf.get("token_file"))
        self._ssl = wire.client_ssl_context(
            ca=conf.get("tls_ca"), cert=conf.get("tls_cert"), key=conf.get("tls_key"),
            enabled=parse_bool(conf.get("tls", False), "tls"),
            verify_hostname=parse_bool(conf.get("tls_verify_hostname", True),
                                            "tls_verify_hostname"))
        self.timeout_s = parse_seconds(conf.get("timeout_s", 10.0), "timeout_s")
        self._lock = threading.Lock()
        self._idle: List[_Connection] = []
        self._instance: Optional[str] = None
        self._closed = False
        self._pid = os.getpid()
        self._release(self._connect())

    # -- Store ---------------------------------------------------------------------------
    def get(self, key: str) -> Optional[KeyValue]:
        return wire.kv_from_wire(self._call("get", key=args.key(key)))

    def get_prefix(self, prefix: str) -> Tuple[List[KeyValue], int]:
        result = self._call("get_prefix", prefix=args.key(prefix))
        return [wire.kv_from_wire(kv) for kv in result["kvs"]], int(result["revision"])

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return int(self._call("put", key=args.key(key), value=wire.value_to_wire(args.value(value)),
                              lease=args.count(lease)))

    def compare_and_set(self, key: str, expected_revision: Optional[int], value: bytes,
                        lease: int = 0) -> Tuple[bool, Optional[KeyValue]]:
        if expected_revision is not None:
            expected_revision = args.count(expected_revision)
        result = self._call("cas", key=args.key(key), expected=expected_revision,
                            value=wire.value_to_wire(args.value(value)), lease=args.count(lease))
        return bool(result["ok"]), wire.kv_from_wire(result["kv"])

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key=args.key(key)))

    def grant_lease(self, ttl_s: float) -> int:
        return int(self._call("grant", ttl_s=args.ttl(ttl_s)))

    def keep_alive(self, lease: int) -> None:
        self._call("keep_alive", lease=args.count(lease))

    def revoke_lease(self, lease: int) -> None:
        self._call("revoke", lease=args.count(lease))

    def wait(self, prefix: str, after_revision: int, timeout_s: float) -> List[Event]:
        timeout_s = args.timeout(timeout_s)
        result = self._call("wait", reply_timeout_s=timeout_s + self.timeout_s,
                            prefix=args.key(prefix), after=args.count(after_revision), timeout_s=timeout_s)
        return [wire.event_from_wire(e) for e in result]

    def ping(self) -> int:
        """Round trip to the server; returns its current revision."""
        return int(self._call("ping")["revision"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        return f"EmbeddedStore({self.endpoint!r})"

    # -- requests ------------------------------------------------------------------------
    def _call(self, op: str, reply_timeout_s: Optional[float] = None, **fields: Any) -> Any:
        timeout_s = self.timeout_s if reply_timeout_s is None else reply_timeout_s
        for attempt in (1, 2):
            conn = self._acquire()
            try:
                reply = conn.request({"op": op, **fields}, timeout_s)
            except StoreArgumentError:  # refused before sending (over the size limit)
                self._release(conn)
                raise
            except _Lost as lost:
                conn.close()
                if attempt == 1 and (not lost.sent or op in _REPEATABLE):
                    continue
                raise StoreUnavailableError(
                    f"lost the connection to the rendezvous server {self.endpoint} during "
                    f"{op} ({lost}){'; its outcome is unknown' if lost.sent else ''}") from None
            self._release(conn)
            return _unwrap(reply)
        raise AssertionError("unreachable")  # pragma: no cover

    def _acquire(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise StoreError(f"the store client for {self.endpoint} is closed")
            if self._pid != os.getpid():  # forked: the pooled sockets belong to the parent
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if not conn.looks_closed():
                    return conn
                conn.close()
        return self._connect()

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    # -- connecting ----------------------------------------------------------------------
    def _connect(self) -> _Connection:
        where = f"the rendezvous server {self.endpoint}"
        deadline = time.monotonic() + self.timeout_s
        try:
            sock = _open_socket(self.host, self.port, self.timeout_s)
        except socket.gaierror as exc:
            raise StoreUnavailableError(f"cannot resolve the rendezvous host {self.host!r}: "
                                        f"{exc.strerror or exc}") from None
        except socket.timeout:
            raise StoreUnavailableError(f"cannot reach {where}: no answer within "
                                        f"{self.timeout_s:g}s") from None
        except OSError as exc:
            raise StoreUnavailableError(f"cannot reach {where}: {_reason(exc)}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            return self._handshake(sock, deadline)
        except _ssl.SSLCertVerificationError as exc:
            sock.close()
            raise StoreAuthError(f"{where} presented a certificate we do not trust: "
                                 f"{exc.verify_message or exc.reason}") from None
        except _ssl.SSLError as exc:
            sock.close()
            raise StoreUnavailableError(f"TLS with {where} failed ({exc.reason or exc}); "
                                        "does the server use TLS?") from None
        except socket.timeout:
            sock.close()
            hint = "" if self._ssl else " (does it use TLS? then set tls_ca)"
            raise StoreUnavailableError(f"{where} did not complete the handshake within "
                                        f"{self.timeout_s:g}s{hint}") from None
        except (OSError, EOFError) as exc:
            sock.close()
            hint = "" if self._ssl else " (does it use TLS? then set tls_ca)"
            raise StoreUnavailableError(f"{where} closed the connection during the handshake"
                                        f"{hint}: {_reason(exc)}") from None
        except BaseException:
            sock.close()
            raise

    def _handshake(self, sock: socket.socket, deadline: float) -> _Connection:
        where = f"the rendezvous server {self.endpoint}"
        sock.settimeout(self.timeout_s)
        reader = _Reader(sock)
        reader.use_kernel_timeouts()  # plain TCP: fewer hand-overs of the interpreter lock
        try:
            hello = reader.message(wire.MAX_HANDSHAKE_BYTES, deadline)
            if hello.get("hello") != wire.PROTOCOL:
                raise wire.ProtocolError("no hello")
            server_nonce = wire.unb64(hello.get("nonce"))
        except wire.ProtocolError:
            raise StoreUnavailableError(f"{self.endpoint} is not an elastic-rendezvous server") from None
        if hello.get("version") != wire.VERSION:
            raise StoreUnavailableError(f"{where} speaks protocol version {hello.get('version')}, "
                                        f"this client {wire.VERSION}")
        instance = str(hello.get("instance"))
        if hello.get("auth") and self._token is None:
            raise StoreAuthError(f"{where} requires a token and this node has none: add --rdzv-conf "
                                 f"token_file=PATH (or token=SECRET), or set ${wire.TOKEN_ENV} "
                                 f"(or ${wire.TOKEN_FILE_ENV}), with the same secret as the other nodes")
        if not hello.get("auth") and self._token is not None:
            raise StoreAuthError(f"{where} has no token configured but this client has one; "
                                 "refusing an unauthenticated server")
        client_nonce = wire.new_nonce()
        proof = (wire.client_proof(self._token, server_nonce, client_nonce)
                 if self._token is not None else None)
        sock.sendall(wire.encode({"proof": proof, "nonce": wire.b64(client_nonce)}))
        try:
            answer = reader.message(wire.MAX_HANDSHAKE_BYTES, deadline)
        except wire.ProtocolError:
            raise StoreUnavailableError(f"{self.endpoint} is not an elastic-rendezvous server") from None
        if not answer.get("ok"):
            message = str(answer.get("message") or "authentication failed")[:200]
            hint = ("; add --rdzv-conf token_file=PATH (or token=SECRET), or set "
                    f"${wire.TOKEN_ENV}, on every node" if self._token is None else "")
            raise StoreAuthError(f"{where} refused us: {message}{hint}")
        if self._token is not None and not wire.proof_matches(
                wire.server_proof(self._token, server_nonce, client_nonce), answer.get("proof")):
            raise StoreAuthError(f"{where} could not prove it holds the token")
        with self._lock:
            if self._instance is None:
                self._instance = instance
            elif self._instance != instance:
                sock.close()
                raise StoreUnavailableError(
                    f"{where} restarted and lost the rendezvous state; rejoin with a new store")
        return _Connection(sock, reader, instance)


# -- helpers -------------------------------------------------------------------------------
class _Reader:
    """Buffered framing on a blocking socket: one ``recv`` usually brings a whole reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.kernel = False  # timeouts by SO_RCVTIMEO/SO_SNDTIMEO (see _Connection)
        self._recv_timeout = self._send_timeout = -1.0

    def use_kernel_timeouts(self) -> None:
        """Switch a plain TCP socket to blocking mode with kernel timeouts (not TLS, not
        where the kernel refuses them: then Python's timeouts stay)."""
        if isinstance(self.sock, _ssl.SSLSocket) or not _KERNEL_TIMEOUTS:
            return
        timeout = self.sock.gettimeout()
        try:
            self.set_recv_timeout(timeout or 10.0)
            self.set_send_timeout(timeout or 10.0)
            self.sock.settimeout(None)
        except OSError:
            self.sock.settimeout(timeout)
            return
        self.kernel = True

    def set_recv_timeout(self, seconds: float) -> None:
        seconds = max(0.001, seconds)  # zero would mean "wait forever"
        if abs(seconds - self._recv_timeout) > 0.0005:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
            self._recv_timeout = seconds

    def set_send_timeout(self, seconds: float) -> None:
        seconds = max(0.001, seconds)
        if abs(seconds - self._send_timeout) > 0.0005:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
            self._send_timeout = seconds

    def buffered(self) -> int:
        return len(self.buf)

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            if self.kernel:
                self.set_recv_timeout(remaining)
                try:
                    chunk = self.sock.recv(max(65536, n - len(self.buf)))
                except BlockingIOError:  # EAGAIN: SO_RCVTIMEO ran out
                    raise socket.timeout("timed out") from None
            else:
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise EOFError("connection closed by the server")
            self.buf += chunk

    def message(self, limit: int, deadline: float) -> Dict[str, Any]:
        self._fill(wire.HEADER.size, deadline)
        (length,) = wire.HEADER.unpack_from(self.buf)
        wire.check_length(length, limit)
        end = wire.HEADER.size + length
        self._fill(end, deadline)
        body = bytes(self.buf[wire.HEADER.size:end])
        del self.buf[:end]
        return wire.decode(body)


# Kernel socket timeouts: Linux's SO_RCVTIMEO/SO_SNDTIMEO take a struct timeval.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")
_TIMEVAL = struct.Struct("@ll")
# TCP_INFO's first byte is the connection's state (1: established); SIOCINQ (= FIONREAD) the
# bytes waiting to be read. Both are read without releasing the interpreter lock.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_ESTABLISHED = 1
_SIOCINQ = 0x541B


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1e6))


def _tcp_idle_state(sock: socket.socket) -> Optional[bool]:
    """True: established with nothing to read (safe to reuse); False: closed by the peer,
    reset, or something unasked-for to read; None: cannot tell (ask select)."""
    if _TCP_INFO is None or not _KERNEL_TIMEOUTS:
        return None
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)[0]
        pending = bytearray(4)
        fcntl.ioctl(sock.fileno(), _SIOCINQ, pending, True)
    except (OSError, ValueError, IndexError):
        return None
    return state == _TCP_ESTABLISHED and not any(pending)


def _open_socket(host: str, port: int, timeout_s: float) -> socket.socket:
    """``socket.create_connection``, without a resolver call when ``host`` is an IP address
    (getaddrinfo costs about a millisecond, on every connection a worker or agent opens)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout_s)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _unwrap(reply: Dict[str, Any]) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    kind, message = reply.get("error"), str(reply.get("message", ""))
    if kind == "lease_not_found":
        raise LeaseNotFoundError(message)
    if kind == "compacted":
        raise StoreCompactedError(message)
    if kind == "value":
        raise StoreArgumentError(message)
    raise StoreError(f"rendezvous server error: {kind}: {message}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
