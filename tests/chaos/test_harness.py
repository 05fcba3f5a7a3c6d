"""The chaos harness itself (issue 16): hosts in network namespaces, their isolation, the route
check, every fault kind and its undo, teardown by name (also after a crash), and the seeded
schedule. Real namespaces, real packets between them (never from the root namespace to the
subnet), real processes; no timing is asserted."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.chaos import faults, netns
from benchmarks.chaos.faults import Injector, Schedule, ScheduledFault
from benchmarks.chaos.proxy import DelayProxy

from .conftest import REPO, need_namespaces

PY = sys.executable

# A UDP echo server: binds ADDR:PORT, echoes every datagram, keeps the count of datagrams it
# received in COUNT_FILE (written "0" once bound).
ECHO_SERVER = r"""
import socket, sys
addr, port, count_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port)); n = 0
open(count_file, "w").write("0")
while True:
    data, peer = s.recvfrom(2048); n += 1
    open(count_file + ".tmp", "w").write(str(n)); __import__("os").replace(count_file + ".tmp", count_file)
    s.sendto(data, peer)
"""
# A UDP client: sends N numbered datagrams to ADDR:PORT, waits WAIT_S for echoes, prints how many came back.
ECHO_CLIENT = r"""
import socket, sys, time
addr, port, n, wait_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    try:
        s.sendto(str(i).encode(), (addr, port))
    except OSError:
        pass
    time.sleep(0.002)
got, end = set(), time.time() + wait_s
while time.time() < end:
    s.settimeout(max(0.01, end - time.time()))
    try:
        got.add(s.recv(2048))
    except (socket.timeout, OSError):
        pass
print(len(got))
"""
TCP_ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("LISTENING", flush=True)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
"""
TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
payload = bytes(range(256)) * 64
c.sendall(payload); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
print("ECHO", "ok" if got == payload else f"bad {len(got)}", socket.gethostname())
"""


def wait_for(cond, timeout_s: float, what: str):
    """Poll ``cond`` until it returns truthy (a bound on the wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what} after {timeout_s:.0f}s")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its (possibly re-parented) parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


class Echo:
    """UDP echo servers on some hosts of a cluster (port 7007), counting what each received."""

    def __init__(self, cluster, hosts):
        self.c = cluster
        self.files = {}
        self.procs = []
        for h in hosts:
            f = Path(cluster.workdir) / f"echo-{h}-{os.getpid()}-{time.monotonic_ns()}.count"
            self.files[h] = f
            self.procs.append(cluster.spawn(h, [PY, "-c", ECHO_SERVER, cluster.addr(h), "7007", str(f)]))
        for h, f in self.files.items():
            wait_for(f.exists, 20, f"the echo server on {h}")

    def received(self, h) -> int:
        return int(self.files[h].read_text() or 0)

    def send(self, src, dst, n=20, wait_s=1.0) -> tuple:
        """(echoes back at src, datagrams the server on dst received meanwhile)."""
        before = self.received(dst)
        out = self.c.run(src, [PY, "-c", ECHO_CLIENT, self.c.addr(dst), "7007", str(n), str(wait_s)], timeout_s=60)
        assert out.returncode == 0, out.stdout
        return int(out.stdout.split()[-1]), self.received(dst) - before

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)


# --------------------------------------------------------------------------------------- schedule (no root)
KINDS = ["kill_worker", "stop_worker", "power_off", "partition", "degrade", "cpu_quota", "scale_up", "scale_down"]


def test_schedule_is_seeded():
    a = Schedule.compressed(7, 240, period_s=25, kinds=KINDS, hosts=["h2", "h3", "h4", "h5"], spare_hosts=["h5"])
    b = Schedule.compressed(7, 240, period_s=25, kinds=KINDS, hosts=["h2", "h3", "h4", "h5"], spare_hosts=["h5"])
    c = Schedule.compressed(8, 240, period_s=25, kinds=KINDS, hosts=["h2", "h3", "h4", "h5"], spare_hosts=["h5"])
    assert a == b
    assert a != c
    assert all(isinstance(f, ScheduledFault) for f in a)


