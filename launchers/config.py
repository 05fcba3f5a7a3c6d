"""What one ``elastic-run`` invocation asks for, validated: :class:`LaunchConfig`."""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from elastic.errors import ConfigError

__all__ = ["LaunchConfig", "parse_nnodes", "parse_rdzv_conf", "is_local_host"]

DEFAULT_RDZV_PORT = 29400
DEFAULT_MASTER_PORT = 29500
# --rdzv-conf keys the launcher understands (torchrun's names where torchrun has one).
PROTOCOL_KEYS = {"join_timeout", "last_call_timeout", "lease_ttl", "is_host"}
EMBEDDED_KEYS = {"token", "token_file", "tls", "tls_cert", "tls_key", "tls_ca", "tls_verify_hostname",
                 "timeout_s", "auth_timeout_s"}
ETCD_KEYS = {"cacert", "cert", "key", "user", "password", "protocol", "ssl", "timeout"}


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
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
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
    adapter: Optional[object] = None  # an elastic.agent.FrameworkAdapter; None: PyTorch's (nothing extra)

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.monitor_interval_s <= 0:
            raise ConfigError("--monitor-interval must be > 0")
        if not self.entrypoint:
            raise ConfigError("no training script given")
        if not (self.module or self.no_python):
            script = self.entrypoint[0]
            if not os.path.isfile(script):
                raise ConfigError(f"training script {script!r} not found")
        allowed = PROTOCOL_KEYS | (EMBEDDED_KEYS if self.rdzv_backend == "embedded" else set()) | (
            ETCD_KEYS if self.rdzv_backend == "etcd" else set())
        unknown = sorted(set(self.rdzv_conf) - allowed)
        if unknown and self.rdzv_backend != "memory":
            raise ConfigError(f"--rdzv-conf: unknown key(s) for backend {self.rdzv_backend!r}: "
                              f"{', '.join(unknown)} (known: {', '.join(sorted(allowed))})")

    def conf_seconds(self, key: str, default: float) -> float:
        raw = self.rdzv_conf.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--rdzv-conf {key}={raw!r}: expected seconds") from None
        if value < 0:
            raise ConfigError(f"--rdzv-conf {key}={raw!r}: must be >= 0")
        return value
