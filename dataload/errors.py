"""Errors of the dataload package."""
from elastic.errors import ElasticError


class DataLoadError(ElasticError):
    """Base class of data-loading errors."""
