"""The ``etcd`` rendezvous backend: etcd v3 through ``pyetcd`` (pip install 'elastic-run[etcd]').

Maps the store interface onto etcd's own primitives: leases for liveness (TTL in whole
seconds, at least 1; etcd may round it up further), watches for :meth:`EtcdStore.wait`
(starting at ``after_revision + 1``, so nothing between a read and a wait is missed),
transactions on ``mod_revision`` for compare-and-set (``None``: ``version == 0``, the key is
absent). Several endpoints (``h1:p1,h2:p2``) are tried in order and failed over; TLS
certificates and user/password are passed through.

``pyetcd`` and ``grpc`` are imported when a store is created, never by ``import elastic``.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from ..lazy import require
from ..errors import ConfigError, one_line
from ..settings import parse_bool, parse_seconds
from . import _args as args
from .api import (BackendSpec, Event, KeyValue, LeaseNotFoundError, Store, StoreAuthError, StoreCompactedError,
                  StoreError, StoreUnavailableError)

__all__ = ["EtcdStore", "create_etcd_store", "parse_endpoints", "DEFAULT_PORT", "SETTINGS"]

DEFAULT_PORT = 2379
# Ops whose repetition is harmless when a timeout leaves their outcome unknown.
_REPEATABLE = frozenset({"status", "get", "get_prefix", "put", "lease", "keep_alive", "revoke",
                         "watch", "authenticate"})
# A wait shorter than this still gives etcd time to replay history into a new watch.
_MIN_HISTORY_WAIT_S = 0.25


def parse_endpoints(endpoint: str) -> List[Tuple[str, int]]:
    """``h1:p1,h2:p2`` (optionally ``http://`` / ``https://``) -> [(host, port), ...]."""
    from .embedded_client import parse_endpoint

    out = []
    for item in (endpoint or "").split(","):
        text = item.strip()
        for scheme in ("http://", "https://"):
            if text.startswith(scheme):
                text = text[len(scheme):]
        text = text.rstrip("/")
        if text:
            out.append(parse_endpoint(text, DEFAULT_PORT))
    return out or [("127.0.0.1", DEFAULT_PORT)]


class EtcdStore(Store):
    """A :class:`Store` on an etcd v3 cluster.

    Settings (strings accepted, as from ``--rdzv-conf``): ``cacert`` (CA bundle; turns TLS on),
    ``cert``/``key`` (client certificate), ``tls`` (TLS with the system CAs), ``user`` and
    ``password``, ``timeout_s`` (per-request timeout, default 10). torchrun's spellings
    ``timeout``, ``protocol=https`` and ``ssl`` work as well. Other keys are ignored.
    Checks the cluster is reachable at construction: a wrong endpoint fails here in one line.
    """

    def __init__(self, endpoint: str = "", **conf: Any) -> None:
        self._pyetcd = require("pyetcd", "the etcd rendezvous backend")
        import grpc  # installed with pyetcd

        self._grpc = grpc
        from pyetcd import events as etcd_events, exceptions as etcd_exceptions
        from pyetcd.client import EtcdTokenCallCredentials

        self._exc = etcd_exceptions
        self._delete_event = etcd_events.DeleteEvent
        self._token_credentials = EtcdTokenCallCredentials
        self.endpoints = parse_endpoints(endpoint)
        self.endpoint = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        # torchrun's etcd settings are accepted too: timeout, protocol=https, ssl.
        self.timeout_s = parse_seconds(conf.get("timeout_s", conf.get("timeout", 10.0)), "timeout_s")
        user, password = conf.get("user"), conf.get("password")
        if (user is None) != (password is None):
            raise ConfigError("etcd authentication needs both user and password")
        self._user, self._password = user, password
        credentials = self._credentials(conf)
        self._secure = credentials is not None
        self._eps = [self._pyetcd.Endpoint(host, port, secure=credentials is not None,
                                           creds=credentials, time_retry=min(1.0, self.timeout_s))
                     for host, port in self.endpoints]
        self._client = self._pyetcd.MultiEndpointEtcd3Client(
            endpoints=self._eps, timeout=self.timeout_s, failover=True)
        self._client._current_endpoint_label = self._eps[0].netloc  # try them in order
        self._auth_lock = threading.Lock()
        self._closed = False
        try:
            if user is not None:
                self._authenticate()
            self._call("status", self._client.status)
        except BaseException:
            self.close()
            raise

    # -- Store ---------------------------------------------------------------------------
    def get(self, key: str) -> Optional[KeyValue]:
        response = self._call("get", self._client.get_response, args.key(key))
        if not response.kvs:
            return None
        return _kv(response.kvs[0])

    def get_prefix(self, prefix: str) -> Tuple[List[KeyValue], int]:
        start, end = _range(args.key(prefix))
        response = self._call("get_prefix", self._client.get_range_response, start, end,
                              sort_order="ascend", sort_target="key")
        return [_kv(kv) for kv in response.kvs], int(response.header.revision)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        response = self._call("put", self._client.put, args.key(key), args.value(value),
                              lease=args.count(lease) or None)
        return int(response.header.revision)

    def compare_and_set(self, key: str, expected_revision: Optional[int], value: bytes,
                        lease: int = 0) -> Tuple[bool, Optional[KeyValue]]:
        t = self._client.transactions
        key, value, lease = args.key(key), args.value(value), args.count(lease)
        compare = [t.version(key) == 0] if expected_revision is None else [
            t.mod(key) == args.count(expected_revision)]
        ok, responses = self._call(
            "cas", self._client.transaction, compare=compare,
            success=[t.put(key, value, lease=lease or None), t.get(key)],
            failure=[t.get(key)])
        found = responses[-1] if responses else []
        if not found:
            return bool(ok), None
        value_read, meta = found[0]
        return bool(ok), KeyValue(key, bytes(value_read), int(meta.mod_revision), int(meta.lease_id))

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", self._client.delete, args.key(key)))

    def grant_lease(self, ttl_s: float) -> int:
        lease = self._call("lease", self._client.lease, max(1, math.ceil(args.ttl(ttl_s))))
        return int(lease.id)

    def keep_alive(self, lease: int) -> None:
        responses = self._call("keep_alive", lambda: list(self._client.refresh_lease(args.count(lease))))
        if not responses or responses[-1].TTL <= 0:
            raise LeaseNotFoundError(f"lease {lease} expired or was revoked")

    def revoke_lease(self, lease: int) -> None:
        try:
            self._call("revoke", self._client.revoke_lease, args.count(lease))
        except LeaseNotFoundError:
            pass

    def wait(self, prefix: str, after_revision: int, timeout_s: float) -> List[Event]:
        start, end = _range(args.key(prefix))
        after_revision = args.count(after_revision)
        deadline = time.monotonic() + max(args.timeout(timeout_s), _MIN_HISTORY_WAIT_S)
        responses: "queue.Queue[Any]" = queue.Queue()
        watch_id = self._call("watch", self._client.add_watch_callback, start, responses.put,
                              range_end=end, start_revision=int(after_revision) + 1)
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    item = responses.get(timeout=max(0.0, remaining))
                except queue.Empty:
                    return []
                events = self._events(item, after_revision)
                if events:
                    while True:  # take whatever else already arrived
                        try:
                            events.extend(self._events(responses.get_nowait(), after_revision))
                        except queue.Empty:
                            return events
        finally:
            try:
                self._client.cancel_watch(watch_id)
            except Exception:  # the stream may be gone already; nothing to cancel then
                pass

    def close(self) -> None:
        self._closed = True
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoint!r})"

    # -- internals -----------------------------------------------------------------------
    def _events(self, item: Any, after_revision: int) -> List[Event]:
        if isinstance(item, self._exc.RevisionCompactedError):
            raise StoreCompactedError(
                f"etcd compacted its history past revision {after_revision} "
                f"(compacted at {item.compacted_revision}); re-read and wait again")
        if isinstance(item, BaseException):
            raise StoreUnavailableError(f"etcd watch on {self.endpoint} broke: "
                                        f"{_grpc_details(item)}")
        out = []
        for event in item.events:
            kind = "delete" if isinstance(event, self._delete_event) else "put"
            revision = int(event.mod_revision)
            if revision > after_revision:
                out.append(Event(kind, event.key.decode("utf-8", "replace"),
                                 b"" if kind == "delete" else bytes(event.value), revision))
        return out

    def _credentials(self, conf: dict):
        cacert, cert, key = conf.get("cacert"), conf.get("cert"), conf.get("key")
        tls = (parse_bool(conf.get("tls", conf.get("ssl", False)), "tls")
               or str(conf.get("protocol", "")).lower() == "https")
        if not (cacert or cert or key or tls):
            return None
        if bool(cert) != bool(key):
            raise ConfigError("an etcd client certificate needs both cert and key")

        def read(path: Optional[str], what: str) -> Optional[bytes]:
            if not path:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read the etcd {what} {path}: {exc.strerror or exc}") from None

        return self._grpc.ssl_channel_credentials(read(cacert, "CA file"), read(key, "key file"),
                                                  read(cert, "certificate"))

    def _authenticate(self) -> None:
        def authenticate():
            request = self._pyetcd.etcdrpc.AuthenticateRequest(name=self._user, password=self._password)
            try:
                return self._client.authstub.Authenticate(request, self.timeout_s)
            except self._grpc.RpcError as exc:
                self._client._manage_grpc_errors(exc)  # marks the endpoint failed, maps the code

        with self._auth_lock:
            response = self._call("authenticate", authenticate, _reauth=False)
            self._client.metadata = (("token", response.token),)
            # gRPC sends call credentials only over TLS; plaintext channels carry the token
            # as metadata (which pyetcd adds to every call) instead.
            self._client.call_credentials = self._grpc.metadata_call_credentials(
                self._token_credentials(response.token)) if self._secure else None
            self._client._stubs.pop("watcher", None)  # the watcher holds the old token

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, _reauth: bool = True,
              **kwargs: Any) -> Any:
        """Run one pyetcd call, failing over between endpoints, mapping errors to ours."""
        grpc, exc_mod = self._grpc, self._exc
        attempts = len(self._eps) + 1
        last: Optional[BaseException] = None
        for _ in range(attempts):
            if self._closed:
                raise StoreError(f"the etcd client for {self.endpoint} is closed")
            try:
                return fn(*args, **kwargs)
            except exc_mod.NoServerAvailableError as exc:
                last = last or exc
                for ep in self._eps:  # every endpoint failed recently: try them all again
                    ep.last_failed = 0
            except exc_mod.ConnectionFailedError as exc:  # not connected: the request never ran
                last = exc
            except (exc_mod.ConnectionTimeoutError, exc_mod.InternalServerError,
                    exc_mod.WatchTimedOut) as exc:
                last = exc
                if what not in _REPEATABLE:
                    break
            except grpc.RpcError as exc:
                code, details = exc.code(), _grpc_details(exc)
                if code == grpc.StatusCode.NOT_FOUND and "lease" in details:
                    raise LeaseNotFoundError(f"etcd: {details}") from None
                if _is_auth_error(grpc, code, details):
                    if _reauth and self._user is not None and "token" in details:
                        self._authenticate()  # simple tokens expire (5 min by default)
                        continue
                    raise StoreAuthError(f"etcd at {self.endpoint} refused our credentials: "
                                         f"{details}") from None
                if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                    raise StoreCompactedError(f"etcd: {details}") from None
                raise StoreError(f"etcd {what} failed: {details}") from None
            except exc_mod.Etcd3Exception as exc:  # any other of pyetcd's: ours, in one line
                raise StoreError(f"etcd {what} failed: {_describe(exc)}") from None
            except ValueError as exc:  # grpc: "Cannot invoke RPC: Channel closed!"
                if self._closed:
                    raise StoreError(f"the etcd client for {self.endpoint} is closed") from None
                raise StoreError(f"etcd {what} failed: {_describe(exc)}") from None
        raise StoreUnavailableError(
            f"etcd at {self.endpoint} is unavailable: {what} failed ({_describe(last)}; "
            f"timeout {self.timeout_s:g}s)") from None


