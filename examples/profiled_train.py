"""Train a small MLP on scikit-learn's digits with the always-on step profiler.

Alone:                python examples/profiled_train.py --run-dir runs/prof
Several processes:    torchrun --nproc-per-node 3 examples/profiled_train.py --run-dir runs/prof
                      (or elastic-run; any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR,
                      MASTER_PORT): DDP over gloo, the profiler's comm hook times gradient
                      allreduce and every --exchange-every steps the ranks compare step times.
Then:                 elastic-prof report runs/prof

``--slow-rank R --slow-s S`` makes rank R sleep S seconds in every step, to see it named as a
straggler. ``--peak-flops`` sets the peak FLOP/s used for MFU (on a CPU there is no default).
``--phase-every N``: the automatic hooks time forward, backward and optimizer on every Nth
step (the profiler's default; 1: every step); every step is recorded either way.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from elastic import World  # noqa: E402
from profiler import StepProfiler  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/profiled_train")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--exchange-every", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.1, help="straggler threshold (fraction)")
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-s", type=float, default=0.02)
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--phase-every", type=int, default=None,
                   help="forward/backward/optimizer timed on every Nth step (default: the "
                        "profiler's, 20; 1: every step)")
    p.add_argument("--prometheus-port", type=int, default=None)
    p.add_argument("--tensorboard-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def batches(x, y, batch_size, rank, world_size, seed=0):
    """An endless stream of this rank's shard of the data, reshuffled every epoch."""
    shard_x, shard_y = x[rank::world_size], y[rank::world_size]
    gen = torch.Generator().manual_seed(seed + rank)
    while True:
        order = torch.randperm(len(shard_x), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield shard_x[idx], shard_y[idx]


def main(argv=None) -> int:
    args = parse_args(argv)
    world = World.from_env()
    logging.basicConfig(level=logging.INFO,
                        format=f"[rank {world.rank}] %(levelname)s %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    distributed = world.world_size > 1
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
            device = torch.device("cuda", world.local_rank)
        dist.init_process_group(backend, rank=world.rank, world_size=world.world_size)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                                torch.nn.Linear(args.hidden, 10)).to(device)
    params = sum(p.numel() for p in model.parameters())
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    prof = StepProfiler(args.run_dir, world=world, exchange_every=args.exchange_every,
                        straggler_threshold=args.threshold, peak_flops=args.peak_flops,
                        # forward + backward of a dense net: about 6 FLOPs per weight per sample
                        flops_per_step=6.0 * params * args.batch_size,
                        prometheus_port=args.prometheus_port,
                        tensorboard_dir=args.tensorboard_dir,
                        **({} if args.phase_every is None else {"phase_every": args.phase_every}))
    prof.attach(model, optimizer)  # forward/backward/optimizer hooks, DDP comm hook
    prof.add_straggler_hook(lambda report: report.stragglers and world.rank == 0 and print(
        f"straggler report: {report.describe()}", flush=True))

    stream = prof.wrap_loader(batches(x, y, args.batch_size, world.rank, world.world_size))
    loss = torch.zeros(())
    for step in range(args.steps):
        xb, yb = next(stream)
        with prof.step(samples=len(xb)):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            if world.rank == args.slow_rank:
                time.sleep(args.slow_s)  # a slow rank: its compute takes longer
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                with prof.phase("checkpoint"):
                    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    del state
    prof.close()

    with torch.no_grad():
        acc = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    last = prof.last_record
    print(f"rank {world.rank}: {args.steps} steps, last step {last.step_time_s * 1e3:.2f} ms, "
          f"loss {loss.item():.3f}, train accuracy {acc:.3f}, records in {prof.jsonl_path}",
          flush=True)
    if prof.last_report is not None and world.rank == 0:
        print(f"last straggler report: {prof.last_report.describe()}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
