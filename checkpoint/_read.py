"""The reader: which region of which tensor this rank loads, from where, and its assembly.

A region is a block of a tensor's global shape (the whole tensor, or the :class:`Shard` a
target names). Its bytes come from the node-memory tier when that holds exactly this
committed step, else from the step's files (whole files, size- and CRC-checked); a region
is then a view of one piece, or a copy assembled from every piece that overlaps it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _memory
from ._layout import Layout
from ._tree import decode, fill_target, flatten_target, raw_dtype, tensor_keys, to_framework
from .api import Shard
from .errors import CheckpointCorruptError, CheckpointStateError
from .format import Manifest, PieceEntry, SlotMeta, TensorEntry

__all__ = ["Reader", "Region", "overlap", "assemble"]

logger = logging.getLogger("checkpoint")

# Threads that checksum a load's files (ranges of a big file too): CRC32 runs ~2-3 GB/s per
# core, below a fast disk's or the page cache's speed.
_LOAD_THREADS = max(2, min(8, os.cpu_count() or 1))

Region = Tuple[str, Tuple[int, ...], Tuple[int, ...]]  # (tensor key, offsets, shape)


class Reader:
    """Loads committed steps of one root for one rank."""

    def __init__(self, layout: Layout, rank: int, world_size: int, memory_dir: Optional[str],
                 crc_pool: ThreadPoolExecutor) -> None:
        self.layout = layout
        self.rank, self.world_size = rank, world_size
        self.memory_dir = memory_dir
        self._crc = crc_pool
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def load_step(self, step: int, target: Any) -> Tuple[Any, Tuple[str, str, int, int]]:
        """The state of ``step`` and ``(source, where, bytes read, generation)``."""
        m = self.layout.read_manifest(step)
        tree = m.tree_for(self.rank)
        targets = flatten_target(target) if target is not None else {}
        refs = tensor_keys(tree)
        regions = plan_regions(step, m, refs, targets)
        loaded = self._from_memory(step, m, regions)
        if loaded is not None:
            source, where = "memory", self.memory_dir or ""
            tables, sources = loaded
        else:
            source, where = "storage", self.layout.step_dir(step)
            tables, sources = m.tensors, self._read_sources(step, m, regions)
        nread = sum(int(s.nbytes) for s in sources.values())
        results: Dict[Tuple[Any, ...], Any] = {}
        fws = {path: node["fw"] for path, node in refs}
        for path, (key, offs, shape) in regions.items():
            t = tables[key]
            raw = assemble(key, t, offs, shape, sources)
            tgt = targets.get(path)
            if tgt is not None:
                results[path] = fill_target(tgt, raw, t.dtype)
            else:
                results[path] = to_framework(raw, t.dtype, fws[path])
        state = decode(tree, lambda path, node: results[path])
        return state, (source, where, nread, m.generation)

    def verify(self, step: int) -> List[str]:
        m = self.layout.read_manifest(step)
        problems = []
        for f in m.files:
            try:
                self.layout.storage.read_many([(self.layout.path(step, f.name), f.size_bytes,
                                                f.crc32)], self._loader(), self._crc)
            except CheckpointCorruptError as exc:
                problems.append(str(exc))
        return problems

    def _from_memory(self, step: int, m: Manifest, regions: Mapping[Any, Region]
                     ) -> Optional[Tuple[Mapping[str, TensorEntry], Dict[str, np.ndarray]]]:
        """The memory tier's tables and buffer, if it holds exactly this committed step."""
        if self.memory_dir is None or m.world_size != self.world_size:
            return None
        snap = _memory.read_snapshot(self.memory_dir)  # mapped, not copied: costs nothing yet
        if snap is None:
            return None
        raw_meta, data = snap
        try:
            meta = SlotMeta.from_json(raw_meta, self.memory_dir)
        except CheckpointCorruptError:
            return None
        if (meta.step != step or meta.generation != m.generation or meta.rank != self.rank
                or meta.world_size != self.world_size):
            return None
        for key, offs, shape in regions.values():
            t, mt = meta.tensors.get(key), m.tensors[key]
            if t is None or t.dtype != mt.dtype or t.shape != mt.shape:
                return None
            if coverage(t.pieces, offs, shape) != math.prod(shape):
                return None
        logger.info("[rank %d] loading step %d from node memory %s", self.rank, step,
                    self.memory_dir)
        return meta.tensors, {"slot": data}

    def _read_sources(self, step: int, m: Manifest, regions: Mapping[Any, Region]
                      ) -> Dict[str, np.ndarray]:
        st, layout = self.layout.storage, self.layout
        files = {f.name: f for f in m.files}
        for f in files.values():  # every file must be whole, even those this rank won't read
            got = st.size(layout.path(step, f.name))
            if got is None:
                raise CheckpointCorruptError(f"step {step}: {f.name} is missing")
            if got != f.size_bytes:
                raise CheckpointCorruptError(f"step {step}: {f.name} has {got} bytes, the "
                                             f"manifest says {f.size_bytes} (truncated?)")
        needed = set()
        for key, offs, shape in regions.values():
            for p in m.tensors[key].pieces:
                if overlap(p, offs, shape) is not None:
                    needed.add(p.file)
        names = sorted(needed)
        for name in names:
            if name not in files:
                raise CheckpointCorruptError(f"step {step}: pieces refer to unlisted file {name}")
        specs = [(layout.path(step, n), files[n].size_bytes, files[n].crc32) for n in names]
        return dict(zip(names, st.read_many(specs, self._loader(), self._crc)))

    def _loader(self) -> ThreadPoolExecutor:
        """Threads that map and checksum the files of a load in parallel (made on first use)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_LOAD_THREADS, thread_name_prefix="ckpt-load")
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def plan_regions(step: int, m: Manifest, refs: Sequence[Tuple[Tuple[Any, ...], dict]],
                 targets: Mapping[Tuple[Any, ...], Any]) -> Dict[Tuple[Any, ...], Region]:
    """The region each tensor reference of the tree loads: the target Shard's block, else the
    whole tensor (a target's shape must match it)."""
    ref_paths = {path for path, _ in refs}
    extra = [p for p in targets if p not in ref_paths]
    if extra:
        raise CheckpointStateError(
            f"target names {'/'.join(map(str, extra[0])) or '<root>'} which checkpoint step "
            f"{step} does not hold")
    regions: Dict[Tuple[Any, ...], Region] = {}
    for path, node in refs:
        key = node.get("key") if isinstance(node, dict) else None
        if not isinstance(key, str) or key not in m.tensors:
            raise CheckpointCorruptError(f"step {step}: tree names tensor {key!r} the manifest lacks")
        gshape = m.tensors[key].shape
        tgt = targets.get(path)
        if isinstance(tgt, Shard):
            if tgt.global_shape != gshape:
                raise CheckpointStateError(
                    f"target Shard of {key!r} has global shape {tgt.global_shape}; the "
                    f"checkpoint's is {gshape}")
            regions[path] = (key, tgt.offsets, tgt.shape)
        else:
            if tgt is not None and tuple(int(s) for s in tgt.shape) != gshape:
                raise CheckpointStateError(
                    f"target {key!r} has shape {tuple(tgt.shape)}; the checkpoint's is {gshape}")
            regions[path] = (key, (0,) * len(gshape), gshape)
    return regions


def overlap(piece: PieceEntry, offs: Sequence[int], shape: Sequence[int]
            ) -> Optional[List[Tuple[int, int]]]:
    """Per-dim (lo, hi) of the piece/region intersection, or None if they do not meet."""
    if len(piece.offsets) != len(offs):
        return None
    box = []
    for a, n, b, k in zip(piece.offsets, piece.shape, offs, shape):
        lo, hi = max(a, b), min(a + n, b + k)
        if lo >= hi and not (n == 0 and k == 0 and a == b):
            return None
        box.append((lo, hi))
    return box


def coverage(pieces: Sequence[PieceEntry], offs: Sequence[int], shape: Sequence[int]) -> int:
    """How many elements of the region the pieces hold (counting overlaps twice)."""
    total = 0
    for p in pieces:
        box = overlap(p, offs, shape)
        if box is not None:
            total += math.prod(hi - lo for lo, hi in box)
    return total


def assemble(key: str, t: TensorEntry, offs: Tuple[int, ...], shape: Tuple[int, ...],
             sources: Mapping[str, np.ndarray]) -> np.ndarray:
    """The region ``offs``/``shape`` of tensor ``key`` as a raw array (a view when one piece
    holds exactly that region, else a copy assembled from every overlapping piece)."""
    rdt = raw_dtype(t.dtype)

    def view(p: PieceEntry) -> np.ndarray:
        buf = sources[p.file]
        if p.end > len(buf) or p.end - p.begin != p.numel * rdt.itemsize:
            raise CheckpointCorruptError(f"tensor {key!r}: piece bytes {p.begin}:{p.end} out of "
                                         f"range")
        return buf[p.begin:p.end].view(rdt).reshape(p.shape)

    for p in t.pieces:
        if p.offsets == tuple(offs) and p.shape == tuple(shape):
            return view(p)
    out = np.empty(shape, dtype=rdt)
    covered = 0
    for p in t.pieces:
        box = overlap(p, offs, shape)
        if box is None:
            continue
        src = view(p)
        s_idx = tuple(slice(lo - a, hi - a) for (lo, hi), a in zip(box, p.offsets))
        d_idx = tuple(slice(lo - b, hi - b) for (lo, hi), b in zip(box, offs))
        out[d_idx] = src[s_idx]
        covered += math.prod(hi - lo for lo, hi in box)
    if covered != math.prod(shape):
        raise CheckpointCorruptError(f"tensor {key!r}: the stored pieces cover {covered} of the "
                                     f"{math.prod(shape)} elements asked for")
    return out
