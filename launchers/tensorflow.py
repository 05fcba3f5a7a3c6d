"""TensorFlow under ``elastic-run``: ``TF_CONFIG`` per round, and ``strategy()``.

``tf.distribute.MultiWorkerMirroredStrategy`` cannot rebuild its collectives inside a running
process, so on a membership change the agent restarts the workers (from warm standbys where
possible) with the next round's ``TF_CONFIG``, and training resumes from the newest checkpoint
(:mod:`checkpoint.keras`: ``ElasticCheckpoint`` for Keras' ``fit()``, ``TrainingCheckpoint``
for a custom loop; both names are still served from here, the path they had before).

TensorFlow is imported when a helper is used, never when this module is imported.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from elastic.agent import FrameworkAdapter
from elastic.errors import ConfigError
from elastic.lazy import require

if TYPE_CHECKING:
    from checkpoint.keras import ElasticCheckpoint, TrainingCheckpoint

__all__ = ["TensorFlowAdapter", "tf_config", "strategy", "TrainingCheckpoint", "ElasticCheckpoint"]


def tf_config(rnd, rank: int) -> Dict[str, Any]:
    """The ``TF_CONFIG`` of global rank ``rank`` in round ``rnd``.

    One ``worker`` task per rank, in rank order; node ``i``'s local rank ``j`` listens on
    ``nodes[i].aux_port + j`` (each node offers ``nproc`` consecutive free ports).
    """
    workers = [f"{_hostport(n.host)}:{n.aux_port + j}" for n in rnd.nodes for j in range(n.nproc)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}


def _hostport(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class TensorFlowAdapter(FrameworkAdapter):
    """Writes ``TF_CONFIG`` (cluster spec and task) for every worker of every round."""

    name = "tensorflow"

    def on_round(self, rnd, fresh_local_ranks: Optional[Sequence[int]] = None) -> None:
        if any(not n.aux_port for n in rnd.nodes):
            raise ConfigError("a node offered no aux ports for TF_CONFIG")

    def worker_env(self, rnd, local_rank: int, rank: int) -> Mapping[str, str]:
        return {"TF_CONFIG": json.dumps(tf_config(rnd, rank), separators=(",", ":"))}


def _tf():
    return require("tensorflow", "launchers.tensorflow")


def _num_workers() -> int:
    try:
        cfg = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        raise ConfigError("TF_CONFIG is not valid JSON") from None
    return len(cfg.get("cluster", {}).get("worker", []))


def strategy(communication: str = "auto"):
    """The distribution strategy for this round: one line at the top of the script.

    More than one worker in ``TF_CONFIG``: ``MultiWorkerMirroredStrategy`` (``communication``:
    ``auto``, ``ring`` or ``nccl``). One worker: ``MirroredStrategy`` over its GPUs if it has
    several, else TensorFlow's default strategy. Call it before any other TensorFlow op, as
    MultiWorkerMirroredStrategy requires.
    """
    tf = _tf()
    impl = {"auto": "AUTO", "ring": "RING", "nccl": "NCCL"}.get(communication.lower())
    if impl is None:
        raise ConfigError(f"strategy(communication={communication!r}): expected auto, ring or nccl")
    if _num_workers() > 1:
        opts = tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(tf.distribute.experimental.CommunicationImplementation, impl))
        return _mwms_class(tf)(communication_options=opts)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _rank(value) -> Optional[int]:
    values = getattr(value, "values", None)
    t = values[0] if isinstance(values, (tuple, list)) and values else value
    shape = getattr(t, "shape", None)
    return None if shape is None else shape.rank


def _mwms_class(tf):
    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """TensorFlow's, with the ``reduce()`` Keras 3's ``fit()`` needs: it reduces an ``(x, y)``
        batch with ``axis=None`` and scalar losses with ``axis=0``, both of which the stock
        multi-worker strategy rejects (nested structures; a reduction axis on a scalar)."""

        def reduce(self, reduce_op, value, axis):
            parent = super(MultiWorkerMirroredStrategy, self).reduce
            if isinstance(value, (tuple, list, dict)):
                return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
            if axis is not None and _rank(value) == 0:
                axis = None  # the mean over replicas of a scalar is the mean over replicas
            return parent(reduce_op, value, axis)

    return MultiWorkerMirroredStrategy


# The checkpoint helpers live in checkpoint.keras now; this module's old names for them stay,
# served on first use, so that importing this module (the agent's adapter) imports no Keras.
_MOVED_TO_CHECKPOINT = ("ElasticCheckpoint", "TrainingCheckpoint")


def __getattr__(name: str):
    if name in _MOVED_TO_CHECKPOINT:
        from checkpoint import keras

        return getattr(keras, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MOVED_TO_CHECKPOINT))
