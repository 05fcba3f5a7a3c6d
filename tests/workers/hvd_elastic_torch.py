"""An unmodified Horovod Elastic PyTorch script, written as Horovod's elastic docs show.

``hvd.init()``, ``hvd.DistributedOptimizer``, ``hvd.elastic.TorchState``, a reset callback,
``state.commit()`` every ``--commit-every`` batches and ``@hvd.elastic.run``: nothing of
elastic-run. inproc_train.py's deterministic data and model, so a run that loses no step and
repeats none ends with inproc_train.py's fault-free parameters (rolled-back batches are redone
on the same data).
"""
import argparse
import json
import os
import time

import horovod.torch as hvd
import torch
import torch.nn as nn

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--commit-every", type=int, default=2)
p.add_argument("--step-delay", type=float, default=0.0)
p.add_argument("--out", default="")
args = p.parse_args()

hvd.init()
torch.set_num_threads(1)
GLOBAL_BATCH = 12
torch.manual_seed(0)
X = torch.randn(args.steps * GLOBAL_BATCH, 8)
Y = (X @ torch.randn(8, 1) + 0.1 * torch.randn(args.steps * GLOBAL_BATCH, 1))
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
resets = []


@hvd.elastic.run
def train(state):
    while state.batch < args.steps:
        world, rank = hvd.size(), hvd.rank()
        per_rank = GLOBAL_BATCH // world
        lo = state.batch * GLOBAL_BATCH + rank * per_rank
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X[lo:lo + per_rank]), Y[lo:lo + per_rank]).backward()
        optimizer.step()
        state.batch += 1
        print(f"STEP step={state.batch} rank={rank} world={world} pid={os.getpid()} "
              f"gen={os.environ.get('ELASTIC_GENERATION', '0')}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
        if state.batch % args.commit_every == 0:
            state.commit()


def on_state_reset():
    resets.append(hvd.size())


state = hvd.elastic.TorchState(model=model, optimizer=optimizer, batch=0)
state.register_reset_callbacks([on_state_reset])
train(state)
print(f"DONE rank={hvd.rank()} pid={os.getpid()} resets={resets}", flush=True)
if args.out and hvd.rank() == 0:
    with open(args.out, "w") as f:
        json.dump({k: v.tolist() for k, v in model.state_dict().items()}, f)
