"""The :class:`Checkpointer`: async, sharded, checksummed, fenced checkpoints on any fsspec URL.

A thin façade over one module per concern: :mod:`checkpoint.format` (the files and their
records), :mod:`checkpoint._plan` (who writes which bytes), :mod:`checkpoint._commit` (parts,
the manifest that is the commit, fencing, retention), :mod:`checkpoint._read` (regions,
memory tier, file reads, assembly). A step exists only once its ``manifest.json`` is
published (temp file, fsync, rename locally; one PUT on object stores).
"""
from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np

from . import _memory
from ._commit import Committer
from ._layout import Layout
from ._plan import plan_save
from ._read import Reader
from ._storage import CHUNK_BYTES, Storage, open_url, why
from ._tree import encode
from .api import CheckpointInfo, LoadInfo
from .errors import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                     CheckpointStateError, CheckpointStorageError, CheckpointWriteError)
from .format import FORMAT, FORMAT_VERSION, SlotMeta, step_dirname

__all__ = ["Checkpointer", "FORMAT", "FORMAT_VERSION", "step_dirname"]

logger = logging.getLogger("checkpoint")


class Checkpointer:
    """Save and load checkpoints of a nested state under one URL.

    ``url``: any fsspec URL or a plain path (``/ckpt``, ``file:///ckpt``, ``memory://x``,
    ``s3://bucket/run``). ``keep``: how many committed checkpoints to keep. ``staging_bytes``:
    the most host memory one save may stage; a save whose local state is larger is written
    directly from the tensors and blocks until committed. Rank, world size and the rendezvous
    generation default to this process's place (:meth:`elastic.World.detect`: elastic-run,
    torchrun, horovodrun, TF_CONFIG, mpirun, srun);
    ``current_generation`` (optional) returns the newest generation, and a writer older than
    it cannot publish. ``memory`` keeps the last snapshot in node-local shared memory
    (``memory_dir``, default ``/dev/shm/elastic-run``) for fast reloads after a restart.
    """

    def __init__(self, url: str, keep: int = 2, staging_bytes: Optional[int] = None,
                 storage_options: Optional[dict] = None, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None, generation: Optional[int] = None,
                 current_generation: Optional[Callable[[], int]] = None,
                 run_id: Optional[str] = None, memory: bool = True,
                 memory_dir: Optional[str] = None, publish_timeout_s: float = 600.0) -> None:
        from elastic.errors import ConfigError
        from elastic.world import World

        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an integer >= 1, got {keep!r}")
        if staging_bytes is not None and (not isinstance(staging_bytes, int) or staging_bytes < 0):
            raise ConfigError(f"staging_bytes must be a non-negative integer or None, got "
                              f"{staging_bytes!r}")
        world = World.detect()
        self.rank = world.rank if rank is None else int(rank)
        self.world_size = world.world_size if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"invalid world: rank {self.rank} of {self.world_size}")
        self.generation = world.generation if generation is None else int(generation)
        self.run_id = world.run_id if run_id is None else str(run_id)
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else url
        self.keep = keep
        self.staging_bytes = staging_bytes
        self.publish_timeout_s = float(publish_timeout_s)
        fs, root = open_url(url, storage_options)
        self._storage = Storage(fs, root)
        if self._storage.is_file(root):
            raise CheckpointError(f"{url}: is a file, not a checkpoint directory")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        mem_root = (memory_dir or _memory.memory_dir_default()) if memory else None
        self._memory_dir = (_memory.slot_dir(mem_root, self.run_id, f"{protocol}://{root}", self.rank)
                            if mem_root else None)
        self._slot = _memory.Slot(self._memory_dir)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer")
        self._crc = ThreadPoolExecutor(1, thread_name_prefix="ckpt-crc")
        self._layout = Layout(self._storage, self.url)
        self._committer = Committer(self._layout, self.rank, self.world_size, self.generation,
                                    keep, self.publish_timeout_s, current_generation)
        self._reader = Reader(self._layout, self.rank, self.world_size, self._memory_dir,
                              self._crc)
        self._pending: Optional[Tuple[int, Future]] = None
        self._closed = False
        self.last_load: Optional[LoadInfo] = None

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, *, blocking: bool = False) -> None:
        """Snapshot ``state`` as ``step``; returns once it is copied to host memory.

        The background writer persists and (rank 0) commits it; call :meth:`wait` to block
        until then. An error of an earlier background write is raised here.
        """
        self._check_open()
        self.wait()  # the single staging slot is free again; earlier errors surface here
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise CheckpointStateError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        self._committer.check_fence()
        tree, leaves = encode(state, self.rank)
        plan = plan_save(leaves, self.rank, self.world_size)
        direct = self.staging_bytes is not None and plan.total_bytes > self.staging_bytes
        if direct:
            self._slot.invalidate()
            chunks: Iterator[memoryview] = (p.leaf.host_rows(p.r0, p.r1) for p in plan.mine)
        else:
            view = self._slot.reserve(plan.total_bytes)
            for p in plan.staged:
                p.leaf.copy_rows_into(view[p.slot_begin:p.slot_begin + p.nbytes], p.r0, p.r1)
            chunks = _chunks(view[:plan.mine_bytes])
            self._slot.commit(SlotMeta(step, self.generation, self.rank, self.world_size,
                                       self.url, plan.total_bytes, tree,
                                       plan.slot_tensors()).to_json())
            for lf in plan.leaves:  # drop the live tensors: the writer must use staged bytes
                lf.value = None
        header = plan.header({"format": FORMAT, "step": str(step), "rank": str(self.rank),
                              "generation": str(self.generation)})
        job = self._writer.submit(self._committer.persist, step, tree, plan, header, chunks,
                                  not direct, self._crc)

        def report(done: Future, s: int = step) -> None:
            if done.exception() is None:
                _report_checkpoint(s)
        job.add_done_callback(report)
        self._pending = (step, job)
        if blocking or direct:
            self.wait()

    def wait(self) -> None:
        """Block until the pending save is persisted (and, on rank 0, committed).

        Raises the error of a failed background write: :class:`StaleGenerationError` and the
        other :class:`CheckpointError` as themselves, anything else as
        :class:`CheckpointWriteError`.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, job = pending
        try:
            job.result()
        except CheckpointStorageError as exc:  # a read of the commit protocol failed
            raise CheckpointWriteError(f"background write of checkpoint step {step} to "
                                       f"{self.url} failed: {exc}") from exc
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointWriteError(f"background write of checkpoint step {step} to "
                                       f"{self.url} failed: {why(exc)}") from exc

    # ------------------------------------------------------------------ listing
    def steps(self) -> List[int]:
        """Committed steps (those whose manifest is published), oldest first."""
        return self._layout.committed_steps()

    def latest_step(self) -> Optional[int]:
        """The newest committed step, or None. (``load()`` also verifies its files.)"""
        steps = self.steps()
        return steps[-1] if steps else None

    def list(self) -> List[CheckpointInfo]:
        """The committed checkpoints, oldest first, as their manifests describe them."""
        out = []
        for step in self.steps():
            try:
                m = self._layout.read_manifest(step)
            except CheckpointCorruptError:
                continue
            out.append(CheckpointInfo(
                step=step, generation=m.generation, world_size=m.world_size,
                size_bytes=m.size_bytes, num_files=len(m.files), created_unix_s=m.created_unix_s,
                path=self._layout.step_dir(step)))
        return out

    def verify(self, step: int) -> List[str]:
        """Problems of ``step``'s files (missing, size, checksum); [] when it is whole."""
        try:
            return self._reader.verify(step)
        except CheckpointError as exc:
            return [str(exc)]

    # ------------------------------------------------------------------ loading
    def load(self, step: Optional[int] = None, target: Any = None) -> Any:
        """Load ``step`` (default: the newest good checkpoint) and return the state.

        Files are checked against the manifest's sizes and CRC32s; with ``step=None`` a bad
        checkpoint is skipped with a warning and the previous one is loaded. ``target`` (same
        nesting as the state) names tensors, arrays, TF variables to fill in place, and
        :class:`Shard` blocks to load out of a checkpoint of any world size.
        """
        self._check_open()
        self.wait()
        steps = self.steps()
        if step is not None:
            if step not in steps:
                avail = ", ".join(map(str, steps)) or "none"
                raise CheckpointNotFoundError(
                    f"no checkpoint of step {step} at {self.url} (committed steps: {avail})")
            candidates = [step]
        else:
            if not steps:
                raise CheckpointNotFoundError(f"no checkpoint at {self.url}")
            candidates = list(reversed(steps))
        skipped: List[Tuple[int, str]] = []
        for s in candidates:
            try:
                state, info = self._reader.load_step(s, target)
            except CheckpointCorruptError as exc:
                if step is not None:
                    raise
                skipped.append((s, str(exc)))
                msg = f"checkpoint step {s} at {self.url} is damaged ({exc}); trying an older one"
                logger.warning("[rank %d] %s", self.rank, msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                continue
            self.last_load = LoadInfo(step=s, source=info[0], path=info[1],
                                      skipped=tuple(skipped), bytes_read=info[2],
                                      generation=info[3])
            return state
        raise CheckpointCorruptError(
            f"no loadable checkpoint at {self.url}: " + "; ".join(f"step {s}: {w}" for s, w in skipped))

    # ------------------------------------------------------------------ housekeeping
    def drop_memory(self) -> None:
        """Delete this rank's node-memory snapshot (it otherwise outlives the process)."""
        self.wait()
        self._slot.close()
        if self._memory_dir is not None:
            _memory.remove_snapshot(self._memory_dir)

    def close(self) -> None:
        """Wait for the pending write, then release threads and memory maps (the node-memory
        snapshot stays for a restarted worker; :meth:`drop_memory` deletes it)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._writer.shutdown(wait=True)
            self._crc.shutdown(wait=True)
            self._reader.close()
            self._slot.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this Checkpointer is closed")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpointer({self.url!r}, keep={self.keep}, rank={self.rank}, "
                f"world_size={self.world_size}, generation={self.generation})")


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start:start + CHUNK_BYTES]


def _report_checkpoint(step: int) -> None:
    """Under elastic-run, schedulers see the last checkpointed step (status, checkpoint age)."""
    if os.environ.get("ELASTIC_RDZV_BACKEND"):
        from elastic import report_progress

        report_progress(checkpoint_step=step)
