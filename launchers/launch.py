"""The Python API behind ``elastic-run``: :func:`launch` runs one node's agent for a job.

Schedulers (a Kubernetes operator, a Slurm prolog, a Ray actor) call this directly instead of
shelling out: build a :class:`LaunchConfig`, call ``launch(config)``, get the exit code.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from elastic.agent import ElasticAgent, FrameworkAdapter, WorkerSpec
from elastic.errors import ConfigError
from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.rendezvous.keys import JobKeys
from elastic.settings import DEFAULT_RDZV_PORT, is_true
from elastic.store import BackendSpec, Store, StoreError, backend_spec, backends
from elastic.store.embedded_client import parse_endpoint

if TYPE_CHECKING:
    from .handle import AgentHandle
from .config import LaunchConfig, has_token, is_local_host, is_loopback_host, store_conf

__all__ = ["launch", "start", "guess_preload"]

log = logging.getLogger("elastic.launcher")
DEFAULT_LAST_CALL_S = 3.0
DEFAULT_LEASE_TTL_S = 5.0
DEFAULT_JOIN_TIMEOUT_S = 600.0
DEFAULT_STOP_GRACE_S = 5.0


def guess_preload(config: LaunchConfig) -> Tuple[str, ...]:
    """Frameworks the script imports (read with ``ast``), for the warm standbys to import first."""
    if config.preload is not None:
        return config.preload
    if config.module or config.no_python:
        return ()
    from .frameworks import standby_preload

    return standby_preload(config.entrypoint[0])


def _open_store(config: LaunchConfig):
    """Connect to the job's store, picked through the registry and given only the settings
    its backend declares; host the backend's server here if it has one and the endpoint is ours.

    Returns the store, the server this node hosts (or None), the address this node is known
    by when the store says so (or None) and the environment that leads workers to the store.
    """
    backend = config.rdzv_backend
    factory, spec = backends.get(backend), backend_spec(backend)
    conf = store_conf(config.rdzv_conf, backend)
    endpoint, server, local = config.rdzv_endpoint, None, None
    if spec.serve is not None:
        endpoint, server, local = _serve_here(config, spec, conf)
    try:
        store = factory(endpoint, **conf)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if spec.in_process:  # nobody else can reach it: this node is on loopback, workers get nothing
        return store, server, "127.0.0.1", {}
    return store, server, local, _store_env(backend, endpoint, conf)


def _serve_here(config: LaunchConfig, spec: BackendSpec, conf: dict):
    """Start the backend's server when this node hosts it (``is_host``, else: the endpoint's
    host is this machine or its port is 0); a server already listening there is joined."""
    host, port = parse_endpoint(config.rdzv_endpoint, DEFAULT_RDZV_PORT, any_port=True)
    server = None
    raw = config.rdzv_conf.get("is_host")
    is_host = port == 0 or is_local_host(host) if raw is None else is_true(raw)
    if is_host:
        bind = host if host in ("localhost",) or host.startswith("127.") else "0.0.0.0"
        serve = spec.serve
        assert serve is not None  # only called for a backend that serves its store
        try:
            server = serve(bind, port, **conf)
            port = server.port
        except StoreError as exc:
            if getattr(exc.__cause__, "errno", None) != errno.EADDRINUSE:
                raise
            log.info("rendezvous server already running at %s:%d; joining it", host, port)
    local = "127.0.0.1" if host.startswith("127.") or host == "localhost" else None
    return f"{host}:{port}", server, local


def _store_env(backend: str, endpoint: str, conf: dict) -> dict:
    """How workers reach the job's store (``@elastic.run`` reads its new place there)."""
    import json

    return {"ELASTIC_RDZV_BACKEND": backend, "ELASTIC_RDZV_ENDPOINT": endpoint,
            "ELASTIC_RDZV_CONF": json.dumps(conf)}


