"""The Python API behind ``elastic-run``: :func:`launch` runs one node's agent for a job.

Schedulers (a Kubernetes operator, a Slurm prolog, a Ray actor) call this directly instead of
shelling out: build a :class:`LaunchConfig`, call ``launch(config)``, get the exit code.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
import uuid
from typing import Optional, Tuple

from elastic.agent import ElasticAgent, WorkerSpec
from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.store import MemoryStore, Store, StoreError, create_store
from elastic.store.embedded_client import parse_endpoint

from .config import DEFAULT_RDZV_PORT, LaunchConfig, is_local_host

__all__ = ["launch", "guess_preload"]

log = logging.getLogger("elastic.launcher")
DEFAULT_LAST_CALL_S = 3.0
DEFAULT_LEASE_TTL_S = 5.0
DEFAULT_JOIN_TIMEOUT_S = 600.0
_FRAMEWORK_IMPORT = re.compile(r"^\s*(?:import|from)\s+(torch|tensorflow)\b", re.M)


def guess_preload(config: LaunchConfig) -> Tuple[str, ...]:
    """Frameworks the script imports at top level, for the warm standbys to import first."""
    if config.preload is not None:
        return config.preload
    if config.module or config.no_python:
        return ()
    try:
        with open(config.entrypoint[0], encoding="utf-8", errors="replace") as f:
            source = f.read(1 << 20)
    except OSError:
        return ()
    return tuple(dict.fromkeys(m.group(1) for m in _FRAMEWORK_IMPORT.finditer(source)))


def _conf_bool(value: Optional[str]) -> Optional[bool]:
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def _open_store(config: LaunchConfig):
    """Connect to the job's store; host the embedded server here if the endpoint is ours."""
    backend = config.rdzv_backend
    conf = {k: v for k, v in config.rdzv_conf.items() if k not in ("join_timeout", "last_call_timeout",
                                                                    "lease_ttl", "is_host")}
    if backend == "memory":
        return MemoryStore(), None, "127.0.0.1", {}
    if backend == "etcd":
        store = create_store("etcd", config.rdzv_endpoint, **conf)
        return store, None, None, _store_env("etcd", config.rdzv_endpoint, conf)
    host, port = parse_endpoint(config.rdzv_endpoint, DEFAULT_RDZV_PORT, any_port=True)
    server = None
    is_host = _conf_bool(config.rdzv_conf.get("is_host"))
    if is_host is None:
        is_host = port == 0 or is_local_host(host)
    if is_host:
        from elastic.store.embedded_server import EmbeddedServer

        bind = host if host in ("localhost",) or host.startswith("127.") else "0.0.0.0"
        try:
            server = EmbeddedServer.from_conf(bind, port, **conf).start()
            port = server.port
        except StoreError as exc:
            if getattr(exc.__cause__, "errno", None) != errno.EADDRINUSE:
                raise
            log.info("rendezvous server already running at %s:%d; joining it", host, port)
    store = create_store("embedded", f"{host}:{port}", **conf)
    local = "127.0.0.1" if host.startswith("127.") or host == "localhost" else None
    return store, server, local, _store_env("embedded", f"{host}:{port}", conf)


def _store_env(backend: str, endpoint: str, conf: dict) -> dict:
    """How workers reach the job's store (``@elastic.run`` reads its new place there)."""
    import json

    return {"ELASTIC_RDZV_BACKEND": backend, "ELASTIC_RDZV_ENDPOINT": endpoint,
            "ELASTIC_RDZV_CONF": json.dumps(conf)}


def _wait_for_others(store: Store, prefix: str, timeout_s: float) -> None:
    """The host keeps the server up until every other node has left (torchrun's exit barrier)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive, rev = store.get_prefix(prefix + "alive/")
        if not alive:
            return
        store.wait(prefix + "alive/", rev, timeout_s=min(1.0, max(0.0, deadline - time.monotonic())))
    log.warning("other nodes still running after %.0fs; shutting the rendezvous server down", timeout_s)


def launch(config: LaunchConfig) -> int:
    """Run this node's agent until the job ends; returns the process exit code."""
    settings = RendezvousSettings(
        run_id=config.run_id,
        min_nodes=config.min_nodes,
        max_nodes=config.max_nodes,
        last_call_s=config.conf_seconds("last_call_timeout", DEFAULT_LAST_CALL_S),
        lease_ttl_s=config.conf_seconds("lease_ttl", DEFAULT_LEASE_TTL_S) or DEFAULT_LEASE_TTL_S,
        join_timeout_s=config.conf_seconds("join_timeout", DEFAULT_JOIN_TIMEOUT_S),
        max_restarts=config.max_restarts,
    )
    store, server, local, store_env = _open_store(config)
    handler = None
    code = 1
    try:
        addr = config.local_addr or local or socket.getfqdn()
        node = NodeInfo(node_id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", host=addr,
                        nproc=config.nproc_per_node, rank_hint=config.node_rank)
        handler = RendezvousHandler(store, settings, node)
        spec = WorkerSpec(
            entrypoint=tuple(config.entrypoint), nproc_per_node=config.nproc_per_node, module=config.module,
            no_python=config.no_python, env=dict(config.env), log_dir=config.log_dir, tee=config.tee,
            preload=guess_preload(config), standby=config.standby and not config.no_python, role=config.role,
        )
        code = ElasticAgent(spec, handler, monitor_interval_s=config.monitor_interval_s,
                            adapter=config.adapter, store_env=store_env).run()
        return code
    finally:
        if handler is not None:
            handler.leave()
        if server is not None:
            if code == 0 and handler is not None:
                _wait_for_others(server.store, handler.prefix, timeout_s=settings.join_timeout_s)
            server.stop()
        store.close()
