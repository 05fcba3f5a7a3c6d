"""The node's fork server: one interpreter imports the framework once and forks every worker,
first start and replacement alike; exits, signals, output and CPU affinity reach the agent as
from a child of its own, and nothing outlives the agent."""
import os
import signal
import sys
import time

import pytest

from elastic.agent.forkserver import ForkServer

from paths import ELASTIC_RUN, REPO  # noqa: E402


@pytest.fixture
def server(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    srv = ForkServer(sys.executable, ["json"], env, str(tmp_path))
    assert srv.wait_warm(60)
    yield srv
    srv.close()


def script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_exit_codes_signals_and_output_reach_the_caller(server, tmp_path):
    ok = script(tmp_path, "ok.py", "import sys, random\nprint('OUT', random.random())\n"
                                   "print('ERR', file=sys.stderr)\n")
    bad = script(tmp_path, "bad.py", "raise SystemExit(3)\n")
    hang = script(tmp_path, "hang.py", "import time\nprint('UP', flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ)
    a = server.take([ok], False, env, str(tmp_path))
    b = server.take([ok], False, env, str(tmp_path))
    assert a.wait(30) == 0 and b.wait(30) == 0
    out_a, out_b = a.stdout.read().decode(), b.stdout.read().decode()
    assert out_a.startswith("OUT ") and a.stderr.read().decode() == "ERR\n"
    assert out_a != out_b  # each fork reseeds: no two workers share a random stream
    assert server.take([bad], False, env, str(tmp_path)).wait(30) == 3
    h = server.take([hang], False, env, str(tmp_path))
    assert h.stdout.readline() == b"UP\n" and h.poll() is None
    assert os.getpgid(h.pid) == h.pid  # its own session: the agent signals its process group
    os.killpg(h.pid, signal.SIGKILL)
    assert h.wait(30) == -signal.SIGKILL


def test_each_exit_reaches_its_own_caller_while_others_run(server, tmp_path):
    """Workers that end one by one while others still run: every caller gets its own worker's
    exit code, and an exit never closes another worker's connection (read as a SIGKILL)."""
    wait_for = script(tmp_path, "wait.py", "import os, sys, time\nflag = sys.argv[1]\n"
                                            "while not os.path.exists(flag):\n    time.sleep(0.01)\n"
                                            "raise SystemExit(int(sys.argv[2]))\n")
    env = dict(os.environ)
    workers = [server.take([wait_for, str(tmp_path / f"go{i}"), str(10 + i)], False, env, str(tmp_path))
               for i in range(4)]
    for i in (2, 0, 3, 1):  # out of order, each while the others are still running
        (tmp_path / f"go{i}").write_text("")
        assert workers[i].wait(30) == 10 + i
        assert all(w.poll() is None for j, w in enumerate(workers) if not (tmp_path / f"go{j}").exists())


def test_the_forked_worker_is_bound_to_its_cpus(server, tmp_path):
    show = script(tmp_path, "cpus.py", "import os\nprint(sorted(os.sched_getaffinity(0)))\n")
    proc = server.take([show], False, dict(os.environ), str(tmp_path), cpus=(0,))
    assert proc.wait(30) == 0 and proc.stdout.read().decode().strip() == "[0]"


def test_elastic_run_forks_torch_workers_and_they_die_with_the_agent(procs, tmp_path):
    """Both workers come from one warm interpreter (their parent), which had imported torch
    before the script ran; SIGKILL to the agent takes the server and the workers with it."""
    probe = script(tmp_path, "probe.py", "import os, sys, time\n"
                                         "warm = 'torch' in sys.modules\n"
                                         "import torch\n"
                                         "print('PROBE', os.environ['LOCAL_RANK'], os.getpid(), os.getppid(), warm,"
                                         " flush=True)\n"
                                         "time.sleep(120)\n")
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", probe])
    procs.wait_for_output("job", "PROBE 1", timeout_s=120)
    procs.wait_for_output("job", "PROBE 0", timeout_s=120)
    rows = [line.split("PROBE ", 1)[1].split() for line in procs.output("job").splitlines() if "PROBE " in line]
    agent = procs["job"].pid
    parents = {ppid for _, _, ppid, _ in rows}
    assert len(parents) == 1 and str(agent) not in parents  # one fork server, not the agent
    assert all(warm == "True" for *_, warm in rows)
    pids = [int(pid) for _, pid, _, _ in rows] + [int(parents.pop())]
    procs.signal("job", signal.SIGKILL)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
        time.sleep(0.05)
    assert not alive, f"outlived the agent: {alive}"


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_an_exit_that_arrives_with_the_pid_is_not_taken_for_a_kill(server, tmp_path):
    """A worker that exits at once: its exit status may reach the agent in the same read as
    its pid; it once read as SIGKILL when the server then closed the connection."""
    quick = script(tmp_path, "quick.py", "")
    for _ in range(20):
        proc = server.take([quick], False, dict(os.environ), str(tmp_path))
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.returncode == 0
