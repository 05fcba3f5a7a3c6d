"""A job whose embedded store is gone ends cleanly and in bounded time, never a silent hang.

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
