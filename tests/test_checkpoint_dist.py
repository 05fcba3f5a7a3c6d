"""checkpoint across real processes: N ranks writing one checkpoint, N -> M resharding, the
node-memory tier after a restart, and SIGKILL at random instants during saves."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import uuid

import numpy as np
import pytest

from checkpoint import Checkpointer

# One worker script for every multi-process test; numpy only, so processes start fast.
WORKER = r'''
import json, os, sys
import numpy as np
from checkpoint import Checkpointer, Shard, PerRank, CheckpointNotFoundError

mode, url = sys.argv[1], sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
ROWS, COLS = 37, 6

def glob(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

W = glob(1, (ROWS, 5))          # sharded by rows
C = glob(2, (4, COLS))          # sharded by columns
R = glob(3, (1000, 3))          # replicated (data parallel)

def span(n, world, rank):
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)

def state(step, rank, world):
    r0, r1 = span(ROWS, world, rank)
    c0, c1 = span(COLS, world, rank)
    return {"step": step,
            "w": Shard.rows(W[r0:r1] + step, r0, ROWS),
            "c": Shard(C[:, c0:c1] + step, (0, c0), C.shape),
            "rep": {"r": R + step, "b": np.arange(5, dtype=np.int16) + step, "s": np.float64(step)},
            "mine": PerRank({"rank": rank, "vec": np.full(3, rank, np.int64)}),
            "data": {"samples_seen": 1000 * step}}

if mode == "save":
    ck = Checkpointer(url, keep=2)
    for step in map(int, sys.argv[3].split(",")):
        ck.save(step, state(step, rank, world))
    ck.close()
    print("SAVED", flush=True)
elif mode == "load":
    saved_world, step = int(sys.argv[3]), int(sys.argv[4])
    r0, r1 = span(ROWS, world, rank)
    c0, c1 = span(COLS, world, rank)
    target = {"w": Shard.rows(np.zeros((r1 - r0, 5), np.float32), r0, ROWS),
              "c": Shard(np.zeros((4, c1 - c0), np.float32), (0, c0), C.shape)}
    ck = Checkpointer(url)
    got = ck.load(target=target)
    assert got["step"] == step, got["step"]
    assert np.array_equal(target["w"].tensor, W[r0:r1] + step)
    assert np.array_equal(target["c"].tensor, C[:, c0:c1] + step)
    assert np.array_equal(got["rep"]["r"], R + step)
    assert np.array_equal(got["rep"]["b"], np.arange(5, dtype=np.int16) + step)
    assert got["rep"]["s"] == step and got["data"] == {"samples_seen": 1000 * step}
    want_rank = rank if rank < saved_world else 0
    assert got["mine"]["rank"] == want_rank and np.array_equal(got["mine"]["vec"], np.full(3, want_rank))
    full = Checkpointer(url, memory=False).load()  # no target: whole global tensors
    assert np.array_equal(full["w"], W + step) and np.array_equal(full["c"], C + step)
    print("LOADED", json.dumps({"source": ck.last_load.source, "step": ck.last_load.step}), flush=True)
elif mode == "loop":
    # A training process: resume from the newest checkpoint, then save every step until killed.
    ck = Checkpointer(url, keep=2)
    try:
        step = ck.load()["step"]
    except CheckpointNotFoundError:
        step = 0
    print("START", step, flush=True)
    n = int(sys.argv[3])
    while True:
        step += 1
        ck.save(step, {"step": step, "a": np.full(n, step, np.float32),
                       "b": np.full((n // 4, 4), -step, np.int64), "meta": {"s": str(step)}})
        ck.wait()
        print("C", step, flush=True)
'''


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "ckpt_worker.py"
    path.write_text(WORKER)
    return str(path)


@pytest.fixture
def memdir():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    path = os.path.join(base, f"ckpt-test-{uuid.uuid4().hex[:10]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_world(procs, worker, tag, world, argv, memdir, run_id="job", timeout_s=120):
    for rank in range(world):
        procs.start(f"{tag}{rank}", [worker, *argv], python=True,
                    env={"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                         "LOCAL_WORLD_SIZE": str(world), "ELASTIC_CKPT_MEMORY_DIR": memdir,
                         "TORCHELASTIC_RUN_ID": run_id})
    results = procs.wait(timeout_s, [f"{tag}{r}" for r in range(world)])
    return [results[f"{tag}{r}"].output for r in range(world)]


def loaded(output):
    line = [ln for ln in output.splitlines() if ln.startswith("LOADED ")][-1]
    return json.loads(line[len("LOADED "):])


def test_four_ranks_write_one_copy_then_reshard_to_two(procs, worker, tmp_path, memdir):
    url = str(tmp_path / "ck")
    run_world(procs, worker, "save", 4, ["save", url, "1,2"], memdir)
    ck = Checkpointer(url, memory=False)
    assert ck.steps() == [1, 2]
    manifest = json.loads((tmp_path / "ck" / "step-000000000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and len(manifest["files"]) == 4
    # Replicated state is written once, spread over the ranks, not four times.
    rep = manifest["tensors"]["rep/r"]
    assert rep["kind"] == "replicated"
    assert sum(math.prod(p["shape"]) for p in rep["pieces"]) == 1000 * 3
    assert len({p["file"] for p in rep["pieces"]}) >= 3
    data_bytes = sum(f["size_bytes"] - 4096 for f in manifest["files"])
    # every tensor byte exactly once: rep/r, w, c, rep/b, and each rank's own mine/vec
    assert data_bytes == 1000 * 3 * 4 + 37 * 5 * 4 + 4 * 6 * 4 + 5 * 2 + 4 * 3 * 8
    sizes = [f["size_bytes"] for f in manifest["files"]]
    assert max(sizes) - min(sizes) < 1200  # balanced, in parallel
    assert manifest["tensors"]["w"]["kind"] == "sharded"
    assert len(manifest["tensors"]["w"]["pieces"]) == 4
    outs = run_world(procs, worker, "load", 2, ["load", url, "4", "2"], memdir)
    assert all(loaded(o)["step"] == 2 for o in outs)


def test_two_ranks_reshard_to_three(procs, worker, tmp_path, memdir):
    url = str(tmp_path / "ck")
    run_world(procs, worker, "save", 2, ["save", url, "5"], memdir)
    outs = run_world(procs, worker, "load", 3, ["load", url, "2", "5"], memdir, run_id="other")
    assert [loaded(o)["source"] for o in outs] == ["storage"] * 3


def test_memory_tier_after_restart_and_storage_when_gone(procs, worker, tmp_path, memdir):
    url = str(tmp_path / "ck")
    run_world(procs, worker, "save", 2, ["save", url, "3,4"], memdir)
    assert len(os.listdir(memdir)) == 1  # /dev/shm/<...>/<run id>/...
    # Restarted workers (new processes, same node, same ranks) reload from node memory.
    outs = run_world(procs, worker, "restart", 2, ["load", url, "2", "4"], memdir)
    assert [loaded(o) for o in outs] == [{"source": "memory", "step": 4}] * 2
    shutil.rmtree(memdir)  # the node was replaced: storage is the fallback
    outs = run_world(procs, worker, "fresh", 2, ["load", url, "2", "4"], memdir)
    assert [loaded(o) for o in outs] == [{"source": "storage", "step": 4}] * 2


def _kill_lane(procs, worker, root, memdir, lane, kills, n, seed, failures):
    rng = random.Random(seed)
    url = os.path.join(root, f"lane{lane}")
    reader = Checkpointer(url, run_id=f"lane{lane}", memory_dir=memdir)
    storage_reader = Checkpointer(url, memory=False)
    try:
        for i in range(kills):
            name = f"lane{lane}-{i}"
            procs.start(name, [worker, "loop", url, str(n)], python=True,
                        env={"RANK": "0", "WORLD_SIZE": "1", "ELASTIC_CKPT_MEMORY_DIR": memdir,
                             "TORCHELASTIC_RUN_ID": f"lane{lane}"})
            procs.wait_for_output(name, "START", timeout_s=60)
            # Vary the instant: right away, within one save, or several saves in.
            delay = rng.choice([0.0, rng.uniform(0, 0.01), rng.uniform(0, 0.05), rng.uniform(0, 0.2)])
            if delay:
                threading.Event().wait(delay)
            procs.signal(name, signal.SIGKILL)
            procs.wait(30, [name], check=False)
            out = procs.output(name).split()
            start = int(out[out.index("START") + 1])
            committed = [int(out[j + 1]) for j, w in enumerate(out) if w == "C" and j + 1 < len(out)
                         and out[j + 1].isdigit()]
            last = committed[-1] if committed else start
            for ck in (reader, storage_reader):
                if last == 0 and not ck.steps():
                    continue  # killed before the very first commit: nothing to load yet
                state = ck.load()
                step = state["step"]
                # The old checkpoint or the new one, never anything else, and whole.
                assert step in (last, last + 1), (i, step, last, ck.last_load)
                assert state["meta"] == {"s": str(step)}
                assert np.array_equal(state["a"], np.full(n, step, np.float32))
                assert np.array_equal(state["b"], np.full((n // 4, 4), -step, np.int64))
    except BaseException as exc:  # reported by the test thread
        failures.append(exc)


def _sigkill_run(procs, worker, tmp_path, memdir, kills, n):
    failures: list = []
    lanes = [threading.Thread(target=_kill_lane, args=(procs, worker, str(tmp_path), memdir,
                                                       lane, kills // 2, n, 1000 + lane, failures))
             for lane in range(2)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join(timeout=280)
    assert not any(t.is_alive() for t in lanes), "a kill lane hung"
    if failures:
        raise failures[0]
    return sum(len(Checkpointer(os.path.join(tmp_path, f"lane{k}"), memory=False).steps())
               for k in range(2))


def test_sigkill_at_100_random_points_leaves_old_or_new_loadable(procs, worker, tmp_path, memdir):
    # ~600 KB of state per save; two lanes of 50 processes, each killed at a random instant.
    assert _sigkill_run(procs, worker, tmp_path, memdir, kills=100, n=50_000) >= 2


@pytest.mark.slow
def test_sigkill_at_400_random_points_bigger_state(procs, worker, tmp_path, memdir):
    assert _sigkill_run(procs, worker, tmp_path, memdir, kills=400, n=2_000_000) >= 2
