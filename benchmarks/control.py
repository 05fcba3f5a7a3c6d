"""A preemption notice for one node of a 3-node job, 5 s before the node is killed: elastic-run's
drain (in process and on the restart path) vs torchrun, where the notice is a SIGTERM.

    python benchmarks/control.py [--quick] [--trials N] [--step-s S]

Each trial runs a 3-node job on loopback (3 agents, 1 worker each, gloo, one all-reduce and a
~30 ms sleep per step: benchmarks/_control_worker.py) until it has trained a while at world size
3, then gives the notice for the third node (never the first, which hosts the rendezvous):

- ``drain``: elastic-run, the loop under ``@elastic.run`` with a commit every step;
  ``JobController.drain(node, deadline_s=5, reason="preemption")``. The drained node's worker
  saves at its next commit and leaves; the survivors re-form in place (``--max-restarts 0``).
- ``drain_restart_path``: elastic-run, a plain loop that keeps a checkpoint every step; the same
  drain; the survivors' workers restart and resume from that checkpoint.
- ``torchrun_sigterm``: torchrun (``--rdzv-backend c10d --nnodes 2:3 --max-restarts 3``), the
  plain loop as users run it, a checkpoint every 50 steps; the notice is a SIGTERM to the node's
  torchrun agent (what Kubernetes and Slurm send). torchrun restarts every worker.

5 s after the notice the node's process group is SIGKILLed, whatever it is doing. Figures: the
time from the notice to the survivors' first step at world size 2, and the steps of committed
work lost: (the last step completed before the notice, across the job) minus (the step the
survivors resume from), clipped at 0. Both launchers get the same rendezvous timing: a 1 s last
call and a dead node noticed within 3 s (torch's keep-alive 1 s x 3; our lease 3 s).

The last line is one JSON object: ``drain_to_step_s``, ``drain_restart_path_to_step_s``,
``torchrun_sigterm_to_step_s`` (medians of the trials), ``steps_lost``,
``restart_path_steps_lost`` and ``torchrun_steps_lost`` (medians), ``ratio``
(torchrun / drain), ``survivor_restarts`` (worker PIDs replaced on the survivors under
``@elastic.run``, most over the trials), ``restarts_spent`` (ours, of the budget, most) and
``failed_trials`` (per launcher, trials whose survivors never stepped at world size 2 within
``--timeout-s``: counted, not timed). ``--quick``: one trial of each; default: ``--trials`` 3,
alternating launchers, median with the min-max spread. The notice lands after 60 + a seeded
random 0-49 steps at world size 3 (the same for every launcher in a trial), so it meets
torchrun's 50-step checkpoint cycle at varying phases.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from elastic.net import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_control_worker.py")
BIN = os.path.dirname(sys.executable)
ELASTIC_RUN = os.path.join(BIN, "elastic-run")
TORCHRUN = os.path.join(BIN, "torchrun")
NOTICE_S = 5.0  # the notice comes this long before the node is killed
TORCHRUN_CKPT_EVERY = 50
OUR_CONF = "last_call_timeout=1,lease_ttl=3,join_timeout=60"
TORCHRUN_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60"
STEP = re.compile(r"STEP step=(\d+) rank=(\d+) world=(\d+) pid=(\d+) t=([\d.]+)")
SAVED = re.compile(r"SAVED step=(\d+) rank=\d+ reason=(\w+)")

_LIVE: list[subprocess.Popen] = []  # every launcher started, killed (their groups) on any exit


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from /proc (torchrun starts its workers in sessions of
    their own, so killing the launcher's process group leaves a hung worker group running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher, its process group and every process it started, wherever they are."""
    pids = _descendants(proc.pid)
    for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), *(
            (lambda p=p: os.killpg(os.getpgid(p), signal.SIGKILL)) for p in pids), *(
            (lambda p=p: os.kill(p, signal.SIGKILL)) for p in pids)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _kill_all() -> None:
    for proc in list(_LIVE):
        _kill_tree(proc)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.remove(proc)


def _on_signal(signum, frame):
    _kill_all()
    sys.exit(128 + signum)


@dataclass(frozen=True)
class Step:
    step: int
    rank: int
    world: int
    pid: int
    t: float
    node: str


@dataclass(frozen=True)
class Trial:
    seconds: float  # notice -> the survivors' first step at world size 2
    lost: int  # committed steps the job did not resume from
    last_before: int  # the last step completed before the notice
    resumed_from: int  # the step the survivors resumed from
    victim_exit: int | None  # the noticed node's launcher exit code (None: killed at +5 s)
    survivor_restarts: int  # survivor worker processes started after the notice
    restarts_spent: int | None  # ours: restarts of the budget used (status())


