"""Time from a membership change to the next completed step, per framework, under elastic-run;
and Horovod under its own elastic launcher, ``horovodrun --host-discovery-script``.

    python benchmarks/frameworks.py [--quick] [--trials N]

Each trial runs a 2-node job (two agents on 127.0.0.1, one worker each, the loop of
benchmarks/_fw_steps.py on scikit-learn's digits, a checkpoint every 20 steps), lets it train
at world size 2 until the warm standbys are ready, then SIGKILLs the second node's agent (its
worker dies with it). The figure is the time from that kill to the first step the job completes
at world size 1. Under elastic-run the survivor is restarted with the new round's environment
and resumes from the checkpoint (PyTorch DDP, Horovod, TensorFlow MultiWorkerMirroredStrategy
with ``ElasticCheckpoint``). horovodrun's elastic mode runs the same Horovod loop written for it
(``@hvd.elastic.run``, in-process reset to the last ``commit()``) on two "hosts" from a
discovery script (127.0.0.1 and localhost); the kill is of the localhost worker, and the
discovery script stops listing it at the same moment.

The last line is one JSON object: ``torch_s``, ``horovod_s``, ``tensorflow_s`` (elastic-run,
median of the trials) and ``horovodrun_s`` (null, with the reason printed, when it cannot run).
"""
from __future__ import annotations

import argparse
import json
import os
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
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "_fw_steps.py")
BIN = os.path.dirname(sys.executable)
_PREFIX = re.compile(r"^\[[^\]]*\](?:<\w+>)?:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """A launcher process whose STEP / PID lines are parsed as they come."""

    def __init__(self, argv: List[str], env: Optional[dict] = None) -> None:
        full = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env=full, cwd=REPO)
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

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def elastic_run_trial(framework: str, warm_s: float) -> float:
    tmp = tempfile.mkdtemp(prefix=f"bench-fw-{framework}-")
    port = free_port()
    argv = [os.path.join(BIN, "elastic-run"), "--nnodes", "1:2", "--nproc-per-node", "1",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"bench-{framework}-{port}",
            "--rdzv-conf", "last_call_timeout=0.5,lease_ttl=2", "--max-restarts", "10",
            "--framework", framework, SCRIPT, framework, os.path.join(tmp, "ckpt")]
    a0 = Job(argv)
    a1 = None
    try:
        a0.wait_step(lambda s: s[2] == 1, timeout_s=180)
        a1 = Job(argv)
        t2 = a0.wait_step(lambda s: s[2] == 2, timeout_s=180)[1]
        a0.wait_step(lambda s: s[2] == 2 and s[1] - t2 >= warm_s, timeout_s=180)  # standbys warm again
        killed_at = time.time()
        os.kill(a1.proc.pid, signal.SIGKILL)  # the node's agent; its worker dies with it
        return a0.wait_step(lambda s: s[2] == 1 and s[1] > killed_at, timeout_s=180)[1] - killed_at
    finally:
        for job in (a1, a0):
            if job is not None:
                job.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def horovodrun_trial(warm_s: float) -> float:
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
        os.kill(pid, signal.SIGKILL)  # ... and its worker dies
        return job.wait_step(lambda s: s[2] == 1 and s[1] > killed_at, timeout_s=180)[1] - killed_at
    finally:
        job.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one trial each, shorter warm-up")
    p.add_argument("--trials", type=int, default=None)
    args = p.parse_args()
    trials = args.trials or (1 if args.quick else 3)
    warm_s = 8.0 if args.quick else 12.0
    results = {}
    rows = []
    for name, run in [("torch", lambda: elastic_run_trial("torch", warm_s)),
                      ("horovod", lambda: elastic_run_trial("horovod", warm_s)),
                      ("tensorflow", lambda: elastic_run_trial("tensorflow", warm_s)),
                      ("horovodrun", lambda: horovodrun_trial(warm_s))]:
        times, reason = [], None
        for _ in range(trials):
            try:
                times.append(run())
            except Exception as exc:  # noqa: BLE001 - a launcher that cannot recover here is a result
                reason = str(exc).splitlines()[0]
                print(f"{name}: trial failed: {str(exc)[-1500:]}", file=sys.stderr, flush=True)
        results[f"{name}_s"] = round(statistics.median(times), 3) if times else None
        rows.append((name, times, reason))
    print(f"{'launcher / framework':<34}{'change -> next step (s)':>26}  trials")
    labels = {"torch": "elastic-run, PyTorch DDP", "horovod": "elastic-run, Horovod (torch)",
              "tensorflow": "elastic-run, TensorFlow MWMS", "horovodrun": "horovodrun elastic, Horovod"}
    for name, times, reason in rows:
        med = f"{statistics.median(times):.2f}" if times else "n/a"
        detail = ", ".join(f"{t:.2f}" for t in times) + (f"  ({len(times)} ok; {reason})" if reason else "")
        print(f"{labels[name]:<34}{med:>26}  {detail}")
    if results.get("horovod_s") and results.get("horovodrun_s"):
        print(f"horovodrun / elastic-run (Horovod): {results['horovodrun_s'] / results['horovod_s']:.2f}x")
    if results.get("horovodrun_s") is None:
        print(f"horovodrun_s: null: {rows[-1][2]}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
