"""The on-disk format: file names and the typed, versioned records behind every JSON we write.

Layout under the URL (one directory per step)::

    step-000000000100/
        r00000-of-00002.g3.safetensors   # rank 0's tensor bytes (standard safetensors)
        r00000-of-00002.g3.part.json     # rank 0's done-marker: a Part
        r00001-of-00002.g3.safetensors
        r00001-of-00002.g3.part.json
        manifest.json                    # a Manifest, written last by rank 0: THE commit

The node-memory tier describes its slot with a :class:`SlotMeta`. Records are frozen
dataclasses; ``to_json`` gives the exact dict that is written (key order included, so files
stay byte-compatible across versions of this code) and ``from_json`` checks what it reads:
anything malformed, of another format or of a newer version is a :class:`CheckpointCorruptError`.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from ._tree import ST_DTYPES
from .errors import CheckpointCorruptError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "KINDS", "PieceEntry", "TensorEntry", "FileEntry",
    "Part", "Manifest", "SlotMeta", "step_dirname", "step_of_dirname", "rank_file_base",
    "part_name", "generation_of", "safetensors_header", "dumps",
]

FORMAT = "elastic-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("replicated", "sharded", "per_rank")
HEADER_ALIGN = 4096
_STEP_RE = re.compile(r"^step-(\d{12})$")
_GEN_RE = re.compile(r"\.g(\d+)\.")


# ----------------------------------------------------------------------------- names
def step_dirname(step: int) -> str:
    return f"step-{step:012d}"


def step_of_dirname(name: str) -> Optional[int]:
    """The step a directory name stands for, or None for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def rank_file_base(rank: int, world_size: int, generation: int) -> str:
    """The common stem of a rank's data file and part file."""
    return f"r{rank:05d}-of-{world_size:05d}.g{generation}"


def part_name(rank: int, world_size: int, generation: int) -> str:
    return f"{rank_file_base(rank, world_size, generation)}.part.json"


def generation_of(name: str) -> Optional[int]:
    """The writer's generation in a rank file's name, or None."""
    m = _GEN_RE.search(name)
    return int(m.group(1)) if m else None


def dumps(record: Any) -> bytes:
    """A record as the compact JSON bytes that are written."""
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