def test_schedule_kinds_spacing_and_hosts():
    hosts = ["h2", "h3", "h4", "h5"]
    for seed in range(20):
        s = Schedule.compressed(seed, 240, period_s=25, kinds=KINDS, hosts=hosts, spare_hosts=["h5"])
        assert len(s) in (9, 10)  # one a period from 12.5 s (each moved up to 2.5 s) to 239 s
        assert s[-1].duration_s >= faults.DEFAULT_DURATIONS[s[-1].kind] / 2
        assert set(f.kind for f in s) <= set(KINDS)
        assert set(f.kind for f in s[:8]) == set(KINDS)  # every kind once a round
        times = [f.t_s for f in s]
        assert times == sorted(times) and times[0] >= 0 and times[-1] <= 240
        for f, nxt in zip(s, s[1:]):
            assert nxt.t_s - f.t_s >= 25 * 0.8 - 0.2  # jitter is at most a tenth of a period each way
            assert f.t_s + f.duration_s <= nxt.t_s  # a fault ends before the next begins
        assert s[-1].t_s + s[-1].duration_s <= 240
        up, down = {"h2", "h3", "h4"}, ["h5"]
        for f in s:  # the schedule tracks which hosts have an agent
            assert f.host in hosts
            if f.kind == "scale_up":
                assert f.host in down
                down.remove(f.host)
                up.add(f.host)
            else:
                assert f.host in up, (seed, f)
                if f.kind in ("power_off", "scale_down"):
                    up.remove(f.host)
                    down.append(f.host)
            assert len(up) >= 1
        ups = [i for i, f in enumerate(s) if f.kind == "scale_up"]
        downs = [i for i, f in enumerate(s) if f.kind == "scale_down"]
        assert not downs or (ups and ups[0] < downs[0]), "a scale-down only after a scale-up"


def test_schedule_durations_and_errors():
    s = Schedule.compressed(1, 100, period_s=25, kinds=["partition"], hosts=["h2"], jitter=0.0)
    assert [f.t_s for f in s] == [12.5, 37.5, 62.5, 87.5]
    assert all(f.kind == "partition" and f.host == "h2" for f in s)
    assert [f.duration_s for f in s[:3]] == [20.0, 20.0, 20.0]
    assert s[-1].duration_s == 12.0  # cut to end by duration_s
    assert Schedule.compressed(1, 60, kinds=["etcd_kill"], hosts=["h2"])[0].host == "etcd"
    with pytest.raises(ValueError):
        Schedule.compressed(1, 60, kinds=["nope"], hosts=["h2"])
    with pytest.raises(ValueError, match="callback"):
        Injector(object(), [ScheduledFault(0, "kill_worker", "h2")])  # type: ignore[arg-type]


