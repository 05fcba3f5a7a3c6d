"""Time from a membership change to the next completed step, per framework, under elastic-run;
and Horovod under its own elastic launcher, ``horovodrun --host-discovery-script``.

    python benchmarks/frameworks.py [--quick] [--trials N] [--only horovod_elastic,horovodrun]

Each trial runs a 2-node job (two agents on 127.0.0.1, one worker each, the loop of
benchmarks/_fw_steps.py on scikit-learn's digits, a checkpoint or commit every 20 steps), lets
it train at world size 2 until the warm standbys are ready, then SIGKILLs the second node's
agent (its worker dies with it). The figure is the time from that kill to the first step the
job completes at world size 1, with the committed steps it did not resume from (lost) and the
steps since the last commit it trained again (redone). Under elastic-run the survivor is
restarted with the new round's environment and resumes from the checkpoint (PyTorch DDP,
Horovod, TensorFlow MultiWorkerMirroredStrategy with ``ElasticCheckpoint``); the
``horovod_elastic`` row runs the Horovod loop written for ``horovodrun``'s elastic mode
(``@hvd.elastic.run``, ``state.commit()``), unmodified, and its survivor resets in place.
horovodrun's elastic mode runs that same script on two "hosts" from a discovery script
(127.0.0.1 and localhost); the kill is of the localhost worker, and the discovery script stops
listing it at the same moment (horovodrun is told of the change; elastic-run learns it from the
dead node's lease, 2 s here).

The last line is one JSON object: ``torch_s``, ``horovod_s``, ``horovod_elastic_s``,
``tensorflow_s`` and ``horovodrun_s`` (median of the trials; null, with the reason printed,
when a launcher cannot recover here), and ``NAME_steps_lost`` (the most over the trials).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from elastic.net import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "_fw_steps.py")
BIN = os.path.dirname(sys.executable)
SAVE_EVERY = 20  # _fw_steps.py's checkpoint / commit interval


@dataclass(frozen=True)
class Trial:
    seconds: float  # from the kill to the first step the job completes at world size 1
    lost: int  # committed steps the job did not resume from
    redone: int  # steps since the last commit, trained again


_PREFIX = re.compile(r"^\[[^\]]*\](?:<\w+>)?:")




class Job:
    """A launcher process whose STEP / PID lines are parsed as they come.

    ``joins``: another node's Job of the same job, whose lines this one shares (rank 0, which
    prints the steps, may be on either node: a slow rejoin can reorder the nodes).
    """

    def __init__(self, argv: List[str], env: Optional[dict] = None, joins: Optional["Job"] = None) -> None:
        full = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=full, cwd=REPO)
        if joins is not None:
            self.lines, self.steps, self.pids, self.cond = joins.lines, joins.steps, joins.pids, joins.cond
        else:
            self.lines: List[str] = []
            self.steps: List[tuple] = []  # (step, unix time, world)
            self.pids: dict = {}  # host or rank -> pid
            self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            body = _PREFIX.sub("", line)  # elastic-run's "[rank]:", horovodrun's "[rank]<stdout>:"
            parts = body.split()
            with self.cond:
                self.lines.append(line)
                if parts[:1] == ["STEP"] and len(parts) == 4:
                    self.steps.append((int(parts[1]), float(parts[2]), int(parts[3])))
                elif parts[:1] == ["PID"] and len(parts) >= 3:
                    self.pids[parts[3] if len(parts) > 3 else parts[1]] = int(parts[2])
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_step(self, pred, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for s in self.steps:
                    if pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError("no such step; last output:\n" + "".join(self.lines[-30:]))
                self.cond.wait(min(left, 1.0))

    def trial(self, killed_at: float) -> "Trial":
        """The time from the kill to the first step at world size 1, and the steps lost."""
        after = self.wait_step(lambda s: s[2] == 1 and s[1] > killed_at, timeout_s=180)
        with self.cond:
            last = max((s[0] for s in self.steps if s[1] <= killed_at), default=0)
        committed = last - last % SAVE_EVERY  # checkpoint / commit every SAVE_EVERY steps
        return Trial(after[1] - killed_at, lost=max(0, committed - (after[0] - 1)),
                     redone=max(0, last - (after[0] - 1)))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def elastic_run_trial(framework: str, warm_s: float, kind: Optional[str] = None, notice: bool = False) -> Trial:
    tmp = tempfile.mkdtemp(prefix=f"bench-fw-{framework}-")
    port = free_port()
    argv = [os.path.join(BIN, "elastic-run"), "--nnodes", "1:2", "--nproc-per-node", "1",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"bench-{framework}-{port}",
            "--rdzv-conf", "last_call_timeout=0.5,lease_ttl=2", "--max-restarts", "10",
            "--framework", framework, SCRIPT, kind or framework, os.path.join(tmp, "ckpt")]
    a0 = Job(argv)
    a1 = None
    try:
        a0.wait_step(lambda s: s[2] == 1, timeout_s=180)
        a1 = Job(argv, joins=a0)
        t2 = a0.wait_step(lambda s: s[2] == 2, timeout_s=180)[1]
        a0.wait_step(lambda s: s[2] == 2 and s[1] - t2 >= warm_s, timeout_s=180)  # standbys warm again
        killed_at = time.time()
        # the node's agent: SIGKILL (its worker dies with it), or SIGTERM, a scheduler's notice
        # (it stops its worker and leaves the round at once)
        os.kill(a1.proc.pid, signal.SIGTERM if notice else signal.SIGKILL)
        return a0.trial(killed_at)
    finally:
        for job in (a1, a0):
            if job is not None:
                job.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def horovodrun_trial(warm_s: float, notice: bool = False) -> Trial:
    tmp = tempfile.mkdtemp(prefix="bench-fw-horovodrun-")
    hosts = os.path.join(tmp, "hosts")
    with open(hosts, "w") as f:
        f.write("127.0.0.1:1\nlocalhost:1\n")
    discover = os.path.join(tmp, "discover.sh")
    with open(discover, "w") as f:
        f.write(f"#!/bin/sh\ncat {hosts}\n")
    os.chmod(discover, 0o755)
    argv = [os.path.join(BIN, "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
            "--host-discovery-script", discover, "--gloo", "--network-interface", "lo",
            sys.executable, SCRIPT, "horovod-elastic", os.path.join(tmp, "ckpt")]
    job = Job(argv, env={"PATH": BIN + os.pathsep + os.environ["PATH"]})
    try:
        t2 = job.wait_step(lambda s: s[2] == 2, timeout_s=180)[1]
        job.wait_step(lambda s: s[2] == 2 and s[1] - t2 >= warm_s, timeout_s=180)
        with job.cond:
            pid = job.pids.get("localhost")
        if pid is None:
            raise RuntimeError("no worker on host 'localhost'; output:\n" + "".join(job.lines[-30:]))
        with open(hosts + ".tmp", "w") as f:
            f.write("127.0.0.1:1\n")
        os.replace(hosts + ".tmp", hosts)  # the node is gone from discovery ...
        killed_at = time.time()
        if not notice:  # ... and its worker dies (with notice, horovodrun stops it itself)
            os.kill(pid, signal.SIGKILL)
        return job.trial(killed_at)
    finally:
        job.kill()
        shutil.rmtree(tmp, ignore_errors=True)


RUNS = {
    "torch": ("elastic-run, PyTorch DDP", lambda w: elastic_run_trial("torch", w)),
    "horovod": ("elastic-run, Horovod (torch)", lambda w: elastic_run_trial("horovod", w)),
    "horovod_elastic": ("elastic-run, @hvd.elastic.run", lambda w: elastic_run_trial("horovod", w, "horovod-elastic")),
    "tensorflow": ("elastic-run, TensorFlow MWMS", lambda w: elastic_run_trial("tensorflow", w)),
    "horovodrun": ("horovodrun elastic, Horovod", horovodrun_trial),
    # told of the change: the node's agent gets SIGTERM / the host leaves discovery, no kill
    "horovod_elastic_notice": ("elastic-run, @hvd.elastic.run, notice",
                               lambda w: elastic_run_trial("horovod", w, "horovod-elastic", notice=True)),
    "horovodrun_notice": ("horovodrun elastic, notice", lambda w: horovodrun_trial(w, notice=True)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one trial each, shorter warm-up")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(RUNS)}")
    args = p.parse_args()
    trials = args.trials or (1 if args.quick else 3)
    warm_s = 8.0 if args.quick else 12.0
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        p.error(f"--only: unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    results = {}
    rows = []
    for name in names:
        label, run = RUNS[name]
        got, reason = [], None
        for i in range(trials):
            print(f"{label}: trial {i + 1}/{trials}", file=sys.stderr, flush=True)
            try:
                got.append(run(warm_s))
            except Exception as exc:  # noqa: BLE001 - a launcher that cannot recover here is a result
                reason = str(exc).splitlines()[0]
                print(f"{name}: trial failed: {str(exc)[-1500:]}", file=sys.stderr, flush=True)
        times = [t.seconds for t in got]
        results[f"{name}_s"] = round(statistics.median(times), 3) if times else None
        results[f"{name}_steps_lost"] = max((t.lost for t in got), default=None)
        rows.append((name, label, got, reason))
    print(f"{'launcher / framework':<34}{'change -> next step (s)':>26}{'steps lost / redone':>22}  trials")
    for _name, label, got, reason in rows:
        times = [t.seconds for t in got]
        med = f"{statistics.median(times):.2f}" if times else "n/a"
        lost = f"{max(t.lost for t in got)} / {max(t.redone for t in got)}" if got else "n/a"
        detail = ", ".join(f"{t:.2f}" for t in times) + (f"  ({len(times)} ok; {reason})" if reason else "")
        print(f"{label:<34}{med:>26}{lost:>22}  {detail}")
    for ours, theirs in (("horovod", "horovodrun"), ("horovod_elastic", "horovodrun"),
                         ("horovod_elastic_notice", "horovodrun_notice")):
        if results.get(f"{ours}_s") and results.get(f"{theirs}_s"):
            print(f"{RUNS[theirs][0]} / {RUNS[ours][0]}: {results[f'{theirs}_s'] / results[f'{ours}_s']:.2f}x")
    if "horovodrun" in names and results.get("horovodrun_s") is None:
        print(f"horovodrun_s: null: {rows[names.index('horovodrun')][3]}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