def safetensors_header(entries: Iterable[Tuple[str, str, Tuple[int, ...], int, int]],
                       metadata: Dict[str, str]) -> bytes:
    """A safetensors header for ``(name, dtype, shape, begin, end)`` entries (offsets past the
    header), padded with spaces to a multiple of 4 KiB so the data starts page-aligned."""
    head: Dict[str, Any] = {"__metadata__": metadata}
    for name, dtype, shape, begin, end in entries:
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    body = json.dumps(head, separators=(",", ":")).encode()
    total = 8 + len(body)
    padded = -(-total // HEADER_ALIGN) * HEADER_ALIGN
    body += b" " * (padded - total)
    return struct.pack("<Q", len(body)) + body


# ----------------------------------------------------------------------------- checks
def _bad(where: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where}: {what}")


def _field(d: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise _bad(where, f"missing field {key!r}") from None


def _int(d: Mapping[str, Any], key: str, where: str, low: Optional[int] = None) -> int:
    v = _field(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        raise _bad(where, f"field {key!r} is {v!r}, not an integer"
                   + (f" >= {low}" if low is not None else ""))
    return v


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = _field(d, key, where)
    if not isinstance(v, str):
        raise _bad(where, f"field {key!r} is {v!r}, not a string")
    return v


def _ints(d: Mapping[str, Any], key: str, where: str) -> Tuple[int, ...]:
    v = _field(d, key, where)
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0
                                      for x in v):
        raise _bad(where, f"field {key!r} is {v!r}, not a list of non-negative integers")
    return tuple(v)


def _loads(data: bytes, where: str, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise _bad(where, f"unreadable {what}: {exc}") from exc


def _obj(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, dict):
        raise _bad(where, f"expected an object, got {type(d).__name__}")
    return d


def _header(d: Any, where: str, versioned: bool = True) -> Mapping[str, Any]:
    """Check the format name (and version) that every top-level record carries."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _bad(where, f"not an {FORMAT} record")
    if versioned:
        version = _int(d, "version", where)
        if not 1 <= version <= FORMAT_VERSION:
            raise _bad(where, f"format version {version}; this elastic-run reads versions 1 to "
                       f"{FORMAT_VERSION} (written by a newer one?)")
    return d


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PieceEntry:
    """A block of a tensor stored at bytes ``begin:end`` of ``file`` (a data file, or
    ``"slot"``); ``name`` is its safetensors entry (none in the memory tier)."""

    file: str
    offsets: Tuple[int, ...]
    shape: Tuple[int, ...]
    begin: int
    end: int
    name: Optional[str] = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"file": self.file}
        if self.name is not None:
            d["name"] = self.name
        d.update(offsets=list(self.offsets), shape=list(self.shape), begin=self.begin,
                 end=self.end)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "PieceEntry":
        d = _obj(d, where)
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(where, f"piece name {name!r} is not a string")
        offsets, shape = _ints(d, "offsets", where), _ints(d, "shape", where)
        begin, end = _int(d, "begin", where, 0), _int(d, "end", where, 0)
        if len(offsets) != len(shape) or end < begin:
            raise _bad(where, f"piece at {list(offsets)} of shape {list(shape)}, bytes "
                       f"{begin}:{end} is inconsistent")
        return cls(_str(d, "file", where), offsets, shape, begin, end, name)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the state: its dtype (a safetensors name), global shape, kind
    (``replicated``, ``sharded`` or ``per_rank``) and the pieces that hold its bytes."""

    dtype: str
    shape: Tuple[int, ...]
    kind: str
    pieces: Tuple[PieceEntry, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def with_pieces(self, pieces: Iterable[PieceEntry]) -> "TensorEntry":
        return TensorEntry(self.dtype, self.shape, self.kind, tuple(pieces))

    def to_json(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "kind": self.kind,
                "pieces": [p.to_json() for p in self.pieces]}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "TensorEntry":
        d = _obj(d, where)
        dtype, kind = _str(d, "dtype", where), _str(d, "kind", where)
        if dtype not in ST_DTYPES:
            raise _bad(where, f"unknown dtype {dtype!r}")
        if kind not in KINDS:
            raise _bad(where, f"unknown tensor kind {kind!r}")
        shape = _ints(d, "shape", where)
        pieces = _field(d, "pieces", where)
        if not isinstance(pieces, list):
            raise _bad(where, "field 'pieces' is not a list")
        out = tuple(PieceEntry.from_json(p, f"{where} piece {i}") for i, p in enumerate(pieces))
        for p in out:
            if len(p.shape) != len(shape):
                raise _bad(where, f"a piece of shape {list(p.shape)} in a tensor of shape "
                           f"{list(shape)}")
        return cls(dtype, shape, kind, out)


def _tensors_json(tensors: Mapping[str, TensorEntry]) -> Dict[str, Any]:
    return {k: t.to_json() for k, t in tensors.items()}


def _tensors(d: Mapping[str, Any], where: str) -> Dict[str, TensorEntry]:
    v = _obj(_field(d, "tensors", where), f"{where} tensors")
    return {k: TensorEntry.from_json(t, f"{where} tensor {k!r}") for k, t in v.items()}


@dataclass(frozen=True)
class FileEntry:
    """A data file of a step: its name, size and CRC-32."""

    name: str
    size_bytes: int
    crc32: int

    def to_json(self) -> Dict[str, Any]:  # the manifest's spelling
        return {"name": self.name, "size_bytes": self.size_bytes,
                "checksum": f"crc32:{self.crc32:08x}"}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "FileEntry":
        d = _obj(d, where)
        name = _str(d, "name", where)
        algo, _, value = str(_field(d, "checksum", where)).partition(":")
        if algo != "crc32":
            raise _bad(where, f"{name}: unknown checksum {d['checksum']!r}")
        return cls(name, _int(d, "size_bytes", where, 0), _hex(value, f"{where}: {name}"))


def _hex(value: Any, where: str) -> int:
    try:
        return int(value, 16)
    except (TypeError, ValueError):
        raise _bad(where, f"malformed checksum {value!r}") from None


@dataclass(frozen=True)
class Part:
    """One rank's share of a step, published once its data file is durable (the done-marker
    rank 0 waits for). ``tree`` is the rank's encoded state structure."""

    step: int
    rank: int
    world_size: int
    generation: int
    file: FileEntry
    tensors: Mapping[str, TensorEntry]
    tree: Any
    version: int = FORMAT_VERSION

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "step": self.step, "rank": self.rank,
                "world_size": self.world_size, "generation": self.generation,
                "file": {"name": self.file.name, "size_bytes": self.file.size_bytes,
                         "crc32": f"{self.file.crc32:08x}"},
                "tensors": _tensors_json(self.tensors), "tree": self.tree}

    @classmethod
    def from_json(cls, d: Any, where: str = "part") -> "Part":
        d = _header(d, where)
        f = _obj(_field(d, "file", where), f"{where} file")
        name = _str(f, "name", where)
        file = FileEntry(name, _int(f, "size_bytes", where, 0),
                         _hex(_field(f, "crc32", where), f"{where}: {name}"))
        return cls(_int(d, "step", where, 0), _int(d, "rank", where, 0),
                   _int(d, "world_size", where, 1), _int(d, "generation", where), file,
                   _tensors(d, where), _field(d, "tree", where), d["version"])

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Part":
        return cls.from_json(_loads(data, where, "part"), where)


@dataclass(frozen=True)
class Manifest:
    """A committed step: every rank's file and tree, and every tensor's merged pieces."""

    step: int
    generation: int
    world_size: int
    created_unix_s: float
    files: Tuple[FileEntry, ...]
    tensors: Mapping[str, TensorEntry]
    trees: Tuple[Any, ...]
    version: int = FORMAT_VERSION

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def tree_for(self, rank: int) -> Any:
        """The tree ``rank`` loads: its own, or rank 0's for a rank the saving world lacked."""
        return self.trees[rank if rank < self.world_size else 0]

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "step": self.step,
                "generation": self.generation, "world_size": self.world_size,
                "created_unix_s": self.created_unix_s,
                "files": [f.to_json() for f in self.files],
                "tensors": _tensors_json(self.tensors), "trees": list(self.trees)}

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT or "files" not in d:
            raise _bad(where, f"not an {FORMAT} manifest")
        d = _header(d, where)
        world_size = _int(d, "world_size", where, 1)
        files, trees = _field(d, "files", where), _field(d, "trees", where)
        if not isinstance(files, list) or not isinstance(trees, list):
            raise _bad(where, "fields 'files' and 'trees' must be lists")
        if len(trees) != world_size:
            raise _bad(where, f"{len(trees)} trees for a world of {world_size}")
        created = d.get("created_unix_s", 0.0)
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise _bad(where, f"field 'created_unix_s' is {created!r}, not a number")
        return cls(_int(d, "step", where, 0), _int(d, "generation", where), world_size,
                   float(created),
                   tuple(FileEntry.from_json(f, f"{where} file {i}") for i, f in enumerate(files)),
                   _tensors(d, where), tuple(trees), d["version"])

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Manifest":
        return cls.from_json(_loads(data, where, "manifest"), where)


@dataclass(frozen=True)
class SlotMeta:
    """What the node-memory slot holds: one rank's snapshot of a step, its pieces at byte
    ranges of the slot (``file`` ``"slot"``). Unversioned: a slot never outlives a node."""

    step: int
    generation: int
    rank: int
    world_size: int
    url: str
    data_bytes: int
    tree: Any
    tensors: Mapping[str, TensorEntry]

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "step": self.step, "generation": self.generation,
                "rank": self.rank, "world_size": self.world_size, "url": self.url,
                "data_bytes": self.data_bytes, "tree": self.tree,
                "tensors": _tensors_json(self.tensors)}

    @classmethod
    def from_json(cls, d: Any, where: str = "slot") -> "SlotMeta":
        d = _header(d, where, versioned=False)
        return cls(_int(d, "step", where, 0), _int(d, "generation", where),
                   _int(d, "rank", where, 0), _int(d, "world_size", where, 1),
                   _str(d, "url", where), _int(d, "data_bytes", where, 0),
                   _field(d, "tree", where), _tensors(d, where))
