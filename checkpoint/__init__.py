"""checkpoint: fault-tolerant, async, checksummed, reshardable checkpoints on any fsspec URL.

>>> ck = Checkpointer("s3://bucket/run1", keep=2)
>>> ck.save(step, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step})
>>> state = ck.load()          # newest good checkpoint; a damaged one is skipped

Importing this package imports no framework; torch / TensorFlow are touched only when their
tensors are saved or loaded.
"""
from .api import CheckpointInfo, LoadInfo, PerRank, Shard
from .checkpointer import Checkpointer
from .errors import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                     CheckpointStateError, CheckpointStorageError, CheckpointTimeoutError,
                     CheckpointURLError, CheckpointWriteError, StaleGenerationError)

__all__ = [
    "Checkpointer", "Shard", "PerRank", "CheckpointInfo", "LoadInfo",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointURLError", "CheckpointStateError",
    "CheckpointCorruptError", "CheckpointWriteError", "StaleGenerationError",
    "CheckpointTimeoutError", "CheckpointStorageError",
]
