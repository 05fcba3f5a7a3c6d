"""The recovery benchmarks' DDP loop under @elastic.run: one timestamped line per step.

    _inproc_steps.py [MAX_STEPS] [--horovod]

With ``--horovod`` (run it under ``elastic-run --framework horovod``) the gradients are
averaged by Horovod's DistributedOptimizer and recovery re-initialises Horovod in place.
"""
import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import elastic

HOROVOD = "--horovod" in sys.argv
positional = [a for a in sys.argv[1:] if not a.startswith("--")]
max_steps = int(positional[0]) if positional else 100000
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
if HOROVOD:
    import horovod.torch as hvd

    hvd.init()
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
state = elastic.TorchState(model=model, optimizer=opt, step=0)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))


@elastic.run
def train(state):
    rank, env = int(os.environ["RANK"]), os.environ
    print(f"PID {rank} {os.getpid()} {env.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)
    net = state.model if HOROVOD else DDP(state.model)
    while state.step < max_steps:
        state.optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        state.optimizer.step()
        state.step += 1
        if rank == 0:
            print(f"STEP {state.step} {time.time():.6f} {env.get('TORCHELASTIC_RESTART_COUNT', '0')} "
                  f"{env['WORLD_SIZE']}", flush=True)
        time.sleep(0.01)
        state.commit()


train(state)
