"""A DDP training loop for the recovery benchmarks: prints one timestamped line per step."""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
print(f"PID {rank} {os.getpid()} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)
for step in range(max_steps):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if rank == 0:
        print(f"STEP {step} {time.time():.6f} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", flush=True)
    time.sleep(0.01)  # a 10 ms data/compute stand-in keeps the log small
