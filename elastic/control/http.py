"""The agent's HTTP control port (``elastic-run --control-port N [--control-host H]``).

What a probe, a scraper or a Kubernetes ``preStop`` hook reaches on each node::

    GET  /healthz   200 "ok" while the agent loop is alive, else 503 and why
    GET  /readyz    200 "ready" while the node runs its workers in a closed round, else 503
    GET  /status    the job's JobStatus as JSON, with this node's id ("node_id")
    GET  /metrics   Prometheus text format (elastic_* gauges and counters)
    POST /drain?deadline_s=N&reason=preemption|maintenance|scale_down
                    drain this node (202 and the drain as JSON); GET works too, since a
                    Kubernetes preStop ``httpGet`` sends nothing else

Bound to 127.0.0.1 unless told; bound off loopback it needs the job's token
(``Authorization: Bearer <token>`` on every request, 401 otherwise) and refuses to start without
one. Stdlib only: a ``ThreadingHTTPServer`` in a daemon thread. A bad request is one line and a
4xx; an error of ours is one line and a 500, never a traceback.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple, Union
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError, UserError, one_line
from .api import DrainReason, NodeState
from .controller import JobController
from .metrics import CheckpointClock, render

__all__ = ["ControlServer", "is_loopback"]

log = logging.getLogger("elastic.control")

_FINAL = {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.DRAINED, NodeState.STOPPED}
_GET = ("/healthz", "/readyz", "/status", "/metrics")
_DRAIN_REASONS = (DrainReason.PREEMPTION, DrainReason.MAINTENANCE, DrainReason.SCALE_DOWN)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is a loopback address only."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    control: "ControlServer"

    def server_bind(self) -> None:
        # HTTPServer's own asks the resolver for the host's FQDN (a reverse lookup that can
        # stall a start where DNS is slow or absent); the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


class ControlServer:
    """Serves ``agent`` (an ``ElasticAgent``) on ``host:port`` (``port`` 0: a free one; ``.port``
    tells which once started). ``token`` (bytes or str) is the job's shared secret; it is
    required on every request when ``require_token`` (default: when ``host`` is not loopback).
    ``stall_s``: how long the agent loop may not pass before ``/healthz`` fails (default
    ``max(10 s, 50 monitor intervals)``)."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 0, token: Union[bytes, str, None] = None, *,
                 require_token: Optional[bool] = None, stall_s: Optional[float] = None) -> None:
        self.agent = agent
        self.host = (host or "0.0.0.0").strip("[]")
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError(f"--control-port {port!r}: expected a port number (0: any free one)")
        self.port = port
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.require_token = (not is_loopback(self.host)) if require_token is None else bool(require_token)
        if self.require_token and not self.token:
            raise ConfigError(f"--control-host {self.host}: a control port off loopback needs the job's token "
                              f"(--rdzv-conf token=... or $ELASTIC_RDZV_TOKEN), or bind it to 127.0.0.1")
        interval = float(getattr(agent, "monitor_interval_s", 0.1) or 0.1)
        self.stall_s = max(10.0, 50 * interval) if stall_s is None else float(stall_s)
        self.controller = JobController(agent.handler.store, agent.handler.settings.run_id)
        self._checkpoints = CheckpointClock()
        self._lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._draining_since: Optional[float] = None  # when /healthz first saw this node draining

    @property
    def node_id(self) -> str:
        return self.agent.handler.node.node_id

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- life --------------------------------------------------------------------------
    def start(self) -> "ControlServer":
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self.port), _Handler)
        except OSError as exc:
            raise ConfigError(f"control port {self.host}:{self.port}: cannot listen: {exc.strerror or exc}") from None
        server.control = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"elastic-control-{self.port}", daemon=True)
        self._thread.start()
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info("control port listening on %s:%d%s", host, self.port,
                 " (token required)" if self.require_token else "")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ControlServer":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- answers (status code, content type, body) ---------------------------------------
    def authorized(self, header: Optional[str]) -> bool:
        if not self.require_token:
            return True
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode("utf-8"), self.token or b"")

    def health(self) -> Tuple[bool, str]:
        reporter = self.agent.reporter
        state = reporter.state
        if state in _FINAL:
            return False, f"agent has ended (node {state.value})"
        if state is not NodeState.DRAINING:
            self._draining_since = None
        else:  # the drain loop waits for the workers, bounded by the drain's deadline
            now = time.time()
            if self._draining_since is None:
                self._draining_since = now
            drain = reporter.drain
            grace = float(getattr(self.agent, "drain_grace_s", 25.0))
            ends = drain.deadline if drain is not None and drain.deadline else \
                ((drain.at if drain is not None and drain.at else self._draining_since) + grace)
            if now < ends + self.stall_s:
                return True, "ok"
            return False, f"agent loop stuck draining: its deadline passed {time.time() - ends:.0f}s ago"
        if reporter.healthy(self.stall_s):
            return True, "ok"
        return False, (f"agent loop stalled: last pass {time.monotonic() - reporter.tick:.1f}s ago "
                       f"(limit {self.stall_s:g}s, node {state.value})")

    def healthz(self) -> Tuple[int, str]:
        ok, why = self.health()
        return (200, "ok") if ok else (503, why)

    def readyz(self) -> Tuple[int, str]:
        reporter = self.agent.reporter
        rnd = reporter.round
        if reporter.state is NodeState.RUNNING and rnd is not None and reporter.pids:
            return 200, "ready"
        return 503, f"not ready: node {reporter.state.value}"

    def status(self) -> Dict[str, Any]:
        out = self.controller.status().to_json()
        out["node_id"] = self.node_id
        out["agent"] = {"state": self.agent.reporter.state.value, "healthy": self.health()[0]}
        return out

    def metrics(self) -> str:
        try:
            status = self.controller.status()
        except Exception as exc:  # the store is away or the job not published yet: our own figures only
            log.debug("/metrics without the job's status: %s", exc)
            status = None
        checkpoint_time = None
        try:
            kvs, _ = self.agent.handler.store.get_prefix(self.agent.handler.keys.progress(self.node_id))
            with self._lock:
                checkpoint_time = self._checkpoints.update(kv.value for kv in kvs)
        except Exception as exc:
            log.debug("/metrics without progress: %s", exc)
        return render(self.agent, status, self.health()[0], checkpoint_time)

    def drain(self, query: str) -> Tuple[int, Dict[str, Any]]:
        deadline_s, reason = parse_drain_query(query)
        reporter = self.agent.reporter
        if reporter.state in _FINAL:
            raise _HTTPError(409, f"node {self.node_id} has ended ({reporter.state.value}); nothing to drain")
        if reporter.state is NodeState.DRAINING and reporter.drain is not None:
            return 202, {"node_id": self.node_id, "already_draining": True, **reporter.drain.to_json()}
        drain = self.controller.request_drain(self.node_id, reason, deadline_s)
        log.warning("control port: drain of this node asked (%s, deadline %s)", reason.value,
                    "none" if deadline_s is None else f"{deadline_s:g}s")
        return 202, {"node_id": self.node_id, "already_draining": False, "deadline_s": deadline_s,
                     **drain.to_json()}


