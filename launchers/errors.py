"""Errors of the launchers package."""
from elastic.errors import ElasticError


class LauncherError(ElasticError):
    """Base class of launcher errors."""
