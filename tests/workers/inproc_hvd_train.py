"""inproc_train.py's deterministic job with Horovod: @elastic.run under --framework horovod.

The same data, model and optimizer as inproc_train.py; the gradients are averaged by
``hvd.DistributedOptimizer`` (the mean over ranks of per-rank means = the global batch mean,
as DDP's), so a recovered run must end where inproc_train.py's fault-free run ends. On a
change ``@elastic.run`` calls ``hvd.shutdown()`` and ``hvd.init()`` in place.
"""
import argparse
import json
import os
import time

import horovod.torch as hvd
import torch
import torch.nn as nn

import elastic

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--step-delay", type=float, default=0.0)
p.add_argument("--out", default="")
args = p.parse_args()

hvd.init()
GLOBAL_BATCH = 12
torch.manual_seed(0)
X = torch.randn(args.steps * GLOBAL_BATCH, 8)
Y = (X @ torch.randn(8, 1) + 0.1 * torch.randn(args.steps * GLOBAL_BATCH, 1))
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
# Wrapped once, outside train(): the wrapper holds the optimizer state (momentum).
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
state = elastic.TorchState(model=model, optimizer=opt, step=0)
resets = []
state.register_reset_callbacks([lambda: resets.append(hvd.size())])


@elastic.run(timeout_s=60)
def train(state):
    world, rank = hvd.size(), hvd.rank()
    assert (world, rank) == (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
    per_rank = GLOBAL_BATCH // world
    while state.step < args.steps:
        lo = state.step * GLOBAL_BATCH + rank * per_rank
        xb, yb = X[lo:lo + per_rank], Y[lo:lo + per_rank]
        state.optimizer.zero_grad()
        nn.functional.mse_loss(state.model(xb), yb).backward()
        state.optimizer.step()
        state.step += 1
        print(f"STEP step={state.step} rank={rank} world={world} pid={os.getpid()} "
              f"gen={os.environ.get('ELASTIC_GENERATION', '0')}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
        state.commit()


train(state)
rank = hvd.rank()
print(f"DONE rank={rank} pid={os.getpid()} resets={resets}", flush=True)
if args.out and rank == 0:
    params = {k: v.tolist() for k, v in state.model.state_dict().items()}
    with open(args.out, "w") as f:
        json.dump(params, f)
