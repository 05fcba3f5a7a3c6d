"""A training loop per framework for benchmarks/frameworks.py: one timestamped line per step.

    python _fw_steps.py torch|horovod|tensorflow|horovod-elastic CKPT_DIR

Rank 0 prints ``STEP <n> <unix time> <world size>``; every worker prints ``PID <rank> <pid>
<host>`` first. torch / horovod / tensorflow resume from a checkpoint written every 20 steps
(the restart path of ``elastic-run``); ``horovod-elastic`` is the same Horovod loop written for
``horovodrun``'s elastic mode (``@hvd.elastic.run``, state committed every 20 steps).
"""
import os
import sys
import time

# benchmarks/checkpoint.py would shadow the checkpoint package: drop this script's directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

FRAMEWORK, CKPT = sys.argv[1], sys.argv[2]
SAVE_EVERY = 20


def digits():
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def report(step, world):
    print(f"STEP {step} {time.time():.6f} {world}", flush=True)


def torch_loop(kind):
    import torch
    import torch.nn as nn

    from checkpoint import Checkpointer, CheckpointNotFoundError

    torch.set_num_threads(1)
    if kind == "torch":
        from torch.nn.parallel import DistributedDataParallel as DDP

        from launchers.torch import init_process_group

        world_info = init_process_group()
        rank, world = world_info.rank, world_info.world_size
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, world = hvd.rank(), hvd.size()
    print(f"PID {rank} {os.getpid()} {os.environ.get('HOROVOD_HOSTNAME', '')}", flush=True)
    x, y = digits()
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    if kind == "horovod-elastic":
        state = hvd.elastic.TorchState(model=net, optimizer=opt, step=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
        state.optimizer = opt

        @hvd.elastic.run
        def train(state):
            while True:
                i = (state.step * 32 * hvd.size() + hvd.rank() * 32) % (len(x) - 32)
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32]).backward()
                opt.step()
                state.step += 1
                if state.step % SAVE_EVERY == 0:
                    state.commit()
                if hvd.rank() == 0:
                    report(state.step, hvd.size())
                time.sleep(0.01)

        train(state)
        return
    ck = Checkpointer(CKPT, keep=2, rank=rank, world_size=world)
    step = 0
    try:
        state = ck.load()
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    except CheckpointNotFoundError:
        pass
    if kind == "torch":
        model = DDP(net)
    else:
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
        model = net
    while True:
        i = (step * 32 * world + rank * 32) % (len(x) - 32)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
        step += 1
        if step % SAVE_EVERY == 0:
            ck.save(step, {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step})
        if rank == 0:
            report(step, world)
        time.sleep(0.01)


def tf_loop():
    import launchers.tensorflow as ltf

    strategy = ltf.strategy()
    import keras

    rank, world = int(os.environ.get("RANK", "0")), strategy.num_replicas_in_sync
    print(f"PID {rank} {os.getpid()}", flush=True)
    x, y = digits()
    with strategy.scope():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if rank == 0:
                report(ck.step, world)
            time.sleep(0.01)

    ck = ltf.ElasticCheckpoint(CKPT, every_steps=SAVE_EVERY, verbose=False)
    model.fit(x, y, batch_size=32 * world, epochs=100000, verbose=0, callbacks=[ck, Steps()])


if FRAMEWORK == "tensorflow":
    tf_loop()
else:
    torch_loop(FRAMEWORK)
