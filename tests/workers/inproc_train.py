"""A deterministic @elastic.run DDP job for the in-process recovery tests.

Each step trains on a fixed global batch of 12 samples split evenly over the ranks; DDP averages
the gradients, so the parameters follow the same path at any world size of 1, 2, 3, 4 or 6 and
a recovered run must end exactly where a fault-free one does.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import elastic

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--step-delay", type=float, default=0.0)
p.add_argument("--out", default="")
p.add_argument("--hold-at-step", type=int, default=-1,
               help="wait there until --hold-until-world workers (before any re-formation)")
p.add_argument("--hold-until-world", type=int, default=0)
p.add_argument("--timeout-s", type=float, default=60.0, help="@elastic.run's timeout_s")
p.add_argument("--stall-before-init", type=float, default=0.0,
               help="reach the first process-group init this much later (registered with the agent, "
                    "so it is not restarted): the round it was started for breaks meanwhile")
args = p.parse_args()

GLOBAL_BATCH = 12
torch.manual_seed(0)
X = torch.randn(args.steps * GLOBAL_BATCH, 8)
Y = (X @ torch.randn(8, 1) + 0.1 * torch.randn(args.steps * GLOBAL_BATCH, 1))
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
state = elastic.TorchState(model=model, optimizer=opt, step=0)
resets = []
state.register_reset_callbacks([lambda: resets.append(int(os.environ.get("WORLD_SIZE", "1")))])


@elastic.run(timeout_s=args.timeout_s)
def train(state):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    net = DDP(state.model) if world > 1 else state.model
    per_rank = GLOBAL_BATCH // world
    while state.step < args.steps:
        lo = state.step * GLOBAL_BATCH + rank * per_rank
        xb, yb = X[lo:lo + per_rank], Y[lo:lo + per_rank]
        state.optimizer.zero_grad()
        nn.functional.mse_loss(net(xb), yb).backward()
        state.optimizer.step()
        state.step += 1
        print(f"STEP step={state.step} rank={rank} world={world} pid={os.getpid()} "
              f"gen={os.environ.get('ELASTIC_GENERATION', '0')}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
        state.commit()
        while state.step == args.hold_at_step and world < args.hold_until_world and not resets:
            time.sleep(0.05)  # a test's gate: hold until the job has grown (news raises here)
            state.check_membership()


if args.stall_before_init:  # a slow worker (still loading, say), as a fault injector
    from elastic import recovery

    real_init, stalled = recovery._TorchGroup.init, []

    def late_init(self, *a, **kw):
        if not stalled:
            stalled.append(1)
            print(f"STALL pid={os.getpid()} gen={os.environ.get('ELASTIC_GENERATION')}", flush=True)
            time.sleep(args.stall_before_init)
        return real_init(self, *a, **kw)

    recovery._TorchGroup.init = late_init
train(state)
rank = int(os.environ.get("RANK", "0"))
print(f"DONE rank={rank} pid={os.getpid()} resets={resets}", flush=True)
if args.out and rank == 0:
    params = {k: v.tolist() for k, v in state.model.state_dict().items()}
    with open(args.out, "w") as f:
        json.dump(params, f)