def create_etcd_store(endpoint: str = "", **conf: Any) -> EtcdStore:
    """Backend factory: connect to etcd at ``endpoint`` (``host:port[,host:port...]``)."""
    return EtcdStore(endpoint, **conf)


# Our names, torchrun's etcd spellings (protocol=https, ssl) and, as aliases, its etcd-v2
# ones and its per-request ``timeout``.
SETTINGS = frozenset({"cacert", "cert", "key", "tls", "user", "password", "protocol", "ssl",
                      "timeout_s"})
create_etcd_store.spec = BackendSpec(  # type: ignore[attr-defined]
    keys=SETTINGS, aliases=(("ca_cert", "cacert"), ("ssl_cert", "cert"), ("ssl_cert_key", "key"),
                            ("timeout", "timeout_s")))


# -- helpers -------------------------------------------------------------------------------
def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode("utf-8", "replace"), bytes(kv.value), int(kv.mod_revision),
                    int(kv.lease))


def _range(prefix: str) -> Tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key that starts with ``prefix``."""
    if not prefix:
        return b"\0", b"\0"  # etcd: from the smallest key to the end
    start = prefix.encode("utf-8")
    end = bytearray(start)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return start, bytes(end[:i + 1])
    return start, b"\0"


def _is_auth_error(grpc: Any, code: Any, details: str) -> bool:
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return True
    text = details.lower()
    return code == grpc.StatusCode.INVALID_ARGUMENT and (
        "authentication" in text or "user name" in text or "auth token" in text
        or "password" in text)


def _grpc_details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            return str(details() or exc)
        except Exception:
            pass
    return str(exc) or type(exc).__name__


def _describe(exc: Optional[BaseException]) -> str:
    return "no attempt made" if exc is None else one_line(exc)
