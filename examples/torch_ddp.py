"""Elastic PyTorch DDP on scikit-learn's digits: an unmodified torchrun-style script.

    elastic-run --nproc-per-node 2 examples/torch_ddp.py
    elastic-run --nnodes 1:3 --nproc-per-node 2 --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        examples/torch_ddp.py --ckpt-dir /shared/ckpt

It survives restarts and world-size changes by resuming from its last checkpoint: each epoch
rank 0 saves model, optimizer and epoch atomically (temp file + rename) to --ckpt-dir, and
every (re)started worker loads it before training on.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)),
            TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR", ""))
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds of extra work per step (demos, tests)")
    args = p.parse_args()

    dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from elastic-run
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = os.environ.get("ELASTIC_GENERATION", "?")
    torch.manual_seed(0)
    train, test = data()
    model = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    start_epoch = 0
    ckpt = os.path.join(args.ckpt_dir, "digits.pt") if args.ckpt_dir else ""
    if ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"resumed from epoch {state['epoch']} (world size {world}, generation {gen})", flush=True)
    elif rank == 0:
        print(f"training from scratch (world size {world}, generation {gen})", flush=True)

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        total = torch.zeros(2)
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(yb), len(yb)])
            if args.step_delay:
                time.sleep(args.step_delay)
        dist.all_reduce(total)
        acc = evaluate(model.module, test)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} loss {total[0] / total[1]:.4f} "
                  f"test accuracy {acc:.4f} world size {world} generation {gen}", flush=True)
            if ckpt:
                os.makedirs(args.ckpt_dir, exist_ok=True)
                tmp = f"{ckpt}.tmp{os.getpid()}"
                torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp)
                os.replace(tmp, ckpt)
        dist.barrier()
    if rank == 0:
        print(f"final test accuracy {evaluate(model.module, test):.4f}", flush=True)
    dist.barrier()  # nobody tears the group down while a peer still uses it
    # Drop DDP (its reducer holds the group) before the group itself: freeing the group from
    # the reducer's destructor can deadlock against gloo's worker thread (seen in torch 2.13).
    del model, opt
    dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, test):
    x, y = test.tensors
    return (model(x).argmax(1) == y).float().mean().item()


if __name__ == "__main__":
    main()
