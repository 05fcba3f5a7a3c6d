"""An unmodified Horovod Elastic Keras script, written as Horovod's TF2 Keras elastic example.

``hvd.init()``, ``hvd.DistributedOptimizer``, ``hvd.elastic.KerasState``, the elastic
callbacks (commit, batch, epoch), a reset callback and ``@hvd.elastic.run`` around
``model.fit``: nothing of elastic-run. A callback counts trained batches in the state
(``state.step``, rolled back with it), so a run that loses no batch ends with exactly
``epochs * batches`` of them, whatever happened in between.
"""
import argparse
import os

import horovod.tensorflow.keras as hvd
import numpy as np
import tensorflow as tf

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--batches", type=int, default=12, help="global batches per epoch")
p.add_argument("--step-delay", type=float, default=0.0)
args = p.parse_args()

hvd.init()
tf.random.set_seed(0)
rng = np.random.default_rng(0)
x = rng.standard_normal((1024, 8)).astype(np.float32)
y = (x @ rng.standard_normal((8, 1)) + 0.1 * rng.standard_normal((1024, 1))).astype(np.float32)
dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16)

model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="tanh"),
                             tf.keras.layers.Dense(1)])
lr = 0.01
opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(lr * hvd.size(), momentum=0.9))
model.compile(loss="mse", optimizer=opt)


class Progress(tf.keras.callbacks.Callback):
    def on_batch_end(self, batch, logs=None):
        state.step += 1
        print(f"STEP step={state.step} rank={hvd.rank()} world={hvd.size()} pid={os.getpid()} "
              f"gen={os.environ.get('ELASTIC_GENERATION', '0')}", flush=True)
        if args.step_delay:
            import time
            time.sleep(args.step_delay)


resets = []


def on_state_reset():
    resets.append(hvd.size())
    state.model.optimizer.learning_rate.assign(lr * hvd.size())


state = hvd.elastic.KerasState(model, batch=0, epoch=0, step=0)
state.register_reset_callbacks([on_state_reset])
callbacks = [
    Progress(),
    hvd.elastic.UpdateEpochStateCallback(state),
    hvd.elastic.UpdateBatchStateCallback(state),
    hvd.elastic.CommitStateCallback(state, batches_per_commit=2),
]


@hvd.elastic.run
def train(state):
    state.model.fit(dataset, steps_per_epoch=args.batches, epochs=args.epochs - state.epoch,
                    callbacks=callbacks, verbose=0)


train(state)
print(f"DONE rank={hvd.rank()} pid={os.getpid()} steps={state.step} resets={resets}", flush=True)
