"""Records of a sharded dataset: its columns, its shards and the index file that lists them.

A dataset is a folder (any fsspec URL) of shard files plus ``index.json``, written last so a
half-written dataset has no index. The index records, for every shard, its sample count, size
and SHA-256, so a cache can verify what it fills and key it by content.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import DatasetIndexError

__all__ = ["INDEX_NAME", "Column", "ShardInfo", "DatasetIndex"]

INDEX_NAME = "index.json"
_INDEX_FORMAT = "elastic-shards"
_INDEX_VERSION = 1
COLUMN_KINDS = ("array", "bytes", "str", "object")


@dataclass(frozen=True)
class Column:
    """One field of every sample.

    ``kind`` is ``array`` (fixed ``dtype`` and per-sample ``shape``; batches stack), ``bytes``
    or ``str`` (variable length), or ``object`` (anything else a Parquet table holds).
    """

    name: str
    kind: str
    dtype: Optional[str] = None
    shape: Tuple[int, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Column":
        if d.get("kind") not in COLUMN_KINDS:
            raise DatasetIndexError(f"column {d.get('name')!r}: unknown kind {d.get('kind')!r}")
        return cls(str(d["name"]), d["kind"], d.get("dtype"), tuple(int(x) for x in d.get("shape", ())))


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name inside the dataset folder, sample count, size and checksum."""

    name: str
    num_samples: int
    size_bytes: int
    sha256: str

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples,
                "size_bytes": self.size_bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ShardInfo":
        return cls(str(d["name"]), int(d["num_samples"]), int(d["size_bytes"]), str(d["sha256"]))


@dataclass(frozen=True)
class DatasetIndex:
    """The whole dataset: shard format, columns and shards, in global sample order."""

    shard_format: str
    columns: Tuple[Column, ...]
    shards: Tuple[ShardInfo, ...]
    metadata: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.shards)

    @property
    def shard_sizes(self) -> List[int]:
        return [s.num_samples for s in self.shards]

    @property
    def fingerprint(self) -> str:
        """A short digest of the shard layout; sampler states carry it to catch a wrong dataset."""
        layout = json.dumps([[s.name, s.num_samples] for s in self.shards]).encode()
        return hashlib.sha256(layout).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({
            "format": _INDEX_FORMAT, "version": _INDEX_VERSION,
            "shard_format": self.shard_format,
            "num_samples": self.num_samples,
            "columns": [c.to_json() for c in self.columns],
            "shards": [s.to_json() for s in self.shards],
            "metadata": self.metadata,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "index") -> "DatasetIndex":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise DatasetIndexError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != _INDEX_FORMAT:
            raise DatasetIndexError(f"{where}: not an elastic-shards index")
        if d.get("version") != _INDEX_VERSION:
            raise DatasetIndexError(f"{where}: unsupported index version {d.get('version')!r}")
        try:
            index = cls(
                shard_format=str(d["shard_format"]),
                columns=tuple(Column.from_json(c) for c in d["columns"]),
                shards=tuple(ShardInfo.from_json(s) for s in d["shards"]),
                metadata=dict(d.get("metadata") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetIndexError(f"{where}: malformed index ({exc!r})") from None
        if "num_samples" in d and int(d["num_samples"]) != index.num_samples:
            raise DatasetIndexError(f"{where}: num_samples does not match its shards")
        return index
