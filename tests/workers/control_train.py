"""A job for the control-plane tests: @elastic.run over gloo (or a plain restart-path loop with
--plain), one all-reduce per step, a commit per step, a drain callback that saves the step.

Prints ``STEP step= rank= world= pid=`` per step and ``SAVED step= rank= reason=`` when it saves
on a drain or a stop; runs until --steps or until the file ``finish`` appears in its cwd.
"""
import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import elastic

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100000)
p.add_argument("--step-s", type=float, default=0.05)
p.add_argument("--plain", action="store_true", help="no @elastic.run: SIGTERM saves, a restart resumes")
p.add_argument("--ckpt", default="ckpt", help="directory of per-rank saves")
args = p.parse_args()
os.makedirs(args.ckpt, exist_ok=True)


def save(step: int, reason: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(args.ckpt, f"node-{os.environ.get('ELASTIC_NODE_ID', 'x')}-rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "reason": reason, "pid": os.getpid()}, f)
    os.replace(path + ".tmp", path)
    print(f"SAVED step={step} rank={rank} reason={reason}", flush=True)


def step_once(step: int) -> int:
    """One step; prints how many steps are complete with it."""
    x = torch.ones(1)
    if dist.is_initialized():
        dist.all_reduce(x)
    print(f"STEP step={step + 1} rank={os.environ.get('RANK')} world={int(x.item())} pid={os.getpid()}", flush=True)
    time.sleep(args.step_s)
    return step + 1


if args.plain:
    start = 0
    resume = os.path.join(args.ckpt, "latest.json")
    if os.path.exists(resume):
        start = json.load(open(resume))["step"]
    dist.init_process_group("gloo")
    state = {"step": start}

    def on_term(signum, frame):
        save(state["step"], "sigterm")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    while state["step"] < args.steps and not os.path.exists("finish"):
        state["step"] = step_once(state["step"])
        if int(os.environ["RANK"]) == 0:
            with open(resume + ".tmp", "w") as f:
                json.dump({"step": state["step"]}, f)
            os.replace(resume + ".tmp", resume)
        if elastic.drain_requested():
            save(state["step"], "poll")
            sys.exit(0)
    sys.exit(0)

state = elastic.TorchState(model=torch.nn.Linear(1, 1), step=0)
state.register_drain_callbacks([lambda: save(state.step, "drain")])


# A round that breaks while it forms (a node drained right after it joined) is waited out for
# up to timeout_s before the survivors take the next one: keep it short for the tests.
@elastic.run(timeout_s=20)
def train(state):
    while state.step < args.steps and not os.path.exists("finish"):
        state.step = step_once(state.step)
        state.commit()


train(state)
print(f"DONE rank={os.environ.get('RANK')} step={state.step} pid={os.getpid()}", flush=True)
