"""checkpoint: fault-tolerant, async, checksummed, reshardable checkpoints on any fsspec URL."""
from .errors import CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointError", "CheckpointNotFoundError"]