def test_records_are_frozen_dataclasses():
    r = faults.FaultRecord("partition", "h2", "link", 1.0, None, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.t_end = 2.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------- hosts
def test_skips_with_reason_without_namespaces(monkeypatch):
    """Without root the harness names the reason (and so the chaos tests skip with it)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_PROBE", {})
    with pytest.raises(netns.NamespacesUnavailable, match="root"):
        netns.require_namespaces()


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_hosts_reach_each_other_by_address(cluster3):
    c = cluster3
    echo = Echo(c, ["h1", "h2"])
    try:
        got, recv = echo.send("h1", "h2", n=10)
        assert (got, recv) == (10, 10)
        got, recv = echo.send("h2", "h1", n=10)
        assert (got, recv) == (10, 10)
    finally:
        echo.stop()
    server = c.spawn("h3", [PY, "-u", "-c", TCP_ECHO_SERVER, c.addr("h3"), "7100"])
    try:
        wait_for(lambda: "LISTENING" in _log_of(c, server), 20, "the TCP server")
        for src in ("h1", "h2"):
            out = c.run(src, [PY, "-c", TCP_CLIENT, c.addr("h3"), "7100"], timeout_s=60)
            assert out.stdout.split() == ["ECHO", "ok", src], out.stdout
        by_name = c.run("h1", [PY, "-c", TCP_CLIENT, "h3", "7100"], timeout_s=60)  # /etc/hosts names every host
        assert by_name.stdout.split() == ["ECHO", "ok", "h1"], by_name.stdout
    finally:
        server.kill()
        server.wait(timeout=10)


GLOO_ALLREDUCE = r"""
import os, socket, torch, torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="tcp://h1:29555", rank=rank, world_size=2)
t = torch.tensor([rank + 1.0]); dist.all_reduce(t)
print("RESULT", socket.gethostname(), t.item(), flush=True)
"""


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torch_gloo_allreduce_across_hosts(cluster3):
    """What the workloads do, in miniature: two hosts find each other by name and all-reduce."""
    from needs import require

    require("torch")
    c = cluster3
    logs = {h: Path(c.workdir) / f"gloo-{h}.log" for h in ("h1", "h2")}
    procs = [c.spawn(h, [PY, "-c", GLOO_ALLREDUCE], env={"RANK": str(i), "OMP_NUM_THREADS": "1"}, log_path=logs[h])
             for i, h in enumerate(("h1", "h2"))]
    try:
        for p in procs:
            p.wait(timeout=100)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for h, log in logs.items():
        text = log.read_text(errors="replace")
        assert f"RESULT {h} 3.0" in text, text[-2000:]


def _log_of(c, proc) -> str:
    logs = sorted((Path(c.workdir) / "logs").glob("*"), key=lambda p: p.stat().st_mtime)
    return "".join(p.read_text(errors="replace") for p in logs)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_each_host_has_its_own_hostname_tmp_and_shm(cluster3):
    c = cluster3
    write = "import socket; open('/dev/shm/mark','w').write('x'); open('/tmp/mark','w').write('y'); " \
            "print(socket.gethostname())"
    look = "import os, socket; " \
           "print(socket.gethostname(), os.path.exists('/dev/shm/mark'), os.path.exists('/tmp/mark'))"
    try:
        assert c.run("h1", [PY, "-c", write]).stdout.split() == ["h1"]
        assert c.run("h1", [PY, "-c", look]).stdout.split() == ["h1", "True", "True"]  # the same host: shared
        assert c.run("h2", [PY, "-c", look]).stdout.split() == ["h2", "False", "False"]
        assert not os.path.exists("/dev/shm/mark") or open("/dev/shm/mark").read() != "x"
        # the work directory is shared by every host, like an NFS mount
        shared = Path(c.workdir) / "shared-mark"
        c.run("h2", ["sh", "-c", f"echo from-h2 > {shared}"])
        assert shared.read_text().strip() == "from-h2"
        assert c.run("h3", ["cat", str(shared)]).stdout.strip() == "from-h2"
    finally:
        c.run("h1", ["rm", "-f", "/dev/shm/mark", "/tmp/mark"])


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_no_default_route_and_the_route_check_refuses_a_bad_topology(cluster3):
    c = cluster3
    for h in c.hosts.values():
        routes = sh("ip", "-n", h.netns, "route", "show", "table", "all")
        assert "default" not in routes
        assert sh("ip", "-n", h.netns, "route").strip().startswith(c.subnet + " dev eth0")
        for peer in c.hosts.values():
            if peer is not h:
                got = sh("ip", "-n", h.netns, "route", "get", peer.addr).split()
                assert got[got.index("dev") + 1] == "eth0" and "via" not in got
    assert c.subnet.rsplit(".", 1)[0] not in sh("ip", "-4", "-o", "addr", "show")  # root holds nothing of it
    assert c.root_guard_packets() == 0  # and has sent nothing there (the guard would drop and count it)
    c.check_routes()
    ns = c.hosts["h2"].netns
    subprocess.run(["ip", "-n", ns, "route", "add", "default", "dev", "eth0"], check=True)
    try:
        with pytest.raises(netns.UnsafeTopology, match="h2.*default"):
            c.check_routes()
    finally:
        subprocess.run(["ip", "-n", ns, "route", "del", "default"], check=True)
    c.check_routes()


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_partition_cuts_both_directions_and_heal_restores(cluster3):
    c = cluster3
    echo = Echo(c, ["h1", "h2", "h3"])
    try:
        assert echo.send("h1", "h2", n=5) == (5, 5)
        rec = faults.partition(c, "h2")
        try:
            assert rec.kind == "partition" and rec.host == "h2" and rec.t_end is None
            assert echo.send("h1", "h2", n=10) == (0, 0)  # h1 -> h2 never arrives
            assert echo.send("h2", "h1", n=10) == (0, 0)  # h2 -> h1 never arrives
            assert echo.send("h3", "h2", n=10) == (0, 0)
            assert echo.send("h1", "h3", n=5) == (5, 5)  # the others still talk
        finally:
            done = faults.heal(c, "h2", rec)
        assert done.t_end is not None and done.t_end >= done.t_inject and done.kind == "partition"
        assert echo.send("h1", "h2", n=5) == (5, 5)
        assert echo.send("h2", "h1", n=5) == (5, 5)
    finally:
        echo.stop()


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_degrade_loses_some_packets_and_restore_undoes_it(cluster3):
    c = cluster3
    echo = Echo(c, ["h2"])
    port = c.port_name("h2")
    try:
        rec = faults.degrade(c, "h2", loss_pct=30, rate_mbit=50)
        try:
            assert "tbf" in sh("ip", "netns", "exec", c.switch, "tc", "qdisc", "show", "dev", port)
            assert "tbf" in sh("ip", "netns", "exec", c.hosts["h2"].netns, "tc", "qdisc", "show", "dev", "eth0")
            got, recv = echo.send("h1", "h2", n=200, wait_s=1.5)
            assert 0 < recv < 200, recv  # ~30% of the requests lost on the way in
            assert 0 < got <= recv  # and ~30% of the echoes on the way out
            assert got < 200
        finally:
            faults.restore(c, "h2", rec)
        rules = sh("ip", "netns", "exec", c.switch, "nft", "list", "chain", "bridge", c.nft_table, "forward")
        assert "numgen" not in rules
        assert "tbf" not in sh("ip", "netns", "exec", c.switch, "tc", "qdisc", "show", "dev", port)
        assert "tbf" not in sh("ip", "netns", "exec", c.hosts["h2"].netns, "tc", "qdisc", "show", "dev", "eth0")
        got, recv = echo.send("h1", "h2", n=5)
        assert got == 5
    finally:
        echo.stop()


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cpu_quota_throttles_the_hosts_processes(cluster3):
    c = cluster3
    busy = c.spawn("h3", [PY, "-c", "while True: pass"])
    cpu = c.cgroup("h3", "cpu")

    def throttled() -> int:
        stat = dict(line.split() for line in (cpu / "cpu.stat").read_text().splitlines())
        return int(stat["nr_throttled"])

    try:
        assert busy.pid in c.pids("h3")
        assert str(busy.pid) in (cpu / "cgroup.procs").read_text().split()
        before = throttled()
        rec = faults.cpu_quota(c, "h3", 0.1)
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "10000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
        wait_for(lambda: throttled() > before, 30, "the CFS quota to throttle the busy loop")
        done = faults.restore_cpu(c, "h3", rec)
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
        assert done.kind == "cpu_quota" and done.t_end is not None
    finally:
        busy.kill()
        busy.wait(timeout=10)
        faults.restore_cpu(c, "h3")


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_power_off_freezes_and_kills_the_host_and_power_on_brings_it_back(fresh_cluster):
    c = fresh_cluster
    c.run("h2", ["sh", "-c", "echo x > /dev/shm/ram && echo y > /tmp/disk"])
    a = c.spawn("h2", ["sleep", "1000"])
    b = c.spawn("h2", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    other = c.spawn("h1", ["sleep", "1000"])
    wait_for(lambda: len(c.pids("h2")) >= 4, 20, "four processes on h2")
    # the freezer stops the host's processes (the first half of a power-off)
    c.freeze("h2")
    assert (c.cgroup("h2") / "freezer.state").read_text().strip() == "FROZEN"
    c.thaw("h2")
    pids = c.pids("h2")
    rec = faults.power_off(c, "h2")
    assert rec.kind == "power_off" and rec.detail == f"killed {len(pids)} processes"
    assert c.pids("h2") == []
    assert a.returncode == -signal.SIGKILL and b.returncode == -signal.SIGKILL
    assert all(gone(p) for p in pids)
    assert "state DOWN" in sh("ip", "-n", c.switch, "link", "show", c.port_name("h2"))
    assert not c.is_on("h2")
    with pytest.raises(netns.HostDown):
        c.spawn("h2", ["true"])
    assert other.poll() is None and c.pids("h1") == [other.pid]  # the other host runs on
    done = faults.power_on(c, "h2", rec)
    assert done.kind == "power_off" and done.t_end is not None
    assert c.is_on("h2")
    look = c.run("h2", ["sh", "-c", "hostname; ls /dev/shm /tmp | wc -w"])
    assert look.stdout.split() == ["h2", "2"], look.stdout  # its memory is gone: only the two dir headers
    echo = Echo(c, ["h2"])
    try:
        assert echo.send("h1", "h2", n=5) == (5, 5)
    finally:
        echo.stop()
        other.kill()
        other.wait(timeout=10)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_kill_stop_cont(cluster3):
    c = cluster3
    w = c.spawn("h2", ["sleep", "1000"])
    intruder = subprocess.Popen(["sleep", "1000"])  # not a process of h2: refused
    try:
        with pytest.raises(ValueError):
            faults.kill_worker(c, "h2", intruder.pid)
        rec = faults.stop_worker(c, "h2", w.pid)
        wait_for(lambda: open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", 10, "SIGSTOP")
        done = faults.cont_worker(c, "h2", w.pid, rec)
        assert done.kind == "stop_worker" and done.t_end is not None
        wait_for(lambda: open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "S", 10, "SIGCONT")
        rec = faults.kill_worker(c, "h2", w.pid)
        assert rec.target == str(w.pid) and w.wait(timeout=10) == -signal.SIGKILL
    finally:
        intruder.kill()
        intruder.wait()
        w.kill()
        w.wait()


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_injector_runs_a_schedule_and_undoes_on_stop(cluster3):
    c = cluster3
    w = c.spawn("h3", ["sleep", "1000"])
    ups = []
    sched = [ScheduledFault(0.0, "partition", "h2", 0.5), ScheduledFault(0.6, "cpu_quota", "h1", 0.2),
             ScheduledFault(0.9, "kill_worker", "h3"), ScheduledFault(1.0, "scale_up", "h1"),
             ScheduledFault(1.1, "degrade", "h1", 300.0)]
    inj = Injector(c, sched, worker_pid=lambda h: c.pids(h)[0] if c.pids(h) else None,
                   on_scale_up=lambda h: ups.append(h) or "h9", on_scale_down=lambda h: None)
    try:
        inj.start()
        wait_for(lambda: len(inj.records) == 5, 60, "five injections")
        inj.stop()
        inj.join(60)
        assert not inj.is_alive() and inj.done()
    finally:
        inj.stop()
        inj.join(60)
        w.kill()
        w.wait()
    recs = inj.records()
    assert [r.kind for r in recs] == ["partition", "cpu_quota", "kill_worker", "scale_up", "degrade"]
    assert all(r.t_end is not None and r.t_end >= r.t_inject for r in recs), recs
    assert recs[2].target == str(w.pid) and w.returncode == -signal.SIGKILL
    assert ups == ["h1"] and recs[3].host == "h9"
    assert not inj.errors
    # stop() ended the degrade that had 300 s to go; everything is back to normal
    forward = sh("ip", "netns", "exec", c.switch, "nft", "list", "table", "bridge", c.nft_table)
    assert "numgen" not in forward and "elements" not in forward
    assert (c.cgroup("h1", "cpu") / "cpu.cfs_quota_us").read_text().strip() == "-1"


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_delay_proxy_forwards_intact(cluster3):
    c = cluster3
    server = c.spawn("h1", [PY, "-u", "-c", TCP_ECHO_SERVER, c.addr("h1"), "7200"],
                     log_path=Path(c.workdir) / "tcp7200.log")
    try:
        wait_for(lambda: "LISTENING" in (Path(c.workdir) / "tcp7200.log").read_text(), 20, "the TCP server")
        with DelayProxy(c, "h2", f"{c.addr('h2')}:7201", f"{c.addr('h1')}:7200", 0.05):
            out = c.run("h3", [PY, "-c", TCP_CLIENT, c.addr("h2"), "7201"], timeout_s=60)
            assert out.stdout.split() == ["ECHO", "ok", "h3"], out.stdout
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_etcd_on_its_host_stops_and_restarts():
    need_namespaces()
    if not os.path.exists(netns.ETCD_BIN):
        pytest.skip(f"{netns.ETCD_BIN} not installed (etcd-server)")
    probe = ("import sys, urllib.request; "
             "print(urllib.request.urlopen(sys.argv[1] + '/health', timeout=5).read().decode())")
    with netns.Cluster(("h1",), etcd_host=True) as c:
        url = c.start_etcd()
        assert url == f"http://{c.addr('etcd')}:{netns.ETCD_PORT}"
        assert '"health":"true"' in c.run("h1", [PY, "-c", probe, url]).stdout.replace(" ", "")
        rec = faults.etcd_kill(c)
        assert c.pids("etcd") == []
        faults.etcd_restart(c, rec)
        assert '"health":"true"' in c.run("h1", [PY, "-c", probe, url]).stdout.replace(" ", "")
        assert (Path(c.workdir) / "etcd-data").is_dir()
        with Injector(c, [ScheduledFault(0.0, "etcd_kill", "etcd", 0.2)]) as inj:  # the scheduled kind
            wait_for(inj.done, 60, "the etcd kill and restart")
        assert [(r.kind, r.host) for r in inj.records()] == [("etcd_kill", "etcd")] and not inj.errors
        assert inj.records()[0].t_end is not None
        assert '"health":"true"' in c.run("h1", [PY, "-c", probe, url]).stdout.replace(" ", "")


# --------------------------------------------------------------------------------------- teardown
def _leftovers(tag: str) -> list:
    out = []
    out += [f"netns {n}" for n in sh("ip", "netns", "list").split() if n.startswith(tag)]
    out += [f"link {ln}" for ln in sh("ip", "-o", "link", "show").splitlines() if f"{tag}-" in ln]
    out += [f"nft {t}" for t in sh("nft", "list", "tables").splitlines() if t.split()[-1:] == [tag]]
    out += [f"cgroup {ctrl}" for ctrl in netns.CONTROLLERS if netns.cgroup_dir(ctrl, tag).exists()]
    out += [f"owner {tag}" for _ in [0] if (netns.OWNERS / f"{tag}.json").exists()]
    return out


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_close_leaves_nothing_behind():
    need_namespaces()
    c = netns.Cluster(("h1", "h2"))
    tag, workdir = c.tag, Path(c.workdir)
    p = c.spawn("h1", ["sh", "-c", "sleep 1000 & sleep 1000"])
    faults.degrade(c, "h1")
    faults.partition(c, "h2")
    faults.cpu_quota(c, "h2", 0.5)
    c.freeze("h2")
    pids = c.pids("h1") + c.pids("h2")
    assert _leftovers(tag)
    c.close()
    assert _leftovers(tag) == []
    assert p.returncode is not None
    assert all(gone(x) for x in pids)
    assert not workdir.exists()
    c.close()  # idempotent


CRASHER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.chaos import netns, faults
c = netns.Cluster(("h1", "h2"), tag=sys.argv[2], workdir=sys.argv[3])
c.spawn("h1", ["sleep", "1000"])
faults.partition(c, "h2"); faults.degrade(c, "h1"); faults.cpu_quota(c, "h1", 0.5)
print("UP", os.getpid(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)   # no close(), no atexit
"""


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cleanup_stale_after_a_crash_and_never_a_live_run():
    need_namespaces()
    tag = "ecx" + os.urandom(3).hex()
    workdir = Path("/var/tmp") / f"elastic-chaos-test-{tag}"
    live = netns.Cluster(("h1",), tag="ecy" + os.urandom(3).hex())
    try:
        out = subprocess.run([PY, "-c", CRASHER, REPO, tag, str(workdir)], capture_output=True, text=True,
                             timeout=60)
        assert out.stdout.split()[0] == "UP" and out.returncode == -signal.SIGKILL, out.stderr
        crashed_pid = out.stdout.split()[1]
        left = _leftovers(tag)
        assert any(x.startswith("netns") for x in left) and any(x.startswith("cgroup") for x in left)
        sleeper = [int(x) for x in (netns.cgroup_dir("freezer", tag) / "h1" / "cgroup.procs").read_text().split()]
        assert sleeper
        assert netns.cleanup_stale(live.tag) == []  # its owner is alive: left alone
        with pytest.raises(ValueError, match="in use by a live run"):
            netns.Cluster(("h1",), tag=live.tag)  # a tag is never shared, and the refusal touches nothing
        with pytest.raises(ValueError, match="left by a run that died"):
            netns.Cluster(("h1",), tag=tag)
        listed = subprocess.run([PY, "-m", "benchmarks.chaos.netns", "list", tag], cwd=REPO, capture_output=True,
                                text=True, timeout=60).stdout
        assert listed.split()[:4] == [tag, "owner", crashed_pid, "dead"], listed
        cli = subprocess.run([PY, "-m", "benchmarks.chaos.netns", "cleanup", tag], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert cli.stdout.strip() == f"removed 1 run(s): {tag}", cli.stdout + cli.stderr
        assert _leftovers(tag) == []
        assert all(gone(x) for x in sleeper)
        assert live.run("h1", ["hostname"]).stdout.strip() == "h1"
        assert json.loads((netns.OWNERS / f"{live.tag}.json").read_text())["pid"] == os.getpid()
    finally:
        live.close()
        netns.cleanup_stale(tag)
        subprocess.run(["rm", "-rf", str(workdir)])
