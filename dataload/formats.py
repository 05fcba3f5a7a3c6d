"""Shard formats: NumPy (``.npz``, uncompressed) and Parquet (pyarrow).

A format turns a block of columns into the bytes of one shard file and back into a
:class:`DecodedShard`, which serves single samples and whole batches (one fancy-index per
column, no per-sample Python for fixed-shape columns). Formats are registered by name in
:data:`FORMATS` so a third party can add one.
"""
from __future__ import annotations

import io
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from elastic._lazy import require

from .api import Column
from .errors import ShardFormatError

__all__ = ["ShardFormat", "DecodedShard", "NpzFormat", "ParquetFormat", "FORMATS", "get_format"]

_OFFSETS = "@offsets"
Source = Union[str, bytes, memoryview]


class _VarColumn:
    """Variable-length bytes or text: one flat byte buffer plus ``n + 1`` offsets."""

    __slots__ = ("data", "offsets", "text")

    def __init__(self, data: np.ndarray, offsets: np.ndarray, text: bool) -> None:
        self.data, self.offsets, self.text = data, offsets, text

    def get(self, i: int) -> Any:
        raw = self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()
        return raw.decode("utf-8") if self.text else raw

    def take(self, rows: np.ndarray) -> List[Any]:
        return [self.get(int(i)) for i in rows]


class DecodedShard:
    """The columns of one shard in memory; ``take`` gathers a batch, ``row`` one sample."""

    def __init__(self, num_samples: int, columns: Dict[str, Any]) -> None:
        self.num_samples = num_samples
        self.columns = columns

    def row(self, i: int) -> Dict[str, Any]:
        out = {}
        for name, col in self.columns.items():
            out[name] = col.get(i) if isinstance(col, _VarColumn) else col[i]
        return out

    def take(self, rows: np.ndarray) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name, col in self.columns.items():
            if isinstance(col, _VarColumn):
                out[name] = col.take(rows)
            elif isinstance(col, np.ndarray):
                out[name] = col[rows]
            else:
                out[name] = [col[int(i)] for i in rows]
        return out


class ShardFormat(ABC):
    """How one shard is laid out in a file."""

    name: str = ""
    suffix: str = ""

    @abstractmethod
    def encode(self, columns: Mapping[str, Any], schema: Sequence[Column]) -> bytes:
        """Columns (each ``num_samples`` long) -> the bytes of one shard file."""

    @abstractmethod
    def decode(self, source: Source, schema: Sequence[Column]) -> DecodedShard:
        """A local path or the shard's bytes -> its columns."""


class NpzFormat(ShardFormat):
    """An uncompressed ``.npz``: one member per fixed-shape column, two per variable one."""

    name = "npy"
    suffix = ".npz"

    def encode(self, columns: Mapping[str, Any], schema: Sequence[Column]) -> bytes:
        members: Dict[str, np.ndarray] = {}
        for col in schema:
            values = columns[col.name]
            if col.kind == "array":
                members[col.name] = np.ascontiguousarray(values)
            elif col.kind in ("bytes", "str"):
                raws = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
                offsets = np.zeros(len(raws) + 1, dtype=np.int64)
                np.cumsum([len(r) for r in raws], out=offsets[1:])
                members[col.name] = np.frombuffer(b"".join(raws), dtype=np.uint8)
                members[col.name + _OFFSETS] = offsets
            else:
                raise ShardFormatError(f"column {col.name!r}: the npy format cannot hold "
                                       f"{col.kind!r} values; use format='parquet'")
        buf = io.BytesIO()
        np.savez(buf, **members)
        return buf.getvalue()

    def decode(self, source: Source, schema: Sequence[Column]) -> DecodedShard:
        src = source if isinstance(source, str) else io.BytesIO(source)
        with np.load(src, allow_pickle=False) as npz:
            columns: Dict[str, Any] = {}
            n = -1
            for col in schema:
                if col.kind == "array":
                    columns[col.name] = npz[col.name]
                    n = len(columns[col.name])
                else:
                    offsets = npz[col.name + _OFFSETS]
                    columns[col.name] = _VarColumn(npz[col.name], offsets, col.kind == "str")
                    n = len(offsets) - 1
        return DecodedShard(max(n, 0), columns)


