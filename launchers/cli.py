"""``elastic-run``: a drop-in for ``torchrun`` that keeps training through node changes.

Takes torchrun's flags (and, as torchrun does, ``PET_<FLAG>`` environment variables, so a
Kubeflow PyTorchJob with an elasticPolicy runs it unchanged). A user's mistake is reported as
one line on stderr with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from typing import List, Optional

from elastic.errors import UserError
from elastic.store import StoreError

from .config import DEFAULT_MASTER_PORT, LaunchConfig, parse_nnodes, parse_rdzv_conf

__all__ = ["main", "parse_args", "config_from_args"]


def _env_default(dest: str, default):
    return os.environ.get("PET_" + dest.upper(), default)


def _flag(parser: argparse.ArgumentParser, *names: str, dest: str, default=None, **kw) -> None:
    parser.add_argument(*names, dest=dest, default=_env_default(dest, default), **kw)


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-run",
        description="Run a training script on an elastic set of nodes (torchrun-compatible).",
        allow_abbrev=False,
    )
    _flag(p, "--nnodes", dest="nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    _flag(p, "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", default="1",
          help="workers per node: a number, or 'cpu' (one per core)")
    _flag(p, "--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="embedded",
          help="embedded (default; 'c10d' is an alias), etcd, etcd-v2 (alias of etcd) or static")
    _flag(p, "--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default="",
          help="host:port of the rendezvous store (embedded: hosted by the node that owns the address)")
    _flag(p, "--rdzv-id", "--rdzv_id", dest="rdzv_id", default="none", help="job id shared by all nodes")
    _flag(p, "--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", default="",
          help="k=v,... e.g. token=SECRET,last_call_timeout=3,join_timeout=600,lease_ttl=5")
    p.add_argument("--standalone", action="store_true", default=_truthy(_env_default("standalone", False)),
                   help="single node, rendezvous inside this process on a private store")
    _flag(p, "--max-restarts", "--max_restarts", dest="max_restarts", default="0",
          help="job-wide restarts allowed after worker failures (default 0)")
    _flag(p, "--monitor-interval", "--monitor_interval", dest="monitor_interval", default="0.1",
          help="seconds between worker health checks (default 0.1)")
    _flag(p, "--node-rank", "--node_rank", dest="node_rank", default=None, help="static node rank")
    _flag(p, "--master-addr", "--master_addr", dest="master_addr", default=None,
          help="static rendezvous: address of node rank 0")
    _flag(p, "--master-port", "--master_port", dest="master_port", default=None,
          help=f"static rendezvous: port on node rank 0 (default {DEFAULT_MASTER_PORT})")
    _flag(p, "--local-addr", "--local_addr", dest="local_addr", default=None,
          help="address other nodes use to reach this one")
    _flag(p, "--log-dir", "--log_dir", dest="log_dir", default=None,
          help="per-rank logs under LOG_DIR/RUN_ID/attempt_GEN/LOCAL_RANK/{stdout,stderr}.log")
    _flag(p, "--tee", "-t", dest="tee", default=None,
          help="with --log-dir, also stream worker output to the console, rank-prefixed (0-3 or on)")
    _flag(p, "--redirects", "-r", dest="redirects", default=None, help="accepted for torchrun compatibility")
    _flag(p, "--role", dest="role", default="default", help="worker role name (ROLE_NAME)")
    _flag(p, "--preload", dest="preload", default=None,
          help="modules warm standbys import ahead of time (default: frameworks the script imports)")
    _flag(p, "--framework", dest="framework", default="auto",
          help="auto (default: from the script's imports), torch, horovod or tensorflow")
    p.add_argument("--no-standby", dest="standby", action="store_false", default=True,
                   help="start every worker cold instead of from a warm standby")
    p.add_argument("-m", "--module", action="store_true", default=_truthy(_env_default("module", False)),
                   help="run the script as a module, like python -m")
    p.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                   default=_truthy(_env_default("no_python", False)),
                   help="run the entrypoint as an executable, not through python")
    p.add_argument("training_script", help="the script (or module / executable) to run")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return p


def _int(value, flag: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: expected an integer") from None


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    lo, hi = parse_nnodes(args.nnodes)
    if str(args.nproc_per_node) in ("cpu", "auto"):
        nproc = os.cpu_count() or 1
    else:
        nproc = _int(args.nproc_per_node, "--nproc-per-node")
    try:
        monitor = float(args.monitor_interval)
    except ValueError:
        raise UserError(f"--monitor-interval {args.monitor_interval!r}: expected seconds") from None
    backend = {"c10d": "embedded", "etcd-v2": "etcd"}.get(args.rdzv_backend, args.rdzv_backend)
    if backend not in ("embedded", "etcd", "static"):
        raise UserError(f"--rdzv-backend {args.rdzv_backend!r}: expected embedded, c10d, etcd, etcd-v2 or static")
    endpoint, run_id = args.rdzv_endpoint, args.rdzv_id
    node_rank = None if args.node_rank is None else _int(args.node_rank, "--node-rank")
    static = backend == "static" or (not endpoint and (args.master_addr or node_rank is not None))
    if args.standalone or (not static and not endpoint and hi == 1 and backend == "embedded"):
        # One node and no rendezvous flags: our own embedded server on a free loopback port,
        # with a random token and a fresh run id.
        if args.standalone and (lo, hi) != (1, 1):
            raise UserError("--standalone runs one node; drop --nnodes or use --rdzv-endpoint")
        backend, endpoint = "embedded", "127.0.0.1:0"
        run_id = run_id if run_id != "none" else uuid.uuid4().hex[:12]
        if "token" not in parse_rdzv_conf(args.rdzv_conf):
            args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, f"token={uuid.uuid4().hex}"]))
    elif static:
        if lo != hi:
            raise UserError(f"static rendezvous needs a fixed --nnodes, got {args.nnodes}")
        if node_rank is None or not 0 <= node_rank < hi:
            raise UserError(f"static rendezvous needs --node-rank in [0, {hi}), got {args.node_rank}")
        backend = "embedded"
        port = _int(args.master_port or DEFAULT_MASTER_PORT, "--master-port")
        endpoint = f"{args.master_addr or '127.0.0.1'}:{port}"
    elif backend == "etcd" and not endpoint:
        raise UserError("--rdzv-backend etcd needs --rdzv-endpoint host:port[,host:port...]")
    tee = True if not args.log_dir else (args.tee is not None and str(args.tee) not in ("0", "false", "off"))
    preload = None if args.preload is None else tuple(m for m in args.preload.split(",") if m)
    from .frameworks import create_adapter, resolve_framework, standby_preload

    script = None if args.module or args.no_python else args.training_script
    adapter = create_adapter(resolve_framework(args.framework, script))
    if preload is None and script:
        preload = standby_preload(script) or None
    return LaunchConfig(
        entrypoint=(args.training_script, *args.training_script_args),
        min_nodes=lo, max_nodes=hi, nproc_per_node=nproc,
        rdzv_backend=backend, rdzv_endpoint=endpoint, run_id=run_id,
        rdzv_conf=parse_rdzv_conf(args.rdzv_conf), node_rank=node_rank,
        max_restarts=_int(args.max_restarts, "--max-restarts"), monitor_interval_s=monitor,
        log_dir=args.log_dir, tee=tee, module=args.module, no_python=args.no_python,
        local_addr=args.local_addr, role=args.role, standby=args.standby, preload=preload,
        adapter=adapter,
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("ELASTIC_LOG_LEVEL", "INFO").upper(),
                        format="[elastic-run %(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    try:
        from .launch import launch

        return launch(config_from_args(args))
    except (UserError, StoreError) as exc:  # a store that cannot be served or reached is no bug of ours
        print(f"elastic-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
