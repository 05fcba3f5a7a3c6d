"""Elastic Horovod (Keras) on scikit-learn's digits: ``hvd.init()``, ``hvd.DistributedOptimizer``.

    elastic-run --nproc-per-node 2 examples/horovod_keras.py
    elastic-run --nnodes 1:3 --nproc-per-node 2 --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        examples/horovod_keras.py --ckpt-dir /shared/ckpt

``elastic-run`` sees ``import horovod`` and gives each worker ``horovodrun``'s environment for
the round. Each worker trains on its shard of the data; gradients are averaged by Horovod's
DistributedOptimizer over Gloo. After a membership change the workers restart and
``checkpoint.keras.ElasticCheckpoint`` resumes them from the newest checkpoint (rank 0
writes it every ``--save-steps`` steps, at each epoch's end and on SIGTERM; every rank loads).
"""
import argparse
import os
import tempfile
import time

import horovod.tensorflow as hvd_tf
import horovod.tensorflow.keras as hvd
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from checkpoint.keras import ElasticCheckpoint


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int64), test_size=0.25, random_state=0, stratify=y)


def accuracy(model, x, y):
    return float((np.argmax(model(x, training=False), axis=1) == y).mean())


class BroadcastFromRankZero(keras.callbacks.Callback):
    """Everyone starts from rank 0's weights. (Horovod 0.28.1's BroadcastGlobalVariablesCallback
    predates Keras 3: it calls ``Variable.ref()``, which Keras 3 variables lack.)"""

    def on_train_begin(self, logs=None):
        hvd_tf.broadcast_variables([v.value for v in self.model.variables], root_rank=0)


class StepDelay(keras.callbacks.Callback):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


class Report(keras.callbacks.Callback):
    def __init__(self, xte, yte, epochs):
        super().__init__()
        self.xte, self.yte, self.epochs = xte, yte, epochs

    def on_epoch_end(self, epoch, logs=None):
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}/{self.epochs} loss {logs['loss']:.4f} test accuracy "
                  f"{accuracy(self.model, self.xte, self.yte):.4f} world size {hvd.size()} "
                  f"generation {os.environ.get('ELASTIC_GENERATION', '?')}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds of extra work per step (demos, tests)")
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR", ""),
                   help="checkpoint URL or directory (default: one per run id under the temp dir)")
    args = p.parse_args()

    hvd.init()  # rank, size and the Gloo rendezvous from elastic-run's HOROVOD_* variables
    rank, world = hvd.rank(), hvd.size()
    if rank == 0:
        print(f"world size {world} (Horovod), generation {os.environ.get('ELASTIC_GENERATION', '?')}",
              flush=True)
    xtr, xte, ytr, yte = data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10)])
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(args.lr, momentum=0.9))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    url = args.ckpt_dir or os.path.join(tempfile.gettempdir(), "horovod_keras_digits",
                                        os.environ.get("TORCHELASTIC_RUN_ID", "local"))
    # Every rank needs the same number of steps per epoch (each step is an allreduce).
    per_rank = len(xtr) // world
    model.fit(xtr[rank * per_rank:(rank + 1) * per_rank], ytr[rank * per_rank:(rank + 1) * per_rank],
              batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[ElasticCheckpoint(url, every_steps=args.save_steps),  # restores first
                         BroadcastFromRankZero(),
                         Report(xte, yte, args.epochs), StepDelay(args.step_delay)])
    if rank == 0:
        print(f"final test accuracy {accuracy(model, xte, yte):.4f} world size {world}", flush=True)


if __name__ == "__main__":
    main()
