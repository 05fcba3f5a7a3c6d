"""dataload across real processes: the exactly-once audit (4 -> 2 -> 3 ranks, mid-epoch,
with SIGKILLed workers), several processes filling one shard, a fill killed midway."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import textwrap
import time

import numpy as np
import pytest

from dataload import ShardCache, ShardInfo, write_shards
from needs import require, require_tool

AUDIT_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import dataload
    from elastic import World

    url, cache_dir, state_in, out_dir, commit, batch = sys.argv[1:]
    commit, batch = int(commit), int(batch)
    world = World.from_env()
    ds = dataload.ShardedDataset(url, cache_dir=cache_dir, cache_max_bytes="64MiB")
    loader = dataload.ElasticDataLoader(ds, batch, seed=123, num_workers=1)
    if state_in != "-":
        with open(state_in) as f:
            loader.load_state_dict(json.load(f))
    log = open(os.path.join(out_dir, f"rank{world.rank}.log"), "w")
    for step, b in enumerate(loader):
        log.write(json.dumps({"step": step, "ids": b["id"].tolist()}) + "\\n")
        log.flush()
        if step + 1 == commit:
            tmp = os.path.join(out_dir, f"state-{world.rank}.json.tmp")
            with open(tmp, "w") as f:
                json.dump(loader.state_dict(), f)
            os.rename(tmp, os.path.join(out_dir, f"state-{world.rank}.json"))
            print("COMMITTED", flush=True)
        if commit > 0 and step + 1 == commit + 2:
            os.kill(os.getpid(), signal.SIGKILL)  # die holding uncommitted work
    print("EPOCH-END", json.dumps(loader.state_dict()), flush=True)
""")


def _run_phase(procs, tmp_path, phase, world_size, batch, commit, state_in, url, cache_dir):
    out = tmp_path / f"phase{phase}"
    out.mkdir()
    script = tmp_path / "audit_worker.py"
    script.write_text(AUDIT_WORKER)
    names = []
    for rank in range(world_size):
        name = f"p{phase}-r{rank}"
        env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size)}
        procs.start(name, [str(script), url, cache_dir, state_in, str(out), str(commit),
                           str(batch)], env=env, python=True)
        names.append(name)
    results = procs.wait(timeout_s=120, names=names, check=commit < 0)
    if commit > 0:
        for r in results.values():
            assert r.signal == signal.SIGKILL, r.describe()
            assert "COMMITTED" in r.output
    logs = []
    for rank in range(world_size):
        with open(out / f"rank{rank}.log") as f:
            logs.append([json.loads(line) for line in f])
    states = []
    if commit > 0:
        for rank in range(world_size):
            with open(out / f"state-{rank}.json") as f:
                states.append(json.load(f))
        assert all(s == states[0] for s in states), "ranks disagree on the saved position"
    return logs, (states[0] if states else None), results


def test_exactly_once_across_4_2_3_ranks_mid_epoch(procs, tmp_path):
    n = 1000
    url = str(tmp_path / "ds")
    write_shards({"id": np.arange(n, dtype=np.int64),
                  "x": np.zeros((n, 16), dtype=np.float32)}, url, samples_per_shard=40)
    cache_dir = str(tmp_path / "cache")
    committed = collections.Counter()
    rolled_back = []

    # 4 ranks, 10 per batch: commit after 8 steps (position 320), die 2 steps later.
    logs, state, _ = _run_phase(procs, tmp_path, 1, 4, 10, 8, "-", url, cache_dir)
    assert state["position"] == 320 and state["epoch"] == 0
    for log in logs:
        committed.update(i for rec in log if rec["step"] < 8 for i in rec["ids"])
        rolled_back += [i for rec in log if rec["step"] >= 8 for i in rec["ids"]]
    assert len(rolled_back) == 4 * 2 * 10  # work after the commit, lost with the world
    state_path = tmp_path / "state1.json"
    state_path.write_text(json.dumps(state))

    # 2 ranks, 13 per batch, from the 4-rank state: commit after 10 steps, die.
    logs, state, _ = _run_phase(procs, tmp_path, 2, 2, 13, 10, str(state_path), url, cache_dir)
    assert state["position"] == 320 + 10 * 2 * 13
    for log in logs:
        committed.update(i for rec in log if rec["step"] < 10 for i in rec["ids"])
    state_path = tmp_path / "state2.json"
    state_path.write_text(json.dumps(state))

    # 3 ranks, 8 per batch, to the end of the epoch (17 full steps, then a tail of 12).
    logs, _, results = _run_phase(procs, tmp_path, 3, 3, 8, -1, str(state_path), url, cache_dir)
    for log in logs:
        committed.update(i for rec in log for i in rec["ids"])
        assert len(log) == 18 and len(log[-1]["ids"]) == 4
    for r in results.values():
        end = json.loads(r.output.split("EPOCH-END", 1)[1].strip().splitlines()[0])
        assert (end["epoch"], end["position"]) == (1, 0)

    dupes = {i: c for i, c in committed.items() if c > 1}
    missing = set(range(n)) - set(committed)
    assert not dupes, f"seen more than once: {sorted(dupes)[:20]}"
    assert not missing, f"never seen: {sorted(missing)[:20]}"
    assert set(rolled_back) <= set(committed)  # lost work was redone, not skipped
    # The node cache was shared and filled by concurrent processes: every shard once.
    shards = os.listdir(tmp_path / "cache" / "shards")
    assert len(shards) == 25 and os.listdir(tmp_path / "cache" / "tmp") == []