class _HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_drain_query(query: str) -> Tuple[Optional[float], DrainReason]:
    """``deadline_s`` (seconds >= 0, optional) and ``reason`` of a drain request; a 400 otherwise."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8)
    except ValueError:
        raise _HTTPError(400, f"malformed query {query[:80]!r}") from None
    unknown = sorted(set(params) - {"deadline_s", "reason"})
    if unknown:
        raise _HTTPError(400, f"unknown parameter {unknown[0][:40]!r}: expected deadline_s and reason")
    for name, values in params.items():
        if len(values) > 1:
            raise _HTTPError(400, f"parameter {name} given {len(values)} times")
    deadline_s = None
    if "deadline_s" in params:
        raw = params["deadline_s"][0]
        try:
            deadline_s = float(raw)
        except ValueError:
            raise _HTTPError(400, f"deadline_s={raw[:40]!r}: expected seconds (a number >= 0)") from None
        if not math.isfinite(deadline_s) or deadline_s < 0:
            raise _HTTPError(400, f"deadline_s={raw[:40]!r}: expected seconds (a number >= 0)")
    reason = DrainReason.MAINTENANCE
    if "reason" in params:
        raw = params["reason"][0]
        if raw not in {r.value for r in _DRAIN_REASONS}:
            raise _HTTPError(400, f"reason={raw[:40]!r}: expected one of {', '.join(r.value for r in _DRAIN_REASONS)}")
        reason = DrainReason(raw)
    return deadline_s, reason


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "elastic-run"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that sends nothing does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def _serve(self, method: str) -> None:
        control = self.server.control
        try:
            self._drop_body()
            if not control.authorized(self.headers.get("Authorization")):
                self._send(401, "unauthorized: send 'Authorization: Bearer <the job's token>'",
                           extra={"WWW-Authenticate": 'Bearer realm="elastic-run"'})
                return
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path == "/drain":
                if method not in ("POST", "GET"):
                    self._send(405, f"{method} /drain: use POST", extra={"Allow": "POST, GET"})
                    return
                code, body = control.drain(url.query)
                self._send(code, body)
            elif path in _GET:
                if method not in ("GET", "HEAD"):
                    self._send(405, f"{method} {path}: use GET", extra={"Allow": "GET, HEAD"})
                    return
                if url.query:
                    raise _HTTPError(400, f"{path} takes no parameters")
                if path == "/healthz":
                    self._send(*control.healthz())
                elif path == "/readyz":
                    self._send(*control.readyz())
                elif path == "/status":
                    self._send(200, control.status())
                else:
                    self._send(200, control.metrics(), content_type="text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, f"no such path {url.path[:80]!r}: try /healthz, /readyz, /status, /metrics, /drain")
        except _HTTPError as exc:
            self._send(exc.code, str(exc))
        except UserError as exc:  # no such job yet, unknown node: the client's to know, in one line
            self._send(503, one_line(exc))
        except Exception as exc:
            log.exception("control port: %s %s failed", method, self.path[:200])
            self._send(500, f"internal error: {one_line(exc)}")

    def _drop_body(self) -> None:
        """Read (and ignore) a request body, so the connection stays in step; bounded."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if length > 65536:
            self.close_connection = True
            raise _HTTPError(413, "request body too large")
        if length > 0:
            self.rfile.read(length)

    def _send(self, code: int, body: Union[str, Dict[str, Any]], content_type: Optional[str] = None,
              extra: Optional[Dict[str, str]] = None) -> None:
        if isinstance(body, dict):
            data = (json.dumps(body, default=str) + "\n").encode("utf-8")
            content_type = content_type or "application/json"
        else:
            data = (body if body.endswith("\n") else body + "\n").encode("utf-8")
            content_type = content_type or "text/plain; charset=utf-8"
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client went away
            self.close_connection = True
