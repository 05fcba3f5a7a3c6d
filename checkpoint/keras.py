"""Keras and TensorFlow checkpoints that carry training across the restarts a membership change
forces (``tf.distribute.MultiWorkerMirroredStrategy`` cannot re-form inside a process):

- :class:`ElasticCheckpoint`, a Keras callback (like ``keras.callbacks.BackupAndRestore``):
  restore on train begin, save every N steps / N seconds / epoch, a final save on SIGTERM, a
  save at the end;
- :class:`TrainingCheckpoint`, the same for a custom training loop.

Both write through :class:`checkpoint.Checkpointer`: fenced by the round's generation (a
writer of an older round cannot publish over a newer round's checkpoint) and reshardable
(any world size loads it). The state is replicated, so the chief (rank 0) writes all of it
alone: no rank waits for a peer that may have died, and the save schedule (seconds, SIGTERM)
needs no agreement between ranks. Every rank restores.

Importing this module imports neither TensorFlow nor Keras: ``ElasticCheckpoint`` subclasses
``keras.callbacks.Callback``, so it is built (importing Keras) when first looked up.
(``launchers.tensorflow`` serves both names too, the path they had before.)
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

import elastic
from elastic.errors import ConfigError
from elastic.lazy import require
from elastic.world import World

__all__ = ["TrainingCheckpoint", "ElasticCheckpoint"]

log = logging.getLogger("elastic.launcher")


class _Variables:
    def __init__(self, variables: list) -> None:
        self.variables = variables


def _variable_list(obj) -> list:
    """``obj.variables``, also for Horovod's Keras ``DistributedOptimizer``, whose ``variables``
    property calls the Keras 3 base class's list (a TypeError); its base class's is used then."""
    try:
        variables = obj.variables
    except TypeError:
        for base in type(obj).__mro__[1:]:
            prop = base.__dict__.get("variables")
            if isinstance(prop, property):
                variables = prop.__get__(obj)
                break
        else:
            raise
    if callable(variables):
        variables = variables()
    return list(variables)


class TrainingCheckpoint:
    """Fenced, reshardable checkpoints of TensorFlow objects for a custom training loop::

        ck = TrainingCheckpoint(url, every_steps=100, model=model, optimizer=opt)
        step = ck.restore()               # 0, or the step of the newest checkpoint
        while step < total:
            train_step(...)
            step += 1
            ck.step_end(step)             # saves when due; on SIGTERM a final save, then exits
        ck.close(step)                    # a last save, and wait for it

    ``objects`` are Keras models/optimizers or ``tf.Module``s, named as in
    ``tf.train.Checkpoint(model=..., optimizer=...)``; build optimizers before :meth:`restore`.
    ``extra`` (plain JSON data: epoch, samples seen) rides along and is in :attr:`extra` after
    :meth:`restore`. Saves are due every ``every_steps`` steps and/or every ``every_s`` seconds.
    The chief (``rank`` 0; default from the environment) writes; every rank restores.
    """

    def __init__(self, url: str, *, every_steps: Optional[int] = None, every_s: Optional[float] = None,
                 keep: int = 2, storage_options: Optional[dict] = None, rank: Optional[int] = None,
                 save_on_sigterm: bool = True, sigterm_grace_s: float = 3.0, **objects: Any) -> None:
        if not objects:
            raise ConfigError("TrainingCheckpoint needs the objects to save (model=..., optimizer=...)")
        if every_steps is not None and every_steps < 1:
            raise ConfigError(f"every_steps must be >= 1, got {every_steps}")
        if every_s is not None and every_s <= 0:
            raise ConfigError(f"every_s must be > 0, got {every_s}")
        from . import Checkpointer

        world = World.detect()  # under horovodrun only Horovod says who the chief is
        self.rank = world.rank if rank is None else int(rank)
        self.generation = world.generation
        self.is_chief = self.rank == 0
        self.url = url
        self.objects = objects
        self.every_steps = every_steps
        self.every_s = every_s
        self.extra: Dict[str, Any] = {}
        self.restored_step: Optional[int] = None
        self.last_saved_step: Optional[int] = None
        self._last_save_t = time.monotonic()
        self.sigterm_grace_s = float(sigterm_grace_s)
        self._term = threading.Event()
        self._final = threading.Event()  # the main thread took the SIGTERM path
        self._prev_handler: Any = None
        self._wakeup: Optional[tuple] = None
        # The chief writes the whole (replicated) state as a world of one; the others only read.
        self._ck = Checkpointer(url, keep=keep, storage_options=storage_options, rank=0, world_size=1,
                                generation=world.generation, memory=self.is_chief,
                                current_generation=elastic.closed_round_fence(world.generation))
        if save_on_sigterm and threading.current_thread() is threading.main_thread():
            self._install_sigterm()

    # -- restore ---------------------------------------------------------------------------
    def _variables(self) -> Dict[str, Dict[str, Any]]:
        from .frameworks import tf_variables

        return tf_variables(**{name: _Variables(_variable_list(obj)) for name, obj in self.objects.items()})

    def restore(self) -> int:
        """Assign the newest checkpoint's values in place; returns its step (0: none yet)."""
        from . import CheckpointNotFoundError

        try:
            state = self._ck.load(target={"vars": self._variables()})
        except CheckpointNotFoundError:
            return 0
        meta = state.get("meta", {})
        self.extra = dict(meta.get("extra") or {})
        self.restored_step = self.last_saved_step = int(meta.get("step", 0))
        info = self._ck.last_load
        log.info("restored step %d (saved by generation %s, world size %s) from %s", self.restored_step,
                 meta.get("generation"), meta.get("world_size"), info.source if info else "?")
        return self.restored_step

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, extra: Optional[Mapping[str, Any]] = None, *, blocking: bool = False) -> None:
        """Save now (chief only; other ranks return at once). Returns after a memory copy."""
        if extra is not None:
            self.extra = dict(extra)
        self._last_save_t = time.monotonic()
        if not self.is_chief or step == self.last_saved_step:
            return
        world = World.detect()
        state = {"vars": self._variables(),
                 "meta": {"step": int(step), "extra": self.extra, "world_size": world.world_size,
                          "generation": self.generation}}
        self._ck.save(int(step), state, blocking=blocking)
        self.last_saved_step = int(step)

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.every_s is not None and time.monotonic() - self._last_save_t >= self.every_s

    def step_end(self, step: int, extra: Optional[Mapping[str, Any]] = None) -> bool:
        """Call after each step; saves when due. Returns whether it saved.

        After SIGTERM (the agent stopping this worker) the chief saves this step, waits until
        it is committed, and the process then ends by SIGTERM as it would have.
        """
        if self._term.is_set():
            self._final.set()
            try:
                self.save(step, extra, blocking=True)
            except Exception as exc:  # noqa: BLE001 - fenced or failed: the worker is stopping anyway
                log.warning("final save of step %d on SIGTERM not published: %s", step, exc)
            self._die()
        if self.due(step):
            self.save(step, extra)
            return True
        if extra is not None:
            self.extra = dict(extra)
        return False

    def wait(self) -> None:
        """Block until the last save is persisted and committed."""
        self._ck.wait()

    def close(self, step: Optional[int] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
        """A last save of ``step`` (if given), wait for it, release the checkpointer."""
        if step is not None:
            self.save(step, extra)
        try:
            self._ck.close()
        finally:
            self._uninstall_sigterm()

    # -- SIGTERM ---------------------------------------------------------------------------
    # The agent stops workers with SIGTERM and SIGKILLs them after a grace period. The Python
    # handler only sets a flag: the main thread saves at its next step end. A main thread stuck
    # in a collective with a dead peer never gets there (and Python handlers only run between
    # bytecodes), so a watchdog thread hears the signal through the wakeup fd, which the C-level
    # handler writes at once, and ends the process if no step ends within ``sigterm_grace_s``.
    def _install_sigterm(self) -> None:
        self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            old = None
        if old is None or old != -1:  # someone else's (asyncio's): keep it, flag only
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)
        threading.Thread(target=self._watch_sigterm, args=(r,), name="sigterm-watchdog", daemon=True).start()

    def _uninstall_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])  # the watchdog reads EOF and ends
            self._wakeup = None
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None

    def _watch_sigterm(self, r: int) -> None:
        try:
            while True:
                data = os.read(r, 64)
                if not data:
                    return
                if signal.SIGTERM in data:
                    break
        finally:
            os.close(r)
        self._term.set()
        if self._final.wait(self.sigterm_grace_s):
            return  # the main thread is saving; it ends the process when done
        log.warning("SIGTERM: no step ended within %.1fs (a peer is gone?); exiting without a final save",
                    self.sigterm_grace_s)
        try:
            self._ck.wait()  # a save already in the background (an epoch's end) may still commit
        except Exception as exc:  # noqa: BLE001
            log.warning("the last background save was not published: %s", exc)
        os._exit(128 + signal.SIGTERM)

    def _on_sigterm(self, signum, frame) -> None:
        self._term.set()

    def _die(self) -> None:
        try:
            self._ck.close()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the signal ends us before this does