def _wait_for_others(store: Store, keys: JobKeys, timeout_s: float) -> None:
    """The host keeps the server up until every other node has left (torchrun's exit barrier)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive, rev = store.get_prefix(keys.alive())
        if not alive:
            return
        store.wait(keys.alive(), rev, timeout_s=min(1.0, max(0.0, deadline - time.monotonic())))
    log.warning("other nodes still running after %.0fs; shutting the rendezvous server down", timeout_s)


def check_token(config: LaunchConfig) -> None:
    """Refuse, before any connection, an embedded store off loopback without a shared token.

    A server without a token serves loopback clients only (anyone who can reach the port
    could otherwise join the job), so such a job could never form: say what to add instead.
    """
    if backend_spec(config.rdzv_backend).serve is None:  # only a node that serves the store needs it here
        return
    host, _ = parse_endpoint(config.rdzv_endpoint, DEFAULT_RDZV_PORT, any_port=True)
    if is_loopback_host(host) or has_token(config.rdzv_conf):
        return
    raise ConfigError(f"rendezvous endpoint {host!r} is not a loopback address and no token is set; "
                      "a job across machines needs the same secret on every node: add --rdzv-conf "
                      "token_file=PATH (or token=SECRET), or set ELASTIC_RDZV_TOKEN "
                      "(or ELASTIC_RDZV_TOKEN_FILE)")


def rendezvous_settings(config: LaunchConfig) -> RendezvousSettings:
    """torchrun's c10d ``--rdzv-conf`` timeouts mapped onto the round protocol's settings."""
    lease_ttl = DEFAULT_LEASE_TTL_S
    if {"keep_alive_interval", "keep_alive_max_attempt"} & set(config.rdzv_conf):
        # torchrun declares a node dead after keep_alive_max_attempt missed keep-alives
        interval = config.conf_seconds("keep_alive_interval", 5.0)
        try:
            attempts = int(config.rdzv_conf.get("keep_alive_max_attempt", "3"))
        except ValueError:
            raise ConfigError(f"--rdzv-conf keep_alive_max_attempt="
                              f"{config.rdzv_conf['keep_alive_max_attempt']!r}: expected an integer") from None
        lease_ttl = interval * max(1, attempts)
    return RendezvousSettings(
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        last_call_s=config.conf_seconds("last_call_timeout", DEFAULT_LAST_CALL_S),
        lease_ttl_s=config.conf_seconds("lease_ttl", lease_ttl) or DEFAULT_LEASE_TTL_S,
        join_timeout_s=config.conf_seconds("join_timeout", DEFAULT_JOIN_TIMEOUT_S, "timeout"),
        max_restarts=config.max_restarts,
        store_timeout_s=config.conf_seconds("store_timeout", 0.0),
    )


class _VirtualLocalRank(FrameworkAdapter):
    """``--virtual-local-rank``: each worker sees only its own GPU, as device 0 (torchrun's
    meaning): ``LOCAL_RANK=0`` and ``CUDA_VISIBLE_DEVICES`` the local rank's entry of the
    agent's own ``CUDA_VISIBLE_DEVICES`` (or the local rank itself)."""

    def __init__(self, inner: FrameworkAdapter, visible: Optional[str], nproc: int) -> None:
        self.inner = inner
        self.name = inner.name  # the agent decides framework-specific things by these
        self.hosts_worker_store = inner.hosts_worker_store
        self.devices = [d.strip() for d in visible.split(",")] if visible is not None else None
        if self.devices is not None and nproc > len(self.devices):
            raise ConfigError(f"--virtual-local-rank: local rank {len(self.devices)} has no GPU in "
                              f"CUDA_VISIBLE_DEVICES={visible}")

    def on_round(self, *args, **kwargs) -> None:
        self.inner.on_round(*args, **kwargs)

    def worker_env(self, rnd, local_rank: int, rank: int) -> Mapping[str, str]:
        device = self.devices[local_rank] if self.devices is not None else str(local_rank)
        return {**self.inner.worker_env(rnd, local_rank, rank), "LOCAL_RANK": "0",
                "CUDA_VISIBLE_DEVICES": device}

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, item):
        return getattr(self.inner, item)


def _handle_signals(agent: ElasticAgent, names: Tuple[str, ...]) -> Dict[int, Any]:
    """``--signals-to-handle``: each stops the workers and leaves the job, as SIGTERM does (the
    agent itself always handles SIGTERM and SIGINT). Returns the previous handlers."""
    previous: Dict[int, Any] = {}
    for name in names:
        sig = signal.Signals[name]
        if sig in (signal.SIGTERM, signal.SIGINT):
            continue
        previous[sig] = signal.signal(sig, agent._on_signal)
    return previous


