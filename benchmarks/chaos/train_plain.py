"""The chaos benchmark's plain torchrun script: DDP on gloo, DistributedSampler, a checkpoint.

    torchrun    ... benchmarks/chaos/train_plain.py --log-dir DIR --ckpt-dir DIR [--total-steps N]
    elastic-run ... benchmarks/chaos/train_plain.py --log-dir DIR --ckpt-dir DIR [--total-steps N]

Written as users write for torchrun: ``init_process_group("gloo")`` from the environment, a
``DistributedSampler`` over the dataset, a fixed global batch (``workload.GLOBAL_BATCH``: each
rank takes ``GLOBAL_BATCH // WORLD_SIZE`` samples), about ``--step-s`` (0.1 s) a step. Rank 0
saves model, optimizer and step every ``--ckpt-every`` (20) steps to ``--ckpt-dir/latest.pt``
(temp file and rename); every (re)started worker resumes from it and, within the epoch, skips
the batches already done, as a torchrun script does. After a change of world size the
sampler's split differs from the one the skipped steps used, so samples repeat and others are
skipped: the audit counts them. Every step is logged (``steplog``).
"""
import argparse
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DistributedSampler, TensorDataset  # noqa: E402

from benchmarks.chaos import workload  # noqa: E402
from benchmarks.chaos.steplog import CHECKSUM_EVERY, StepLog  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--total-steps", type=int, default=1000)
    p.add_argument("--step-s", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--pg-timeout-s", type=float, default=0.0,
                   help="process-group timeout (0: torch's default, 30 min)")
    p.add_argument("--launcher", default=os.environ.get("CHAOS_LAUNCHER", ""))
    args = p.parse_args()

    gen = workload.generation()
    log = StepLog(args.log_dir, launcher=args.launcher)
    # a worker process started: the launcher formed a new round (logged before the group forms,
    # so a round whose group never forms is seen too)
    log.start(rank=int(os.environ.get("RANK", -1)), world_size=int(os.environ.get("WORLD_SIZE", 0)),
              generation=gen, step=-1, source="launch")
    if args.pg_timeout_s > 0:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout_s))
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = workload.per_rank_batch(world)

    cols = workload.arrays()
    ds = TensorDataset(torch.from_numpy(cols["x"]), torch.from_numpy(cols["y"]), torch.from_numpy(cols["id"]))
    model = workload.build_model()
    opt = workload.build_optimizer(model)
    step, source = 0, "scratch"
    path = os.path.join(args.ckpt_dir, "latest.pt")
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, source = int(saved["step"]), "checkpoint"
    net = DDP(model)
    log.start(rank=rank, world_size=world, generation=gen, step=step, source=source)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    indices: list = []
    epoch = -1
    pacer = workload.Pacer(args.step_s)
    while step < args.total_steps:
        t0 = time.time()
        if step // workload.STEPS_PER_EPOCH != epoch:
            epoch = step // workload.STEPS_PER_EPOCH
            sampler.set_epoch(epoch)
            indices = list(sampler)
        k = step % workload.STEPS_PER_EPOCH  # batches of this epoch already done: skipped
        mine = indices[k * batch:(k + 1) * batch]
        x, y, ids = ds[mine]
        pacer.compute()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        step += 1
        log.step(t_start=t0, t_end=pacer.done(), step=step, epoch=epoch, generation=gen, rank=rank,
                 world_size=world, samples=ids.tolist(),
                 checksum=workload.param_checksum(model) if step % CHECKSUM_EVERY == 0 else None)
        if rank == 0 and step % args.ckpt_every == 0:
            os.makedirs(args.ckpt_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            t_save = time.time()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, path)
            log.ckpt(step=step, generation=gen, rank=rank, world_size=world, published=True, t_save=t_save)
    dist.barrier()
    del net, opt
    dist.destroy_process_group()
    log.close()


if __name__ == "__main__":
    main()
