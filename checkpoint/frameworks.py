"""Framework glue: name the state of TensorFlow objects (and Horovod, which uses torch/TF).

PyTorch needs none: ``model.state_dict()``, ``optimizer.state_dict()`` and
``scheduler.state_dict()`` are nested dicts of tensors and plain data, which
:class:`~checkpoint.Checkpointer` saves as they are (optimizer int keys included).
Horovod training saves the torch or TF state the same way, on every rank: where the launcher
sets no ``RANK`` (``horovodrun``, ``mpirun``), :class:`~checkpoint.Checkpointer` takes rank and
size from :meth:`elastic.World.detect` (the initialised Horovod module first), so the ranks
split the writing of the replicated state between them instead of all writing as rank 0 of 1.
"""
from __future__ import annotations

from typing import Any, Dict

from .errors import CheckpointStateError

__all__ = ["tf_variables"]

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