FILL_WORKER = textwrap.dedent("""
    import hashlib, json, sys, time
    from dataload import FillProgress, ShardCache, ShardInfo

    cache_dir, src, info_json, delay_s = sys.argv[1:]
    info = ShardInfo.from_json(json.loads(info_json))
    delay_s = float(delay_s)

    class SlowSource:  # a slow remote: 256 KiB per read, each after a delay
        def __init__(self):
            self.f = open(src, "rb")
        def read(self, n=-1):
            time.sleep(delay_s)
            return self.f.read(256 << 10)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    progress = FillProgress(None)
    cache = ShardCache(cache_dir, "1GiB", progress=progress)
    print("START", flush=True)
    path = cache.fetch(info, SlowSource, ".bin")
    with open(path, "rb") as f:
        ok = hashlib.sha256(f.read()).hexdigest() == info.sha256
    print("RESULT", json.dumps({"filled": progress.stats().shards_done, "ok": ok}), flush=True)
""")


@pytest.fixture
def big_shard(tmp_path):
    data = np.random.default_rng(1).bytes(8 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    info = ShardInfo("big.bin", 1, len(data), hashlib.sha256(data).hexdigest())
    script = tmp_path / "fill_worker.py"
    script.write_text(FILL_WORKER)
    return src, info, script


def _result(output: str) -> dict:
    return json.loads(output.split("RESULT", 1)[1].strip().splitlines()[0])


def test_several_processes_fill_one_shard_once(procs, tmp_path, big_shard):
    src, info, script = big_shard
    cache_dir = str(tmp_path / "cache")
    names = [f"filler{i}" for i in range(4)]
    for name in names:
        procs.start(name, [str(script), cache_dir, str(src), json.dumps(info.to_json()), "0.01"],
                    python=True)
    results = procs.wait(timeout_s=120, names=names)
    outs = [_result(r.output) for r in results.values()]
    assert all(o["ok"] for o in outs), outs
    assert sum(o["filled"] for o in outs) == 1, outs  # one filler; the others waited or hit
    assert os.listdir(tmp_path / "cache" / "shards") == [info.sha256 + ".bin"]
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_a_fill_killed_midway_is_never_served_and_is_refilled(procs, tmp_path, big_shard):
    src, info, script = big_shard
    cache_dir = str(tmp_path / "cache")
    procs.start("victim", [str(script), cache_dir, str(src), json.dumps(info.to_json()), "0.2"],
                python=True)
    tmp_dir = tmp_path / "cache" / "tmp"
    deadline = time.monotonic() + 60
    parts = []
    while time.monotonic() < deadline:  # wait until the fill has written some bytes
        parts = [p for p in tmp_dir.glob("*.part") if p.stat().st_size > 0] \
            if tmp_dir.exists() else []
        if parts:
            break
        assert procs["victim"].poll() is None, procs.output("victim")
        time.sleep(0.02)
    assert parts, "the fill never started"
    procs.signal("victim", signal.SIGKILL)
    result = procs.wait(timeout_s=30, names=["victim"], check=False)["victim"]
    assert result.signal == signal.SIGKILL and "RESULT" not in result.output
    assert parts[0].exists() and parts[0].stat().st_size < info.size_bytes  # half a shard
    cache = ShardCache(cache_dir, "1GiB", progress=False)
    assert cache.get(info, ".bin") is None  # the half-written fill is not served
    procs.start("refill", [str(script), cache_dir, str(src), json.dumps(info.to_json()), "0"],
                python=True)
    out = _result(procs.wait(timeout_s=60, names=["refill"])["refill"].output)
    assert out == {"filled": 1, "ok": True}
    assert not parts[0].exists() and os.listdir(tmp_dir) == []
    assert cache.get(info, ".bin") is not None


HOROVOD_WORKER = textwrap.dedent("""
    import json, os, sys
    import horovod.torch as hvd
    import torch
    import dataload

    hvd.init()
    ds = dataload.ShardedDataset(sys.argv[1])
    loader = dataload.ElasticDataLoader(ds, 16, seed=4)  # world from HOROVOD_RANK/SIZE
    assert loader.sampler.world.world_size == hvd.size() == 2
    ids = torch.cat([b["id"] for b in loader])
    sizes = hvd.allgather(torch.tensor([len(ids)]))
    every = hvd.allgather(ids)
    if hvd.rank() == 0:
        print("IDS", json.dumps(sorted(every.tolist())), json.dumps(sizes.tolist()), flush=True)
""")


def test_horovod_through_the_torch_path(procs, tmp_path):
    require("horovod.torch", "Horovod built by make setup")
    horovodrun = require_tool("horovodrun", "Horovod built by make setup")
    import sys

    url = str(tmp_path / "ds")
    write_shards({"id": np.arange(300, dtype=np.int64)}, url, samples_per_shard=50)
    script = tmp_path / "hvd_worker.py"
    script.write_text(HOROVOD_WORKER)
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    procs.start("hvd", [horovodrun, "-np", "2", "--gloo", sys.executable, str(script), url],
                env=env)
    out = procs.wait(timeout_s=120, names=["hvd"])["hvd"].output
    line = out.split("IDS", 1)[1].strip().splitlines()[0]
    ids = json.loads(line.split("] ", 1)[0] + "]")
    assert ids == list(range(300))