class ParquetFormat(ShardFormat):
    """One Parquet file per shard; multi-dimensional arrays become fixed-size lists."""

    name = "parquet"
    suffix = ".parquet"

    def __init__(self, compression: str = "none") -> None:
        self.compression = compression

    def encode(self, columns: Mapping[str, Any], schema: Sequence[Column]) -> bytes:
        pa = require("pyarrow", "Parquet shards")
        arrays, names = [], []
        for col in schema:
            values = columns[col.name]
            if col.kind == "array":
                arr = np.ascontiguousarray(values)
                flat = pa.array(arr.reshape(-1))
                for size in reversed(arr.shape[1:]):
                    flat = pa.FixedSizeListArray.from_arrays(flat, int(size))
                arrays.append(flat)
            elif col.kind == "bytes":
                arrays.append(pa.array([bytes(v) for v in values], pa.binary()))
            elif col.kind == "str":
                arrays.append(pa.array(list(values), pa.string()))
            else:
                arrays.append(pa.array(list(values)))
            names.append(col.name)
        return self.encode_table(pa.Table.from_arrays(arrays, names=names))

    def encode_table(self, table: Any) -> bytes:
        pq = require("pyarrow.parquet", "Parquet shards")
        pa = require("pyarrow", "Parquet shards")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=self.compression)
        return sink.getvalue().to_pybytes()

    def decode(self, source: Source, schema: Sequence[Column]) -> DecodedShard:
        pa = require("pyarrow", "Parquet shards")
        pq = require("pyarrow.parquet", "Parquet shards")
        src = source if isinstance(source, str) else pa.BufferReader(source)
        table = pq.read_table(src, columns=[c.name for c in schema])
        return DecodedShard(table.num_rows, arrow_columns(table, schema))


def arrow_columns(table: Any, schema: Sequence[Column]) -> Dict[str, Any]:
    """A pyarrow table's columns as NumPy arrays (array columns) or lists (the rest)."""
    columns: Dict[str, Any] = {}
    for col in schema:
        chunked = table.column(col.name)
        if col.kind == "array":
            arr = chunked.combine_chunks()
            for _ in col.shape:
                arr = arr.flatten()
            values = arr.to_numpy(zero_copy_only=False)
            columns[col.name] = values.reshape((table.num_rows, *col.shape))
        else:
            columns[col.name] = chunked.to_pylist()
    return columns


FORMATS: Dict[str, ShardFormat] = {"npy": NpzFormat(), "parquet": ParquetFormat()}


def get_format(name: str) -> ShardFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ShardFormatError(
            f"unknown shard format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


def schema_of(columns: Mapping[str, Any]) -> Tuple[Column, ...]:
    """Infer columns from a mapping of name -> array / list of bytes / list of str."""
    out = []
    n = None
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            if values.dtype == object or values.dtype.kind in "USV":
                first = values[0] if len(values) else ""
                kind = "str" if isinstance(first, str) else "bytes"
                out.append(Column(str(name), kind))
            else:
                if values.ndim == 0:
                    raise ShardFormatError(f"column {name!r}: a 0-d array has no samples")
                out.append(Column(str(name), "array", values.dtype.str, tuple(values.shape[1:])))
        elif isinstance(values, (list, tuple)):
            first = values[0] if len(values) else b""
            if isinstance(first, str):
                out.append(Column(str(name), "str"))
            elif isinstance(first, (bytes, bytearray, memoryview)):
                out.append(Column(str(name), "bytes"))
            else:
                try:
                    arr = np.asarray(values)
                except ValueError:
                    arr = np.empty(0, dtype=object)
                if arr.dtype == object:
                    out.append(Column(str(name), "object"))
                else:
                    out.append(Column(str(name), "array", arr.dtype.str, tuple(arr.shape[1:])))
        else:
            raise ShardFormatError(
                f"column {name!r}: expected an array or a list, got {type(values).__name__}")
        if n is None:
            n = len(values)
        elif len(values) != n:
            raise ShardFormatError(f"column {name!r} has {len(values)} samples, others {n}")
    if not out:
        raise ShardFormatError("no columns to write")
    return tuple(out)
