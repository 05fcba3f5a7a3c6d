"""What one ``elastic-run`` invocation asks for, validated: :class:`LaunchConfig`."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from elastic.agent.api import FrameworkAdapter
from elastic.errors import ConfigError

__all__ = ["LaunchConfig", "parse_nnodes", "parse_rdzv_conf", "is_local_host", "is_loopback_host", "store_conf",
           "has_token"]

NUMA_MODES = ("node", "socket", "exclusive", "core-complex")  # torch.numa.binding.AffinityMode
DEFAULT_MASTER_PORT = 29500
# --rdzv-conf keys the launcher itself understands (torchrun's names where torchrun has one); a
# store backend declares its own (elastic.store.BackendSpec) and gets only those. The round
# protocol's, with torchrun's c10d meaning: join_timeout (``timeout``, the etcd backend's name,
# is its alias) bounds the wait for a round; last_call_timeout; close_timeout bounds how long the
# hosting node keeps the store up for the others to leave; read_timeout is the store's
# per-request timeout (its ``timeout_s``); keep_alive_interval x keep_alive_max_attempt is how
# long a silent node lives (torchrun's dead-node rule; our ``lease_ttl``); heartbeat_timeout is
# accepted (the keep-alive call is bounded by read_timeout); is_host; store_type (tcp only).
PROTOCOL_KEYS = {"join_timeout", "timeout", "last_call_timeout", "close_timeout", "read_timeout", "lease_ttl",
                 "keep_alive_interval", "keep_alive_max_attempt", "heartbeat_timeout", "is_host", "store_type",
                 "store_timeout"}


def store_conf(rdzv_conf: Dict[str, str], backend: str) -> Dict[str, str]:
    """The settings the store backend takes: protocol keys dropped, torchrun's names mapped,
    only the keys the backend declares; an unknown key is one ConfigError line."""
    from elastic.store import backend_spec

    spec = backend_spec(backend)
    conf = {k: v for k, v in rdzv_conf.items() if k not in PROTOCOL_KEYS}
    if "read_timeout" in rdzv_conf and "timeout_s" in spec.keys:
        conf.setdefault("timeout_s", rdzv_conf["read_timeout"])
    return spec.settings(backend, conf, where="--rdzv-conf", known_elsewhere=PROTOCOL_KEYS)


def has_token(rdzv_conf: Dict[str, str], environ: Optional[Dict[str, str]] = None) -> bool:
    """Whether the embedded store's clients and server will have a shared token."""
    env = os.environ if environ is None else environ
    return bool(rdzv_conf.get("token") or rdzv_conf.get("token_file")
                or env.get("ELASTIC_RDZV_TOKEN") or env.get("ELASTIC_RDZV_TOKEN_FILE"))


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (traffic to it never leaves the machine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {str(ai[4][0]) for ai in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    try:
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)
    except ValueError:
        return False


def parse_nnodes(value: str) -> Tuple[int, int]:
    """``"N"`` or ``"MIN:MAX"`` -> (MIN, MAX), with 1 <= MIN <= MAX."""
    text = str(value).strip()
    parts = text.split(":")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with integers") from None
    if lo < 1:
        raise ConfigError(f"--nnodes {text!r}: the number of nodes must be at least 1")
    if lo > hi:
        raise ConfigError(f"--nnodes {text!r}: MIN ({lo}) is greater than MAX ({hi})")
    return lo, hi


def parse_rdzv_conf(value: str) -> Dict[str, str]:
    """``k=v,k2=v2`` -> dict."""
    conf: Dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (value or "").split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--rdzv-conf item {item!r}: expected key=value")
        conf[key.strip()] = val.strip()
    return conf


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (so the embedded server belongs here)."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addrs = {str(ai[4][0]) for ai in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    for addr in addrs:
        try:
            if ipaddress.ip_address(addr).is_loopback:
                return True
        except ValueError:
            continue
        try:
            with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((addr, 0))  # binds only to an address of ours
            return True
        except OSError:
            continue
    return False


DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # torchrun's --signals-to-handle


def parse_signals(value, flag: str = "--signals-to-handle") -> Tuple[str, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``TERM``, or a number) -> ("SIGTERM", "SIGUSR1")."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in filter(None, (str(i).strip() for i in items)):
        try:
            sig = signal.Signals(int(item)) if item.isdigit() else signal.Signals[
                item.upper() if item.upper().startswith("SIG") else "SIG" + item.upper()]
        except (KeyError, ValueError):
            raise ConfigError(f"{flag}: unknown signal {item!r}") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"{flag}: {sig.name} cannot be handled")
        names.append(sig.name)
    return tuple(dict.fromkeys(names))


def module_exists(name: str, cwd: Optional[str] = None) -> bool:
    """Whether ``python -m NAME`` run in ``cwd`` would find the module, without importing it
    (parent packages' ``__init__`` is not run: sub-modules are looked up on the parent's path)."""
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    saved = sys.path[:]
    sys.path.insert(0, cwd or os.getcwd())
    try:
        spec = importlib.util.find_spec(parts[0])
        for part in parts[1:]:
            if spec is None or spec.submodule_search_locations is None:
                return False
            spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return False
    finally:
        sys.path[:] = saved
    return spec is not None


