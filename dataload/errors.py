"""Errors of the dataload package.

Everything derives from :class:`DataLoadError` (rooted in ``elastic.ElasticError``); the
ones a user can fix (a wrong URL, a bad argument, a state from another dataset, a cache too
small for one shard) are also :class:`~elastic.errors.UserError`.
"""
from elastic.errors import ElasticError, UserError

__all__ = [
    "DataLoadError",
    "DatasetIndexError",
    "ShardFormatError",
    "ChecksumError",
    "CacheError",
    "CacheTooSmallError",
    "SamplerStateError",
]


class DataLoadError(ElasticError):
    """Base class of data-loading errors."""


class DatasetIndexError(DataLoadError, UserError):
    """The dataset's index file is missing, unreadable or malformed."""


class ShardFormatError(DataLoadError, UserError):
    """An unknown shard format, or input the shard writer cannot turn into shards."""


class ChecksumError(DataLoadError):
    """A shard's bytes do not match the size or checksum its index records."""


class CacheError(DataLoadError):
    """The node-local cache could not store or serve a shard."""


class CacheTooSmallError(CacheError, UserError):
    """A shard is larger than the whole cache bound."""


class SamplerStateError(DataLoadError, UserError):
    """A sampler state that does not belong to this dataset, or is malformed."""
