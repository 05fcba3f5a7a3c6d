"""Errors of the checkpoint package."""

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CheckpointURLError", "CheckpointStateError",
    "CheckpointCorruptError", "CheckpointWriteError", "StaleGenerationError",
    "CheckpointTimeoutError", "CheckpointStorageError",
]

from elastic.errors import ConfigError, ElasticError, UserError


class CheckpointError(ElasticError):
    """Base class of checkpoint errors."""


class CheckpointNotFoundError(CheckpointError, UserError):
    """No (valid) checkpoint exists where one was asked for."""


class CheckpointURLError(CheckpointError, ConfigError):
    """The checkpoint URL is malformed or names a protocol fsspec does not know."""


class CheckpointStateError(CheckpointError, UserError, TypeError):
    """The state handed to ``save()`` (or a ``target`` handed to ``load()``) cannot be stored:
    a leaf that is neither a tensor, an array nor plain JSON-able data, or a mismatch."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's manifest or files fail verification (missing, truncated, bad checksum)."""


class CheckpointWriteError(CheckpointError):
    """A background write failed; raised at the next ``save()`` or ``wait()``."""


class StaleGenerationError(CheckpointError):
    """The writer's rendezvous generation is older than the current one: it may not publish."""


class CheckpointTimeoutError(CheckpointError):
    """Rank 0 waited too long for the other ranks' parts of a checkpoint."""


class CheckpointStorageError(CheckpointError):
    """The storage behind the URL cannot be reached or refuses us (network, credentials,
    permissions, a filesystem fsspec cannot open); the message names the URL and the cause."""
