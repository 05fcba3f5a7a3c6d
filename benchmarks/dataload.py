"""Data loading, side by side on one generated dataset (samples/s, resume time).

    python benchmarks/dataload.py [--quick] [--mosaic-workers N]

Starts a real S3 endpoint (moto server) on loopback, writes the dataset there as shards and
also pre-stages the same shard files on local disk, then measures with ElasticDataLoader
(torch, batches of 256, no workers): epoch 1 from S3 through an empty node cache
(``remote_sps``), the next epochs from the cache (``cached_sps``), the same order read straight
from the local shards (``local_sps``), and the time to resume at 90% of an epoch in a fresh
process (``resume_s``: in a new Python process, with the node cache on disk from before but
nothing in memory: dataset, loader, ``load_state_dict``, first batch, after ``import torch``
and ``import dataload`` as a training script has them; the process's start-up and those
imports are printed beside it). MosaicML Streaming 0.13 runs from ``.bench-venv``
(``make bench-env``) as its documentation recommends: its own MDS format written from the same
arrays to the same endpoint, a ``StreamingDataset(remote=, local=, shuffle=True,
batch_size=256)`` read through a torch ``DataLoader(batch_size=256, num_workers=N)``
(``--mosaic-workers``, default the number of CPUs, at most 8); ``mosaic_cached_sps`` is from its
cache (the epochs after the first).

Every side is measured the same way: whole epochs, the same number of rounds (``--rounds``:
31 ``--quick``, 15 full) after one warm-up epoch, samples/s of the median epoch time, and
every epoch must deliver every sample exactly once (a MosaicML epoch whose sample count or
ids are wrong is an error: its figure is null and the error is printed, never a figure).
Cached and local alternate (which goes first alternates too) with the same loader class,
sampler, seed, epoch order, batch size and shard decode (the shard files are byte-identical;
only where they come from differs), both from a warm page cache; ``cached_frac_of_local`` is
the median over rounds of the paired whole-epoch ratio (cached epoch / the local epoch next to
it). Also printed: the ratio of the two median epochs, the same ratio from each step's median over the rounds summed
(a step another tenant slowed is an outlier there) and by CPU time. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
import importlib.metadata
import numpy as np
import torch
from streaming import MDSWriter, StreamingDataset

arrays, remote, local, shard_bytes, batch, rounds, workers = sys.argv[1:]
shard_bytes, batch, rounds, workers = int(shard_bytes), int(batch), int(rounds), int(workers)
data = np.load(os.path.join(arrays, "x.npy"))
ids = np.load(os.path.join(arrays, "id.npy"))
cols = {"id": "int64", "x": f"ndarray:float32:{data.shape[1]}"}
with MDSWriter(out=(os.path.join(local, "staging"), remote), columns=cols,
               size_limit=shard_bytes, exist_ok=True, progress_bar=False) as w:
    for i in range(len(ids)):
        w.write({"id": int(ids[i]), "x": data[i]})
ds = StreamingDataset(remote=remote, local=os.path.join(local, "cache"), shuffle=True,
                      shuffle_seed=7, batch_size=batch)
loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
out = {"versions": {"mosaicml-streaming": importlib.metadata.version("mosaicml-streaming"),
                    "torch": torch.__version__, "numpy": np.__version__},
       "epochs": []}
for epoch in range(1 + 1 + rounds):  # the first fills the cache, one warm-up, then the rounds
    t0 = time.perf_counter()
    n = 0
    seen = []
    for b in loader:
        n += len(b["id"])
        seen.append(b["id"].numpy())
    took = time.perf_counter() - t0
    got = np.sort(np.concatenate(seen)) if seen else np.empty(0, np.int64)
    exact = len(got) == len(ids) and bool(np.array_equal(got, np.sort(ids)))
    out["epochs"].append({"n": n, "s": took, "exact": exact})
print("MOSAIC", json.dumps(out))
'''

RESUME = r'''
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import torch  # a restarted training process has imported it for its model already
import dataload
state = json.loads(sys.argv[2])
opts = json.loads(sys.argv[5])
t1 = time.perf_counter()
marks = {}
cache = dataload.ShardCache(sys.argv[4], 1 << 40, progress=False)
ds = dataload.ShardedDataset(sys.argv[3], storage_options=opts, cache=cache)
marks["dataset_s"] = time.perf_counter() - t1
loader = dataload.ElasticDataLoader(ds, int(sys.argv[6]))
loader.load_state_dict(state)
marks["load_state_s"] = time.perf_counter() - t1 - marks["dataset_s"]
it = iter(loader)
first = next(it)
t2 = time.perf_counter()
marks["first_batch_s"] = t2 - t1 - marks["dataset_s"] - marks["load_state_s"]
print("RESUME", json.dumps({"resume_s": t2 - t1, "imports_s": t1 - t0, "batch": len(first["id"]),
                            "first_id": int(first["id"][0]), **marks}))
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
    ap.add_argument("--rounds", type=int, default=None, help="epochs per side (quick 31, full 15)")
    ap.add_argument("--mosaic-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="DataLoader workers for MosaicML Streaming (its docs: one per CPU)")
    args = ap.parse_args()
    n, dim = (10_000, 1024) if args.quick else (80_000, 1024)  # 4 KiB per sample
    shard_bytes = (4 << 20) if args.quick else (32 << 20)
    rounds = args.rounds or (31 if args.quick else 15)
    work = tempfile.mkdtemp(prefix="bench-dataload-")
    rng = np.random.default_rng(0)
    x = rng.random((n, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    np.save(os.path.join(work, "x.npy"), x)
    np.save(os.path.join(work, "id.npy"), ids)
    results: dict = {}
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
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
            # the figures: samples/s of the median whole epoch (as for MosaicML below)
            results["cached_sps"] = n / statistics.median(sum(c[1]) for c in cached)
            results["local_sps"] = n / statistics.median(sum(loc[1]) for loc in local_runs)
            step_frac = _robust_sps(n, cached) / _robust_sps(n, local_runs)
            # the ratio: per round, the cached epoch against the local epoch next to it, median
            # (a paired whole-epoch statistic; the ratio of the two medians is printed beside)
            epoch_frac = statistics.median(sum(loc[1]) / sum(c[1])
                                           for c, loc in zip(cached, local_runs))
            results["cached_frac_of_local"] = epoch_frac
            medians_frac = results["cached_sps"] / results["local_sps"]
            cpu_frac = (statistics.median(loc[2] for loc in local_runs)
                        / statistics.median(c[2] for c in cached))

            # Resume at 90% of an epoch in a fresh process: nothing in memory, the node cache
            # on disk (a restarted worker); it jumps there, no replay.
            state = dict(loader.state_dict(), position=int(0.9 * n))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", RESUME, REPO, json.dumps(state), url,
                                   os.path.join(work, "cache"), json.dumps(opts), str(BATCH)],
                                  capture_output=True, text=True, timeout=300)
            process_s = time.perf_counter() - t0
            if proc.returncode != 0 or "RESUME" not in proc.stdout:
                raise RuntimeError("resume process failed: " + proc.stderr[-2000:])
            res = json.loads(proc.stdout.split("RESUME", 1)[1])
            assert res["batch"] == BATCH
            results["resume_s"] = res["resume_s"]
            resume_note = (f"dataset {res['dataset_s']:.2f} s, load_state_dict "
                           f"{res['load_state_s']:.2f} s, first batch {res['first_batch_s']:.2f} s; "
                           f"fresh process: {process_s:.2f} s from its start (imports "
                           f"{res['imports_s']:.2f} s of torch and dataload)")
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
                                       os.path.join(work, "mosaic"), str(shard_bytes), str(BATCH),
                                       str(rounds), str(args.mosaic_workers)],
                                      capture_output=True, text=True, env=env, timeout=3600)
                if proc.returncode != 0 or "MOSAIC" not in proc.stdout:
                    mosaic_note = "MosaicML run failed: " + (proc.stderr.strip().splitlines()
                                                             or ["?"])[-1]
                else:
                    m = json.loads(proc.stdout.split("MOSAIC", 1)[1].strip().splitlines()[0])
                    versions.update(m["versions"])
                    wrong = [(i, e["n"]) for i, e in enumerate(m["epochs"]) if not e["exact"]]
                    if wrong:
                        mosaic_note = (f"MosaicML ERROR: epochs {wrong[:5]} (epoch, samples) did not "
                                       f"deliver each of the {n} samples exactly once: no figure")
                    else:
                        timed = [e["s"] for e in m["epochs"][2:]]
                        results["mosaic_cached_sps"] = n / statistics.median(timed)
                        results["mosaic_remote_sps"] = n / m["epochs"][0]["s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("epoch 1 from S3 (fills cache)", results["remote_sps"], "remote_sps"),
        ("epoch 2 from the node cache", results["cached_sps"], "cached_sps"),
        ("local shards, read directly", results["local_sps"], "local_sps"),
        ("MosaicML Streaming, epoch 1 (fills)", results.get("mosaic_remote_sps"), ""),
        ("MosaicML Streaming, cached epoch", results["mosaic_cached_sps"], "mosaic_cached_sps"),
    ]
    print("\nversions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"settings: {n} samples of {dim * 4} B, shards of {shard_bytes >> 20} MiB, batch {BATCH}; "
          f"ours: ElasticDataLoader, no workers; MosaicML: StreamingDataset(shuffle=True, "
          f"batch_size={BATCH}) in DataLoader(num_workers={args.mosaic_workers}); each side: "
          f"{rounds} whole epochs after a warm-up, samples/s of the median epoch; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"\n{'what':36} {'samples/s':>12}")
    for label, value, _key in rows:
        print(f"{label:36} {value:12,.0f}" if value is not None else f"{label:36} {'n/a':>12}")
    print(f"\ncached / local: {results['cached_frac_of_local']:.3f} (target >= 0.95; median over "
          f"{rounds} rounds of the cached epoch / the local epoch beside it); ratio of the median "
          f"epochs: {medians_frac:.3f}; from per-step medians: {step_frac:.3f}; by CPU time: "
          f"{cpu_frac:.3f}")
    if results["mosaic_cached_sps"]:
        print(f"cached / MosaicML cached: {results['cached_sps'] / results['mosaic_cached_sps']:.2f}"
              " (target >= 1)")
    print(f"resume at 90% of an epoch: {results['resume_s']:.3f} s (target < 1 s; {resume_note}); "
          f"replaying to it at the cached rate would take {replay_s:.1f} s")
    if mosaic_note:
        print(mosaic_note)
    keys = ["remote_sps", "cached_sps", "local_sps", "mosaic_cached_sps", "cached_frac_of_local",
            "resume_s"]
    print(json.dumps({k: (round(results[k], 4) if results[k] is not None else None)
                      for k in keys}))


if __name__ == "__main__":
    main()
