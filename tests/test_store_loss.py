"""A job whose store is gone ends cleanly and in bounded time, never a silent hang; a store that
comes back within ``store_timeout`` with the job's leases (etcd restarted) costs no re-formation.

The rendezvous server is killed (run apart with ``elastic-rendezvous serve``, or inside the
agent that hosts it, killed with its node): every other agent fences its workers once its lease
can no longer be renewed, keeps trying the store for ``store_timeout`` (by default six lease
periods), then stops, with one line naming the store and how long it was silent, and exit 69
(``elastic.agent.EXIT_STORE_LOST``). The bound is the test's hard timeout, not a figure asserted.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from needs import needs
from services import free_port

from paths import BIN, ELASTIC_RUN
from elastic.agent import EXIT_STORE_LOST

WORKER = r"""
import os, sys, time
print(f"WORKER gen={os.environ['ELASTIC_GENERATION']} world={os.environ['WORLD_SIZE']} pid={os.getpid()}",
      flush=True)
while True:
    time.sleep(0.05)
"""

LINE = re.compile(r"elastic-run: error: the rendezvous store (\S+) is gone: no answer for (\d+)s "
                  r"\(store_timeout 12s\)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.parametrize("where", ["apart", "in_an_agent"])
def test_every_agent_ends_with_one_line_when_the_store_is_gone(procs, tmp_path, where):
    script = tmp_path / "forever.py"
    script.write_text(WORKER)
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    # lease_ttl=2: the store is given up after 6 lease periods, 12 s of silence
    conf = "last_call_timeout=1,lease_ttl=2,join_timeout=120"

    def agent(name: str, host: bool) -> None:
        procs.start(name, [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", "0",
                           "--rdzv-endpoint", endpoint, "--rdzv-id", "gone",
                           "--rdzv-conf", f"{conf},is_host={'true' if host else 'false'}", str(script)])

    if where == "apart":
        procs.start("store", [os.path.join(BIN, "elastic-rendezvous"), "serve", "--host", "127.0.0.1",
                              "--port", str(port)])
        procs.wait_for_output("store", "listening", timeout_s=60)
        survivors = ["a0", "a1", "a2"]
        agent("a0", host=False)
    else:
        agent("a0", host=True)
        procs.wait_for_output("a0", "listening", timeout_s=60)
        survivors = ["a1", "a2"]
    agent("a1", host=False)
    agent("a2", host=False)
    pids = {}
    for name in survivors:
        procs.wait_for_output(name, "world size 3", timeout_s=120)
        procs.wait_for_output(name, "WORKER gen=", timeout_s=120)
        pids[name] = int(re.findall(r"WORKER gen=\d+ world=3 pid=(\d+)", procs.output(name))[0])

    victim = "store" if where == "apart" else "a0"
    procs.signal(victim, signal.SIGKILL, group=True)  # the store's host dies with its processes
    results = procs.wait(timeout_s=120, names=survivors, check=False)

    for name in survivors:
        result = results[name]
        assert not result.hung and result.returncode == EXIT_STORE_LOST, result.describe()
        lines = [line for line in result.output.splitlines() if "elastic-run: error:" in line]
        assert len(lines) == 1, result.describe()
        match = LINE.search(lines[0])
        assert match and match.group(1) == endpoint and int(match.group(2)) >= 12, lines[0]
        assert "workers were stopped (exit 69)" in lines[0], lines[0]
        assert "fenced round" in result.output, result.describe()  # stopped once the lease was in doubt
    deadline = time.monotonic() + 30  # a hard deadline for the kernel to finish the kills
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids.values()), pids


def _etcd_agents(procs, tmp_path, etcd, conf: str, names=("a0", "a1")):
    from test_partition_heal import WORKER as STEPS_WORKER

    script = tmp_path / "steps_worker.py"
    script.write_text(STEPS_WORKER)
    steps, finish = tmp_path / "steps.log", tmp_path / "finish"
    for name in names:
        procs.start(name, [ELASTIC_RUN, "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "0",
                           "--rdzv-backend", "etcd", "--rdzv-endpoint", etcd.endpoint, "--rdzv-id", "etcd-gone",
                           "--rdzv-conf", conf, str(script), str(steps), str(finish)])
    for name in names:
        procs.wait_for_output(name, "world size 2", timeout_s=120)
        procs.wait_for_output(name, "WORKER node=", timeout_s=120)
    return steps, finish


@needs("pyetcd", tools=["etcd"], why="the etcd extra; etcd-server from make setup")
def test_agents_on_an_etcd_that_is_gone_end_with_one_line(procs, tmp_path, etcd_server_fn):
    _etcd_agents(procs, tmp_path, etcd_server_fn, "last_call_timeout=1,lease_ttl=2,join_timeout=120")
    etcd_server_fn.stop()  # SIGKILL, never restarted
    results = procs.wait(timeout_s=120, check=False)
    for result in results.values():
        assert not result.hung and result.returncode == EXIT_STORE_LOST, result.describe()
        (line,) = [line for line in result.output.splitlines() if "elastic-run: error:" in line]
        assert f"the rendezvous store {etcd_server_fn.endpoint} is gone: no answer for " in line, line


@needs("pyetcd", tools=["etcd"], why="the etcd extra; etcd-server from make setup")
def test_workers_frozen_while_etcd_restarts_go_on_in_their_round(procs, tmp_path, etcd_server_fn):
    """etcd keeps its leases across a restart: the fence froze every worker while it was down
    (their leases could not be renewed), and once it is back the same workers go on in the same
    round: no re-formation, nothing charged."""
    steps, finish = _etcd_agents(procs, tmp_path, etcd_server_fn,
                                 "last_call_timeout=1,lease_ttl=2,join_timeout=120,store_timeout=120")
    before = {name: len(procs.output(name)) for name in ("a0", "a1")}
    etcd_server_fn.stop()
    for name in ("a0", "a1"):
        procs.wait_for_output(name, "fenced round", timeout_s=120, after=before[name])
    etcd_server_fn.start()  # the same data dir: the leases and the round are still there
    for name in ("a0", "a1"):
        procs.wait_for_output(name, "workers resumed", timeout_s=120, after=before[name])
    resumed = steps.read_text().count("\n")
    deadline = time.monotonic() + 60  # a hard deadline for the resumed workers' next steps
    while steps.read_text().count("\n") < resumed + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    finish.write_text("")
    results = procs.wait(timeout_s=120)
    lines = [line.split() for line in steps.read_text().splitlines()]
    assert len(lines) >= resumed + 10
    assert {line[1] for line in lines} == {"1"}, "a new round formed"  # the generation, on every step
    assert len({line[4] for line in lines}) == 2, "a worker was replaced"  # one pid per node, throughout
    for result in results.values():
        assert "restart 1/0" not in result.output and "round 2" not in result.output, result.describe()
