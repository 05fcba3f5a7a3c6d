"""dataload: sharded datasets on any fsspec URL, a node-local cache and an elastic sampler.

::

    import dataload
    dataload.write_shards({"x": x, "y": y}, "s3://bucket/ds")       # once
    ds = dataload.ShardedDataset("s3://bucket/ds", cache_dir="/local/cache",
                                 cache_max_bytes="50GiB")
    loader = dataload.ElasticDataLoader(ds, batch_size=64, num_workers=2)
    loader.load_state_dict(saved)        # any world size; no replay
    for batch in loader: ...
    saved = loader.state_dict()          # plain JSON: seed, epoch, global position

Heavy dependencies (torch, tensorflow, pyarrow, s3fs) are imported on first use.
"""
from .api import INDEX_NAME, Column, DatasetIndex, ShardInfo
from .cache import FillProgress, FillStats, ShardCache, parse_size
from .dataset import ShardedDataset
from .errors import (CacheError, CacheTooSmallError, ChecksumError, DataLoadError,
                     DatasetIndexError, SamplerStateError, ShardFormatError)
from .formats import FORMATS, DecodedShard, ShardFormat
from .loader import ElasticDataLoader, ElasticNumpyLoader, collate_columns
from .sampler import ElasticSampler, rank_slices
from .tfdata import ElasticTFDataset, to_tf_dataset
from .writer import write_shards

__all__ = [
    "INDEX_NAME", "Column", "DatasetIndex", "ShardInfo",
    "FillProgress", "FillStats", "ShardCache", "parse_size",
    "ShardedDataset",
    "DataLoadError", "DatasetIndexError", "ShardFormatError", "ChecksumError", "CacheError",
    "CacheTooSmallError", "SamplerStateError",
    "FORMATS", "DecodedShard", "ShardFormat",
    "ElasticDataLoader", "ElasticNumpyLoader", "collate_columns",
    "ElasticSampler", "rank_slices",
    "ElasticTFDataset", "to_tf_dataset",
    "write_shards",
]
