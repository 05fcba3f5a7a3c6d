"""Horovod under ``elastic-run``: the launcher side of what ``horovodrun --gloo`` does, per round.

For every round, node rank 0's agent hosts Horovod's own Gloo rendezvous HTTP server
(:class:`horovod.runner.http.http_server.RendezvousServer`, the one ``horovodrun`` starts) on
its first aux port, initialised with the round's host allocation plan
(:func:`horovod.runner.common.util.hosts.get_host_assignments`, one "host" per agent); the
previous round's server is stopped. Every worker gets the variables ``horovodrun`` sets
(``gloo_run.create_slot_env_vars`` + ``create_run_env_vars``): ``HOROVOD_RANK``/``SIZE``,
``LOCAL_RANK``/``SIZE``, ``CROSS_RANK``/``SIZE``, ``HOROVOD_HOSTNAME``, the rendezvous address
and port, ``HOROVOD_CONTROLLER=gloo``, ``HOROVOD_CPU_OPERATIONS=gloo``, ``HOROVOD_GLOO_IFACE``
and ``NCCL_SOCKET_IFNAME``. Unmodified ``hvd.init()`` scripts then run as under ``horovodrun``.

A membership change restarts the workers with the next round's variables (state from the
script's checkpoint), or, for workers that recover in place (``@elastic.run``, or an
unmodified ``@hvd.elastic.run`` script: see :mod:`elastic._hvd_bridge`), hands the survivors
the new variables: they ``hvd.shutdown()`` and ``hvd.init()`` against the new round's server,
which answers Horovod's elastic ``rank_and_size`` query from the round's plan
(``HOROVOD_ELASTIC=1``, as ``horovodrun --elastic`` sets). The other nodes' agents wait
(bounded) until that server accepts connections before they start or re-form their workers,
since Horovod's own client gives up after about 1.5 s.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

from elastic.lazy import require
from elastic.agent import FrameworkAdapter
from elastic.errors import ConfigError
from elastic.world import World

from .errors import LauncherError

__all__ = ["HorovodAdapter", "HorovodError", "init", "slot_hostname", "host_plan", "network_interface"]

log = logging.getLogger("elastic.launcher")
_RANK_AND_SIZE = "rank_and_size"  # horovod.runner.elastic.rendezvous.GET_RANK_AND_SIZE
_SERVER_WAIT_S = 10.0  # how long other nodes wait for node rank 0's server of a new round


class HorovodError(LauncherError):
    """Horovod's rendezvous could not be served, or a worker's Horovod is misconfigured."""


def slot_hostname(node) -> str:
    """The name Horovod knows a node by (``HOROVOD_HOSTNAME``; its ``local_<name>`` scope).

    One per agent, not per machine: two agents on one host are two "hosts" to Horovod, each
    with its own local ranks. URL-safe, as Horovod puts it into HTTP paths, and free of ``:``
    (Horovod's elastic keys are ``host:local_rank``).
    """
    return re.sub(r"[^\w.-]", "-", node.node_id)


def round_hostname(node, generation: int) -> str:
    """``HOROVOD_HOSTNAME`` of ``node``'s workers in round ``generation``.

    The generation in the name keeps rounds apart on Horovod's rendezvous server: a worker
    asking for its place in a newer round than the server holds is told to wait (404), not
    handed its old place.
    """
    return f"{slot_hostname(node)}.g{generation}"


def host_plan(rnd, fresh_local_ranks: Optional[Sequence[int]] = None) -> list:
    """Horovod's ``SlotInfo`` for every rank of the round, in rank order (as ``horovodrun``).

    ``fresh_local_ranks``: node rank 0's workers that start fresh while the others of the
    node recover in place. Horovod's ``state.sync()`` broadcasts from rank 0, so rank 0 must
    hold the committed state: if local rank 0 is fresh, its global rank is swapped with the
    lowest surviving local rank's (``horovodrun`` keeps survivors on low ranks the same way).
    """
    hosts_mod = require("horovod.runner.common.util.hosts", "--framework horovod")
    hosts = [hosts_mod.HostInfo(round_hostname(n, rnd.generation), n.nproc) for n in rnd.nodes]
    plan = hosts_mod.get_host_assignments(hosts, rnd.world_size)
    fresh = set(fresh_local_ranks or ())
    survivors = [i for i in range(rnd.nodes[0].nproc) if i not in fresh]
    if 0 in fresh and survivors:
        a, b = plan[0], plan[survivors[0]]
        plan[0] = hosts_mod.SlotInfo(b.hostname, 0, b.local_rank, b.cross_rank, b.size, b.local_size, b.cross_size)
        plan[survivors[0]] = hosts_mod.SlotInfo(a.hostname, b.rank, a.local_rank, a.cross_rank, a.size,
                                                a.local_size, a.cross_size)
    return plan


def _addresses(host: str) -> List[str]:
    try:
        return sorted({str(ai[4][0]) for ai in socket.getaddrinfo(host, None, socket.AF_INET)})
    except socket.gaierror:
        return []


def _source_address(peer: str) -> Optional[str]:
    """The local IPv4 address the kernel would use to reach ``peer`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def network_interface(host: str, peer: Optional[str] = None) -> str:
    """The name of the local interface that holds ``host``'s address (``lo`` for 127.0.0.1).

    When ``host`` is not an address of this machine (a name behind NAT, say), the interface
    the kernel routes ``peer`` (node rank 0) through is used instead.
    """
    import psutil

    by_addr: Dict[str, str] = {}
    for iface, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                by_addr.setdefault(a.address, iface)
    own = _addresses(host)
    candidates = [a for a in own if not _is_loopback(a)]
    if peer:  # the route to node rank 0 (a name that resolves to 127.0.1.1 says nothing)
        peer_addrs = _addresses(peer)
        src = _source_address(peer_addrs[0] if peer_addrs else peer)
        if src:
            candidates.append(src)
    candidates += [a for a in own if _is_loopback(a)]
    for addr in candidates:
        if addr in by_addr:
            return by_addr[addr]
        try:
            if ipaddress.ip_address(addr).is_loopback:
                loop = [i for a, i in by_addr.items() if ipaddress.ip_address(a).is_loopback]
                if loop:
                    return loop[0]
        except ValueError:
            continue
    raise HorovodError(f"no local network interface holds {host!r}: pass --local-addr with an address "
                       "of this machine, or set HOROVOD_GLOO_IFACE")


def _generation_of(hostname: str) -> int:
    return int(hostname.rpartition(".g")[2] or -1) if ".g" in hostname else -1


def _handler_class(plan_ref, generation: int):
    http = require("horovod.runner.http.http_server", "--framework horovod")

    class Handler(http.RendezvousHandler):  # type: ignore[name-defined]
        """Horovod's Gloo rendezvous, plus its elastic ``rank_and_size`` lookup from the plan
        (asked by a worker's ``hvd.init()`` after a reset, with ``HOROVOD_ELASTIC=1``)."""

        def _get_value(self, scope, key):
            if scope == _RANK_AND_SIZE:
                host, _, local_rank = key.rpartition(":")
                for slot in plan_ref[0]:
                    if slot.hostname == host and str(slot.local_rank) == local_rank:
                        return slot.to_response_string().encode("ascii")
                if _generation_of(host) > generation:
                    return None  # a newer round than this server's: 404, the worker asks again
                return b"-1,-1,-1,-1,-1,-1"  # Horovod's answer for "not part of the job"
            return super()._get_value(scope, key)

    return Handler


class _PlanServer:
    """Horovod's ``RendezvousServer`` bound to a given port instead of a random one."""

    def __init__(self, bind: str, port: int, plan: list, generation: int) -> None:
        http = require("horovod.runner.http.http_server", "--framework horovod")
        self._plan = [plan]
        self._server = http.RendezvousServer()
        try:
            self._server._httpd = http.RendezvousHTTPServer((bind, port), _handler_class(self._plan, generation), 0)
        except OSError as exc:
            raise HorovodError(f"cannot serve Horovod's rendezvous on {bind or '*'}:{port}: {exc}") from exc
        self._server._httpd.daemon_threads = True
        self._server.init(plan)
        self._server._listen_thread = threading.Thread(target=self._server._httpd.serve_forever,
                                                       name="horovod-rendezvous", daemon=True)
        self._server._listen_thread.start()
        self.port = port

    def stop(self) -> None:
        self._server.stop()
        self._server._httpd.server_close()


class HorovodAdapter(FrameworkAdapter):
    """Hosts Horovod's Gloo rendezvous on node rank 0 each round; gives workers ``HOROVOD_*``.

    ``iface`` forces ``HOROVOD_GLOO_IFACE`` (default: ``$HOROVOD_GLOO_IFACE``, else the
    interface that holds this node's address). ``verbose`` turns on the server's own logging.
    """

    name = "horovod"

    def __init__(self, iface: Optional[str] = None) -> None:
        require("horovod.runner.http.http_server", "--framework horovod")  # fail at start, in one line
        self._iface_forced = iface or os.environ.get("HOROVOD_GLOO_IFACE") or None
        self._server: Optional[_PlanServer] = None
        self._plan: list = []
        self._generation = -1
        self._iface: Optional[str] = None

    def on_round(self, rnd, fresh_local_ranks: Optional[Sequence[int]] = None) -> None:
        self._plan = host_plan(rnd, fresh_local_ranks if rnd.node_rank == 0 else None)
        self._generation = rnd.generation
        self._iface = self._iface_forced or network_interface(rnd.node.host, rnd.master_addr)
        self._stop_server()
        if rnd.node_rank == 0:
            port = rnd.nodes[0].aux_port
            if not port:
                raise HorovodError("node rank 0 offered no aux port for Horovod's rendezvous")
            host = rnd.nodes[0].host
            bind = "127.0.0.1" if _is_loopback(host) else ""
            self._server = _PlanServer(bind, port, self._plan, rnd.generation)
            log.info("round %d: Horovod rendezvous on %s:%d, %d rank(s), interface %s", rnd.generation,
                     host, port, len(self._plan), self._iface)
        elif rnd.nodes[0].aux_port and not _wait_for_server(rnd.nodes[0].host, rnd.nodes[0].aux_port,
                                                            _SERVER_WAIT_S):
            log.warning("round %d: Horovod rendezvous on %s:%d not up after %.0fs; starting anyway",
                        rnd.generation, rnd.nodes[0].host, rnd.nodes[0].aux_port, _SERVER_WAIT_S)

    def worker_env(self, rnd, local_rank: int, rank: int) -> Mapping[str, str]:
        if rnd.generation != self._generation:
            self._plan = host_plan(rnd)
            self._generation = rnd.generation
        host = round_hostname(rnd.node, rnd.generation)
        slot = next(s for s in self._plan if s.hostname == host and s.local_rank == local_rank)
        iface = self._iface or network_interface(rnd.node.host, rnd.master_addr)
        # horovod.runner.gloo_run.create_slot_env_vars + create_run_env_vars, as horovodrun sets
        # them for its elastic mode; RANK follows Horovod's rank (they differ after a swap).
        return {
            "RANK": str(slot.rank),
            "ROLE_RANK": str(slot.rank),
            "HOROVOD_ELASTIC": "1",
            "HOROVOD_HOSTNAME": slot.hostname,
            "HOROVOD_RANK": str(slot.rank),
            "HOROVOD_SIZE": str(slot.size),
            "HOROVOD_LOCAL_RANK": str(slot.local_rank),
            "HOROVOD_LOCAL_SIZE": str(slot.local_size),
            "HOROVOD_CROSS_RANK": str(slot.cross_rank),
            "HOROVOD_CROSS_SIZE": str(slot.cross_size),
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": rnd.nodes[0].host,
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rnd.nodes[0].aux_port),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_GLOO_IFACE": iface,
            "NCCL_SOCKET_IFNAME": iface,
            "PYTHONUNBUFFERED": "1",
        }

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def close(self) -> None:
        self._stop_server()


def _wait_for_server(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s`` (polls every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


_MODULES = {"torch": "horovod.torch", "pytorch": "horovod.torch", "tensorflow": "horovod.tensorflow",
            "tf": "horovod.tensorflow", "keras": "horovod.tensorflow.keras"}


def _pick_module(framework: Optional[str]) -> str:
    if framework is not None:
        try:
            return _MODULES[framework.lower()]
        except KeyError:
            raise ConfigError(f"launchers.horovod.init(framework={framework!r}): expected "
                              f"{', '.join(sorted(set(_MODULES)))}") from None
    for name in ("horovod.tensorflow.keras", "horovod.tensorflow", "horovod.torch"):
        if name in sys.modules:
            return name
    if "torch" in sys.modules:
        return "horovod.torch"
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        return "horovod.tensorflow"
    return "horovod.torch"


def _launched_without_horovod(env: Mapping[str, str]) -> bool:
    """torchrun's variables (``elastic-run`` without the Horovod adapter) place this worker in a
    world of several, and Horovod's are absent: ``hvd.init()`` would make it a world of one."""
    if "HOROVOD_RANK" in env or "RANK" not in env or "WORLD_SIZE" not in env:
        return False
    return World.detect(env).world_size > 1


def init(framework: Optional[str] = None, **kwargs):
    """``hvd.init()`` for this round; returns the Horovod module (``hvd``).

    ``framework``: ``torch``, ``tensorflow`` or ``keras`` (default: the Horovod module or
    framework already imported). Under ``elastic-run --framework horovod`` Horovod reads the
    round from ``HOROVOD_*``; a plain ``python script.py`` is a world of one. A worker started
    by ``elastic-run`` without the Horovod adapter (``RANK`` set, ``HOROVOD_RANK`` not) is an
    error: every rank would believe it is alone.
    """
    if _launched_without_horovod(os.environ):
        raise HorovodError("this worker was launched without Horovod's environment: run it with "
                           "`elastic-run --framework horovod` (or let --framework auto see `import horovod`)")
    hvd = require(_pick_module(framework), "launchers.horovod.init")
    hvd.init(**kwargs)
    return hvd
