"""Errors of the profiler package."""
from elastic.errors import ElasticError


class ProfilerError(ElasticError):
    """Base class of profiler errors."""
