"""The TensorFlow path: a ``tf.data.Dataset`` fed by the elastic sampler, with its state."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from elastic.lazy import require
from elastic.world import World

from .dataset import ShardedDataset
from .errors import ShardFormatError
from .loader import ElasticNumpyLoader

__all__ = ["ElasticTFDataset", "to_tf_dataset"]


class ElasticTFDataset(ElasticNumpyLoader):
    """An elastic loader whose :attr:`dataset_tf` is a ``tf.data.Dataset`` of batches.

    Each pass over ``dataset_tf`` yields the rest of the current epoch for this rank (dicts of
    tensors; ``bytes``/``str`` columns as ``tf.string``). tf.data pulls from its generator
    ahead of the model, so each batch also carries its own global position and epoch
    (``_position``, ``_epoch``): ``state_dict(batch)`` gives the exact state after that batch,
    whatever tf.data buffered. ``state_dict()`` alone counts what the generator handed over.
    """

    def state_dict(self, batch: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        state = super().state_dict()
        if batch is not None:
            state["epoch"] = int(np.asarray(batch["_epoch"]))
            state["position"] = int(np.asarray(batch["_position"]))
        return state

    def __init__(self, dataset: ShardedDataset, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        self.dataset_tf = self._make()

    def _make(self) -> Any:
        tf = require("tensorflow", "the tf.data adapter")
        spec: Dict[str, Any] = {}
        for col in self.dataset.columns:
            if col.kind == "array":
                spec[col.name] = tf.TensorSpec((None, *col.shape), tf.as_dtype(np.dtype(col.dtype)))
            elif col.kind in ("bytes", "str"):
                spec[col.name] = tf.TensorSpec((None,), tf.string)
            else:
                raise ShardFormatError(
                    f"column {col.name!r} ({col.kind}) has no tf.data type")

        spec["_position"] = tf.TensorSpec((), tf.int64)
        spec["_epoch"] = tf.TensorSpec((), tf.int64)

        def gen():
            for batch in iter(self):
                out = {"_position": np.int64(self.sampler.position),
                       "_epoch": np.int64(self.sampler.epoch)}
                out.update({k: (v if isinstance(v, np.ndarray) else
                           np.array([x.encode() if isinstance(x, str) else x for x in v],
                                    dtype=object)) for k, v in batch.items()})
                yield out

        return tf.data.Dataset.from_generator(gen, output_signature=spec)


def to_tf_dataset(dataset: ShardedDataset, batch_size: int, *, world: Optional[World] = None,
                  seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                  block_shards: int = 4, prefetch_shards: int = 2) -> ElasticTFDataset:
    """An :class:`ElasticTFDataset`; iterate ``.dataset_tf``, checkpoint ``.state_dict()``."""
    return ElasticTFDataset(dataset, batch_size, world=world, seed=seed, shuffle=shuffle,
                            drop_last=drop_last, block_shards=block_shards,
                            prefetch_shards=prefetch_shards)
