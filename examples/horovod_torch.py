"""Elastic Horovod (PyTorch) on scikit-learn's digits: an unmodified ``hvd.init()`` script.

    elastic-run --nproc-per-node 2 examples/horovod_torch.py
    elastic-run --nnodes 1:3 --nproc-per-node 2 --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        examples/horovod_torch.py --ckpt-dir /shared/ckpt

``elastic-run`` sees ``import horovod`` (or ``--framework horovod``), hosts Horovod's Gloo
rendezvous for every round and gives each worker the ``HOROVOD_*`` environment that
``horovodrun`` would. After a membership change the workers restart and resume from the
newest checkpoint: every epoch all ranks save model, optimizer and epoch through
``checkpoint.Checkpointer`` (each rank writes a part, rank 0 commits), and every (re)started
worker loads it and broadcasts from rank 0, as Horovod scripts do.
"""
import argparse
import os
import tempfile
import time

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from checkpoint import Checkpointer, CheckpointNotFoundError


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
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR", ""),
                   help="checkpoint URL or directory (default: one per run id under the temp dir)")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds of extra work per step (demos, tests)")
    args = p.parse_args()

    hvd.init()  # rank, size and the Gloo rendezvous from elastic-run's HOROVOD_* variables
    torch.set_num_threads(1)
    rank, world = hvd.rank(), hvd.size()
    gen = os.environ.get("ELASTIC_GENERATION", "?")
    torch.manual_seed(0)
    train, test = data()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    url = args.ckpt_dir or os.path.join(tempfile.gettempdir(), "horovod_torch_digits",
                                        os.environ.get("TORCHELASTIC_RUN_ID", "local"))
    ck = Checkpointer(url, keep=2, rank=rank, world_size=world)
    start_epoch = 0
    try:
        state = ck.load()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            print(f"resumed from epoch {state['epoch'] + 1} (world size {world}, generation {gen})", flush=True)
    except CheckpointNotFoundError:
        if rank == 0:
            print(f"training from scratch (world size {world}, generation {gen})", flush=True)
    # Horovod's usual start: everyone takes rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())

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
        total = hvd.allreduce(total, op=hvd.Sum, name="epoch_loss")
        acc = evaluate(model, test)
        ck.save(epoch, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch})
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} loss {total[0] / total[1]:.4f} "
                  f"test accuracy {acc:.4f} world size {world} generation {gen}", flush=True)
    ck.close()  # the last save is persisted (and, on rank 0, committed)
    if rank == 0:
        print(f"final test accuracy {evaluate(model, test):.4f} world size {world}", flush=True)
    hvd.shutdown()


@torch.no_grad()
def evaluate(model, test):
    x, y = test.tensors
    return (model(x).argmax(1) == y).float().mean().item()


if __name__ == "__main__":
    main()
