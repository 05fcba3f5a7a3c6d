"""Free local ports, for the agent's per-worker ports, tests and benchmarks."""
from __future__ import annotations

import socket

from .errors import ElasticError

__all__ = ["free_port", "free_port_range"]


def free_port(host: str = "") -> int:
    """A port free on ``host`` right now (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(count: int, host: str = "", tries: int = 50) -> int:
    """The first of ``count`` consecutive free ports (one per local worker, e.g. TF_CONFIG)."""
    for _ in range(tries):
        base = free_port(host)
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base + 1, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ElasticError(f"no {count} consecutive free ports found on {host or 'any address'}")