@dataclass(frozen=True)
class LaunchConfig:
    """Everything :func:`launchers.launch` needs; the CLI builds one from torchrun's flags."""

    entrypoint: Tuple[str, ...]
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    rdzv_backend: str = "embedded"  # embedded | etcd | memory (standalone)
    rdzv_endpoint: str = ""
    run_id: str = "none"
    rdzv_conf: Dict[str, str] = field(default_factory=dict)
    node_rank: Optional[int] = None  # static ranks
    max_restarts: int = 0
    monitor_interval_s: float = 0.1
    log_dir: Optional[str] = None
    tee: bool = True
    module: bool = False
    no_python: bool = False
    local_addr: Optional[str] = None
    role: str = "default"
    standby: bool = True
    preload: Optional[Tuple[str, ...]] = None  # None: guess from the script's imports
    env: Dict[str, str] = field(default_factory=dict)
    adapter: Optional[FrameworkAdapter] = None  # None: detected from the script's imports
    console_local_ranks: Optional[Tuple[int, ...]] = None  # whose output reaches the console (None: all)
    numa_binding: Optional[str] = None  # node | socket | exclusive | core-complex (launchers.numa)
    signals_to_handle: Tuple[str, ...] = DEFAULT_SIGNALS  # stop workers, leave, exit 128+N
    shutdown_timeout_s: Optional[float] = None  # SIGTERM -> SIGKILL grace for workers (None: 5 s)
    virtual_local_rank: bool = False  # LOCAL_RANK=0 and CUDA_VISIBLE_DEVICES=<its GPU> per worker
    drain_signals: Tuple[str, ...] = ("SIGTERM",)  # drain this node (save, leave, exit 75) instead
    drain_grace_s: float = 25.0  # a drain without a deadline (a signal's) ends by then
    control_port: Optional[int] = None  # the agent's HTTP port (/healthz, /status, /metrics, POST /drain)
    control_host: str = "127.0.0.1"  # off loopback it needs the job's token
    on_event: Optional[Callable[..., None]] = None  # called with each elastic.control.JobEvent this node emits

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.monitor_interval_s <= 0:
            raise ConfigError("--monitor-interval must be > 0")
        if not self.entrypoint:
            raise ConfigError("no training script given")
        script = self.entrypoint[0]
        if self.module and self.no_python:
            raise ConfigError("-m/--module and --no-python exclude each other (torchrun refuses both too)")
        if self.no_python:
            if shutil.which(script) is None:
                raise ConfigError(f"--no-python: executable {script!r} not found "
                                  "(neither an executable file nor on $PATH)")
        elif self.module:
            if not module_exists(script):
                raise ConfigError(f"-m: no module named {script!r} (looked in the current directory "
                                  "and on sys.path)")
        elif not os.path.isfile(script):
            raise ConfigError(f"training script {script!r} not found")
        if self.numa_binding is not None and self.numa_binding not in NUMA_MODES:
            raise ConfigError(f"--numa-binding {self.numa_binding!r}: expected one of {', '.join(NUMA_MODES)}")
        object.__setattr__(self, "signals_to_handle", parse_signals(self.signals_to_handle))
        object.__setattr__(self, "drain_signals", parse_signals(self.drain_signals, "--drain-signals"))
        if not self.drain_grace_s >= 0:
            raise ConfigError(f"--drain-grace must be >= 0, got {self.drain_grace_s}")
        if self.control_port is not None and not 0 <= self.control_port < 65536:
            raise ConfigError(f"--control-port {self.control_port}: expected a port number (0: any free one)")
        if self.shutdown_timeout_s is not None and not self.shutdown_timeout_s >= 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout_s}")
        if self.console_local_ranks is not None and any(r < 0 for r in self.console_local_ranks):
            raise ConfigError("--local-ranks-filter: local ranks are >= 0")
        if self.rdzv_conf.get("store_type", "tcp").strip().lower() != "tcp":
            raise ConfigError(f"--rdzv-conf store_type={self.rdzv_conf['store_type']!r}: only tcp is "
                              "supported (the embedded server is a TCP store)")
        store_conf(self.rdzv_conf, self.rdzv_backend)  # an unknown key: one ConfigError line

    def conf_seconds(self, key: str, default: float, *aliases: str) -> float:
        """``--rdzv-conf key=SECONDS`` (or the first alias given), else ``default``."""
        name = next((k for k in (key, *aliases) if k in self.rdzv_conf), None)
        if name is None:
            return default
        raw = self.rdzv_conf[name]
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--rdzv-conf {name}={raw!r}: expected seconds") from None
        if value < 0:
            raise ConfigError(f"--rdzv-conf {name}={raw!r}: must be >= 0")
        return value
