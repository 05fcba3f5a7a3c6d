"""``make demo``'s story (examples/elastic_demo.py), run as a user runs it: real agents on
loopback, a worker killed, a node drained through the control plane, a third node joining.

The driver's working directory goes under the test's own TMPDIR, so "no process left behind"
is checked by looking for any process whose command line still names it.
"""
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from paths import REPO  # noqa: E402
DEMO = os.path.join(REPO, "examples", "elastic_demo.py")


def start_demo(tmp_path, *args):
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, DEMO, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def leftovers(tmp_path):
    """Processes still running whose command line names the test's directory."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(tmp_path) in part for part in p.info["cmdline"] or ()):
                out.append((p.info["pid"], " ".join(p.info["cmdline"])[:120]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def finish(proc, timeout_s):
    """The demo's output and exit code; past the hard timeout its whole group is killed."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo ran past {timeout_s}s; its output:\n{out}")
    return out, proc.returncode


def assert_nothing_left(tmp_path):
    deadline = time.monotonic() + 10
    while leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # five torch processes and a third agent's start: 30-60 s on 2 busy cores
def test_the_demo_tells_the_elastic_story(tmp_path):
    proc = start_demo(tmp_path)
    out, code = finish(proc, timeout_s=240)
    assert code == 0, out
    # The three changes, each with the pause it caused and the world size after it.
    outcomes = re.findall(r"t=\s*([\d.]+)s  (worker killed \(rank 1\)|node b drained|node c joined) -> "
                          r"training again in ([\d.]+)s at world size (\d+)", out)
    assert [(what, int(world)) for _, what, _, world in outcomes] == [
        ("worker killed (rank 1)", 4), ("node b drained", 2), ("node c joined", 4)], out
    times = [float(t) for t, _, _, _ in outcomes]
    assert times == sorted(times)
    assert all(float(pause) >= 0 for _, _, pause, _ in outcomes)
    # The job's own events, as the agents published them.
    assert "event: node a: worker rank 1 failed" in out or "a worker lost a peer" in out, out
    for line in ["event: round 1 formed: world size 4, nodes [a, b]",
                 "event: controller: drain of node b requested (preemption)",
                 "event: node b: draining (preemption)",
                 "event: node b: drained and left (preemption)",
                 "formed: world size 2, nodes [a]",
                 "formed: world size 4, nodes [a, c]",
                 "event: node c joined (node rank 1)",
                 "node b: its workers saved their last committed step",
                 "node b's agent exited 75: drained"]:
        assert line in out, f"missing {line!r} in:\n{out}"
    # In process: the survivors of each change kept their processes.
    kept = re.findall(r"(\d+) of (\d+) other workers kept their PIDs", out)
    assert kept == [("3", "3"), ("2", "2"), ("2", "2")], out
    # No step lost to the drain: the survivors resume right after the step the drained node saved.
    saved = int(re.search(r"saved their last committed step \((\d+)\)", out).group(1))
    resumed = re.search(r"node b drained -> .*\n\s+\(resumed at step (\d+)", out)
    assert int(resumed.group(1)) == saved + 1, out
    # The crash is charged once (by whichever agent saw it first); the drain and the join never.
    assert re.search(r"restarts spent from the budget: [01] of 3", out), out
    acc = float(re.search(r"final test accuracy ([\d.]+) after \d+ steps \(world size 4\)", out).group(1))
    assert acc >= 0.9, out
    assert_nothing_left(tmp_path)


def test_ctrl_c_stops_every_node(tmp_path):
    """Interrupted while it trains: exit 130, one line, and no process of it left (agents,
    workers, fork servers)."""
    proc = start_demo(tmp_path)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if "training at world size 4" in line or time.monotonic() > deadline:
            break
    assert any("training at world size 4" in line for line in seen), "".join(seen)
    assert len(leftovers(tmp_path)) >= 6  # two agents and their four workers
    proc.send_signal(signal.SIGINT)
    out, code = finish(proc, timeout_s=60)
    assert code == 130, "".join(seen) + out
    assert "interrupted: stopping every node" in out
    assert "Traceback" not in out
    assert_nothing_left(tmp_path)
