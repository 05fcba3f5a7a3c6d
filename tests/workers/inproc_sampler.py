"""An @elastic.run DDP job over dataload's ElasticDataLoader, kept in the TorchState.

Every rank prints the sample ids of each batch when it takes it (before any collective), as
``BATCH gen=G step=S rank=R ids=a,b``; the test keeps, per step, the records of the newest
generation that ran it and checks the epoch's samples were each trained on exactly once.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dataload
import elastic

p = argparse.ArgumentParser()
p.add_argument("data")
p.add_argument("--batch-size", type=int, default=2)
p.add_argument("--step-delay", type=float, default=0.0)
args = p.parse_args()

torch.manual_seed(0)
model = nn.Linear(4, 1)
loader = dataload.ElasticDataLoader(dataload.ShardedDataset(args.data), batch_size=args.batch_size, seed=7)
state = elastic.TorchState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), step=0,
                           loader=loader)


@elastic.run(timeout_s=60)
def train(state):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    assert state.loader.sampler.world.world_size == world  # set_world() ran on re-formation
    net = DDP(state.model) if world > 1 else state.model
    for batch in state.loader:
        ids = ",".join(str(int(i)) for i in batch["id"])
        print(f"BATCH gen={os.environ.get('ELASTIC_GENERATION', '0')} step={state.step + 1} rank={rank} "
              f"pid={os.getpid()} ids={ids}", flush=True)
        state.optimizer.zero_grad()
        net(batch["x"]).pow(2).mean().backward()
        state.optimizer.step()
        state.step += 1
        if args.step_delay:
            time.sleep(args.step_delay)
        state.commit()


train(state)
print(f"DONE rank={os.environ.get('RANK', '0')} pid={os.getpid()} epoch={state.loader.epoch}", flush=True)
