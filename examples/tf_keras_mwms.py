"""Elastic Keras + MultiWorkerMirroredStrategy on scikit-learn's digits.

    elastic-run --nproc-per-node 2 examples/tf_keras_mwms.py
    elastic-run --nnodes 1:3 --nproc-per-node 2 --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        examples/tf_keras_mwms.py --ckpt-dir s3://bucket/ckpt

``elastic-run`` sees ``import tensorflow`` (or ``--framework tensorflow``) and writes each
worker's ``TF_CONFIG``. MultiWorkerMirroredStrategy cannot change its workers in a running
process, so after a membership change the workers restart with the new ``TF_CONFIG`` and
``ElasticCheckpoint`` resumes them from the newest checkpoint (saved every ``--save-steps``
steps, at every epoch's end, and on SIGTERM).
"""
import argparse
import os
import tempfile
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import launchers.tensorflow as ltf

strategy = ltf.strategy()  # MultiWorkerMirroredStrategy for 2+ workers; first, before other TF ops

import keras  # noqa: E402  (after the strategy, as MultiWorkerMirroredStrategy requires)

from checkpoint.keras import ElasticCheckpoint  # noqa: E402


def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int64), test_size=0.25, random_state=0, stratify=y)


class StepDelay(keras.callbacks.Callback):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


class Report(keras.callbacks.Callback):
    """Rank 0 prints each epoch's loss and test accuracy (computed locally: no collective)."""

    def __init__(self, xte, yte, epochs):
        super().__init__()
        self.xte, self.yte, self.epochs = xte, yte, epochs
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = strategy.num_replicas_in_sync
        self.gen = os.environ.get("ELASTIC_GENERATION", "?")

    def on_epoch_end(self, epoch, logs=None):
        if self.rank == 0:
            print(f"epoch {epoch + 1}/{self.epochs} loss {logs['loss']:.4f} test accuracy "
                  f"{accuracy(self.model, self.xte, self.yte):.4f} world size {self.world} "
                  f"generation {self.gen}", flush=True)


def accuracy(model, x, y):
    return float((np.argmax(model(x, training=False), axis=1) == y).mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds of extra work per step (demos, tests)")
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR", ""),
                   help="checkpoint URL or directory (default: one per run id under the temp dir)")
    args = p.parse_args()

    xtr, xte, ytr, yte = data()
    world = strategy.num_replicas_in_sync
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"world size {world} ({type(strategy).__name__}), generation "
              f"{os.environ.get('ELASTIC_GENERATION', '?')}", flush=True)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    url = args.ckpt_dir or os.path.join(tempfile.gettempdir(), "tf_keras_digits",
                                        os.environ.get("TORCHELASTIC_RUN_ID", "local"))
    model.fit(xtr, ytr, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[ElasticCheckpoint(url, every_steps=args.save_steps),
                         Report(xte, yte, args.epochs), StepDelay(args.step_delay)])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final test accuracy {accuracy(model, xte, yte):.4f} world size {world}", flush=True)


if __name__ == "__main__":
    main()