def _detected_adapter(config: LaunchConfig) -> FrameworkAdapter:
    """The API path detects the framework as ``--framework auto`` does."""
    from .frameworks import create_adapter, detect_framework

    script = None if config.module or config.no_python else config.entrypoint[0]
    return create_adapter(detect_framework(script))


class _Node:
    """One node of a job, set up from ``config`` (store, server, rendezvous handler, agent) and
    run once by :meth:`run` in the caller's thread; :func:`launch` and :func:`start` share it."""

    def __init__(self, config: LaunchConfig) -> None:
        check_token(config)
        self.config = config
        settings = rendezvous_settings(config)
        self.close_timeout_s = config.conf_seconds("close_timeout", settings.join_timeout_s)
        adapter = config.adapter or _detected_adapter(config)
        if config.virtual_local_rank:
            adapter = _VirtualLocalRank(adapter,
                                        config.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES")),
                                        config.nproc_per_node)
        from .numa import cpu_affinity

        affinity = cpu_affinity(config.numa_binding, config.nproc_per_node)
        grace_s = config.shutdown_timeout_s
        if grace_s is None:  # torchrun's fallback, then ours
            raw = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "")
            try:
                grace_s = float(raw) if raw else DEFAULT_STOP_GRACE_S
            except ValueError:
                raise ConfigError(f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={raw!r}: expected seconds") from None
        self.store, self.server, local, store_env = _open_store(config)
        try:
            addr = config.local_addr or local or socket.getfqdn()
            node = NodeInfo(node_id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", host=addr,
                            nproc=config.nproc_per_node, rank_hint=config.node_rank)
            self.handler = RendezvousHandler(self.store, settings, node)
        except BaseException:
            self._close_store()
            raise
        spec = WorkerSpec(
            entrypoint=tuple(config.entrypoint), nproc_per_node=config.nproc_per_node, module=config.module,
            no_python=config.no_python, env=dict(config.env), log_dir=config.log_dir, tee=config.tee,
            preload=guess_preload(config), standby=config.standby and not config.no_python, role=config.role,
            stop_grace_s=grace_s, console_local_ranks=config.console_local_ranks, cpu_affinity=affinity,
        )
        self.agent = ElasticAgent(spec, self.handler, monitor_interval_s=config.monitor_interval_s,
                                  adapter=adapter, store_env=store_env,
                                  drain_signals=[signal.Signals[s] for s in config.drain_signals],
                                  drain_grace_s=config.drain_grace_s, on_event=config.on_event)

    @property
    def node_id(self) -> str:
        return self.handler.node.node_id

    def run(self) -> int:
        code = 1
        previous: Dict[int, Any] = {}
        control = None
        try:
            if threading.current_thread() is threading.main_thread():
                previous = _handle_signals(self.agent, self.config.signals_to_handle)
            if self.config.control_port is not None:
                from elastic.control.http import ControlServer

                control = ControlServer(self.agent, self.config.control_host, self.config.control_port,
                                        token=_token(self.config)).start()
            code = self.agent.run()
            return code
        finally:
            if control is not None:
                control.stop()
            for sig, old in previous.items():
                signal.signal(sig, old)
            self.handler.leave()
            if self.server is not None and code == 0:
                _wait_for_others(self.server.store, self.handler.keys, timeout_s=self.close_timeout_s)
            self._close_store()

    def _close_store(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.store.close()


def launch(config: LaunchConfig) -> int:
    """Run this node's agent until the job ends, in this thread; returns the process exit code
    (0 success, 1 failure, 2 bad input, 69 the store is gone, 75 drained, 128+N a signal)."""
    return _Node(config).run()


def start(config: LaunchConfig) -> "AgentHandle":
    """Run this node's agent in a thread of its own (from any thread: a Ray actor, an operator's
    worker thread); signals stay with the caller. The handle waits for it and steers it."""
    from .handle import AgentHandle

    return AgentHandle(_Node(config))


def _token(config: LaunchConfig) -> Optional[bytes]:
    """The job's shared secret (the control port asks for it off loopback)."""
    from elastic.store._wire import resolve_token

    return resolve_token(config.rdzv_conf.get("token"), config.rdzv_conf.get("token_file"))
