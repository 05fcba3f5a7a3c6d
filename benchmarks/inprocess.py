"""Pause seen by the survivors when a peer dies, and when a node joins: in-process recovery
(@elastic.run) vs the restart path (elastic-run) vs torchrun --max-restarts; and the same
in-process recovery for Horovod with PyTorch (``elastic-run --framework horovod``).

    python benchmarks/inprocess.py [--quick] [--trials N]

2 DDP workers on one node; once stepping, rank 1 is SIGKILLed; the figure is the time from the
kill to the next completed step (measured as in benchmarks/recovery.py). Scale-up: 2 agents of
one worker each, a third joins; the figure is the survivors' longest step around the join.
The last line is one JSON object: ``inprocess_pause_s``, ``restart_pause_s``,
``torchrun_pause_s``, ``scaleup_pause_s``, and ``horovod_inprocess_pause_s`` (null where
Horovod is not installed).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recovery import BIN, SCRIPT as RESTART_SCRIPT, free_port, measure  # noqa: E402

INPROC_SCRIPT = os.path.join(HERE, "_inproc_steps.py")
ELASTIC_RUN = os.path.join(BIN, "elastic-run")


def scaleup_pause(timeout_s: float = 120.0) -> float:
    endpoint = f"127.0.0.1:{free_port()}"
    argv = [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "bench-grow", "--rdzv-conf", "last_call_timeout=0.5,lease_ttl=5", "--framework", "torch",
            INPROC_SCRIPT]
    agents = []
    stamps = []  # (time, world) of rank 0's steps
    grown = threading.Event()

    def start(read: bool) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        agents.append(proc)
        if read:
            def pump():
                for line in proc.stdout:
                    parts = line.split("]:", 1)[-1].split()
                    if parts[:1] == ["STEP"]:
                        stamps.append((float(parts[2]), parts[4]))
                        if parts[4] == "3" and len([s for s in stamps if s[1] == "3"]) >= 20:
                            grown.set()
            threading.Thread(target=pump, daemon=True).start()
        else:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        return proc

    try:
        start(read=True)
        time.sleep(0.5)  # let the first agent host the server (the benchmark, not a test)
        start(read=False)
        deadline = time.monotonic() + timeout_s
        while len(stamps) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        joined_at = time.time()
        start(read=False)
        if not grown.wait(max(1.0, deadline - time.monotonic())):
            raise RuntimeError("the third node never joined")
    finally:
        for proc in agents:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    window = [t for t, _ in stamps if t >= joined_at]
    before = [t for t, _ in stamps if t < joined_at]
    times = before[-1:] + window
    return max(b - a for a, b in zip(times, times[1:]))


def _has_horovod() -> bool:
    import importlib.util

    return importlib.util.find_spec("horovod") is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one trial each")
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args()
    trials = 1 if args.quick else args.trials
    runs = {
        "in-process": lambda: measure([ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "3",
                                       "--framework", "torch", INPROC_SCRIPT]),
        "restart": lambda: measure([ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "3", RESTART_SCRIPT]),
        "torchrun": lambda: measure([os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--max-restarts", "3",
                                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                                     RESTART_SCRIPT]),
        "scale-up": scaleup_pause,
    }
    if _has_horovod():
        runs["hvd in-proc"] = lambda: measure([ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "3",
                                               "--framework", "horovod", INPROC_SCRIPT, "--horovod"])
    results = {name: [] for name in runs}
    for _ in range(trials):
        for name, run in runs.items():
            try:
                results[name].append(run())
            except RuntimeError as exc:
                print(f"{name}: trial failed: {str(exc).splitlines()[0]}", file=sys.stderr)
    med = {k: (round(statistics.median(v), 4) if v else None) for k, v in results.items()}
    med.setdefault("hvd in-proc", None)
    print(f"{'path':<12} {'pause s (median)':>17}  trials")
    for name, values in results.items():
        shown = "-" if med[name] is None else f"{med[name]:.3f}"
        print(f"{name:<12} {shown:>17}  {', '.join(f'{v:.3f}' for v in values)}")
    ratio = (med["torchrun"] / med["in-process"]) if med["torchrun"] and med["in-process"] else None
    print(f"target: in-process <= 0.5 s and >= 5x better than torchrun (got {ratio and round(ratio, 1)}x)")
    print(json.dumps({"inprocess_pause_s": med["in-process"], "restart_pause_s": med["restart"],
                      "torchrun_pause_s": med["torchrun"], "scaleup_pause_s": med["scale-up"],
                      "horovod_inprocess_pause_s": med["hvd in-proc"]}))


if __name__ == "__main__":
    main()
