"""Recovery after one worker's SIGKILL in a 2-worker DDP job, and start-up: elastic-run vs torchrun.

    python benchmarks/recovery.py [--quick] [--trials N]

Both launchers run the same unmodified DDP script (benchmarks/_ddp_steps.py) with a restart
budget. Late failure: after 300 steps (a few seconds), rank 1 is SIGKILLed; early failure: at
step 3, in the job's first seconds (when a bad node or a bad setting fails most jobs); the
figure is the time from the kill to the first step completed by the restarted job. Start-up:
the time from launching to the first completed step with ``--nproc-per-node`` 1, 2 and 4.
torchrun uses its c10d rendezvous on 127.0.0.1. The last line is one JSON object:
``elastic_run_recovery_s``, ``torchrun_recovery_s``, ``ratio`` (torchrun / elastic-run),
``elastic_run_early_recovery_s``, ``torchrun_early_recovery_s``, ``early_ratio``,
``elastic_run_startup_s_N`` and ``torchrun_startup_s_N`` (medians of the trials).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from elastic.net import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_ddp_steps.py")
BIN = os.path.dirname(sys.executable)
KILL_AT_STEP = 300




def measure(argv, kill_at_step: int = KILL_AT_STEP, timeout_s: float = 120.0) -> float:
    """Start the launcher, kill rank 1 at ``kill_at_step``, return kill -> next step seconds;
    with ``kill_at_step`` None, return launch -> first step seconds."""
    started = time.time()
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
                if kill_at_step is None:
                    if result[0] is None:
                        result[0] = at - started
                        done.set()
                elif killed_at[0] is None and step >= kill_at_step and ("0", "1") in pids:
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
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (torchrun: c10d on 127.0.0.1); "
          f"{trials} trial(s); load average {os.getloadavg()[0]:.1f}")

    def launchers(nproc: int):
        ours = [os.path.join(BIN, "elastic-run"), "--nproc-per-node", str(nproc), "--max-restarts", "3", SCRIPT]
        theirs = [os.path.join(BIN, "torchrun"), "--nproc-per-node", str(nproc), "--max-restarts", "3",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", SCRIPT]
        return (("elastic_run", ours), ("torchrun", theirs))

    cases = [("recovery", "late failure (step 300)", 2, KILL_AT_STEP),
             ("early_recovery", "early failure (step 3)", 2, 3)]
    cases += [(f"startup_s_{n}", f"launch -> first step, {n} worker(s)", n, None) for n in (1, 2, 4)]
    figures = {}
    print(f"{'case':<36}{'launcher':<13}{'median s':>10}  {'failed':>6}  trials")
    for key, label, nproc, kill_at in cases:
        times = {"elastic_run": [], "torchrun": []}
        failed = {"elastic_run": 0, "torchrun": 0}
        for _ in range(trials):  # alternate, so both see the same machine
            for name, argv in launchers(nproc):
                try:
                    times[name].append(measure(argv, kill_at))
                except RuntimeError as exc:  # a restart that never stepped again: counted, not timed
                    failed[name] += 1
                    print(f"{name} {label}: trial failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        for name, values in times.items():
            med = statistics.median(values) if values else None
            fig = key if key.startswith("startup") else f"{key}_s"
            figures[f"{name}_{fig}"] = None if med is None else round(med, 4)
            shown = "-" if med is None else f"{med:.3f}"
            print(f"{label:<36}{name:<13}{shown:>10}  {failed[name]:>6}  {', '.join(f'{v:.3f}' for v in values)}")
    for key, out in (("recovery_s", "ratio"), ("early_recovery_s", "early_ratio")):
        er, tr = figures[f"elastic_run_{key}"], figures[f"torchrun_{key}"]
        figures[out] = round(tr / er, 2) if er and tr else None
    print(f"target: elastic-run <= 0.5 s; ratio torchrun/elastic-run = {figures['ratio']} late, "
          f"{figures['early_ratio']} early")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
