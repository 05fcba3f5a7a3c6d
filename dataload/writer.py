"""The shard writer: arrays, a folder of files or a Parquet table -> shards + ``index.json``.

Shards are written first and the index last, so a reader never sees a dataset whose index
names a shard that is not there yet. Each shard's SHA-256 goes in the index; caches verify it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from elastic.lazy import require

from ._fs import join, url_to_fs
from .api import INDEX_NAME, Column, DatasetIndex, ShardInfo
from .errors import ShardFormatError
from .formats import ParquetFormat, arrow_columns, get_format, schema_of

__all__ = ["write_shards", "DEFAULT_SHARD_SIZE_BYTES"]

log = logging.getLogger("dataload")
DEFAULT_SHARD_SIZE_BYTES = 64 << 20


def write_shards(source: Any, url: str, *, format: str = "npy",
                 samples_per_shard: Optional[int] = None,
                 shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
                 storage_options: Optional[Mapping[str, Any]] = None,
                 metadata: Optional[Mapping[str, Any]] = None,
                 overwrite: bool = False) -> DatasetIndex:
    """Write ``source`` as a sharded dataset at ``url`` (any fsspec URL) and return its index.

    ``source`` is a mapping of column name -> array (first axis: samples) or list of
    bytes/str; a single array (column ``data``); a ``pyarrow.Table``; or a path to a folder
    (one sample per file: columns ``name`` and ``data``), a ``.parquet``, ``.npy`` or ``.npz``
    file. Shards hold ``samples_per_shard`` samples, or about ``shard_size_bytes`` each.
    """
    fmt = get_format(format)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ShardFormatError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_size_bytes < 1:
        raise ShardFormatError(f"shard_size_bytes must be >= 1, got {shard_size_bytes}")
    fs, root = url_to_fs(url, storage_options)
    index_path = join(root, INDEX_NAME)
    if fs.exists(index_path) and not overwrite:
        raise ShardFormatError(f"{url} already holds a dataset; pass overwrite=True to replace it")

    schema, blocks = _blocks(source, fmt.name, samples_per_shard, shard_size_bytes)
    fs.makedirs(root, exist_ok=True)
    shards: List[ShardInfo] = []
    for i, block in enumerate(blocks):
        if isinstance(fmt, ParquetFormat) and not isinstance(block, dict):
            data = fmt.encode_table(block)
            n = block.num_rows
        else:
            data = fmt.encode(block, schema)
            n = len(block[schema[0].name])
        if n == 0:
            continue
        name = f"shard-{i:05d}{fmt.suffix}"
        fs.pipe_file(join(root, name), data)
        shards.append(ShardInfo(name, n, len(data), hashlib.sha256(data).hexdigest()))
        log.debug("wrote %s: %d samples, %d bytes", name, n, len(data))
    if not shards:
        raise ShardFormatError("the source holds no samples")
    index = DatasetIndex(fmt.name, schema, tuple(shards), dict(metadata or {}))
    fs.pipe_file(index_path, index.to_json().encode())
    log.info("wrote %d samples in %d shards (%d bytes) to %s",
             index.num_samples, len(shards), index.size_bytes, url)
    return index


def _blocks(source: Any, fmt: str, per_shard: Optional[int],
            shard_bytes: int) -> Tuple[Tuple[Column, ...], Iterator[Any]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _folder_blocks(path, per_shard, shard_bytes)
        if not os.path.exists(path):
            raise ShardFormatError(f"no such file or folder: {path}")
        if path.endswith(".parquet"):
            pq = require("pyarrow.parquet", "reading a Parquet source")
            source = pq.read_table(path)
        elif path.endswith(".npy"):
            source = {"data": np.load(path, allow_pickle=False)}
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                source = {k: npz[k] for k in npz.files}
        else:
            raise ShardFormatError(
                f"cannot make shards of {path}: expected a folder, .parquet, .npy or .npz")
    if isinstance(source, np.ndarray):
        source = {"data": source}
    if _is_arrow_table(source):
        return _table_blocks(source, fmt, per_shard, shard_bytes)
    if not isinstance(source, Mapping):
        raise ShardFormatError(f"cannot make shards of a {type(source).__name__}")
    columns = dict(source)
    schema = schema_of(columns)
    n = len(columns[schema[0].name])
    per_shard = per_shard or _per_shard(_nbytes(columns), n, shard_bytes)

    def gen() -> Iterator[Dict[str, Any]]:
        for start in range(0, n, per_shard):
            yield {c.name: columns[c.name][start:start + per_shard] for c in schema}

    return schema, gen()


def _per_shard(total_bytes: int, n: int, shard_bytes: int) -> int:
    return max(1, int(shard_bytes // max(1.0, total_bytes / max(1, n))))


def _nbytes(columns: Mapping[str, Any]) -> int:
    total = 0
    for values in columns.values():
        if isinstance(values, np.ndarray) and values.dtype != object:
            total += values.nbytes
        else:
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in values)
    return total


def _folder_blocks(path: str, per_shard: Optional[int],
                   shard_bytes: int) -> Tuple[Tuple[Column, ...], Iterator[Any]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            files.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    if not files:
        raise ShardFormatError(f"folder {path} holds no files")
    schema = (Column("name", "str"), Column("data", "bytes"))

    def gen() -> Iterator[Dict[str, Any]]:
        names: List[str] = []
        datas: List[bytes] = []
        size = 0
        for rel, full in files:
            with open(full, "rb") as f:
                data = f.read()
            names.append(rel)
            datas.append(data)
            size += len(data)
            if (per_shard and len(names) >= per_shard) or (not per_shard and size >= shard_bytes):
                yield {"name": names, "data": datas}
                names, datas, size = [], [], 0
        if names:
            yield {"name": names, "data": datas}

    return schema, gen()


def _is_arrow_table(obj: Any) -> bool:
    return type(obj).__module__.startswith("pyarrow") and hasattr(obj, "num_rows") \
        and hasattr(obj, "slice")


def _arrow_schema(table: Any) -> Tuple[Column, ...]:
    pa = require("pyarrow", "Parquet sources")
    cols = []
    for field in table.schema:
        t, shape = field.type, []
        while pa.types.is_fixed_size_list(t):
            shape.append(t.list_size)
            t = t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            dtype = np.dtype(t.to_pandas_dtype()).str
            cols.append(Column(field.name, "array", dtype, tuple(shape)))
        elif shape:
            cols.append(Column(field.name, "object"))
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            cols.append(Column(field.name, "bytes"))
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            cols.append(Column(field.name, "str"))
        else:
            cols.append(Column(field.name, "object"))
    return tuple(cols)


def _table_blocks(table: Any, fmt: str, per_shard: Optional[int],
                  shard_bytes: int) -> Tuple[Tuple[Column, ...], Iterator[Any]]:
    schema = _arrow_schema(table)
    n = table.num_rows
    per_shard = per_shard or _per_shard(table.nbytes, n, shard_bytes)

    def gen() -> Iterator[Any]:
        for start in range(0, n, per_shard):
            part = table.slice(start, per_shard)
            if fmt == "parquet":
                yield part
                continue
            yield arrow_columns(part, schema)

    return schema, gen()
