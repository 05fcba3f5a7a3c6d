"""The recovery benchmarks' DDP loop under @elastic.run: one timestamped line per step."""
import os
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import elastic

max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
state = elastic.TorchState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), step=0)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))


@elastic.run
def train(state):
    rank, env = int(os.environ["RANK"]), os.environ
    print(f"PID {rank} {os.getpid()} {env.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)
    net = DDP(state.model)
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
