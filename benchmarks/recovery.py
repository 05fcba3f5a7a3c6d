"""Recovery after one worker's SIGKILL in a 2-worker DDP job: elastic-run vs torchrun.

    python benchmarks/recovery.py [--quick] [--trials N]

Both launchers run the same unmodified DDP script (benchmarks/_ddp_steps.py) with a restart
budget; after 300 steps (a few seconds), rank 1 is SIGKILLed and the figure is the time from the kill
to the first step completed by the restarted job. torchrun uses its c10d rendezvous on
127.0.0.1. The last line is one JSON object: ``elastic_run_recovery_s``,
``torchrun_recovery_s``, ``ratio`` (torchrun / elastic-run).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_ddp_steps.py")
BIN = os.path.dirname(sys.executable)
KILL_AT_STEP = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(argv, timeout_s: float = 120.0) -> float:
    """Start the launcher, kill rank 1 once stepping, return kill -> next step seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    pids = {}
    killed_at = [None]
    result = [None]
    done = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            # elastic-run prefixes worker lines with "[rank]:"; torchrun does not.
            parts = line.split("]:", 1)[-1].split() if line.startswith("[") else line.split()
            i = 0 if parts[:1] in (["PID"], ["STEP"]) else None
            if i is None:
                continue
            if parts[i] == "PID":
                pids[(parts[i + 3], parts[i + 1])] = int(parts[i + 2])
            elif parts[i] == "STEP":
                step, at, restart = int(parts[i + 1]), float(parts[i + 2]), parts[i + 3]
                # Kill once the job has run a few seconds (~300 steps): long enough for the
                # agent's warm standbys to have finished importing, as in any real job.
                if killed_at[0] is None and step >= KILL_AT_STEP and ("0", "1") in pids:
                    killed_at[0] = time.time()
                    os.kill(pids[("0", "1")], signal.SIGKILL)
                elif killed_at[0] is not None and restart != "0" and result[0] is None:
                    result[0] = at - killed_at[0]
                    done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if result[0] is None:
        raise RuntimeError("no step after the kill; output:\n" + "".join(lines[-40:]))
    return result[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one trial each")
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    trials = 1 if args.quick else args.trials
    ours = [os.path.join(BIN, "elastic-run"), "--nproc-per-node", "2", "--max-restarts", "3", SCRIPT]
    results = {"elastic-run": [], "torchrun": []}
    failures = {"elastic-run": 0, "torchrun": 0}
    for _ in range(trials):  # alternate, so both see the same machine
        theirs = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--max-restarts", "3",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", SCRIPT]
        for name, argv in (("elastic-run", ours), ("torchrun", theirs)):
            try:
                results[name].append(measure(argv))
            except RuntimeError as exc:  # a restart that never stepped again: counted, not timed
                failures[name] += 1
                print(f"{name}: trial failed: {str(exc).splitlines()[0]}", file=sys.stderr)
    med = {k: statistics.median(v) if v else None for k, v in results.items()}
    print(f"{'launcher':<12} {'recovery s (median)':>20}  {'failed':>6}  trials")
    for name, values in results.items():
        shown = "-" if med[name] is None else f"{med[name]:.3f}"
        print(f"{name:<12} {shown:>20}  {failures[name]:>6}  {', '.join(f'{v:.3f}' for v in values)}")
    er, tr = med["elastic-run"], med["torchrun"]
    ratio = round(tr / er, 2) if er and tr else None
    print(f"target: elastic-run <= 0.5 s; ratio torchrun/elastic-run = {ratio}")
    print(json.dumps({"elastic_run_recovery_s": None if er is None else round(er, 4),
                      "torchrun_recovery_s": None if tr is None else round(tr, 4), "ratio": ratio}))


if __name__ == "__main__":
    main()
