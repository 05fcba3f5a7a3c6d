"""``elastic-run``: a drop-in for ``torchrun`` that keeps training through node changes.

Takes every flag of torchrun's parser, both spellings (and, as torchrun does, ``PET_<FLAG>``
environment variables, which is how a Kubeflow PyTorchJob with an elasticPolicy passes them).
A user's mistake, a bad flag included, is one line on stderr and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import uuid
from typing import Dict, List, Optional, Tuple

from elastic.commands import run_command
from elastic.errors import UserError
from elastic.settings import is_true

from .config import (DEFAULT_MASTER_PORT, DEFAULT_SIGNALS, NUMA_MODES, LaunchConfig, parse_nnodes, parse_rdzv_conf,
                     parse_signals)

__all__ = ["main", "build_parser", "parse_args", "config_from_args"]

log = logging.getLogger("elastic.launcher")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2, like every user error."""

    def error(self, message: str):
        self.exit(2, f"elastic-run: error: {message} (elastic-run --help lists the flags)\n")


def _env_default(dest: str, default):
    return os.environ.get("PET_" + dest.upper(), default)


def _flag(parser: argparse.ArgumentParser, *names: str, dest: str, default=None, **kw) -> None:
    parser.add_argument(*names, dest=dest, default=_env_default(dest, default), **kw)


