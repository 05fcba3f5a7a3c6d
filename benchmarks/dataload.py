"""Data loading, side by side on one generated dataset (samples/s, resume time).

    python benchmarks/dataload.py [--quick]

Starts a real S3 endpoint (moto server) on loopback, writes the dataset there as shards and
also pre-stages the same shard files on local disk, then measures with ElasticDataLoader
(torch, batches of 256, no workers): epoch 1 from S3 through an empty node cache
(``remote_sps``), the next epoch from the cache (``cached_sps``), the same order read straight
from the local shards (``local_sps``), and the time to resume at 90% of an epoch (``resume_s``:
new loader, ``load_state_dict``, first batch). MosaicML Streaming 0.13 runs from
``.bench-venv`` (``make bench-env``), writes its own MDS format from the same arrays to the same
endpoint and reads it through its own cache with torch's DataLoader (``mosaic_cached_sps``:
its second epoch).

Cached and local are compared on equal terms: the same loader class, sampler, seed, epoch
order, batch size and shard decode (the shard files are byte-identical; only where they come
from differs), after a warm-up pass on each side so both read from a warm page cache. Then
cached and local passes over the same epoch alternate for many rounds (which goes first
alternates too), timing every step (``iter`` + first batch, each next batch, the end). Each
round is printed. Since every pass does the same work step for step, ``cached_sps`` and
``local_sps`` sum each step's median over the rounds: a step slowed by other processes on this
shared machine is an outlier there, while anything the reader itself pays at a step is paid in
every round and stays. ``cached_frac_of_local`` is their ratio; the median of the whole-epoch
ratios and the CPU-time ratio are printed beside it. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import dataload  # noqa: E402
from services import S3Server  # noqa: E402

BENCH_PY = os.path.join(REPO, ".bench-venv", "bin", "python")
BATCH = 256

MOSAIC = r'''
import json, os, sys, time, types
# streaming/__init__ imports streaming.vision (torchvision datasets); the reader never uses it
# and PyPI's torchvision cannot load beside CPU torch, so that one subpackage is stubbed.
sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
import numpy as np
import torch
from streaming import MDSWriter, StreamingDataset

arrays, remote, local, shard_bytes, batch = sys.argv[1:]
shard_bytes, batch = int(shard_bytes), int(batch)
data = np.load(os.path.join(arrays, "x.npy"))
ids = np.load(os.path.join(arrays, "id.npy"))
cols = {"id": "int64", "x": f"ndarray:float32:{data.shape[1]}"}
with MDSWriter(out=(os.path.join(local, "staging"), remote), columns=cols,
               size_limit=shard_bytes, exist_ok=True, progress_bar=False) as w:
    for i in range(len(ids)):
        w.write({"id": int(ids[i]), "x": data[i]})
ds = StreamingDataset(remote=remote, local=os.path.join(local, "cache"), shuffle=True,
                      shuffle_seed=7, batch_size=batch)
out = {}
for epoch in (1, 2):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0)
    t0 = time.perf_counter()
    n = 0
    seen = set()
    for b in loader:
        n += len(b["id"])
    out[f"epoch{epoch}_sps"] = n / (time.perf_counter() - t0)
    out[f"epoch{epoch}_n"] = n
print("MOSAIC", json.dumps(out))
'''


def _epoch(loader) -> tuple:
    """Samples read, wall seconds, and CPU seconds of this process (all its threads)."""
    n, times, cpu_s = _timed_epoch(loader)
    return n, sum(times), cpu_s


def _timed_epoch(loader) -> tuple:
    """Samples read, the wall seconds of each step (``iter`` and the first batch, each next
    batch, the final ``StopIteration``), and CPU seconds of this process (all its threads)."""
    n, times = 0, []
    c0 = time.process_time()
    t = time.perf_counter()
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            times.append(time.perf_counter() - t)
            break
        times.append(time.perf_counter() - t)
        n += len(batch["id"])
        t = time.perf_counter()
    return n, times, max(time.process_time() - c0, 1e-9)


def _robust_sps(n: int, runs: list) -> float:
    """Samples/s from one epoch's order read many times: each step's median over the runs,
    summed. Every run does the same work step for step, so the median drops only what the
    machine's other load added to a step (a preemption), never a cost of the reader."""
    steps = zip(*(times for _n, times, _cpu in runs))
    return n / sum(statistics.median(step) for step in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small dataset (~40 MB)")
    args = ap.parse_args()
    n, dim = (10_000, 1024) if args.quick else (80_000, 1024)  # 4 KiB per sample
    shard_bytes = (4 << 20) if args.quick else (32 << 20)
    rounds = 31 if args.quick else 15
    work = tempfile.mkdtemp(prefix="bench-dataload-")
    rng = np.random.default_rng(0)
    x = rng.random((n, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    np.save(os.path.join(work, "x.npy"), x)
    np.save(os.path.join(work, "id.npy"), ids)
    results: dict = {}
    try:
        with S3Server() as s3:
            s3.new_bucket("bench")
            opts = s3.storage_options
            url = "s3://bench/ds"
            t0 = time.perf_counter()
            index = dataload.write_shards({"id": ids, "x": x}, url, shard_size_bytes=shard_bytes,
                                          storage_options=opts)
            write_s = time.perf_counter() - t0
            local = os.path.join(work, "local")
            dataload.write_shards({"id": ids, "x": x}, local, shard_size_bytes=shard_bytes)
            mib = index.size_bytes / (1 << 20)
            print(f"dataset: {n} samples x {dim * 4} B, {len(index.shards)} shards, {mib:.0f} MiB "
                  f"(written to S3 in {write_s:.1f} s)")

            cache = dataload.ShardCache(os.path.join(work, "cache"), 4 * index.size_bytes,
                                        progress=False)
            ds = dataload.ShardedDataset(url, storage_options=opts, cache=cache)
            loader = dataload.ElasticDataLoader(ds, BATCH, seed=1)
            got, secs, _cpu = _epoch(loader)  # epoch 0: fills the cache from S3
            assert got == n
            results["remote_sps"] = n / secs
            cached, local_runs = [], []
            local_loader = dataload.ElasticDataLoader(dataload.ShardedDataset(local), BATCH,
                                                      seed=1)
            # Every round reads epoch 1 (the second epoch) on both sides: the same order, so
            # step j is the same work in every run. One warm-up pass each first.
            for warm in (loader, local_loader):
                warm.set_epoch(1)
                _epoch(warm)
            print(f"\n{'round':>5} {'cached/s':>10} {'local/s':>10} {'ratio':>6}   (whole epochs)")
            for r in range(rounds):
                pair = {}
                for side in (("cached", "local") if r % 2 == 0 else ("local", "cached")):
                    which = loader if side == "cached" else local_loader
                    which.set_epoch(1)
                    run = _timed_epoch(which)
                    assert run[0] == n
                    pair[side] = run
                cached.append(pair["cached"])
                local_runs.append(pair["local"])
                c_sps, l_sps = n / sum(pair["cached"][1]), n / sum(pair["local"][1])
                print(f"{r:5d} {c_sps:10,.0f} {l_sps:10,.0f} {c_sps / l_sps:6.3f}")
            results["cached_sps"] = _robust_sps(n, cached)
            results["local_sps"] = _robust_sps(n, local_runs)
            results["cached_frac_of_local"] = results["cached_sps"] / results["local_sps"]
            epoch_frac = statistics.median(sum(loc[1]) / sum(c[1])
                                           for c, loc in zip(cached, local_runs))
            cpu_frac = (statistics.median(loc[2] for loc in local_runs)
                        / statistics.median(c[2] for c in cached))

            # Resume at 90% of an epoch: a fresh loader jumps there (no replay).
            state = dict(loader.state_dict(), position=int(0.9 * n))
            t0 = time.perf_counter()
            ds2 = dataload.ShardedDataset(url, storage_options=opts, cache=cache)
            resumed = dataload.ElasticDataLoader(ds2, BATCH)
            resumed.load_state_dict(state)
            first = next(iter(resumed))
            results["resume_s"] = time.perf_counter() - t0
            assert len(first["id"]) == BATCH
            replay_s = 0.9 * n / results["cached_sps"]

            results["mosaic_cached_sps"] = None
            mosaic_note = ""
            if not os.path.exists(BENCH_PY):
                mosaic_note = ".bench-venv not found: run `make bench-env` for the MosaicML column"
            else:
                env = {**os.environ, "S3_ENDPOINT_URL": s3.endpoint_url,
                       "AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret,
                       "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": ""}
                script = os.path.join(work, "mosaic_run.py")
                with open(script, "w") as f:
                    f.write(MOSAIC)
                proc = subprocess.run([BENCH_PY, script, work, "s3://bench/mds",
                                       os.path.join(work, "mosaic"), str(shard_bytes), str(BATCH)],
                                      capture_output=True, text=True, env=env, timeout=1800)
                if proc.returncode != 0 or "MOSAIC" not in proc.stdout:
                    mosaic_note = "MosaicML run failed: " + (proc.stderr.strip().splitlines()
                                                             or ["?"])[-1]
                else:
                    m = json.loads(proc.stdout.split("MOSAIC", 1)[1].strip().splitlines()[0])
                    if m["epoch2_n"] != n:
                        mosaic_note = f"MosaicML read {m['epoch2_n']} samples, not {n}"
                    results["mosaic_cached_sps"] = m["epoch2_sps"]
                    results["mosaic_remote_sps"] = m["epoch1_sps"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("epoch 1 from S3 (fills cache)", results["remote_sps"], "remote_sps"),
        ("epoch 2 from the node cache", results["cached_sps"], "cached_sps"),
        ("local shards, read directly", results["local_sps"], "local_sps"),
        ("MosaicML Streaming, epoch 1", results.get("mosaic_remote_sps"), ""),
        ("MosaicML Streaming, cached epoch", results["mosaic_cached_sps"], "mosaic_cached_sps"),
    ]
    print(f"\n{'what':36} {'samples/s':>12}")
    for label, value, _key in rows:
        print(f"{label:36} {value:12,.0f}" if value is not None else f"{label:36} {'n/a':>12}")
    print(f"\ncached / local: {results['cached_frac_of_local']:.3f} (target >= 0.95; per-step "
          f"medians of {rounds} rounds); median of the whole-epoch ratios: {epoch_frac:.3f}; "
          f"by CPU time: {cpu_frac:.3f}")
    if results["mosaic_cached_sps"]:
        print(f"cached / MosaicML cached: {results['cached_sps'] / results['mosaic_cached_sps']:.2f}"
              " (target >= 1)")
    print(f"resume at 90% of an epoch: {results['resume_s']:.3f} s (target < 1 s); replaying "
          f"to it at the cached rate would take {replay_s:.1f} s")
    if mosaic_note:
        print(mosaic_note)
    keys = ["remote_sps", "cached_sps", "local_sps", "mosaic_cached_sps", "cached_frac_of_local",
            "resume_s"]
    print(json.dumps({k: (round(results[k], 4) if results[k] is not None else None)
                      for k in keys}))


if __name__ == "__main__":
    main()
