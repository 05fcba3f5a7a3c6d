"""dataload: sharded datasets on any fsspec URL, a node-local cache and an elastic sampler."""
from .errors import DataLoadError

__all__ = ["DataLoadError"]
