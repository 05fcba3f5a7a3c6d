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
from needs import require, require_tool

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
    print(f"START {step}", flush=True)  # one write: the test may kill right after "START"
    n = int(sys.argv[3])
    while True:
        step += 1
        ck.save(step, {"step": step, "a": np.full(n, step, np.float32),
                       "b": np.full((n // 4, 4), -step, np.int64), "meta": {"s": str(step)}})
        ck.wait()
        print(f"C {step}", flush=True)
elif mode == "dloop":
    # One rank of a 2-D parallel job: resume from the newest checkpoint (checking it is whole),
    # then save a distributed checkpoint every step until killed. Every value encodes its step
    # and rank, so a checkpoint mixing two saves cannot pass the checks.
    n = int(sys.argv[3])
    ck = Checkpointer(url, keep=2, publish_timeout_s=120)
    try:
        got = ck.load()
    except CheckpointNotFoundError:
        step = 0
    else:
        step = got["step"]
        check_dstate(got, step, rank, n)
    print(f"START {step} {ck.last_load.source if step else '-'}", flush=True)
    while True:
        step += 1
        ck.save(step, dstate(step, rank, world, n))
        ck.wait()
        print(f"C {step}", flush=True)
'''

# Shared by the dloop worker and the test: a replicated vector (its writing split between the
# ranks), a row-sharded matrix and per-rank data, all functions of the step.
DSTATE = r'''
import numpy as np
from checkpoint import Shard, PerRank

DROWS = 64

def dglobal(step):
    return np.arange(DROWS * 8, dtype=np.int64).reshape(DROWS, 8) + 1_000_000 * step

def dstate(step, rank, world, n):
    r0, r1 = DROWS * rank // world, DROWS * (rank + 1) // world
    return {"step": step, "rep": np.full(n, step, np.float32),
            "w": Shard.rows(dglobal(step)[r0:r1], r0, DROWS),
            "mine": PerRank({"rank": rank, "step": step, "v": np.full(4, 10 * step + rank)})}

def check_dstate(got, step, rank, n):
    # Loaded with any world: "w" comes back whole; "mine" is this rank's (or rank 0's).
    assert np.array_equal(got["rep"], np.full(n, step, np.float32)), ("rep", step)
    assert np.array_equal(got["w"], dglobal(step)), ("w", step)
    mine = got["mine"]
    assert mine["step"] == step and np.array_equal(mine["v"], np.full(4, 10 * step + mine["rank"])), mine
    assert mine["rank"] == rank, (mine["rank"], rank)
'''
WORKER = WORKER.replace("mode, url = sys.argv[1], sys.argv[2]", DSTATE + "\nmode, url = sys.argv[1], sys.argv[2]")


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


def test_two_ranks_sigkilled_during_distributed_saves_leave_old_or_new_step(procs, worker, tmp_path,
                                                                             memdir):
    """Each trial restarts a 2-rank job (a new generation, as the agent's next round) that
    resumes from the newest checkpoint and saves every step; one rank is SIGKILLed at a random
    instant, then the other (the agent stopping the group). The checkpoint that loads, in the
    restarted ranks (node memory or storage) and here, is the last committed step or the one
    being committed, each tensor whole and of that step: never a mix of the two."""
    ns: dict = {}
    exec(compile(DSTATE, "dstate", "exec"), ns)
    url, n, world = str(tmp_path / "ck"), 20_000, 2
    rng = random.Random(7)
    last, commits = 0, 0
    for trial in range(8):
        names = [f"t{trial}r{r}" for r in range(world)]
        for rank, name in enumerate(names):
            procs.start(name, [worker, "dloop", url, str(n)], python=True,
                        env={"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                             "LOCAL_WORLD_SIZE": str(world), "ELASTIC_GENERATION": str(trial + 1),
                             "ELASTIC_CKPT_MEMORY_DIR": memdir, "TORCHELASTIC_RUN_ID": "dkill"})
        for name in names:
            procs.wait_for_output(name, "START", timeout_s=60)
        starts = [procs.output(name).split() for name in names]
        for out in starts:  # the restarted ranks loaded the old or the new step, checked whole
            resumed = int(out[out.index("START") + 1])
            assert resumed in (last, last + 1), (trial, resumed, last)
        threading.Event().wait(rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.4)]))
        victim = rng.randrange(world)
        procs.signal(names[victim], signal.SIGKILL)
        threading.Event().wait(rng.uniform(0, 0.03))
        procs.signal(names[1 - victim], signal.SIGKILL)
        procs.wait(30, names, check=False)
        out0 = procs.output(names[0]).split()
        start = int(out0[out0.index("START") + 1])
        done = [int(out0[j + 1]) for j, w in enumerate(out0)
                if w == "C" and j + 1 < len(out0) and out0[j + 1].isdigit()]
        commits += len(done)
        last = done[-1] if done else start  # rank 0 commits; it may die before printing "C"
        steps = Checkpointer(url, memory=False).steps()
        if last == 0 and not steps:
            continue
        for rank, size in ((0, 1), (0, world), (1, world), (2, 3)):  # any world loads it whole
            ck = Checkpointer(url, rank=rank, world_size=size, memory=False)
            got = ck.load()
            step = got["step"]
            assert step in (last, last + 1), (trial, step, last, ck.last_load)
            ns["check_dstate"](got, step, rank if rank < world else 0, n)
            assert ck.last_load.skipped == ()  # nothing damaged was committed
        last = step
    assert commits >= 2


HOROVOD_SCRIPT = r'''
import sys
import torch
import horovod.torch as hvd
from checkpoint import Checkpointer

hvd.init()
url = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(4, 64) * (hvd.rank() + 1)).pow(2).mean().backward()
    opt.step()
ck = Checkpointer(url)  # no RANK in the environment: rank and size come from Horovod
assert (ck.rank, ck.world_size) == (hvd.rank(), hvd.size()), (ck.rank, ck.world_size)
ck.save(3, {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3})
ck.wait()
hvd.allreduce(torch.zeros(1), name="committed")  # rank 0 has committed once all ranks are here
got = Checkpointer(url, memory=False).load()
for k, v in model.state_dict().items():
    assert torch.equal(got["model"][k], v), k
for i, s in opt.state_dict()["state"].items():
    assert torch.equal(got["optim"]["state"][i]["momentum_buffer"], s["momentum_buffer"]), i
print("HVD", hvd.rank(), hvd.size(), float(sum(v.sum() for v in model.state_dict().values())),
      flush=True)
'''


@pytest.mark.slow  # horovodrun and two torch imports: about a minute on 2 busy cores
def test_horovod_ranks_split_one_checkpoint_through_its_framework(tmp_path):
    """Under ``horovodrun`` (no RANK/WORLD_SIZE), the Checkpointer takes rank and size from
    Horovod: the two ranks write one copy of the replicated torch state between them."""
    import subprocess
    import sys

    horovodrun = require_tool("horovodrun", "Horovod built by make setup")
    require("horovod.torch", "Horovod built by make setup")
    script = tmp_path / "hvd_ckpt.py"
    script.write_text(HOROVOD_SCRIPT)
    url = str(tmp_path / "ck")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=os.path.dirname(horovodrun) + os.pathsep + env["PATH"],
               PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""),
               ELASTIC_CKPT_MEMORY_DIR=str(tmp_path / "shm"))
    res = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo",
                          "--network-interface", "lo", sys.executable, str(script), url],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    # "HVD rank size checksum" (horovodrun may prefix each line with its rank)
    rows = [line.split("HVD ", 1)[1].split() for line in out.splitlines() if "HVD " in line]
    sums = {rank: total for rank, size, total in rows if size == "2"}
    assert sorted(sums) == ["0", "1"] and len(set(sums.values())) == 1, out[-4000:]
    manifest = json.loads((tmp_path / "ck" / "step-000000000003" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["files"]) == 2
    weight = manifest["tensors"]["model/0.weight"]
    assert weight["kind"] == "replicated"
    assert sum(math.prod(p["shape"]) for p in weight["pieces"]) == 48 * 64  # one copy in all
    assert sorted(f["size_bytes"] > 4096 for f in manifest["files"]) == [True, True]  # both wrote


def test_rank_and_size_from_horovods_launcher_environment(procs, tmp_path):
    """Without RANK/WORLD_SIZE (torchrun's), the launcher variables of horovodrun (Gloo) and
    mpirun name the rank; RANK wins where both are set; explicit arguments win over both."""
    script = tmp_path / "which.py"
    script.write_text("from checkpoint import Checkpointer\n"
                      "import sys\n"
                      "ck = Checkpointer(sys.argv[1], memory=False)\n"
                      "print('WORLD', ck.rank, ck.world_size, flush=True)\n")
    cases = {"gloo": ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "3"}, "1 3"),
             "ompi": ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}, "2 4"),
             "torchrun": ({"RANK": "0", "WORLD_SIZE": "2", "HOROVOD_RANK": "1",
                           "HOROVOD_SIZE": "2"}, "0 2"),
             "plain": ({}, "0 1")}
    clean = {k: "" for k in ("RANK", "WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE",
                             "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")}
    for name, (env, _) in cases.items():
        procs.start(name, [str(script), str(tmp_path / name)], python=True, env={**clean, **env})
    results = procs.wait(120, list(cases))
    for name, (_, want) in cases.items():
        assert f"WORLD {want}" in results[name].output, (name, results[name].output)
    ck = Checkpointer(str(tmp_path / "explicit"), rank=1, world_size=2, memory=False)
    assert (ck.rank, ck.world_size) == (1, 2)