def _switch(parser: argparse.ArgumentParser, *names: str, dest: str, help: str) -> None:
    """A torchrun ``check_env`` switch: present, or ``PET_<DEST>`` set to a true value."""
    parser.add_argument(*names, dest=dest, action="store_true", default=is_true(_env_default(dest, False)),
                        help=help)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of torchrun's parser (both spellings), with torchrun's defaults from ``PET_*``."""
    p = _Parser(
        prog="elastic-run",
        description="Run a training script on an elastic set of nodes (torchrun-compatible).",
        epilog="'elastic-run ctl VERB ...' reads and steers a running job (elastic-run ctl --help); "
               "a training script literally named ctl is run as 'elastic-run ./ctl'.",
        allow_abbrev=False,
    )
    _flag(p, "--nnodes", dest="nnodes", default="1", help="N or MIN:MAX nodes (default 1)")
    _flag(p, "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", default="1",
          help="workers per node: a number, 'gpu' (one per GPU), 'cpu' (one per core) or 'auto' (GPUs, else cores)")
    _flag(p, "--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default="embedded",
          help="embedded (default; 'c10d' is an alias), etcd, etcd-v2 (alias of etcd) or static")
    _flag(p, "--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default="",
          help="host:port of the rendezvous store (embedded: hosted by the node that owns the address)")
    _flag(p, "--rdzv-id", "--rdzv_id", dest="rdzv_id", default="none", help="job id shared by all nodes")
    _flag(p, "--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", default="",
          help="k=v,... e.g. token_file=PATH,last_call_timeout=3,join_timeout=600,lease_ttl=5")
    _switch(p, "--standalone", dest="standalone",
            help="single node, rendezvous inside this process on a private store")
    _flag(p, "--max-restarts", "--max_restarts", dest="max_restarts", default="0",
          help="job-wide restarts allowed after worker failures (default 0)")
    _flag(p, "--monitor-interval", "--monitor_interval", dest="monitor_interval", default="0.1",
          help="seconds between worker health checks (default 0.1)")
    _flag(p, "--start-method", "--start_method", dest="start_method", default="spawn",
          choices=["spawn", "fork", "forkserver"],
          help="accepted for torchrun compatibility; changes nothing: workers come from the node's "
               "fork server, warm standbys or fresh interpreters")
    _flag(p, "--event-log-handler", "--event_log_handler", dest="event_log_handler", default="null",
          help="accepted for torchrun compatibility; changes nothing: the agent's events go to its log")
    _flag(p, "--role", dest="role", default="default", help="worker role name (ROLE_NAME)")
    _switch(p, "-m", "--module", dest="module", help="run the script as a module, like python -m")
    _switch(p, "--no-python", "--no_python", dest="no_python",
            help="run the entrypoint as an executable, not through python")
    _switch(p, "--run-path", "--run_path", dest="run_path",
            help="run the script with runpy.run_path (what every worker does); wins over --no-python")
    _flag(p, "--log-dir", "--log_dir", dest="log_dir", default=None,
          help="per-rank logs under LOG_DIR/RUN_ID/attempt_GEN/LOCAL_RANK/{stdout,stderr}.log")
    _flag(p, "-r", "--redirects", dest="redirects", default="0",
          help="ranks whose output goes to the log files only: 0-3 for all, or LOCAL_RANK:0-3,...")
    _flag(p, "-t", "--tee", dest="tee", default="0",
          help="ranks whose output goes to the log files and the console: 0-3, or LOCAL_RANK:0-3,...")
    _flag(p, "--local-ranks-filter", "--local_ranks_filter", dest="local_ranks_filter", default="",
          help="show only these local ranks' output on the console, e.g. 0,2 (log files keep all)")
    _flag(p, "--duplicate-stdout-filters", "--duplicate_stdout_filters", dest="duplicate_stdout_filters",
          default="", help="accepted for torchrun compatibility; not supported (a warning says so)")
    _flag(p, "--duplicate-stderr-filters", "--duplicate_stderr_filters", dest="duplicate_stderr_filters",
          default="", help="accepted for torchrun compatibility; not supported (a warning says so)")
    _flag(p, "--node-rank", "--node_rank", dest="node_rank", default=None, help="static node rank")
    _flag(p, "--master-addr", "--master_addr", dest="master_addr", default=None,
          help="static rendezvous: address of node rank 0")
    _flag(p, "--master-port", "--master_port", dest="master_port", default=None,
          help=f"static rendezvous: port on node rank 0 (default {DEFAULT_MASTER_PORT})")
    _flag(p, "--local-addr", "--local_addr", dest="local_addr", default=None,
          help="address other nodes use to reach this one")
    _flag(p, "--logs-specs", "--logs_specs", dest="logs_specs", default=None,
          help="accepted for torchrun compatibility; the log layout is torchrun's default one")
    _flag(p, "--numa-binding", "--numa_binding", dest="numa_binding", default=None, choices=list(NUMA_MODES),
          help="bind each worker to the CPUs near its GPU (local rank i: GPU i), as torchrun does")
    _flag(p, "--signals-to-handle", "--signals_to_handle", dest="signals_to_handle",
          default=",".join(DEFAULT_SIGNALS),
          help="signals that stop the workers and leave the job, exit 128+N (SIGTERM, SIGINT always)")
    _flag(p, "--shutdown-timeout", "--shutdown_timeout", dest="shutdown_timeout", default=None,
          help="seconds between SIGTERM and SIGKILL when stopping workers "
               "(default $TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 5)")
    _switch(p, "--virtual-local-rank", "--virtual_local_rank", dest="virtual_local_rank",
            help="LOCAL_RANK=0 and CUDA_VISIBLE_DEVICES=<its GPU> in every worker")
    _flag(p, "--drain-signals", dest="drain_signals", default="SIGTERM",
          help="signals that drain this node: workers save at a safe point, the node leaves, the agent "
               "exits 75 (default SIGTERM; Slurm's --signal=B:USR1@N: SIGTERM,SIGUSR1)")
    _flag(p, "--drain-grace", dest="drain_grace", default="25",
          help="seconds a drain without a deadline may take before workers are killed (default 25: "
               "inside Kubernetes' 30 s termination grace)")
    _flag(p, "--control-port", dest="control_port", default=None,
          help="serve /healthz, /readyz, /status, /metrics and POST /drain on this port (0: any free one)")
    _flag(p, "--control-host", dest="control_host", default="127.0.0.1",
          help="address of the control port (default 127.0.0.1; off loopback it needs the job's token)")
    _flag(p, "--preload", dest="preload", default=None,
          help="modules warm standbys import ahead of time (default: frameworks the script imports)")
    _flag(p, "--framework", dest="framework", default="auto",
          help="auto (default: from the script's imports), torch, horovod or tensorflow")
    p.add_argument("--no-standby", dest="standby", action="store_false", default=True,
                   help="start every worker cold instead of from a warm standby")
    p.add_argument("training_script", help="the script (or module / executable) to run")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return p


def _int(value, flag: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: expected an integer") from None


def _streams(value, flag: str) -> Dict[Optional[int], int]:
    """torchrun's ``--redirects``/``--tee``: ``0``-``3`` for every local rank, or ``RANK:0-3,...``
    (0 none, 1 stdout, 2 stderr, 3 both) -> {local rank (None: every one): streams}."""
    text = str(value if value is not None else "0").strip().lower()
    text = {"": "0", "off": "0", "false": "0", "no": "0", "on": "3", "true": "3", "yes": "3"}.get(text, text)
    try:
        if ":" not in text:
            out: Dict[Optional[int], int] = {None: int(text)}
        else:
            out = {}
            for item in filter(None, (i.strip() for i in text.split(","))):
                rank, _, std = item.partition(":")
                out[int(rank)] = int(std)
    except ValueError:
        out = {None: -1}
    if any(not 0 <= v <= 3 for v in out.values()):
        raise UserError(f"{flag} {value!r}: expected 0-3 (none, stdout, stderr, both) or "
                        "LOCAL_RANK:0-3,... e.g. 0:1,1:2")
    return out


def _console_ranks(args: argparse.Namespace, nproc: int) -> Optional[Tuple[int, ...]]:
    """Local ranks whose output reaches the console: not redirected without a tee, and
    in --local-ranks-filter when given (torchrun's rules, per rank)."""
    redirects, tee = _streams(args.redirects, "--redirects"), _streams(args.tee, "--tee")
    wanted = None
    if str(args.local_ranks_filter or "").strip():
        try:
            wanted = {int(r) for r in str(args.local_ranks_filter).split(",") if r.strip()}
        except ValueError:
            raise UserError(f"--local-ranks-filter {args.local_ranks_filter!r}: expected local ranks "
                            "separated by commas, e.g. 0,2") from None
    shown = tuple(r for r in range(nproc)
                  if not (redirects.get(r, redirects.get(None, 0)) and not tee.get(r, tee.get(None, 0)))
                  and (wanted is None or r in wanted))
    return None if shown == tuple(range(nproc)) else shown


def _nproc(value) -> int:
    """torchrun's --nproc-per-node: an int, 'cpu', 'gpu' (GPUs through NVML), 'xpu', or 'auto'."""
    text = str(value).strip().lower()
    if text == "cpu":
        return os.cpu_count() or 1
    if text in ("gpu", "auto"):
        gpus = _gpu_count()
        if gpus:
            return gpus
        if text == "gpu":
            raise UserError("--nproc-per-node gpu: no NVIDIA GPU found (NVML)")
        return os.cpu_count() or 1
    if text == "xpu":
        try:
            import torch

            count = torch.xpu.device_count()
        except (ImportError, AttributeError):
            count = 0
        if not count:
            raise UserError("--nproc-per-node xpu: no Intel XPU found")
        return count
    return _int(value, "--nproc-per-node")


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, no driver: no GPUs
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    lo, hi = parse_nnodes(args.nnodes)
    nproc = _nproc(args.nproc_per_node)
    try:
        monitor = float(args.monitor_interval)
    except ValueError:
        raise UserError(f"--monitor-interval {args.monitor_interval!r}: expected seconds") from None
    backend = {"c10d": "embedded", "etcd-v2": "etcd"}.get(args.rdzv_backend, args.rdzv_backend)
    from elastic.store import backends

    known = [name for name in backends.names() if name != "memory"]  # memory: one process only
    if backend not in (*known, "static"):
        raise UserError(f"--rdzv-backend {args.rdzv_backend!r}: expected {', '.join(known)}, c10d, etcd-v2 "
                        "or static (a third-party backend registers through the elastic_run.stores entry point)")
    if args.start_method not in ("spawn", "fork", "forkserver"):  # from PET_START_METHOD
        raise UserError(f"--start-method {args.start_method!r}: expected spawn, fork or forkserver")
    if args.numa_binding is not None and args.numa_binding not in NUMA_MODES:
        raise UserError(f"--numa-binding {args.numa_binding!r}: expected one of {', '.join(NUMA_MODES)}")
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
        node_rank = 0 if node_rank is None else node_rank  # torchrun's default
        if not 0 <= node_rank < hi:
            raise UserError(f"static rendezvous needs --node-rank in [0, {hi}), got {args.node_rank}")
        backend = "embedded"
        port = _int(args.master_port or DEFAULT_MASTER_PORT, "--master-port")
        endpoint = f"{args.master_addr or '127.0.0.1'}:{port}"
    elif backend == "etcd" and not endpoint:
        raise UserError("--rdzv-backend etcd needs --rdzv-endpoint host:port[,host:port...]")
    console = _console_ranks(args, nproc)
    log_dir = args.log_dir
    if log_dir is None and (any(_streams(args.redirects, "--redirects").values())
                            or any(_streams(args.tee, "--tee").values())):
        log_dir = tempfile.mkdtemp(prefix="elastic-run-logs-")  # as torchrun: redirected output needs files
        log.info("worker logs under %s", log_dir)
    for flag, value in (("--duplicate-stdout-filters", args.duplicate_stdout_filters),
                        ("--duplicate-stderr-filters", args.duplicate_stderr_filters)):
        if str(value or "").strip():
            log.warning("%s is not supported by elastic-run and is ignored (the full per-rank logs "
                        "are under --log-dir)", flag)
    if args.logs_specs:
        log.warning("--logs-specs %s: elastic-run has no LogsSpecs plugins; using its own layout "
                    "LOG_DIR/RUN_ID/attempt_GEN/LOCAL_RANK/{stdout,stderr}.log", args.logs_specs)
    shutdown = None
    if args.shutdown_timeout is not None:
        try:
            shutdown = float(args.shutdown_timeout)
        except ValueError:
            raise UserError(f"--shutdown-timeout {args.shutdown_timeout!r}: expected seconds") from None
    preload = None if args.preload is None else tuple(m for m in args.preload.split(",") if m)
    module, no_python = args.module, args.no_python
    if args.run_path:  # torchrun: runpy.run_path in the worker, which is how every worker runs a script
        module = no_python = False
    from .frameworks import create_adapter, resolve_framework

    script = None if module or no_python else args.training_script
    adapter = create_adapter(resolve_framework(args.framework, script))
    try:
        drain_grace = float(args.drain_grace)
        control_port = None if args.control_port in (None, "") else int(args.control_port)
    except ValueError:
        raise UserError(f"--drain-grace {args.drain_grace!r} / --control-port {args.control_port!r}: "
                        "expected seconds / a port number") from None
    return LaunchConfig(
        entrypoint=(args.training_script, *args.training_script_args),
        min_nodes=lo, max_nodes=hi, nproc_per_node=nproc,
        rdzv_backend=backend, rdzv_endpoint=endpoint, run_id=run_id,
        rdzv_conf=parse_rdzv_conf(args.rdzv_conf), node_rank=node_rank,
        max_restarts=_int(args.max_restarts, "--max-restarts"), monitor_interval_s=monitor,
        log_dir=log_dir, tee=True, module=module, no_python=no_python,
        local_addr=args.local_addr, role=args.role, standby=args.standby, preload=preload,
        adapter=adapter, console_local_ranks=console, numa_binding=args.numa_binding,
        signals_to_handle=parse_signals(args.signals_to_handle), shutdown_timeout_s=shutdown,
        virtual_local_rank=args.virtual_local_rank, drain_signals=parse_signals(args.drain_signals, "--drain-signals"),
        drain_grace_s=drain_grace, control_port=control_port, control_host=args.control_host,
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ctl"]:  # `elastic-run ctl VERB`: a script named ctl runs as `elastic-run ./ctl`
        from .ctl import main as ctl_main

        return ctl_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("ELASTIC_LOG_LEVEL", "INFO").upper(),
                        format="[elastic-run %(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    from .launch import launch

    return run_command("elastic-run", lambda: launch(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(main())
