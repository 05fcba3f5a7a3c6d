"""Framework glue: name the state of TensorFlow objects (and Horovod, which uses torch/TF).

PyTorch needs none: ``model.state_dict()``, ``optimizer.state_dict()`` and
``scheduler.state_dict()`` are nested dicts of tensors and plain data, which
:class:`~checkpoint.Checkpointer` saves as they are (optimizer int keys included).
Horovod training saves the torch or TF state the same way, on every rank: where the launcher
sets no ``RANK`` (``horovodrun``, ``mpirun``), :class:`~checkpoint.Checkpointer` takes rank and
size from the initialised Horovod module (:func:`horovod_world`), so the ranks split the
writing of the replicated state between them instead of all writing as rank 0 of 1.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Tuple

from .errors import CheckpointStateError

__all__ = ["tf_variables", "horovod_world"]

# Horovod's framework modules; each one's basics answer rank() and size() once initialised.
_HOROVOD_MODULES = ("horovod.torch", "horovod.tensorflow", "horovod.tensorflow.keras",
                    "horovod.keras", "horovod.mxnet")
# What Horovod's launchers set before the script runs (Gloo, then Open MPI, then MPICH/PMI).
_HOROVOD_ENV = (("HOROVOD_RANK", "HOROVOD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                ("PMI_RANK", "PMI_SIZE"))


def horovod_world() -> Optional[Tuple[int, int]]:
    """``(rank, size)`` of this Horovod process, or None outside Horovod.

    An initialised Horovod module already imported (``horovod.torch``, ``.tensorflow``, ...)
    answers first; before ``hvd.init()`` the launcher's environment does. Nothing is imported.
    """
    for name in _HOROVOD_MODULES:
        hvd = sys.modules.get(name)
        if hvd is None:
            continue
        try:
            if hvd.is_initialized():
                return int(hvd.rank()), int(hvd.size())
        except (AttributeError, ValueError, RuntimeError):
            continue
    for rank_var, size_var in _HOROVOD_ENV:
        rank, size = os.environ.get(rank_var), os.environ.get(size_var)
        if rank and size and rank.isdigit() and size.isdigit():
            return int(rank), int(size)
    return None


def tf_variables(**objects: Any) -> Dict[str, Dict[str, Any]]:
    """``{name: {index: variable}}`` for TensorFlow objects, in the style of
    ``tf.train.Checkpoint(model=..., optimizer=...)``.

    Pass the result as (part of) the state to ``save()``, and a fresh one built from new
    objects as ``load(target=...)`` to assign the saved values in place. Variables are named by
    their position in ``obj.variables``, which is stable for the same model code (Keras' auto
    names are not: they count layers created in the process). Build Keras optimizers
    (``opt.build(model.trainable_variables)``) before loading into them.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for name, obj in objects.items():
        variables = getattr(obj, "variables", None)
        if callable(variables):
            variables = variables()
        if variables is None:
            raise CheckpointStateError(f"tf_variables: {name}={type(obj).__name__} has no .variables")
        out[name] = {str(i): v for i, v in enumerate(variables)}
    return out
