"""Public records and state wrappers of the checkpoint package.

A state is a nested dict (lists and tuples allowed) whose leaves are tensors (torch, NumPy,
TensorFlow) or plain JSON-able data. By default a tensor is *replicated*: every rank holds the
same value (data-parallel training), so the ranks split the writing between them and the
checkpoint holds one copy. Two wrappers say otherwise:

* :class:`Shard` -- this rank holds one block of a larger global tensor (model/tensor
  parallelism, ZeRO); the blocks of all ranks form the global tensor, which can be loaded
  back with any other world size (resharding).
* :class:`PerRank` -- a subtree that differs per rank (RNG states, per-rank counters); each
  rank stores its own and gets its own back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

from .errors import CheckpointStateError

__all__ = ["Shard", "PerRank", "CheckpointInfo", "LoadInfo"]


class Shard:
    """A block of a global tensor held by this rank.

    ``offsets`` is the index of the block's first element in the global tensor, per
    dimension; ``global_shape`` the global tensor's shape. On ``load(target=...)`` a
    :class:`Shard` names the block this rank wants (of any layout) and is filled in place.
    """

    __slots__ = ("tensor", "offsets", "global_shape")

    def __init__(self, tensor: Any, offsets: Sequence[int], global_shape: Sequence[int]) -> None:
        self.tensor = tensor
        self.offsets: Tuple[int, ...] = tuple(int(o) for o in offsets)
        self.global_shape: Tuple[int, ...] = tuple(int(s) for s in global_shape)
        shape = tuple(int(s) for s in tensor.shape)
        if len(self.offsets) != len(shape) or len(self.global_shape) != len(shape):
            raise CheckpointStateError(
                f"Shard: offsets {self.offsets} and global_shape {self.global_shape} must have "
                f"one entry per dimension of the local shape {shape}")
        for o, s, g in zip(self.offsets, shape, self.global_shape):
            if o < 0 or o + s > g:
                raise CheckpointStateError(
                    f"Shard: block at {self.offsets} of shape {shape} lies outside the global "
                    f"shape {self.global_shape}")

    @classmethod
    def rows(cls, tensor: Any, start_row: int, global_rows: int) -> "Shard":
        """A block of whole rows: ``tensor`` holds rows ``start_row...`` of ``global_rows``."""
        shape = tuple(int(s) for s in tensor.shape)
        return cls(tensor, (start_row,) + (0,) * (len(shape) - 1), (global_rows,) + shape[1:])

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(s) for s in self.tensor.shape)

    def __repr__(self) -> str:
        return f"Shard(shape={self.shape}, offsets={self.offsets}, global_shape={self.global_shape})"


class PerRank:
    """A subtree of the state that differs per rank; each rank stores and loads its own.

    Loading with a larger world than was saved gives the new ranks rank 0's subtree.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it."""

    step: int
    generation: int
    world_size: int
    size_bytes: int
    num_files: int
    created_unix_s: float
    path: str


@dataclass(frozen=True)
class LoadInfo:
    """What the last ``load()`` did: the step it loaded, from where, and what it skipped."""

    step: int
    source: str  # "memory" (node-local shared memory) or "storage"
    path: str
    skipped: Tuple[Tuple[int, str], ...] = ()  # (step, why) of newer checkpoints that failed
    bytes_read: int = 0
    generation: Optional[int] = None
