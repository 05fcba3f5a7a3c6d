"""The :class:`Checkpointer`: async, sharded, checksummed, fenced checkpoints on any fsspec URL.

Layout under the URL (one directory per step)::

    step-000000000100/
        r00000-of-00002.g3.safetensors   # rank 0's tensor bytes (standard safetensors)
        r00000-of-00002.g3.part.json     # rank 0's done-marker: its file, CRC, pieces, tree
        r00001-of-00002.g3.safetensors
        r00001-of-00002.g3.part.json
        manifest.json                    # written last by rank 0: THE commit

A step exists only once ``manifest.json`` is published (temp file, fsync, rename locally;
one PUT on object stores). Ranks coordinate through the directory alone (each publishes its
part, rank 0 waits for all of them), so no collective runs on a background thread beside the
training's own collectives, and nothing needs a process group.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import _memory
from ._storage import CHUNK_BYTES, Storage, fsync_dir, open_url, why
from ._tree import (TensorLeaf, decode, encode, fill_target, flatten_target, raw_dtype,
                    tensor_keys, to_framework)
from .api import CheckpointInfo, LoadInfo, Shard
from .errors import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                     CheckpointStateError, CheckpointStorageError, CheckpointTimeoutError,
                     CheckpointWriteError, StaleGenerationError)

__all__ = ["Checkpointer", "FORMAT", "FORMAT_VERSION"]

logger = logging.getLogger("checkpoint")

FORMAT = "elastic-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d{12})$")
_GEN_RE = re.compile(r"\.g(\d+)\.")
_HEADER_ALIGN = 4096
_SLOT_ALIGN = 64
# Threads that checksum a load's files (ranges of a big file too): CRC32 runs ~2-3 GB/s per
# core, below a fast disk's or the page cache's speed.
_LOAD_THREADS = max(2, min(8, os.cpu_count() or 1))


def step_dirname(step: int) -> str:
    return f"step-{step:012d}"


class _Piece:
    """Rows ``r0:r1`` of a leaf (the whole leaf for sharded/per-rank/0-d ones)."""

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


def _split_replicated(leaves: Sequence[TensorLeaf], world_size: int) -> List[_Piece]:
    """Cut the replicated tensors (in key order) into ``world_size`` byte-balanced row ranges.

    Every rank computes the same answer from the same keys and shapes, so together the ranks
    write each replicated tensor exactly once, in parallel.
    """
    leaves = sorted(leaves, key=lambda lf: lf.key)
    total = sum(lf.nbytes for lf in leaves)
    pieces: List[_Piece] = []
    cursor = 0
    for lf in leaves:
        rows, row_bytes = lf.rows(), lf.row_bytes()
        if lf.nbytes == 0:
            pieces.append(_Piece(lf, 0, rows, 0))
            continue
        r0 = 0
        while r0 < rows:
            owner = min(world_size - 1, cursor * world_size // total)
            boundary = -(-(owner + 1) * total // world_size)
            n = max(1, -(-(boundary - cursor) // row_bytes)) if lf.shape else rows
            r1 = min(rows, r0 + n)
            pieces.append(_Piece(lf, r0, r1, owner))
            cursor += (r1 - r0) * row_bytes if lf.shape else lf.nbytes
            r0 = r1
    return pieces


def _safetensors_header(pieces: Sequence[_Piece], metadata: Dict[str, str]) -> bytes:
    """A safetensors header for ``pieces`` (already laid out), padded to 4 KiB with spaces."""
    head: Dict[str, Any] = {"__metadata__": metadata}
    for p in pieces:
        head[p.name] = {"dtype": p.leaf.dtype, "shape": list(p.shape),
                        "data_offsets": [p.file_begin, p.file_begin + p.nbytes]}
    body = json.dumps(head, separators=(",", ":")).encode()
    total = 8 + len(body)
    padded = -(-total // _HEADER_ALIGN) * _HEADER_ALIGN
    body += b" " * (padded - total)
    return struct.pack("<Q", len(body)) + body


def _tensor_entry(leaf: TensorLeaf) -> Dict[str, Any]:
    return {"dtype": leaf.dtype, "shape": list(leaf.global_shape), "kind": leaf.kind, "pieces": []}


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
        self._current_generation = current_generation
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
        self._load_pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Tuple[int, Future]] = None
        self._closed = False
        self._lock = threading.Lock()
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
        self._check_fence()
        tree, leaves = encode(state, self.rank)
        replicated = [lf for lf in leaves if lf.kind == "replicated"]
        pieces = _split_replicated(replicated, self.world_size)
        pieces += [_Piece(lf, 0, lf.rows(), self.rank) for lf in leaves if lf.kind != "replicated"]
        mine = [p for p in pieces if p.owner == self.rank]
        others = [p for p in pieces if p.owner != self.rank]
        # Larger items first keeps every piece aligned to its item size in file and slot.
        mine.sort(key=lambda p: -p.leaf.itemsize)
        others.sort(key=lambda p: -p.leaf.itemsize)
        offset = 0
        for p in mine:
            p.file_begin = p.slot_begin = offset
            offset += p.nbytes
        mine_bytes = offset
        offset = -(-offset // _SLOT_ALIGN) * _SLOT_ALIGN
        for p in others:
            p.slot_begin = offset
            offset += p.nbytes
        total = offset
        tensors: Dict[str, Dict[str, Any]] = {}
        for lf in leaves:
            tensors[lf.key] = _tensor_entry(lf)
        direct = self.staging_bytes is not None and total > self.staging_bytes
        if direct:
            self._slot.invalidate()
            chunks: Iterator[memoryview] = (p.leaf.host_rows(p.r0, p.r1) for p in mine)
            aligned = False
        else:
            view = self._slot.reserve(total)
            for p in mine + others:
                p.leaf.copy_rows_into(view[p.slot_begin:p.slot_begin + p.nbytes], p.r0, p.r1)
            chunks = _chunks(view[:mine_bytes])
            aligned = True
            self._slot.commit(self._slot_meta(step, tree, tensors, mine + others, total))
        for p in pieces:  # drop references to the live tensors: the job must use staged bytes
            if not direct:
                p.leaf.value = None
        header = _safetensors_header(mine, {"format": FORMAT, "step": str(step),
                                            "rank": str(self.rank),
                                            "generation": str(self.generation)})
        job = self._writer.submit(self._persist, step, tree, tensors, mine, header, chunks, aligned)
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

    def _slot_meta(self, step: int, tree: Any, tensors: Dict[str, Dict[str, Any]],
                   pieces: Sequence[_Piece], total: int) -> Dict[str, Any]:
        slot_tensors = {k: {**v, "pieces": []} for k, v in tensors.items()}
        for p in pieces:
            slot_tensors[p.leaf.key]["pieces"].append(
                {"file": "slot", "offsets": list(p.offsets), "shape": list(p.shape),
                 "begin": p.slot_begin, "end": p.slot_begin + p.nbytes})
        return {"format": FORMAT, "step": step, "generation": self.generation, "rank": self.rank,
                "world_size": self.world_size, "url": self.url, "data_bytes": total,
                "tree": tree, "tensors": slot_tensors}

    def _persist(self, step: int, tree: Any, tensors: Dict[str, Dict[str, Any]],
                 mine: Sequence[_Piece], header: bytes, chunks: Iterator[memoryview],
                 aligned: bool) -> None:
        st = self._storage
        sdir = st.join(step_dirname(step))
        st.makedirs(sdir)
        if st.local:
            fsync_dir(st.root)
        base = f"r{self.rank:05d}-of-{self.world_size:05d}.g{self.generation}"
        data_name = f"{base}.safetensors"
        size, crc = st.write_data(st.join(step_dirname(step), data_name), header, chunks, aligned,
                                  self._crc)
        hlen = len(header)
        part_tensors = {k: {**v, "pieces": []} for k, v in tensors.items()}
        for p in mine:
            part_tensors[p.leaf.key]["pieces"].append(
                {"file": data_name, "name": p.name, "offsets": list(p.offsets),
                 "shape": list(p.shape), "begin": hlen + p.file_begin,
                 "end": hlen + p.file_begin + p.nbytes})
        part = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "rank": self.rank,
                "world_size": self.world_size, "generation": self.generation,
                "file": {"name": data_name, "size_bytes": size, "crc32": f"{crc:08x}"},
                "tensors": part_tensors, "tree": tree}
        st.publish(st.join(step_dirname(step), f"{base}.part.json"),
                   json.dumps(part, separators=(",", ":")).encode())
        logger.debug("[rank %d] wrote part of step %d (%d bytes)", self.rank, step, size)
        if self.rank == 0:
            self._commit(step)

    def _commit(self, step: int) -> None:
        st = self._storage
        sdir = st.join(step_dirname(step))
        names = [f"r{r:05d}-of-{self.world_size:05d}.g{self.generation}.part.json"
                 for r in range(self.world_size)]
        parts: Dict[int, Dict[str, Any]] = {}
        deadline = time.monotonic() + self.publish_timeout_s
        delay = 0.005
        while True:
            for r, name in enumerate(names):
                if r in parts:
                    continue
                path = st.join(step_dirname(step), name)
                if r == 0 or st.exists(path):
                    try:
                        parts[r] = json.loads(st.read_bytes(path))
                    except FileNotFoundError:
                        pass
            if len(parts) == self.world_size:
                break
            self._check_fence()
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(parts))
                raise CheckpointTimeoutError(
                    f"step {step}: ranks {missing} did not write their parts within "
                    f"{self.publish_timeout_s:.0f}s; not committed")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        manifest = self._merge(step, [parts[r] for r in range(self.world_size)])
        for f in manifest["files"]:
            got = st.size(st.join(step_dirname(step), f["name"]))
            if got != f["size_bytes"]:
                raise CheckpointCorruptError(f"step {step}: {f['name']} has {got} bytes, its part "
                                             f"says {f['size_bytes']}; not committed")
        self._check_fence(published=True)
        st.publish(st.join(step_dirname(step), MANIFEST),
                   json.dumps(manifest, separators=(",", ":")).encode())
        logger.info("[rank 0] committed checkpoint step %d (generation %d) at %s", step,
                    self.generation, self.url)
        self._retain(step, sdir, {f["name"] for f in manifest["files"]})

    def _merge(self, step: int, parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        tensors: Dict[str, Dict[str, Any]] = {}
        for part in parts:
            for key, t in part["tensors"].items():
                have = tensors.get(key)
                if have is None:
                    tensors[key] = {**t, "pieces": list(t["pieces"])}
                    continue
                if (have["dtype"], have["shape"], have["kind"]) != (t["dtype"], t["shape"], t["kind"]):
                    raise CheckpointStateError(
                        f"step {step}: tensor {key!r} is {t['kind']} {t['dtype']}{t['shape']} on "
                        f"rank {part['rank']} but {have['kind']} {have['dtype']}{have['shape']} on "
                        f"another rank; replicated tensors must match on every rank")
                seen = {(tuple(p["offsets"]), tuple(p["shape"])) for p in have["pieces"]}
                for p in t["pieces"]:
                    if (tuple(p["offsets"]), tuple(p["shape"])) not in seen:  # dedupe equal shards
                        have["pieces"].append(p)
        for key, t in tensors.items():
            covered = sum(math.prod(p["shape"]) for p in t["pieces"])
            if covered != math.prod(t["shape"]) or (not t["pieces"] and t["kind"] != "sharded"):
                raise CheckpointStateError(
                    f"step {step}: the pieces of tensor {key!r} cover {covered} of "
                    f"{math.prod(t['shape'])} elements (overlapping or missing shards?)")
        return {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                "generation": self.generation, "world_size": self.world_size,
                "created_unix_s": time.time(),
                "files": [{"name": p["file"]["name"], "size_bytes": p["file"]["size_bytes"],
                           "checksum": f"crc32:{p['file']['crc32']}"} for p in parts],
                "tensors": tensors, "trees": [p["tree"] for p in parts]}

    def _check_fence(self, published: bool = False) -> None:
        if self._current_generation is not None:
            current = int(self._current_generation())
            if self.generation < current:
                raise StaleGenerationError(
                    f"generation {self.generation} is stale (current is {current}): this "
                    f"writer was removed from the rendezvous round and may not publish")
        if published:
            newest = max((gen for _, gen in self._published_generations()), default=-1)
            if self.generation < newest:
                raise StaleGenerationError(
                    f"generation {self.generation} is stale: a checkpoint of generation "
                    f"{newest} is already published at {self.url}")

    def _published_generations(self) -> List[Tuple[int, int]]:
        out = []
        for step in self.steps():
            try:
                out.append((step, int(self._read_manifest(step)["generation"])))
            except (CheckpointCorruptError, FileNotFoundError, KeyError, ValueError):
                continue
        return out

    def _retain(self, step: int, sdir: str, referenced: set) -> None:
        st = self._storage
        committed = self.steps()
        for old in committed[:-self.keep]:
            if old == step:
                continue
            st.remove(st.join(step_dirname(old), MANIFEST))  # uncommit first, then delete
            st.remove_tree(st.join(step_dirname(old)))
        for old in self._all_step_dirs():
            if old < step and old not in committed:  # abandoned by a crash or a stale writer
                st.remove_tree(st.join(step_dirname(old)))
        for name in st.listdir(sdir):  # leftovers of older generations in this step
            m = _GEN_RE.search(name)
            if name not in referenced and m and int(m.group(1)) < self.generation:
                st.remove(st.join(step_dirname(step), name))

    # ------------------------------------------------------------------ listing
    def _all_step_dirs(self) -> List[int]:
        out = []
        for name in self._storage.listdir(self._storage.root):
            m = _STEP_RE.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def steps(self) -> List[int]:
        """Committed steps (those whose manifest is published), oldest first."""
        st = self._storage
        return [s for s in self._all_step_dirs()
                if st.exists(st.join(step_dirname(s), MANIFEST))]

    def latest_step(self) -> Optional[int]:
        """The newest committed step, or None. (``load()`` also verifies its files.)"""
        steps = self.steps()
        return steps[-1] if steps else None

    def list(self) -> List[CheckpointInfo]:
        """The committed checkpoints, oldest first, as their manifests describe them."""
        out = []
        for step in self.steps():
            try:
                m = self._read_manifest(step)
            except CheckpointCorruptError:
                continue
            out.append(CheckpointInfo(
                step=step, generation=int(m["generation"]), world_size=int(m["world_size"]),
                size_bytes=sum(int(f["size_bytes"]) for f in m["files"]),
                num_files=len(m["files"]), created_unix_s=float(m.get("created_unix_s", 0.0)),
                path=self._storage.join(step_dirname(step))))
        return out

    def _read_manifest(self, step: int) -> Dict[str, Any]:
        st = self._storage
        path = st.join(step_dirname(step), MANIFEST)
        try:
            m = json.loads(st.read_bytes(path))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint of step {step} at {self.url}") from None
        except ValueError as exc:
            raise CheckpointCorruptError(f"{path}: unreadable manifest: {exc}") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT or "files" not in m:
            raise CheckpointCorruptError(f"{path}: not an {FORMAT} manifest")
        return m

    def verify(self, step: int) -> List[str]:
        """Problems of ``step``'s files (missing, size, checksum); [] when it is whole."""
        try:
            m = self._read_manifest(step)
        except CheckpointError as exc:
            return [str(exc)]
        problems = []
        st = self._storage
        for f in m["files"]:
            try:
                st.read_many([(st.join(step_dirname(step), f["name"]), int(f["size_bytes"]),
                               _crc_of(f))], self._loader(), self._crc)
            except CheckpointCorruptError as exc:
                problems.append(str(exc))
        return problems

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
                state, info = self._load_step(s, target)
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

    def _load_step(self, step: int, target: Any) -> Tuple[Any, Tuple[str, str, int, int]]:
        m = self._read_manifest(step)
        try:
            saved_world = int(m["world_size"])
            generation = int(m["generation"])
            tree = m["trees"][self.rank if self.rank < saved_world else 0]
            mtensors = m["tensors"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(f"step {step}: malformed manifest ({exc!r})") from exc
        targets = flatten_target(target) if target is not None else {}
        refs = tensor_keys(tree)
        ref_paths = {path for path, _ in refs}
        extra = [p for p in targets if p not in ref_paths]
        if extra:
            raise CheckpointStateError(
                f"target names {'/'.join(map(str, extra[0])) or '<root>'} which checkpoint step "
                f"{step} does not hold")
        regions: Dict[Tuple[Any, ...], Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = {}
        for path, node in refs:
            key = node["key"]
            if key not in mtensors:
                raise CheckpointCorruptError(f"step {step}: tree names tensor {key!r} the manifest lacks")
            gshape = tuple(mtensors[key]["shape"])
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

        loaded = self._from_memory(step, m, regions)
        if loaded is not None:
            source = "memory"
            tables, sources = loaded
            where = self._memory_dir or ""
            nread = sum(int(s.nbytes) for s in sources.values())
        else:
            source, tables = "storage", mtensors
            sources = self._read_sources(step, m, regions)
            where = self._storage.join(step_dirname(step))
            nread = sum(int(s.nbytes) for s in sources.values())

        results: Dict[Tuple[Any, ...], Any] = {}
        fws = {path: node["fw"] for path, node in refs}
        for path, (key, offs, shape) in regions.items():
            raw = _assemble(key, tables[key], offs, shape, sources)
            tgt = targets.get(path)
            if tgt is not None:
                results[path] = fill_target(tgt, raw, tables[key]["dtype"])
            else:
                results[path] = to_framework(raw, tables[key]["dtype"], fws[path])
        state = decode(tree, lambda path, node: results[path])
        return state, (source, where, nread, generation)

    def _from_memory(self, step: int, m: Dict[str, Any], regions) -> Optional[tuple]:
        """The memory tier's tables and buffer, if it holds exactly this committed step."""
        if self._memory_dir is None or int(m["world_size"]) != self.world_size:
            return None
        snap = _memory.read_snapshot(self._memory_dir)  # mapped, not copied: costs nothing yet
        if snap is None:
            return None
        meta, data = snap
        if (meta.get("format") != FORMAT or meta.get("step") != step
                or meta.get("generation") != m["generation"] or meta.get("rank") != self.rank
                or meta.get("world_size") != self.world_size):
            return None
        tables = meta["tensors"]
        for key, offs, shape in regions.values():
            t = tables.get(key)
            mt = m["tensors"][key]
            if t is None or t["dtype"] != mt["dtype"] or t["shape"] != mt["shape"]:
                return None
            if _coverage(t["pieces"], offs, shape) != math.prod(shape):
                return None
        logger.info("[rank %d] loading step %d from node memory %s", self.rank, step,
                    self._memory_dir)
        return tables, {"slot": data}

    def _read_sources(self, step: int, m: Dict[str, Any], regions) -> Dict[str, np.ndarray]:
        st = self._storage
        files = {f["name"]: f for f in m["files"]}
        for f in files.values():  # every file must be whole, even those this rank won't read
            got = st.size(st.join(step_dirname(step), f["name"]))
            if got is None:
                raise CheckpointCorruptError(f"step {step}: {f['name']} is missing")
            if got != int(f["size_bytes"]):
                raise CheckpointCorruptError(f"step {step}: {f['name']} has {got} bytes, the "
                                             f"manifest says {f['size_bytes']} (truncated?)")
        needed = set()
        for key, offs, shape in regions.values():
            for p in m["tensors"][key]["pieces"]:
                if _overlap(p, offs, shape) is not None:
                    needed.add(p["file"])
        names = sorted(needed)
        for name in names:
            if name not in files:
                raise CheckpointCorruptError(f"step {step}: pieces refer to unlisted file {name}")
        specs = [(st.join(step_dirname(step), n), int(files[n]["size_bytes"]),
                  _crc_of(files[n])) for n in names]
        return dict(zip(names, st.read_many(specs, self._loader(), self._crc)))

    def _loader(self) -> ThreadPoolExecutor:
        """Threads that map and checksum the files of a load in parallel (made on first use)."""
        with self._lock:
            if self._load_pool is None:
                self._load_pool = ThreadPoolExecutor(_LOAD_THREADS, thread_name_prefix="ckpt-load")
            return self._load_pool

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
            if self._load_pool is not None:
                self._load_pool.shutdown(wait=True)
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


def _crc_of(f: Dict[str, Any]) -> int:
    algo, _, value = str(f.get("checksum", "")).partition(":")
    if algo != "crc32":
        raise CheckpointCorruptError(f"{f.get('name')}: unknown checksum {f.get('checksum')!r}")
    try:
        return int(value, 16)
    except ValueError:
        raise CheckpointCorruptError(f"{f.get('name')}: malformed checksum {value!r}") from None


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start:start + CHUNK_BYTES]


def _overlap(piece: Dict[str, Any], offs: Sequence[int], shape: Sequence[int]):
    """Per-dim (lo, hi) of the piece/region intersection, or None if they do not meet."""
    po, ps = piece["offsets"], piece["shape"]
    if len(po) != len(offs):
        return None
    box = []
    for a, n, b, k in zip(po, ps, offs, shape):
        lo, hi = max(a, b), min(a + n, b + k)
        if lo >= hi and not (n == 0 and k == 0 and a == b):
            return None
        box.append((lo, hi))
    return box


def _coverage(pieces: Sequence[Dict[str, Any]], offs, shape) -> int:
    total = 0
    for p in pieces:
        box = _overlap(p, offs, shape)
        if box is not None:
            total += math.prod(hi - lo for lo, hi in box)
    return total


def _assemble(key: str, t: Dict[str, Any], offs: Tuple[int, ...], shape: Tuple[int, ...],
              sources: Dict[str, np.ndarray]) -> np.ndarray:
    """The region ``offs``/``shape`` of tensor ``key`` as a raw array (a view when one piece
    holds exactly that region, else a copy assembled from every overlapping piece)."""
    rdt = raw_dtype(t["dtype"])

    def view(p: Dict[str, Any]) -> np.ndarray:
        buf = sources[p["file"]]
        b, e = int(p["begin"]), int(p["end"])
        if e > len(buf) or e - b != math.prod(p["shape"]) * rdt.itemsize:
            raise CheckpointCorruptError(f"tensor {key!r}: piece bytes {b}:{e} out of range")
        return buf[b:e].view(rdt).reshape(p["shape"])

    for p in t["pieces"]:
        if tuple(p["offsets"]) == tuple(offs) and tuple(p["shape"]) == tuple(shape):
            return view(p)
    out = np.empty(shape, dtype=rdt)
    covered = 0
    for p in t["pieces"]:
        box = _overlap(p, offs, shape)
        if box is None:
            continue
        src = view(p)
        s_idx = tuple(slice(lo - a, hi - a) for (lo, hi), a in zip(box, p["offsets"]))
        d_idx = tuple(slice(lo - b, hi - b) for (lo, hi), b in zip(box, offs))
        out[d_idx] = src[s_idx]
        covered += math.prod(hi - lo for lo, hi in box)
    if covered != math.prod(shape):
        raise CheckpointCorruptError(f"tensor {key!r}: the stored pieces cover {covered} of the "
                                     f"{math.prod(shape)} elements asked for")
    return out
