"""Errors of the checkpoint package."""
from elastic.errors import ElasticError, UserError


class CheckpointError(ElasticError):
    """Base class of checkpoint errors."""


class CheckpointNotFoundError(CheckpointError, UserError):
    """No (valid) checkpoint exists where one was asked for."""
