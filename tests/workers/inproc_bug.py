"""An @elastic.run job with a bug in its collectives at one step: the ranks disagree on a
tensor's size (Gloo aborts the rank that sees the mismatch; its peer reads a reset
connection), or on which collective to call (both time out). Neither is a lost peer."""
import argparse
import os

import torch
import torch.distributed as dist

import elastic

p = argparse.ArgumentParser()
p.add_argument("--bug", choices=["size", "op"], required=True)
p.add_argument("--at-step", type=int, default=3)
p.add_argument("--steps", type=int, default=6)
args = p.parse_args()


@elastic.run(timeout_s=5)
def train(state):
    rank = dist.get_rank()
    while state.step < args.steps:
        if state.step == args.at_step:
            if args.bug == "size":
                dist.all_reduce(torch.ones(4 if rank == 0 else 5))
            elif rank == 0:
                dist.all_reduce(torch.ones(4))
            else:
                dist.broadcast(torch.ones(4), 0)
        else:
            dist.all_reduce(torch.ones(4))
        state.step += 1
        print(f"STEP step={state.step} rank={rank} pid={os.getpid()}", flush=True)
        state.commit()


train(elastic.ObjectState(step=0))
print(f"DONE rank={dist.get_rank() if dist.is_initialized() else 0}", flush=True)
