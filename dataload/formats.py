"""Shard formats: NumPy (``.npz``, uncompressed) and Parquet (pyarrow).

A format turns a block of columns into the bytes of one shard file and back into a
:class:`DecodedShard`, which serves single samples and whole batches (one fancy-index per
column, no per-sample Python for fixed-shape columns). Formats are registered by name in
:data:`FORMATS` so a third party can add one.
"""
from __future__ import annotations

import io
import mmap
import os
import struct
import threading
import zipfile
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from elastic.lazy import require

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
    """The columns of one shard (read-only, often mapped); ``take`` gathers a batch into new
    arrays, ``row`` copies one sample."""

    def __init__(self, num_samples: int, columns: Dict[str, Any]) -> None:
        self.num_samples = num_samples
        self.columns = columns

    def row(self, i: int) -> Dict[str, Any]:
        out = {}
        for name, col in self.columns.items():
            if isinstance(col, _VarColumn):
                out[name] = col.get(i)
            elif isinstance(col, np.ndarray):
                out[name] = col[i].copy()  # not a view of a read-only mapped shard
            else:
                out[name] = col[i]
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
        # numpy >= 2.1's stub lets the ** dict fill savez's allow_pickle: bool too (numpy 1.x,
        # which we support, has no such parameter, so it cannot be named here)
        np.savez(buf, **members)  # type: ignore[arg-type]
        return buf.getvalue()

    def decode(self, source: Source, schema: Sequence[Column]) -> DecodedShard:
        """Members are mapped, not read: a shard opens in O(1) and its pages are the node's
        page cache, shared by every process. The zip's per-member CRC is not re-checked here:
        the cache verified the whole file's SHA-256 when it filled it."""
        members = _stored_members(source)
        if members is None:  # compressed or unusual layout: numpy's reader
            return self._decode_copy(source, schema)
        return _columns(schema, members[1])  # (the mapped buffer, its arrays)

    def _decode_copy(self, source: Source, schema: Sequence[Column]) -> DecodedShard:
        src = source if isinstance(source, str) else io.BytesIO(source)
        with np.load(src, allow_pickle=False) as npz:
            return _columns(schema, npz)


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header, 30 bytes


_Layout = List[Tuple[str, np.dtype, Tuple[int, ...], bool, int]]  # name, dtype, shape, F, offset
_LAYOUTS: Dict[Tuple[int, int, int, int], _Layout] = {}
_LAYOUTS_MAX = 4096
_LAYOUTS_LOCK = threading.Lock()


def _stored_members(source: Source) -> Optional[Tuple[Any, Dict[str, np.ndarray]]]:
    """An uncompressed ``.npz`` as read-only arrays over one mapping (or the given bytes).

    ``None`` when a member is compressed or not a plain ``.npy`` (the caller falls back to
    ``np.load``). Object arrays are refused, as ``allow_pickle=False`` would. A file's member
    layout is parsed once per process and kept by (device, inode, size, mtime), so opening a
    shard again is an ``mmap`` and one ``frombuffer`` per member.
    """
    key = None
    if isinstance(source, str):
        with open(source, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size == 0:
                raise ShardFormatError(f"{source}: empty shard file")
            buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        layout = _LAYOUTS.get(key)
    else:
        buf, layout = source, None
    if layout is None:
        layout = _parse_layout(buf)
        if layout is None:
            return None
        if key is not None:
            with _LAYOUTS_LOCK:
                if len(_LAYOUTS) >= _LAYOUTS_MAX:
                    del _LAYOUTS[next(iter(_LAYOUTS))]  # the oldest entry
                _LAYOUTS[key] = layout
    arrays: Dict[str, np.ndarray] = {}
    for name, dtype, shape, fortran, offset in layout:
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
        arrays[name] = arr.reshape(shape, order="F" if fortran else "C")
    return buf, arrays


def _parse_layout(buf: Any) -> Optional[_Layout]:
    try:
        return _parse_members(memoryview(buf), buf)
    except ShardFormatError:
        raise
    except Exception as exc:  # a damaged header (numpy's parser raises several kinds)
        raise ShardFormatError(f"not a readable npz shard: {exc!r}") from None


def _parse_members(view: memoryview, buf: Any) -> Optional[_Layout]:
    try:
        # an mmap is a seekable file; zipfile reads just the directory through it
        # (typeshed wants IO[bytes]; mmap has the read/seek/tell zipfile uses but is no IO subclass)
        infos = zipfile.ZipFile(buf if isinstance(buf, mmap.mmap) else io.BytesIO(buf)).infolist()  # type: ignore[arg-type]
    except zipfile.BadZipFile as exc:
        raise ShardFormatError(f"not an npz shard: {exc}") from None
    layout: _Layout = []
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
            return None
        at = info.header_offset
        sig, _v, _flags, _method, _t, _d, _crc, _cs, _us, name_len, extra_len = \
            _LOCAL_HEADER.unpack_from(view, at)
        if sig != b"PK\x03\x04":
            raise ShardFormatError(f"npz member {info.filename}: bad local header")
        start = at + _LOCAL_HEADER.size + name_len + extra_len
        head = io.BytesIO(view[start:start + min(info.file_size, 1 << 16)])
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            return None
        if dtype.hasobject:
            raise ShardFormatError(f"npz member {info.filename}: object arrays are not loaded")
        offset = start + head.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + nbytes > min(start + info.file_size, len(view)):
            raise ShardFormatError(f"npz member {info.filename}: truncated")
        layout.append((info.filename[:-4], dtype, tuple(shape), bool(fortran), offset))
    return layout


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


def _columns(schema: Sequence[Column], members) -> DecodedShard:
    """A shard's columns from its arrays (``members[name]``: a mapping or an open ``.npz``)."""
    columns: Dict[str, Any] = {}
    n = -1
    try:
        for col in schema:
            if col.kind == "array":
                columns[col.name] = members[col.name]
                n = len(columns[col.name])
            else:
                offsets = members[col.name + _OFFSETS]
                columns[col.name] = _VarColumn(members[col.name], offsets, col.kind == "str")
                n = len(offsets) - 1
    except KeyError as exc:
        raise ShardFormatError(f"shard has no member {exc.args[0]!r}") from None
    return DecodedShard(max(n, 0), columns)
