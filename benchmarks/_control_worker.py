"""benchmarks/control.py's worker: one gloo all-reduce and a short sleep per step.

    _control_worker.py inproc|plain|torchrun [--step-s S] [--ckpt-every K]

``inproc``: ``@elastic.run`` with a ``state.commit()`` every step (the drain notice arrives at a
commit; the drained node saves there, the survivors re-form in place). ``plain``: the restart
path under elastic-run: rank 0 keeps a checkpoint of the step every ``--ckpt-every`` steps, a
restarted worker resumes from it; after a SIGTERM (the agent's, once it has published the
drain) or once ``elastic.drain_requested()``, it finishes the step, saves and leaves.
``torchrun``: the same loop as users run it under torchrun: a checkpoint every ``--ckpt-every``
steps (50), no SIGTERM handling, a restart resumes from the last checkpoint.

Prints ``STEP step=N rank=R world=W pid=P t=UNIX`` after each completed step (``step`` counts
the steps complete with it; ``world`` is the all-reduced sum of ones) and
``SAVED step=N rank=R reason=WHY`` when it saves on a notice.
"""
import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("mode", choices=("inproc", "plain", "torchrun"))
p.add_argument("--step-s", type=float, default=0.03)
p.add_argument("--ckpt-every", type=int, default=1)
args = p.parse_args()
CKPT = os.path.abspath("latest.json")  # the job's cwd: storage every node shares


def step_once(step: int) -> int:
    """One step (the all-reduce, then the sleep standing for compute); printed once complete."""
    x = torch.ones(1)
    if dist.is_initialized():
        dist.all_reduce(x)
    time.sleep(args.step_s)
    print(f"STEP step={step + 1} rank={os.environ.get('RANK')} world={int(x.item())} pid={os.getpid()} "
          f"t={time.time():.6f}", flush=True)
    return step + 1


def save(step: int, reason: str) -> None:
    with open(CKPT + f".{os.getpid()}.tmp", "w") as f:
        json.dump({"step": step, "reason": reason}, f)
    os.replace(CKPT + f".{os.getpid()}.tmp", CKPT)
    if reason != "periodic":
        print(f"SAVED step={step} rank={os.environ.get('RANK')} reason={reason}", flush=True)


if args.mode == "inproc":
    import elastic

    state = elastic.TorchState(model=torch.nn.Linear(1, 1), step=0)
    state.register_drain_callbacks([lambda: save(state.step, "drain")])

    @elastic.run(timeout_s=60)
    def train(state):
        while True:
            state.step = step_once(state.step)
            state.commit()

    train(state)
    sys.exit(0)

start = 0
if os.path.exists(CKPT):  # a restarted worker resumes from the last checkpoint
    with open(CKPT) as f:
        start = json.load(f)["step"]
dist.init_process_group("gloo")
rank = dist.get_rank()
step = start
notice = []
if args.mode == "plain":
    import elastic

    # a SIGTERM (the agent's, after it has published the drain) ends the job's current step
    # first: the loop saves the step it completes and leaves
    signal.signal(signal.SIGTERM, lambda signum, frame: notice.append(signum))
while True:
    step = step_once(step)
    if rank == 0 and step % args.ckpt_every == 0:
        save(step, "periodic")
    if args.mode == "plain" and (notice or elastic.drain_requested()):
        if rank == 0:
            save(step, "sigterm" if notice else "poll")
        sys.exit(0)
