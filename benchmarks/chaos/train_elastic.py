"""The chaos benchmark's job written for elastic-run: ``@elastic.run``, ``ElasticDataLoader``
and ``checkpoint.Checkpointer``.

    elastic-run ... benchmarks/chaos/train_elastic.py --data DIR --log-dir DIR --ckpt-dir DIR

The same model, data, global batch and step as ``train_plain.py`` (``workload``). The loader and
the step live in an ``elastic.TorchState``: on a lost peer or a new round the survivors roll
back to their last ``commit()`` (every step) and go on in place; a replacement or a newcomer
takes the state from its peers. At every entry into ``train`` each rank's batch becomes
``GLOBAL_BATCH // WORLD_SIZE``, so the global batch stays fixed and the
loader's global position keeps every sample of an epoch exactly once.

Every ``--ckpt-every`` (20) steps the state (model, optimizer, step, loader position) is saved
with ``checkpoint.Checkpointer`` (async; fenced by the round's generation): a process that
starts with no peers to take the state from (the whole job restarted) resumes from the newest
checkpoint. Rank 0 logs each publish it completes and each one the fence refused.
"""
import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import dataload  # noqa: E402
import elastic  # noqa: E402
from benchmarks.chaos import workload  # noqa: E402
from benchmarks.chaos.steplog import CHECKSUM_EVERY, StepLog  # noqa: E402
from checkpoint import Checkpointer  # noqa: E402
from checkpoint.errors import CheckpointError  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--log-dir", required=True)
p.add_argument("--ckpt-dir", required=True)
p.add_argument("--total-steps", type=int, default=1000)
p.add_argument("--step-s", type=float, default=0.1)
p.add_argument("--ckpt-every", type=int, default=20)
p.add_argument("--timeout-s", type=float, default=60.0, help="@elastic.run's bound on a collective")
p.add_argument("--launcher", default=os.environ.get("CHAOS_LAUNCHER", "elastic-run"))
args = p.parse_args()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


log = StepLog(args.log_dir, launcher=args.launcher)
model = workload.build_model()
opt = workload.build_optimizer(model)
world0 = env_int("WORLD_SIZE", 1)
loader = dataload.ElasticDataLoader(dataload.ShardedDataset(args.data),
                                    batch_size=workload.per_rank_batch(world0), seed=0)
state = elastic.TorchState(model=model, optimizer=opt, step=0, loader=loader)


def current_generation() -> int:
    return workload.generation()


def make_checkpointer() -> Checkpointer:
    return Checkpointer(args.ckpt_dir, keep=100000, publish_timeout_s=15.0,
                        current_generation=current_generation)


ck = make_checkpointer()
source = "scratch"
if ck.latest_step() is not None:  # a fresh process; its peers' state, if any, wins at the sync
    saved = ck.load()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in saved["model"].items()})
    opt.load_state_dict(saved["optim"])
    loader.load_state_dict(saved["loader"])
    state.step = int(saved["step"])
    source = "checkpoint"
log.start(rank=env_int("RANK", 0), world_size=world0, generation=workload.generation(), step=state.step,
          source=source)
pending: list = []  # (checkpointer, step, time the save began) of the save in flight


def settle(ckp: Checkpointer, step: int, t_save: float) -> None:
    """Wait for a save and log (rank 0) whether it was published or refused."""
    try:
        ckp.wait()
        if ckp.rank == 0:
            log.ckpt(step=step, generation=ckp.generation, rank=ckp.rank, world_size=ckp.world_size,
                     published=True, t_save=t_save)
    except CheckpointError as exc:
        log.ckpt(step=step, generation=ckp.generation, rank=ckp.rank, world_size=ckp.world_size,
                 published=False, t_save=t_save, detail=f"{type(exc).__name__}: {str(exc)[:200]}")


entered: list = []  # the generation of each entry into train()


def enter_round(world: int, rank: int, gen: int) -> None:
    """At every entry into ``train`` (the first, and after each re-formation): the rank's batch
    for the fixed global batch, and a checkpointer of this round (its rank, world size and
    generation are fixed at construction). Done here rather than in a reset callback, which
    runs only in workers that re-form: a worker started for one round that joins the next
    before its first step (a newcomer whose first round broke while forming) runs none."""
    global ck
    state.loader.set_world(batch_size=workload.per_rank_batch(world))
    if ck.generation != gen or ck.world_size != world or ck.rank != rank:
        if pending:  # the old round's save finishes (or is fenced) on its own
            threading.Thread(target=settle, args=pending.pop(), daemon=True).start()
        ck = make_checkpointer()
    if entered and entered[-1] != gen:
        log.reform(rank=rank, world_size=world, generation=gen, step=state.step)
    entered.append(gen)


@elastic.run(timeout_s=args.timeout_s)
def train(state):
    world, rank, gen = env_int("WORLD_SIZE", 1), env_int("RANK", 0), workload.generation()
    enter_round(world, rank, gen)
    net = DDP(state.model) if world > 1 else state.model
    loss_fn = nn.CrossEntropyLoss()
    pacer = workload.Pacer(args.step_s)
    while state.step < args.total_steps:
        batches = iter(state.loader)
        while True:
            t0 = time.time()  # the batch's fetch is part of the step, as in train_plain.py
            batch = next(batches, None)
            if batch is None:
                break
            epoch = state.loader.epoch  # after next(): a saved end of epoch has moved on by now
            pacer.compute()
            state.optimizer.zero_grad()
            loss_fn(net(batch["x"]), batch["y"]).backward()
            state.optimizer.step()
            state.step += 1
            log.step(t_start=t0, t_end=pacer.done(), step=state.step, epoch=epoch, generation=gen, rank=rank,
                     world_size=world, samples=batch["id"].tolist(),
                     checksum=workload.param_checksum(state.model) if state.step % CHECKSUM_EVERY == 0 else None)
            if state.step % args.ckpt_every == 0:
                if pending:
                    settle(*pending.pop())
                t_save = time.time()
                try:
                    ck.save(state.step, {"model": state.model.state_dict(), "optim": state.optimizer.state_dict(),
                                         "step": state.step, "loader": state.loader.state_dict()})
                    pending.append((ck, state.step, t_save))
                except CheckpointError as exc:  # the fence: a newer round exists
                    log.ckpt(step=state.step, generation=ck.generation, rank=rank, world_size=world,
                             published=False, t_save=t_save, detail=f"{type(exc).__name__}: {str(exc)[:200]}")
            state.commit()
            if state.step >= args.total_steps:
                break


train(state)
if pending:
    settle(*pending.pop())
log.close()
