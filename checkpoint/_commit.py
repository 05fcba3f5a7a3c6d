"""The committer: a rank's bytes become its part; rank 0 merges every part into the manifest.

Ranks coordinate through the step's directory alone (each publishes its part, rank 0 polls
for all of them), so no collective runs on a background thread beside the training's own,
and nothing needs a process group. A writer whose rendezvous generation is stale is fenced
off before it publishes; once a step commits, older steps beyond ``keep`` are deleted.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from ._layout import Layout
from ._plan import SavePlan
from ._storage import fsync_dir
from .errors import CheckpointCorruptError, CheckpointStateError, CheckpointTimeoutError, \
    StaleGenerationError
from .format import (MANIFEST, FileEntry, Manifest, Part, PieceEntry, TensorEntry, dumps,
                     generation_of, part_name, rank_file_base)

__all__ = ["Committer", "merge_parts"]

logger = logging.getLogger("checkpoint")


class Committer:
    """Persists one rank's share of a step and, on rank 0, commits the step."""

    def __init__(self, layout: Layout, rank: int, world_size: int, generation: int, keep: int,
                 publish_timeout_s: float,
                 current_generation: Optional[Callable[[], int]] = None) -> None:
        self.layout = layout
        self.rank, self.world_size, self.generation = rank, world_size, generation
        self.keep = keep
        self.publish_timeout_s = publish_timeout_s
        self._current_generation = current_generation

    # ------------------------------------------------------------------ one rank's part
    def persist(self, step: int, tree: object, plan: SavePlan, header: bytes,
                chunks: Iterator[memoryview], aligned: bool, crc_pool: ThreadPoolExecutor) -> None:
        """Write the data file, publish the part; rank 0 then commits the step."""
        st = self.layout.storage
        st.makedirs(self.layout.step_dir(step))
        if st.local:
            fsync_dir(st.root)
        base = rank_file_base(self.rank, self.world_size, self.generation)
        data_name = f"{base}.safetensors"
        size, crc = st.write_data(self.layout.path(step, data_name), header, chunks, aligned,
                                  crc_pool)
        part = Part(step, self.rank, self.world_size, self.generation,
                    FileEntry(data_name, size, crc), plan.part_tensors(data_name, len(header)), tree)
        st.publish(self.layout.path(step, f"{base}.part.json"), dumps(part))
        logger.debug("[rank %d] wrote part of step %d (%d bytes)", self.rank, step, size)
        if self.rank == 0:
            self.commit(step)

    # ------------------------------------------------------------------ rank 0's commit
    def commit(self, step: int) -> None:
        """Wait for every rank's part, merge, check the files, fence, publish, retain."""
        st = self.layout.storage
        parts = self._wait_for_parts(step)
        manifest = merge_parts(step, self.generation, self.world_size, parts)
        for f in manifest.files:
            got = st.size(self.layout.path(step, f.name))
            if got != f.size_bytes:
                raise CheckpointCorruptError(f"step {step}: {f.name} has {got} bytes, its part "
                                             f"says {f.size_bytes}; not committed")
        self.check_fence(published=True)
        st.publish(self.layout.path(step, MANIFEST), dumps(manifest))
        logger.info("[rank 0] committed checkpoint step %d (generation %d) at %s", step,
                    self.generation, self.layout.url)
        self._retain(step, {f.name for f in manifest.files})

    def _wait_for_parts(self, step: int) -> List[Part]:
        st = self.layout.storage
        names = [part_name(r, self.world_size, self.generation) for r in range(self.world_size)]
        parts: Dict[int, Part] = {}
        deadline = time.monotonic() + self.publish_timeout_s
        delay = 0.005
        while True:
            for r, name in enumerate(names):
                if r in parts:
                    continue
                path = self.layout.path(step, name)
                if r == 0 or st.exists(path):
                    try:
                        parts[r] = Part.loads(st.read_bytes(path), path)
                    except FileNotFoundError:
                        pass
            if len(parts) == self.world_size:
                return [parts[r] for r in range(self.world_size)]
            self.check_fence()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(parts))
                raise CheckpointTimeoutError(
                    f"step {step}: ranks {missing} did not write their parts within "
                    f"{self.publish_timeout_s:.0f}s; not committed")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def check_fence(self, published: bool = False) -> None:
        """Raise :class:`StaleGenerationError` when this writer's generation is older than
        the current one (or, with ``published``, than a checkpoint already published)."""
        if self._current_generation is not None:
            current = int(self._current_generation())
            if self.generation < current:
                raise StaleGenerationError(
                    f"generation {self.generation} is stale (current is {current}): this "
                    f"writer was removed from the rendezvous round and may not publish")
        if published:
            newest = max((gen for _, gen in self.layout.published_generations()), default=-1)
            if self.generation < newest:
                raise StaleGenerationError(
                    f"generation {self.generation} is stale: a checkpoint of generation "
                    f"{newest} is already published at {self.layout.url}")

    def _retain(self, step: int, referenced: set) -> None:
        st, layout = self.layout.storage, self.layout
        committed = layout.committed_steps()
        for old in committed[:-self.keep]:
            if old == step:
                continue
            st.remove(layout.path(old, MANIFEST))  # uncommit first, then delete
            st.remove_tree(layout.step_dir(old))
        for old in layout.all_steps():
            if old < step and old not in committed:  # abandoned by a crash or a stale writer
                st.remove_tree(layout.step_dir(old))
        for name in st.listdir(layout.step_dir(step)):  # leftovers of older generations
            gen = generation_of(name)
            if name not in referenced and gen is not None and gen < self.generation:
                st.remove(layout.path(step, name))


def merge_parts(step: int, generation: int, world_size: int,
                parts: Sequence[Part]) -> Manifest:
    """The manifest of ``parts`` (rank order): each tensor's pieces from every rank, equal
    shards once; raises :class:`CheckpointStateError` when the ranks disagree on a tensor or
    its pieces do not cover it exactly."""
    first: Dict[str, TensorEntry] = {}
    pieces: Dict[str, List[PieceEntry]] = {}
    for part in parts:
        for key, t in part.tensors.items():
            have = first.get(key)
            if have is None:
                first[key] = t
                pieces[key] = list(t.pieces)
                continue
            if (have.dtype, have.shape, have.kind) != (t.dtype, t.shape, t.kind):
                raise CheckpointStateError(
                    f"step {step}: tensor {key!r} is {t.kind} {t.dtype}{list(t.shape)} on "
                    f"rank {part.rank} but {have.kind} {have.dtype}{list(have.shape)} on "
                    f"another rank; replicated tensors must match on every rank")
            seen = {(p.offsets, p.shape) for p in pieces[key]}
            pieces[key] += [p for p in t.pieces if (p.offsets, p.shape) not in seen]
    tensors = {key: t.with_pieces(pieces[key]) for key, t in first.items()}
    for key, t in tensors.items():
        covered = sum(p.numel for p in t.pieces)
        if covered != t.numel or (not t.pieces and t.kind != "sharded"):
            raise CheckpointStateError(
                f"step {step}: the pieces of tensor {key!r} cover {covered} of "
                f"{math.prod(t.shape)} elements (overlapping or missing shards?)")
    return Manifest(step, generation, world_size, time.time(), tuple(p.file for p in parts),
                    tensors, tuple(p.tree for p in parts))