class Cluster:
    """Launcher processes of one job, each in its own session, whose STEP lines share one list."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.lines: dict[str, list[str]] = {}
        self.steps: list[Step] = []
        self.cond = threading.Condition()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env, cwd=self.cwd)
        _LIVE.append(proc)
        self.procs[name] = proc
        self.lines[name] = []
        threading.Thread(target=self._read, args=(name, proc), daemon=True).start()
        return proc

    def _read(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            m = STEP.search(line)
            with self.cond:
                self.lines[name].append(line)
                if m:
                    step, rank, world, pid = (int(g) for g in m.groups()[:4])
                    self.steps.append(Step(step, rank, world, pid, float(m.group(5)), name))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred, timeout_s: float, what: str) -> Step:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for s in self.steps:
                    if pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n" + self.tail())
                self.cond.wait(min(left, 0.5))

    def tail(self, n: int = 12) -> str:
        out = []
        for name, lines in self.lines.items():
            rc = self.procs[name].poll()
            out.append(f"--- {name} (exit {rc}): " + "".join(x for x in lines[-n:] if not STEP.search(x))[-1500:])
        return "\n".join(out)

    def kill(self, name: str) -> None:
        _kill_tree(self.procs[name])

    def close(self) -> None:
        for name in self.procs:
            self.kill(name)
        for entry in os.listdir("/proc"):  # and any orphan still working in this trial's directory
            try:
                if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == os.path.realpath(self.cwd):
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if proc in _LIVE:
                _LIVE.remove(proc)


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s")


def run_trial(kind: str, warm_steps: int, step_s: float, timeout_s: float) -> Trial:
    """One 3-node job of ``kind`` (drain, drain_restart_path, torchrun_sigterm); see the module doc."""
    cwd = tempfile.mkdtemp(prefix=f"bench-control-{kind}-")
    port = free_port()
    run_id = f"bench-{kind}-{port}"
    endpoint = f"127.0.0.1:{port}"
    if kind == "torchrun_sigterm":
        argv = [TORCHRUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", "3",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                "--rdzv-conf", TORCHRUN_CONF, WORKER, "torchrun", "--step-s", str(step_s),
                "--ckpt-every", str(TORCHRUN_CKPT_EVERY)]
    else:
        mode = "inproc" if kind == "drain" else "plain"
        argv = [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", "0",
                "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", OUR_CONF,
                WORKER, mode, "--step-s", str(step_s), "--ckpt-every", "1"]
    job = Cluster(cwd)
    killer = None
    try:
        job.start("a0", argv)  # hosts the rendezvous (torch's TCPStore / our embedded store)
        _wait_port(port, timeout_s)
        job.start("a1", argv)
        job.start("a2", argv)
        first = job.wait(lambda s: s.world == 3, timeout_s, "the first step at world size 3")
        job.wait(lambda s: s.world == 3 and s.step >= first.step + warm_steps, timeout_s,
                 f"{warm_steps} steps at world size 3")
        with job.cond:
            victim_pid = next(s.pid for s in reversed(job.steps) if s.node == "a2")
            survivor_pids = {s.pid for s in job.steps if s.node != "a2" and s.world == 3}
        ctl = None
        if kind != "torchrun_sigterm":
            from elastic.control import JobController

            ctl = JobController.connect(endpoint, run_id=run_id)
            node = next(n for n in ctl.status().nodes if victim_pid in n.worker_pids)
            notice = time.time()
            ctl.drain(node.node_id, deadline_s=NOTICE_S, reason="preemption")
        else:
            notice = time.time()
            os.kill(job.procs["a2"].pid, signal.SIGTERM)  # the torchrun agent, as a kubelet would
        killer = threading.Timer(max(0.0, notice + NOTICE_S - time.time()), job.kill, args=("a2",))
        killer.daemon = True
        killer.start()
        job.wait(lambda s: s.world == 2 and s.t >= notice and s.node != "a2", timeout_s,
                         "the survivors' first step at world size 2")
        with job.cond:
            first_step = min(s.step for s in job.steps if s.world == 2 and s.t >= notice and s.node != "a2")
        for name in ("a0", "a1"):  # both survivors' lines in, to count their worker PIDs
            try:
                job.wait(lambda s, n=name: s.node == n and s.world == 2 and s.step >= first_step + 3, 30.0,
                         f"{name}'s steps at world size 2")
            except RuntimeError:
                pass
        with job.cond:
            firsts = [s for s in job.steps if s.world == 2 and s.t >= notice and s.node != "a2"]
            last_before = max(s.step for s in job.steps if s.t < notice)
            new_pids = {s.pid for s in job.steps if s.node != "a2" and s.t >= notice}
        first_step = min(s.step for s in firsts)
        resumed_from = first_step - 1
        restarts_spent = None
        if ctl is not None:
            try:
                restarts_spent = ctl.status().restarts
            finally:
                ctl.close()
        try:  # ours leaves by itself (exit 75); torchrun's agent exits on the SIGTERM or is killed at +5 s
            victim_exit = job.procs["a2"].wait(timeout=max(0.5, notice + NOTICE_S + 2 - time.time()))
        except subprocess.TimeoutExpired:
            victim_exit = None
        if victim_exit == -signal.SIGKILL:
            victim_exit = None
        return Trial(seconds=min(s.t for s in firsts) - notice,
                     lost=max(0, last_before - resumed_from), last_before=last_before, resumed_from=resumed_from,
                     victim_exit=victim_exit, survivor_restarts=len(new_pids - survivor_pids),
                     restarts_spent=restarts_spent)
    finally:
        if killer is not None:
            killer.cancel()
        job.close()
        shutil.rmtree(cwd, ignore_errors=True)


KINDS = {
    "drain": "elastic-run drain, @elastic.run",
    "drain_restart_path": "elastic-run drain, restart path",
    "torchrun_sigterm": "torchrun, SIGTERM to its agent",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one trial of each")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--step-s", type=float, default=0.03, help="the sleep in each step (default 0.03)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="hard limit on each wait of a trial")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    trials = 1 if args.quick else args.trials
    atexit.register(_kill_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    import torch

    rng = random.Random(args.seed)
    # the notice lands at a varying phase of torchrun's 50-step checkpoint cycle (the same
    # warm-up for every launcher within a trial)
    warmups = [60 + rng.randrange(TORCHRUN_CKPT_EVERY) for _ in range(trials)]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}; 3 nodes x 1 worker, gloo on 127.0.0.1, "
          f"step sleep {args.step_s * 1000:.0f} ms, a commit/checkpoint every step (torchrun: every "
          f"{TORCHRUN_CKPT_EVERY}); notice {NOTICE_S:.0f} s before the kill; {trials} trial(s), warm-up steps "
          f"{warmups}; load average {os.getloadavg()[0]:.1f}")
    print(f"elastic-run --rdzv-conf {OUR_CONF} --max-restarts 0; torchrun --rdzv-backend c10d --rdzv-conf "
          f"{TORCHRUN_CONF} --max-restarts 3", flush=True)
    results: dict[str, list[Trial]] = {k: [] for k in KINDS}
    failures: dict[str, list[str]] = {k: [] for k in KINDS}
    for i in range(trials):  # alternate, so every launcher sees the same machine
        for kind, label in KINDS.items():
            print(f"{label}: trial {i + 1}/{trials}", file=sys.stderr, flush=True)
            try:
                results[kind].append(run_trial(kind, warmups[i], args.step_s, args.timeout_s))
            except Exception as exc:  # noqa: BLE001 - a job that never stepped again is a result
                failures[kind].append(str(exc).splitlines()[0])
                print(f"{kind}: trial failed: {str(exc)[-2500:]}", file=sys.stderr, flush=True)

    def med(values):
        return round(statistics.median(values), 3) if values else None

    print(f"\n{'launcher, notice':<34}{'notice -> step s':>17}{'spread s':>12}{'steps lost':>11}{'failed':>8}"
          "  per trial: last step before the notice / resumed from; node exit; survivor worker restarts")
    for kind, label in KINDS.items():
        got = results[kind]
        if not got:
            print(f"{label:<34}{'n/a':>17}{'':>12}{'n/a':>11}{len(failures[kind]):>8}  ({failures[kind][-1]})")
            continue
        secs = [t.seconds for t in got]
        spread = f"{min(secs):.2f}-{max(secs):.2f}" if len(secs) > 1 else "-"
        lost = med([t.lost for t in got])
        detail = "; ".join(f"{t.last_before}/{t.resumed_from} exit "
                           f"{'killed' if t.victim_exit is None else t.victim_exit} restarts {t.survivor_restarts}"
                           for t in got)
        print(f"{label:<34}{med(secs):>17.3f}{spread:>12}{lost:>11g}{len(failures[kind]):>8}  {detail}")
    figures = {
        "drain_to_step_s": med([t.seconds for t in results["drain"]]),
        "drain_restart_path_to_step_s": med([t.seconds for t in results["drain_restart_path"]]),
        "torchrun_sigterm_to_step_s": med([t.seconds for t in results["torchrun_sigterm"]]),
        "steps_lost": med([t.lost for t in results["drain"]]),
        "restart_path_steps_lost": med([t.lost for t in results["drain_restart_path"]]),
        "torchrun_steps_lost": med([t.lost for t in results["torchrun_sigterm"]]),
    }
    ours, theirs = figures["drain_to_step_s"], figures["torchrun_sigterm_to_step_s"]
    figures["ratio"] = round(theirs / ours, 2) if ours and theirs else None
    figures["survivor_restarts"] = max((t.survivor_restarts for t in results["drain"]), default=None)
    figures["restarts_spent"] = max((t.restarts_spent or 0 for k in ("drain", "drain_restart_path")
                                     for t in results[k]), default=None)
    figures["failed_trials"] = {k: len(v) for k, v in failures.items() if v}
    for key in ("steps_lost", "restart_path_steps_lost", "torchrun_steps_lost"):
        if figures[key] is not None:
            figures[key] = int(figures[key]) if figures[key] == int(figures[key]) else figures[key]
    ratio = "n/a" if figures["ratio"] is None else f"{figures['ratio']}x"
    print(f"targets: drain_to_step_s <= 1 s (got {ours}), steps_lost = 0 (got {figures['steps_lost']}); "
          f"torchrun / drain = {ratio}; survivors under @elastic.run restarted "
          f"{figures['survivor_restarts']} worker(s); restarts of the budget spent {figures['restarts_spent']}")
    for kind, whys in failures.items():
        for why in whys:
            print(f"{KINDS[kind]}: a trial failed (not in the figures): {why}")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
