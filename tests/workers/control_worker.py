"""A plain worker for the control port tests: reports a committed step and a checkpoint step
to its agent (``--step``/``--checkpoint-step``), prints ``REPORTED pid=``, then waits.

It exits 0 when the file ``finish`` appears in ``--dir`` (or on SIGTERM, printing
``WORKER_TERM pid=``: what a drain sends a plain script), and 3 when the file ``fail`` appears.
"""
import argparse
import os
import signal
import sys
import time

from elastic._worker import WorkerLink

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--step", type=int, default=25)
p.add_argument("--checkpoint-step", type=int, default=20)
args = p.parse_args()


def on_term(signum, frame):
    print(f"WORKER_TERM pid={os.getpid()}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
link = WorkerLink.from_env()
if link is None:
    sys.exit("control_worker.py: not under elastic-run (no ELASTIC_RDZV_* in the environment)")
link.report_progress(step=args.step, checkpoint_step=args.checkpoint_step)
print(f"REPORTED pid={os.getpid()} rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']}", flush=True)
while True:
    if os.path.exists(os.path.join(args.dir, "fail")):
        print(f"WORKER_FAIL pid={os.getpid()}", flush=True)
        sys.exit(3)
    if os.path.exists(os.path.join(args.dir, "finish")):
        sys.exit(0)
    time.sleep(0.05)
