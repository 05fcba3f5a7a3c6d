"""Fault injection on a :class:`benchmarks.chaos.netns.Cluster`, and a seeded schedule of faults.

Every injection returns a :class:`FaultRecord` (``t_inject`` is ``time.time()``); a fault that
lasts (a stopped worker, a partition, a degraded link, a CPU quota, a powered-off host, a killed
etcd) is ended by its pair (``cont_worker``, ``heal``, ``restore``, ``restore_cpu``, ``power_on``,
``etcd_restart``), which, given the injection's record, returns it completed with ``t_end``.

=============  =================================================================================
kind           what is done
=============  =================================================================================
kill_worker    SIGKILL of one worker (a pid of that host, from the workload's callback)
stop_worker    SIGSTOP of one worker (a hang), SIGCONT after ``duration_s``
power_off      the host's switch port down, its cgroup frozen, every process SIGKILLed, thawed;
               after ``duration_s`` the link comes back with empty /tmp and /dev/shm (nothing is
               started on it: a scale-up, or the ``on_power_on`` callback, brings an agent)
partition      nft bridge rules in the switch drop every frame from and to the host's port;
               healed after ``duration_s``
degrade        nft ``numgen random mod 100 < loss_pct`` drops on the host's port (both directions)
               and ``tc tbf`` at ``rate_mbit`` on both ends of its link; restored after
               ``duration_s`` (no netem on this kernel: delays come from ``proxy.DelayProxy``)
cpu_quota      cgroup v1 ``cpu.cfs_quota_us`` = ``fraction`` of one CPU on the host: a straggler
scale_up       the workload's ``on_scale_up(host)`` (start an agent on a spare host)
scale_down     the workload's ``on_scale_down(host)`` (SIGTERM an agent)
etcd_kill      etcd SIGKILLed, restarted on the same data dir after ``duration_s``
=============  =================================================================================
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from benchmarks.chaos.netns import Cluster

__all__ = ["FaultRecord", "ScheduledFault", "Schedule", "Injector", "KINDS", "DEFAULT_DURATIONS",
           "kill_worker", "stop_worker", "cont_worker", "power_off", "power_on", "partition", "heal", "degrade",
           "restore", "cpu_quota", "restore_cpu", "etcd_kill", "etcd_restart"]

DEFAULT_DURATIONS: Dict[str, float] = {
    "kill_worker": 0.0, "stop_worker": 10.0, "power_off": 15.0, "partition": 20.0, "degrade": 20.0,
    "cpu_quota": 20.0, "scale_up": 0.0, "scale_down": 0.0, "etcd_kill": 5.0,
}
KINDS = tuple(DEFAULT_DURATIONS)
REMOVING = ("power_off", "scale_down")  # leave the host without an agent until a scale-up
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class FaultRecord:
    kind: str
    host: str
    target: str           # a pid, "link", "agent", "etcd", "cgroup"
    t_inject: float       # time.time() at the injection
    t_end: Optional[float] = None  # when it was ended (healed, restored, SIGCONT...); None while it lasts
    detail: str = ""


def _now() -> float:
    return time.time()


def _done(record: Optional[FaultRecord], kind: str, host: str, target: str, detail: str = "") -> FaultRecord:
    t = _now()
    if record is None:
        return FaultRecord(kind, host, target, t, t, detail)
    more = f"{record.detail}; {detail}" if record.detail and detail else (record.detail or detail)
    return dataclasses.replace(record, t_end=t, detail=more)


def _own_pid(cluster: Cluster, host: str, pid: int) -> int:
    pid = int(pid)
    if pid not in cluster.pids(host):
        raise ValueError(f"pid {pid} is not a live process of host {host}")
    return pid


# --------------------------------------------------------------------------------------- processes
def kill_worker(cluster: Cluster, host: str, pid: int) -> FaultRecord:
    """SIGKILL ``pid``, which must be a live process of ``host`` (ValueError otherwise)."""
    pid = _own_pid(cluster, host, pid)
    t = _now()
    signal_pid(pid, signal.SIGKILL)
    return FaultRecord("kill_worker", host, str(pid), t, t, "SIGKILL")


def stop_worker(cluster: Cluster, host: str, pid: int) -> FaultRecord:
    """SIGSTOP ``pid`` (a hang); end it with :func:`cont_worker`."""
    pid = _own_pid(cluster, host, pid)
    t = _now()
    signal_pid(pid, signal.SIGSTOP)
    return FaultRecord("stop_worker", host, str(pid), t, None, "SIGSTOP")


def cont_worker(cluster: Cluster, host: str, pid: int, record: Optional[FaultRecord] = None) -> FaultRecord:
    """SIGCONT ``pid`` (if it still lives); returns ``record`` completed."""
    gone = not signal_pid(int(pid), signal.SIGCONT)
    return _done(record, "cont_worker", host, str(pid), "gone before SIGCONT" if gone else "SIGCONT")


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig``; False if the process is gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# --------------------------------------------------------------------------------------- hosts
def power_off(cluster: Cluster, host: str) -> FaultRecord:
    """Link down, freeze, SIGKILL every process of the host, thaw (see Cluster.power_off)."""
    t = _now()
    killed = cluster.power_off(host)
    return FaultRecord("power_off", host, "host", t, None, f"killed {len(killed)} processes")


def power_on(cluster: Cluster, host: str, record: Optional[FaultRecord] = None) -> FaultRecord:
    """Link up, fresh /tmp and /dev/shm; nothing started (a rejoin is the workload's)."""
    cluster.power_on(host)
    return _done(record, "power_on", host, "host", "powered on")


# --------------------------------------------------------------------------------------- network
def _sw(cluster: Cluster, *args: str, check: bool = True, input: Optional[str] = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", cluster.switch, *args], input=input, capture_output=True,
                          text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def partition(cluster: Cluster, host: str) -> FaultRecord:
    """Cut the host off: the switch drops every frame in from and out to its port (nft bridge
    family, one set element); the host's own link stays up, as with a failed switch port."""
    port = cluster.port_name(host)
    t = _now()
    _sw(cluster, "nft", "add", "element", "bridge", cluster.nft_table, "cut", f'{{ "{port}" }}')
    return FaultRecord("partition", host, "link", t, None, "both directions dropped")


def heal(cluster: Cluster, host: str, record: Optional[FaultRecord] = None) -> FaultRecord:
    port = cluster.port_name(host)
    _sw(cluster, "nft", "delete", "element", "bridge", cluster.nft_table, "cut", f'{{ "{port}" }}', check=False)
    return _done(record, "heal", host, "link", "healed")


def _rule_handles(cluster: Cluster, comment: str) -> List[str]:
    out = _sw(cluster, "nft", "-a", "list", "chain", "bridge", cluster.nft_table, "forward")
    return [m.group(1) for line in out.splitlines() if f'comment "{comment}"' in line
            for m in [re.search(r"# handle (\d+)", line)] if m]


def degrade(cluster: Cluster, host: str, loss_pct: float = 20, rate_mbit: Optional[float] = 100.0) -> FaultRecord:
    """Random loss of ``loss_pct`` % of the frames into and out of the host's port (each
    direction on its own) and, unless ``rate_mbit`` is None, a token bucket at ``rate_mbit`` on
    both ends of its link."""
    if not 0 <= loss_pct <= 100:
        raise ValueError(f"loss_pct {loss_pct}: 0..100")
    port = cluster.port_name(host)
    tag = f"degrade-{host}"
    t = _now()
    restore(cluster, host)
    pct = int(round(loss_pct))
    if pct > 0:
        script = "".join(
            f'add rule bridge {cluster.nft_table} forward {d} "{port}" numgen random mod 100 < {pct} drop '
            f'comment "{tag}"\n' for d in ("iifname", "oifname"))
        _sw(cluster, "nft", "-f", "-", input=script)
    if rate_mbit is not None:
        burst = max(16384, int(rate_mbit * 1e6 / 8 / 50))  # 20 ms worth, at least 16 KiB
        tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
        _sw(cluster, "tc", "qdisc", "replace", "dev", port, "root", *tbf)
        subprocess.run(["ip", "netns", "exec", cluster.hosts[host].netns, "tc", "qdisc", "replace", "dev", "eth0",
                        "root", *tbf], check=True, capture_output=True, timeout=30)
    cluster._degraded.add(host)
    return FaultRecord("degrade", host, "link", t, None, f"loss {pct}%, rate {rate_mbit} mbit")


def restore(cluster: Cluster, host: str, record: Optional[FaultRecord] = None) -> FaultRecord:
    """Undo :func:`degrade`: its nft rules and both qdiscs."""
    port = cluster.port_name(host)
    for handle in _rule_handles(cluster, f"degrade-{host}"):
        _sw(cluster, "nft", "delete", "rule", "bridge", cluster.nft_table, "forward", "handle", handle, check=False)
    _sw(cluster, "tc", "qdisc", "del", "dev", port, "root", check=False)
    subprocess.run(["ip", "netns", "exec", cluster.hosts[host].netns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                   capture_output=True, timeout=30)
    cluster._degraded.discard(host)
    return _done(record, "restore", host, "link", "restored")


# --------------------------------------------------------------------------------------- cpu
def _cpu_dir(cluster: Cluster, host: str):
    return cluster.cgroup(host, "cpu")


def cpu_quota(cluster: Cluster, host: str, fraction: float) -> FaultRecord:
    """Limit every process of the host together to ``fraction`` of one CPU (cfs quota over a
    100 ms period): a straggler that still answers its heartbeats."""
    if not 0 < fraction:
        raise ValueError(f"fraction {fraction}: > 0")
    d = _cpu_dir(cluster, host)
    t = _now()
    (d / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
    (d / "cpu.cfs_quota_us").write_text(str(max(1000, int(fraction * CPU_PERIOD_US))))
    return FaultRecord("cpu_quota", host, "cgroup", t, None, f"{fraction:g} of a CPU")


def restore_cpu(cluster: Cluster, host: str, record: Optional[FaultRecord] = None) -> FaultRecord:
    (_cpu_dir(cluster, host) / "cpu.cfs_quota_us").write_text("-1")
    return _done(record, "restore_cpu", host, "cgroup", "no quota")


# --------------------------------------------------------------------------------------- etcd
def etcd_kill(cluster: Cluster, sig: int = signal.SIGKILL) -> FaultRecord:
    t = _now()
    cluster.stop_etcd(sig)
    return FaultRecord("etcd_kill", "etcd", "etcd", t, None, f"signal {int(sig)}")


def etcd_restart(cluster: Cluster, record: Optional[FaultRecord] = None) -> FaultRecord:
    cluster.restart_etcd()
    return _done(record, "etcd_restart", "etcd", "etcd", "restarted")


# --------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class ScheduledFault:
    t_s: float         # seconds after the schedule's t0
    kind: str
    host: str          # "" for a scale-up with no known spare (the callback picks one)
    duration_s: float = 0.0


class Schedule:
    """A seeded list of faults (see :meth:`compressed`)."""

    def __init__(self, faults: Iterable[ScheduledFault]) -> None:
        self.faults = sorted(faults, key=lambda f: f.t_s)

    def __iter__(self):
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)

    def __getitem__(self, i):
        return self.faults[i]

    @staticmethod
    def compressed(seed: int, duration_s: float, period_s: float = 25.0, kinds: Sequence[str] = KINDS,
                   hosts: Sequence[str] = ("h2", "h3", "h4"), *, spare_hosts: Sequence[str] = (),
                   durations: Optional[Dict[str, float]] = None, min_up: Optional[int] = None,
                   jitter: float = 0.1, first_s: Optional[float] = None) -> List[ScheduledFault]:
        """One fault per ``period_s`` (the first at ``first_s``, default half a period; each
        moved by up to ``jitter`` of a period, seeded) over ``duration_s``. Kinds go round in a
        seeded order, every kind once a round, a scale-down after the round's scale-up.
        ``hosts`` are the targets; ``spare_hosts`` (among them or not) start without an agent.
        The schedule follows which hosts have an agent: a power-off or scale-down takes one
        away (never below ``min_up``, default ``len(up hosts) - 2``, at least 1: such a slot
        becomes a scale-up when a host is down, else another kind), a scale-up brings the first
        down host back; every other fault targets a host that is up. A fault's duration (default
        ``DEFAULT_DURATIONS``) is cut so it ends before the next fault and by ``duration_s``
        (a last fault that would keep less than half its duration is left out). etcd_kill
        targets the host "etcd"."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown or no kinds {unknown}; known: {', '.join(KINDS)}")
        if period_s <= 0 or duration_s <= 0 or not 0 <= jitter < 0.5:
            raise ValueError("period_s and duration_s > 0, 0 <= jitter < 0.5")
        dur = {**DEFAULT_DURATIONS, **(durations or {})}
        rng = random.Random(seed)
        spare = [h for h in spare_hosts]
        up = [h for h in hosts if h not in spare]
        down = list(spare)
        if not up:
            raise ValueError("no host is up to target")
        floor = max(1, len(up) - 2) if min_up is None else min_up
        first = period_s / 2 if first_s is None else first_s
        times = []
        k = 0
        while True:
            t = first + k * period_s + rng.uniform(-jitter, jitter) * period_s
            if t > duration_s - 1.0:
                break
            times.append(max(0.0, round(t, 1)))
            k += 1
        others = [k for k in kinds if k not in REMOVING and k != "scale_up"]
        out: List[ScheduledFault] = []
        cycle: List[str] = []
        for t in times:
            if not cycle:
                cycle = list(kinds)
                rng.shuffle(cycle)
                if "scale_up" in cycle and "scale_down" in cycle and \
                        cycle.index("scale_down") < cycle.index("scale_up"):
                    i, j = cycle.index("scale_down"), cycle.index("scale_up")
                    cycle[i], cycle[j] = cycle[j], cycle[i]
            kind = cycle.pop(0)
            if kind in REMOVING and len(up) - 1 < floor:
                kind = "scale_up" if down and "scale_up" in kinds else (rng.choice(others) if others else "")
            if not kind:
                continue
            if kind == "etcd_kill":
                host = "etcd"
            elif kind == "scale_up":
                host = down.pop(0) if down else ""
                if host:
                    up.append(host)
            else:
                host = rng.choice(up)
                if kind in REMOVING:
                    up.remove(host)
                    down.append(host)
            out.append(ScheduledFault(t, kind, host, float(dur.get(kind, 0.0))))
        for i, f in enumerate(out):  # each ends before the next begins, and by duration_s
            end = out[i + 1].t_s if i + 1 < len(out) else duration_s
            d = min(f.duration_s, max(0.0, round(end - f.t_s - 0.5, 1)))
            out[i] = dataclasses.replace(f, duration_s=d)
        if out and out[-1].duration_s < dur.get(out[-1].kind, 0.0) / 2:
            out.pop()  # the end of the schedule would leave too little of the last fault to measure
        return out


# --------------------------------------------------------------------------------------- injector
class _Records(list):
    """The injector's FaultRecords, in injection order: a list, and callable for a copy."""

    def __call__(self) -> List[FaultRecord]:
        return list(self)


class Injector:
    """Runs a schedule against a cluster in a thread (``start()``), from ``t0`` (default: the
    time ``start()`` is called). Callbacks for what only the workload knows:

    - ``worker_pid(host) -> int | None`` (alias ``pick_pid``): the worker to kill or stop;
    - ``on_scale_up(host) -> str | None`` / ``on_scale_down(host) -> str | None``: start / stop
      an agent; may return the host they actually used (recorded);
    - ``on_power_on(host)``: called after a powered-off host is back (e.g. to rejoin);
    - ``restart_etcd()``: instead of ``cluster.restart_etcd()``.

    ``records`` (also callable: ``records()``) holds one FaultRecord per fault, completed with
    ``t_end`` when the fault ends. A failed injection is recorded with ``detail`` saying why and
    does not stop the schedule. ``stop()`` ends the schedule and, unless ``undo=False``, every
    fault still in force (heal, restore, SIGCONT, power on, etcd restart); ``join()`` waits."""

    def __init__(self, cluster: Cluster, schedule: Union[Schedule, Sequence[ScheduledFault]], *,
                 t0: Optional[float] = None, worker_pid: Optional[Callable[[str], Optional[int]]] = None,
                 pick_pid: Optional[Callable[[str], Optional[int]]] = None,
                 on_scale_up: Optional[Callable[[str], Optional[str]]] = None,
                 on_scale_down: Optional[Callable[[str], Optional[str]]] = None,
                 on_power_on: Optional[Callable[[str], object]] = None,
                 restart_etcd: Optional[Callable[[], object]] = None,
                 loss_pct: float = 20, rate_mbit: Optional[float] = 100.0, cpu_fraction: float = 0.25) -> None:
        self.cluster = cluster
        self.schedule = list(schedule)
        self.t0 = t0
        self.worker_pid = worker_pid or pick_pid
        self.on_scale_up, self.on_scale_down, self.on_power_on = on_scale_up, on_scale_down, on_power_on
        self.restart_etcd_cb = restart_etcd
        self.loss_pct, self.rate_mbit, self.cpu_fraction = loss_pct, rate_mbit, cpu_fraction
        needs = {"kill_worker": self.worker_pid, "stop_worker": self.worker_pid, "scale_up": on_scale_up,
                 "scale_down": on_scale_down}
        missing = sorted({f.kind for f in self.schedule if f.kind in needs and needs[f.kind] is None})
        if missing:
            raise ValueError(f"the schedule has {', '.join(missing)} but no callback for it "
                             "(worker_pid / on_scale_up / on_scale_down)")
        unknown = sorted({f.kind for f in self.schedule if f.kind not in KINDS})
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}")
        self.records: _Records = _Records()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._undo = True
        self._thread = threading.Thread(target=self._run, name="chaos-injector", daemon=True)
        self._seq = itertools.count()
        self._pending: list = []  # heap of (t, seq, index of record, end callable)
        self.errors: List[str] = []

    # ------------------------------------------------------------------ thread
    def start(self) -> "Injector":
        if self.t0 is None:
            self.t0 = _now()
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def done(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def stop(self, undo: bool = True) -> None:
        self._undo = undo
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Injector":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.join(120)

    def _run(self) -> None:
        assert self.t0 is not None
        events = [(self.t0 + f.t_s, next(self._seq), "inject", f) for f in self.schedule]
        heapq.heapify(events)
        try:
            while events:
                t, _, what, payload = events[0]
                if self._stop.wait(max(0.0, t - _now())):
                    break
                heapq.heappop(events)
                if what == "inject":
                    end = self._inject(payload)
                    if end is not None:
                        heapq.heappush(events, (t + payload.duration_s, next(self._seq), "end", end))
                else:
                    self._end(*payload)
        finally:
            if self._undo:
                for _, _, what, payload in sorted(events):
                    if what == "end":
                        self._end(*payload)

    # ------------------------------------------------------------------ one fault
    def _record(self, rec: FaultRecord) -> int:
        with self._lock:
            self.records.append(rec)
            return len(self.records) - 1

    def _end(self, index: int, fn: Callable[[FaultRecord], FaultRecord]) -> None:
        rec = self.records[index]
        try:
            done = fn(rec)
        except Exception as exc:  # noqa: BLE001 - recorded; the schedule goes on
            self.errors.append(f"ending {rec.kind} on {rec.host}: {exc}")
            done = dataclasses.replace(rec, t_end=_now(), detail=f"{rec.detail}; ending failed: {exc}")
        with self._lock:
            self.records[index] = dataclasses.replace(done, kind=rec.kind, host=rec.host)

    def _inject(self, f: ScheduledFault):
        """Inject ``f``; return (record index, ender) when it lasts, else None."""
        c, host, kind = self.cluster, f.host, f.kind
        t = _now()
        try:
            if kind in ("kill_worker", "stop_worker"):
                assert self.worker_pid is not None
                pid = self.worker_pid(host)
                if pid is None:
                    self._record(FaultRecord(kind, host, "", t, t, "no live worker"))
                    return None
                if kind == "kill_worker":
                    self._record(kill_worker(c, host, pid))
                    return None
                i = self._record(stop_worker(c, host, pid))
                return i, lambda r, pid=pid: cont_worker(c, host, pid, r)
            if kind == "power_off":
                i = self._record(power_off(c, host))

                def back(r: FaultRecord) -> FaultRecord:
                    done = power_on(c, host, r)
                    if self.on_power_on is not None:
                        self.on_power_on(host)
                    return done
                return i, back
            if kind == "partition":
                return self._record(partition(c, host)), lambda r: heal(c, host, r)
            if kind == "degrade":
                return (self._record(degrade(c, host, self.loss_pct, self.rate_mbit)),
                        lambda r: restore(c, host, r))
            if kind == "cpu_quota":
                return self._record(cpu_quota(c, host, self.cpu_fraction)), lambda r: restore_cpu(c, host, r)
            if kind in ("scale_up", "scale_down"):
                cb = self.on_scale_up if kind == "scale_up" else self.on_scale_down
                assert cb is not None
                used = cb(host)
                self._record(FaultRecord(kind, used if isinstance(used, str) and used else host, "agent", t, _now()))
                return None
            if kind == "etcd_kill":
                i = self._record(etcd_kill(c))
                restart = self.restart_etcd_cb
                if restart is not None:
                    def again(r: FaultRecord) -> FaultRecord:
                        restart()
                        return _done(r, "etcd_restart", "etcd", "etcd", "restarted")
                    return i, again
                return i, lambda r: etcd_restart(c, r)
        except Exception as exc:  # noqa: BLE001 - recorded; the schedule goes on
            self.errors.append(f"{kind} on {host}: {exc}")
            self._record(FaultRecord(kind, host, "", t, _now(), f"injection failed: {exc}"))
        return None