class _ElasticCheckpoint:
    """Keras callback: restore on train begin, save every N steps / seconds / epochs through
    :class:`checkpoint.Checkpointer`, a final save on SIGTERM, a save at the end::

        model.fit(x, y, epochs=E, callbacks=[ElasticCheckpoint("s3://b/run1", every_steps=50)])

    Like ``keras.callbacks.BackupAndRestore``, but fenced by the round's generation and
    reshardable (a restart with another world size resumes). Resumes at the start of the
    epoch in progress with the weights and optimizer state of the newest save (a mid-epoch
    save's batches of that epoch are seen again, as with BackupAndRestore). Default: save
    every epoch. Build the model before ``fit()``.
    """

    # The methods of ElasticCheckpoint; the class itself puts keras.callbacks.Callback after
    # them (see _elastic_checkpoint_class), which supplies ``model`` and ``params``.
    model: Any
    params: Dict[str, Any]

    def __init__(self, url: str, *, every_steps: Optional[int] = None, every_s: Optional[float] = None,
                 every_epochs: Optional[int] = None, keep: int = 2, storage_options: Optional[dict] = None,
                 save_on_sigterm: bool = True, sigterm_grace_s: float = 3.0, verbose: bool = True) -> None:
        super().__init__()
        if every_steps is None and every_s is None and every_epochs is None:
            every_epochs = 1
        if every_epochs is not None and every_epochs < 1:
            raise ConfigError(f"every_epochs must be >= 1, got {every_epochs}")
        self.url = url
        self._opts = dict(every_steps=every_steps, every_s=every_s, keep=keep,
                          storage_options=storage_options, save_on_sigterm=save_on_sigterm,
                          sigterm_grace_s=sigterm_grace_s)
        self.every_epochs = every_epochs
        self.verbose = verbose
        self.ck: Optional[TrainingCheckpoint] = None
        self.step = 0  # global training steps done, across restarts
        self.epoch = 0  # the epoch in progress
        self.restored_step: Optional[int] = None
        self._last_batch = -1

    def on_train_begin(self, logs=None):
        model = self.model
        opt = getattr(model, "optimizer", None)
        objects = {"model": model}
        if opt is not None:
            if not opt.built:
                opt.build(model.trainable_variables)
            objects["optimizer"] = opt
        self.ck = TrainingCheckpoint(self.url, **self._opts, **objects)
        step = self.ck.restore()
        if self.ck.restored_step is not None:
            self.restored_step = self.step = step
            extra = self.ck.extra
            self.epoch = int(extra.get("epoch", 0))
            per_epoch = extra.get("steps_per_epoch")
            if per_epoch and int(extra.get("batches", 0)) >= int(per_epoch):
                self.epoch += 1  # saved at the end of that epoch
            model._initial_epoch = self.epoch  # as BackupAndRestore: fit() starts at this epoch
            if self.verbose and self.ck.rank == 0:
                print(f"ElasticCheckpoint: resumed from step {step} at epoch {self.epoch} (world size "
                      f"{World.detect().world_size}, generation {self.ck.generation})", flush=True)

    def _extra(self, batches: int) -> Dict[str, Any]:
        # The epoch in progress and how far into it: a save at its last batch and one at its
        # end hold the same step and the same position.
        return {"epoch": self.epoch, "batches": batches, "steps_per_epoch": self.params.get("steps")}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        self.step += max(1, batch - self._last_batch)  # steps_per_execution > 1 skips indices
        self._last_batch = batch
        self.ck.step_end(self.step, self._extra(batch + 1))

    def on_epoch_end(self, epoch, logs=None):
        extra = self._extra(self._last_batch + 1)
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.ck.save(self.step, extra)
        else:
            self.ck.extra = extra

    def on_train_end(self, logs=None):
        if self.ck is not None:
            self.ck.close(self.step, self.ck.extra)
            self.model._initial_epoch = None


_CALLBACK_CLASS: Optional[type] = None


def _elastic_checkpoint_class() -> type:
    """:class:`ElasticCheckpoint`, built once: the methods above on ``keras.callbacks.Callback``."""
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is None:
        keras = require("keras", "checkpoint.keras.ElasticCheckpoint")
        _CALLBACK_CLASS = type("ElasticCheckpoint", (_ElasticCheckpoint, keras.callbacks.Callback),
                               {"__module__": __name__, "__qualname__": "ElasticCheckpoint",
                                "__doc__": _ElasticCheckpoint.__doc__})
    return _CALLBACK_CLASS


if TYPE_CHECKING:  # what linters and type checkers see; at run time __getattr__ builds it
    from keras.callbacks import Callback

    class ElasticCheckpoint(_ElasticCheckpoint, Callback):
        ...


def __getattr__(name: str):
    if name == "ElasticCheckpoint":
        return _elastic_checkpoint_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"ElasticCheckpoint"})
