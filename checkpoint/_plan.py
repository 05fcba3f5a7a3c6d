"""The save planner: which rank writes which rows of which tensor, and where the bytes go.

Pure computation over :class:`~checkpoint._tree.TensorLeaf` shapes: no I/O, no collective.
Every rank computes the same split of the replicated tensors from the same keys and shapes,
so together the ranks write each replicated tensor exactly once, in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from ._tree import TensorLeaf
from .format import PieceEntry, TensorEntry, safetensors_header

__all__ = ["PlannedPiece", "SavePlan", "split_replicated", "plan_save", "SLOT_ALIGN"]

SLOT_ALIGN = 64


class PlannedPiece:
    """Rows ``r0:r1`` of a leaf (the whole leaf for sharded/per-rank/0-d ones), the rank that
    writes them, and their byte offsets in the staging slot and in the data file."""

    __slots__ = ("leaf", "r0", "r1", "owner", "slot_begin", "file_begin", "name")

    def __init__(self, leaf: TensorLeaf, r0: int, r1: int, owner: int) -> None:
        self.leaf, self.r0, self.r1, self.owner = leaf, r0, r1, owner
        self.slot_begin = 0
        self.file_begin = 0
        whole = (r0, r1) == (0, leaf.rows())
        self.name = leaf.key if whole else f"{leaf.key}[{r0}:{r1}]"

    @property
    def nbytes(self) -> int:
        return (self.r1 - self.r0) * self.leaf.row_bytes() if self.leaf.shape else self.leaf.nbytes

    @property
    def shape(self) -> Tuple[int, ...]:
        return ((self.r1 - self.r0),) + self.leaf.shape[1:] if self.leaf.shape else ()

    @property
    def offsets(self) -> Tuple[int, ...]:
        if not self.leaf.shape:
            return ()
        base = self.leaf.offsets
        return (base[0] + self.r0,) + tuple(base[1:])

    def __repr__(self) -> str:
        return f"PlannedPiece({self.name!r}, owner={self.owner}, {self.nbytes} bytes)"


def split_replicated(leaves: Sequence[TensorLeaf], world_size: int) -> List[PlannedPiece]:
    """Cut the replicated tensors (in key order) into ``world_size`` byte-balanced row ranges:
    rank ``r`` owns the rows whose bytes fall in the ``r``-th ``1/world_size`` of the total."""
    leaves = sorted(leaves, key=lambda lf: lf.key)
    total = sum(lf.nbytes for lf in leaves)
    pieces: List[PlannedPiece] = []
    cursor = 0
    for lf in leaves:
        rows, row_bytes = lf.rows(), lf.row_bytes()
        if lf.nbytes == 0:
            pieces.append(PlannedPiece(lf, 0, rows, 0))
            continue
        r0 = 0
        while r0 < rows:
            owner = min(world_size - 1, cursor * world_size // total)
            boundary = -(-(owner + 1) * total // world_size)
            n = max(1, -(-(boundary - cursor) // row_bytes)) if lf.shape else rows
            r1 = min(rows, r0 + n)
            pieces.append(PlannedPiece(lf, r0, r1, owner))
            cursor += (r1 - r0) * row_bytes if lf.shape else lf.nbytes
            r0 = r1
    return pieces


@dataclass(frozen=True)
class SavePlan:
    """One rank's plan of a save. ``mine``: the pieces it writes, laid out back to back from
    offset 0 in both its data file (after the header) and the slot; ``others``: the pieces
    other ranks write, which it stages too (after ``mine``, 64-byte aligned) so its memory
    tier holds its whole state."""

    rank: int
    world_size: int
    leaves: Tuple[TensorLeaf, ...]
    mine: Tuple[PlannedPiece, ...]
    others: Tuple[PlannedPiece, ...]
    mine_bytes: int
    total_bytes: int

    @property
    def staged(self) -> Tuple[PlannedPiece, ...]:
        return self.mine + self.others

    def tensors(self, pieces: Sequence[Tuple[str, PlannedPiece, PieceEntry]] = ()
                ) -> Dict[str, TensorEntry]:
        """Every leaf's entry (in leaf order) holding the given pieces."""
        lists: Dict[str, List[PieceEntry]] = {lf.key: [] for lf in self.leaves}
        for key, _, entry in pieces:
            lists[key].append(entry)
        return {lf.key: TensorEntry(lf.dtype, lf.global_shape, lf.kind, tuple(lists[lf.key]))
                for lf in self.leaves}

    def part_tensors(self, data_name: str, header_bytes: int) -> Dict[str, TensorEntry]:
        """The entries of this rank's part: its pieces at their bytes in ``data_name``."""
        return self.tensors([(p.leaf.key, p, PieceEntry(
            data_name, p.offsets, p.shape, header_bytes + p.file_begin,
            header_bytes + p.file_begin + p.nbytes, p.name)) for p in self.mine])

    def slot_tensors(self) -> Dict[str, TensorEntry]:
        """The entries of the memory tier: every staged piece at its bytes in the slot."""
        return self.tensors([(p.leaf.key, p, PieceEntry(
            "slot", p.offsets, p.shape, p.slot_begin, p.slot_begin + p.nbytes))
            for p in self.staged])

    def header(self, metadata: Dict[str, str]) -> bytes:
        """The safetensors header of this rank's data file."""
        return safetensors_header(((p.name, p.leaf.dtype, p.shape, p.file_begin,
                                    p.file_begin + p.nbytes) for p in self.mine), metadata)


def plan_save(leaves: Sequence[TensorLeaf], rank: int, world_size: int) -> SavePlan:
    """Split the replicated leaves across the ranks, give each rank its per-rank and sharded
    leaves, and lay out this rank's pieces."""
    pieces = split_replicated([lf for lf in leaves if lf.kind == "replicated"], world_size)
    pieces += [PlannedPiece(lf, 0, lf.rows(), rank) for lf in leaves if lf.kind != "replicated"]
    mine = [p for p in pieces if p.owner == rank]
    others = [p for p in pieces if p.owner != rank]
    # Larger items first keeps every piece aligned to its item size in file and slot.
    mine.sort(key=lambda p: -p.leaf.itemsize)
    others.sort(key=lambda p: -p.leaf.itemsize)
    offset = 0
    for p in mine:
        p.file_begin = p.slot_begin = offset
        offset += p.nbytes
    mine_bytes = offset
    offset = -(-offset // SLOT_ALIGN) * SLOT_ALIGN
    for p in others:
        p.slot_begin = offset
        offset += p.nbytes
    return SavePlan(rank, world_size, tuple(leaves), tuple(mine), tuple(others), mine_bytes,
                    offset)
