"""The save planner, I/O-free: every byte of every tensor is written by exactly one rank,
the ranks' shares are balanced, and each rank's layout is packed and aligned."""
from __future__ import annotations

import math

import numpy as np
import pytest

from checkpoint import PerRank, Shard
from checkpoint._plan import SLOT_ALIGN, plan_save, split_replicated
from checkpoint._tree import encode

SHAPES = {"a": ((37, 5), np.float32), "b": ((7,), np.float64), "c": ((), np.float32),
          "d": ((0, 4), np.float32), "e": ((1000,), np.int8), "f": ((3, 2, 2), np.float16),
          "g": ((1,), np.int64)}


def leaves_of(shapes, rank=0, order=None):
    state = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    if order is not None:
        state = {k: state[k] for k in order}
    return encode(state, rank)[1]


def rows_covered(pieces):
    """key -> sorted (r0, r1) ranges."""
    out = {}
    for p in pieces:
        out.setdefault(p.leaf.key, []).append((p.r0, p.r1))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 16])
def test_split_covers_every_row_once_and_balances_bytes(world):
    leaves = leaves_of(SHAPES)
    pieces = split_replicated(leaves, world)
    for key, ranges in rows_covered(pieces).items():
        leaf = next(lf for lf in leaves if lf.key == key)
        assert ranges[0][0] == 0 and ranges[-1][1] == leaf.rows()
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(0 <= p.owner < world for p in pieces)
    total = sum(lf.nbytes for lf in leaves)
    per_rank = [sum(p.nbytes for p in pieces if p.owner == r) for r in range(world)]
    assert sum(per_rank) == total
    biggest_row = max(lf.row_bytes() for lf in leaves)
    # a rank's share ends at the first row boundary past its even share
    assert max(per_rank) <= -(-total // world) + biggest_row


def test_every_rank_computes_the_same_split_whatever_the_state_order():
    a = split_replicated(leaves_of(SHAPES), 3)
    b = split_replicated(leaves_of(SHAPES, order=sorted(SHAPES, reverse=True)), 3)
    assert [(p.name, p.owner) for p in a] == [(p.name, p.owner) for p in b]


def test_piece_names_offsets_and_shapes():
    pieces = split_replicated(leaves_of({"w": ((10, 3), np.float32)}), 2)
    assert [(p.name, p.owner, p.offsets, p.shape) for p in pieces] == [
        ("w[0:5]", 0, (0, 0), (5, 3)), ("w[5:10]", 1, (5, 0), (5, 3))]
    (whole,) = split_replicated(leaves_of({"w": ((10, 3), np.float32)}), 1)
    assert whole.name == "w" and whole.nbytes == 120


def test_zero_d_and_empty_tensors_go_whole_to_one_rank():
    pieces = split_replicated(leaves_of({"s": ((), np.float32), "e": ((0, 4), np.float32)}), 4)
    assert sorted((p.name, p.owner, p.nbytes) for p in pieces) == [("e", 0, 0), ("s", 0, 4)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_layout_is_packed_aligned_and_complete(world):
    for rank in range(world):
        state = {**{k: np.zeros(s, d) for k, (s, d) in SHAPES.items()},
                 "mine": PerRank({"x": np.zeros(3, np.uint16)}),
                 "sh": Shard(np.zeros((2, 3), np.float64), (2 * rank, 0), (2 * world, 3))}
        plan = plan_save(encode(state, rank)[1], rank, world)
        assert all(p.owner == rank for p in plan.mine)
        assert all(p.owner != rank for p in plan.others)
        # rank-local leaves (per-rank, sharded) are always this rank's
        assert {"rank%d/mine/x" % rank, "sh"} <= {p.leaf.key for p in plan.mine}
        offset = 0
        for p in plan.mine:  # back to back from 0, same offset in file and slot
            assert p.file_begin == p.slot_begin == offset
            assert p.file_begin % p.leaf.itemsize == 0
            offset += p.nbytes
        assert plan.mine_bytes == offset
        offset = -(-offset // SLOT_ALIGN) * SLOT_ALIGN
        for p in plan.others:
            assert p.slot_begin == offset and p.slot_begin % p.leaf.itemsize == 0
            offset += p.nbytes
        assert plan.total_bytes == offset
        # the slot holds this rank's whole state
        slot = plan.slot_tensors()
        assert list(slot) == [lf.key for lf in plan.leaves]
        for key, t in slot.items():
            local = next(lf for lf in plan.leaves if lf.key == key)
            assert sum(p.numel for p in t.pieces) == math.prod(local.shape)
        # the part lists only what this rank writes, past the header
        part = plan.part_tensors("f.safetensors", 4096)
        assert sum(len(t.pieces) for t in part.values()) == len(plan.mine)
        assert all(p.begin >= 4096 and p.file == "f.safetensors" and p.name
                   for t in part.values() for p in t.pieces)


def test_all_ranks_together_write_each_replicated_byte_once():
    world = 3
    written = {}
    for rank in range(world):
        plan = plan_save(leaves_of(SHAPES, rank), rank, world)
        for p in plan.mine:
            written.setdefault(p.leaf.key, []).append((p.r0, p.r1))
    for ranges in written.values():
        ranges.sort()
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert set(written) == set(SHAPES)


def test_header_is_safetensors_and_page_aligned():
    import json
    import struct

    plan = plan_save(leaves_of({"w": ((10, 3), np.float32), "b": ((4,), np.float64)}), 1, 2)
    header = plan.header({"step": "1"})
    assert len(header) % 4096 == 0
    (n,) = struct.unpack("<Q", header[:8])
    head = json.loads(header[8:8 + n])
    assert head.pop("__metadata__") == {"step": "1"}
    assert {k: v["data_offsets"] for k, v in head.items()} == {
        p.name: [p.file_begin, p.file_begin + p.nbytes] for p in plan.mine}
