"""Checkpoint benchmark: training stall, persist and load throughput, side by side.

    python benchmarks/checkpoint.py [--quick] [--dir /tmp] [--size-mib N]

Compares, on one torch state of 1 GiB (``--quick``: 256 MiB) in one run:

* the training stall of ``Checkpointer.save()`` (time until it returns) against ``torch.save``
  and ``torch.distributed.checkpoint.async_save`` (1-rank gloo group) with one ``DefaultStager``
  reused across saves, as its users run it (its stall: until its staging completes, when the
  state may be modified again; the time until ``async_save`` returns is printed too), and
  against an in-memory copy of the state into preallocated buffers (``memcpy_s``, the floor);
* our persist throughput (state bytes / time from ``save()`` to durable commit) against
  ``dd oflag=direct`` writing as many bytes to the same disk right after each timed save;
* our load throughput (a fresh reader, no node memory: map, CRC, tensors) against ``dd``
  reading the same checkpoint files sequentially, both with a cold page cache (the JSON
  figure; evicted with fadvise and checked with mincore before each run) and both warm, in
  interleaved trials (medians), so that the other tenants of a shared machine weigh on both.

Every figure is the median of ``--saves`` runs (default 5) after a warm-up run (which
allocates staging memory once; the first save's stall is printed too), and its spread
(min-max over the runs) is printed beside it and given in the JSON's ``spread``. The last line
is one JSON object with the keys the issue names.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from elastic.net import free_port  # noqa: E402


def make_state(torch, total_bytes: int) -> dict:
    """A model-like state: a few large float32 matrices and some small tensors."""
    n_big = 8
    rows = max(1, total_bytes // n_big // (4 * 4096))
    gen = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.empty(rows, 4096).uniform_(-1, 1, generator=gen)
             for i in range(n_big)}
    model.update({f"layer{i}.bias": torch.zeros(4096) for i in range(n_big)})
    return {"model": model, "step": 1, "rng": torch.get_rng_state()}


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state["model"].values()) + state["rng"].numel()


def _files(path: str) -> list:
    return [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path)
                                                for f in fs]


def drop_cache(path: str) -> None:
    """Evict a file (or every file under a directory) from the page cache (no root needed).

    Pages still mapped by this process cannot be evicted, so maps of an earlier load are
    collected first; :func:`cached_fraction` checks the result."""
    gc.collect()
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(path: str) -> float:
    """The fraction of the bytes under ``path`` that sit in the page cache (mincore(2))."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for p in _files(path):
        size = os.path.getsize(p)
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            libc.mincore(ctypes.c_void_p(addr), size, vec)
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in vec) * page
        total += pages * page
    return resident / total if total else 0.0


def timed_load(Checkpointer, url: str, torch, state: dict) -> float:
    """Seconds for a fresh process-like reader (no node memory) to load the newest step."""
    reader = Checkpointer(url, memory=False)
    t0 = time.perf_counter()
    loaded = reader.load()
    took = time.perf_counter() - t0
    assert reader.last_load.source == "storage"
    assert torch.equal(loaded["model"]["layer0.weight"], state["model"]["layer0.weight"])
    reader.close()
    return took


def seq_read_s(paths: list) -> float:
    """Seconds ``dd bs=64M`` takes to read ``paths`` one after the other (dd's own clock)."""
    total = 0.0
    for p in paths:
        res = subprocess.run(["dd", f"if={p}", "of=/dev/null", "bs=64M"], capture_output=True,
                             text=True, check=True)
        total += float(re.search(r"copied, ([\d.e-]+) s", res.stderr).group(1))
    return total


def dd_bytes_per_s(args: list) -> float:
    res = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", res.stderr)
    return int(m.group(1)) / float(m.group(2))




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB of state instead of 1 GiB")
    ap.add_argument("--size-mib", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    ap.add_argument("--saves", type=int, default=5, help="timed runs of each save after a warm-up")
    ap.add_argument("--load-trials", type=int, default=5, help="interleaved load/read trials")
    args = ap.parse_args()
    size = (args.size_mib or (256 if args.quick else 1024)) << 20

    import torch

    from checkpoint import Checkpointer

    work = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or "/tmp")
    shm = tempfile.mkdtemp(prefix="ckpt-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    rows = []
    try:
        state = make_state(torch, size)
        nbytes = state_bytes(state)
        gib = nbytes / 2**30

        # 1. in-memory copy into preallocated buffers: the floor for any stall
        dst = {k: torch.empty_like(v) for k, v in state["model"].items()}
        times = []
        for _ in range(1 + args.saves):
            t0 = time.perf_counter()
            for k, v in state["model"].items():
                dst[k].copy_(v)
            times.append(time.perf_counter() - t0)
        memcpy_runs = times[1:]  # the first run faults the buffers in
        memcpy_s = statistics.median(memcpy_runs)
        del dst

        # 2. ours: stall, and persist time until the manifest is committed
        url = os.path.join(work, "ours")
        ck = Checkpointer(url, keep=1, memory_dir=shm, rank=0, world_size=1, run_id="bench")
        # After each timed save, dd oflag=direct writes as many bytes to the same disk
        # (interleaved, so that the machine's other load weighs on both alike).
        stalls, persists, dd_writes = [], [], []
        dd_path = os.path.join(work, "dd.bin")
        for step in range(1 + args.saves):
            state["step"] = step
            t0 = time.perf_counter()
            ck.save(step, state)
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            stalls.append(t1 - t0)
            persists.append(t2 - t0)
            ckpt_dir = os.path.join(url, f"step-{step:012d}")
            written = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir))
            if step:
                if os.path.exists(dd_path):
                    os.unlink(dd_path)
                dd_writes.append(dd_bytes_per_s(["if=/dev/zero", f"of={dd_path}", "bs=64M",
                                                 f"count={max(1, written // (64 << 20))}",
                                                 "oflag=direct"]))
        os.unlink(dd_path)
        stall_s = statistics.median(stalls[1:])
        persist_s = statistics.median(persists[1:])
        persist_bps = written / persist_s
        dd_write = statistics.median(dd_writes)
        # paired per save: our persist rate over dd's right after it
        persist_fracs = [written / p / d for p, d in zip(persists[1:], dd_writes)]

        # 3. load vs a sequential read of the same files, both cold (page cache dropped before
        # each run) and both warm (files cached); trials interleaved so that load from the
        # other tenants of the machine falls on both sides alike; medians.
        files = [os.path.join(ckpt_dir, f) for f in sorted(os.listdir(ckpt_dir))]
        cold_ours, cold_read, warm_ours, warm_read = [], [], [], []
        left_cached = []
        for _trial in range(args.load_trials):
            drop_cache(url)
            left_cached.append(cached_fraction(url))
            cold_ours.append(timed_load(Checkpointer, url, torch, state))
            drop_cache(url)
            left_cached.append(cached_fraction(url))
            cold_read.append(seq_read_s(files))
            warm_ours.append(timed_load(Checkpointer, url, torch, state))
            warm_read.append(seq_read_s(files))
        load_s, read_s = statistics.median(cold_ours), statistics.median(cold_read)
        warm_load_s, warm_read_s = statistics.median(warm_ours), statistics.median(warm_read)
        # and from node memory (the restarted worker's path)
        mem_times = []
        for _ in range(args.load_trials):
            t0 = time.perf_counter()
            loaded = ck.load()
            mem_times.append(time.perf_counter() - t0)
            assert ck.last_load.source == "memory"
            del loaded
        mem_load_s = statistics.median(mem_times)
        ck.drop_memory()
        ck.close()
        load_bps, dd_read = written / load_s, written / read_s
        shutil.rmtree(url)

        # 4. torch.save (its stall is the whole save)
        path = os.path.join(work, "torch.pt")
        times = []
        for _ in range(1 + args.saves):
            t0 = time.perf_counter()
            torch.save(state, path)
            times.append(time.perf_counter() - t0)
            os.unlink(path)
        torch_save_runs = times[1:]
        torch_save_s = statistics.median(torch_save_runs)

        # 5. DCP async_save on a 1-rank gloo group with one DefaultStager reused across saves
        # (its staging buffers are allocated once, as ours are): the stall lasts until the
        # staging completes (then the state may change), the save until the upload completes
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        gpu = torch.cuda.is_available()
        # its defaults, except what needs an accelerator: pinned memory, non-blocking copies
        options = StagingOptions(use_pinned_memory=gpu, use_non_blocking_copy=gpu)
        stager = DefaultStager(options)
        dcp_stalls, dcp_returns, dcp_totals = [], [], []
        try:
            for i in range(1 + args.saves):
                path = os.path.join(work, f"dcp{i}")
                t0 = time.perf_counter()
                resp = dcp.async_save({"model": state["model"]}, checkpoint_id=path, async_stager=stager)
                t1 = time.perf_counter()
                resp.staging_completion.result()
                t2 = time.perf_counter()
                resp.upload_completion.result()
                dcp_returns.append(t1 - t0)
                dcp_stalls.append(t2 - t0)
                dcp_totals.append(time.perf_counter() - t0)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            stager.close()
            dist.destroy_process_group()
        dcp_async_stall_s = statistics.median(dcp_stalls[1:])
        dcp_return_s = statistics.median(dcp_returns[1:])
        dcp_total_s = statistics.median(dcp_totals[1:])

    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    def spread(runs, scale=1.0, unit="s", digits=3):
        return f"[{min(runs) * scale:.{digits}f}-{max(runs) * scale:.{digits}f}{' ' + unit if unit else ''}]"

    load_fracs = [read / load for load, read in zip(cold_ours, cold_read)]
    rows = [
        ("state", f"{gib:.2f} GiB", ""),
        ("in-memory copy (memcpy_s)", f"{memcpy_s:.3f} s", f"floor {spread(memcpy_runs)}"),
        ("ours: save() stall (stall_s)", f"{stall_s:.3f} s",
         f"{stall_s / memcpy_s:.2f}x memcpy {spread(stalls[1:])}"),
        ("ours: first save() stall", f"{stalls[0]:.3f} s", "allocates the staging slot"),
        ("torch.save", f"{torch_save_s:.3f} s", f"{torch_save_s / stall_s:.1f}x ours {spread(torch_save_runs)}"),
        ("DCP async_save stall (staged)", f"{dcp_async_stall_s:.3f} s",
         f"{dcp_async_stall_s / stall_s:.1f}x ours {spread(dcp_stalls[1:])} (first call "
         f"{dcp_stalls[0]:.3f} s; async_save returns after {dcp_return_s:.3f} s)"),
        ("DCP async_save -> written", f"{dcp_total_s:.3f} s", f"{spread(dcp_totals[1:])}"),
        ("ours: persist (save->commit)", f"{persist_s:.3f} s",
         f"{persist_bps / 1e9:.2f} GB/s {spread(persists[1:])}"),
        ("ours: of which after save() returned", f"{persist_s - stall_s:.3f} s",
         f"{written / (persist_s - stall_s) / 1e9:.2f} GB/s (write, fsync, commit)"),
        ("dd oflag=direct write", f"{dd_write / 1e9:.2f} GB/s",
         f"same bytes, after each timed save {spread(dd_writes, 1e-9, 'GB/s', 2)}"),
        ("ours: load, cold page cache", f"{load_s:.3f} s",
         f"{load_bps / 1e9:.2f} GB/s {spread(cold_ours)} (at most {max(left_cached):.0%} cached "
         f"before a cold run)"),
        ("dd read of the same files, cold", f"{read_s:.3f} s", f"{dd_read / 1e9:.2f} GB/s {spread(cold_read)}"),
        ("ours: load, warm page cache", f"{warm_load_s:.3f} s",
         f"{written / warm_load_s / 1e9:.2f} GB/s {spread(warm_ours)}"),
        ("dd read of the same files, warm", f"{warm_read_s:.3f} s",
         f"{written / warm_read_s / 1e9:.2f} GB/s {spread(warm_read)}"),
        ("ours: load from node memory", f"{mem_load_s:.3f} s",
         "mapped copy-on-write: no byte is copied (pages fault in on first use)"),
    ]
    print("versions: python " + platform.python_version() + ", torch " + torch.__version__)
    print(f"settings: {gib:.2f} GiB in {len(state['model'])} tensors; ours: Checkpointer(keep=1, "
          f"node memory in /dev/shm); DCP: async_save, 1-rank gloo group, one DefaultStager("
          f"{options}) for all saves; {args.saves} runs of each after a warm-up, {args.load_trials} "
          f"load trials; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    width = max(len(r[0]) for r in rows)
    print(f"{'checkpoint benchmark':<{width}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    print(f"persist = {persist_bps / dd_write:.2f} of dd direct write (per save, paired: "
          f"{spread(persist_fracs, unit='', digits=2)}); load = {load_bps / dd_read:.2f} of a "
          f"sequential read, cold (per trial: {spread(load_fracs, unit='', digits=2)}; "
          f"{warm_read_s / warm_load_s:.2f} warm; medians of {args.load_trials} interleaved trials)")

    def mm(runs, digits=4):
        return [round(min(runs), digits), round(max(runs), digits)]

    print(json.dumps({
        "stall_s": round(stall_s, 4),
        "torch_save_s": round(torch_save_s, 4),
        "dcp_async_stall_s": round(dcp_async_stall_s, 4),
        "memcpy_s": round(memcpy_s, 4),
        "persist_frac_of_dd": round(persist_bps / dd_write, 3),
        "load_frac_of_read": round(load_bps / dd_read, 3),
        "runs": args.saves,
        "spread": {"stall_s": mm(stalls[1:]), "torch_save_s": mm(torch_save_runs),
                   "dcp_async_stall_s": mm(dcp_stalls[1:]), "memcpy_s": mm(memcpy_runs),
                   "persist_frac_of_dd": mm(persist_fracs, 3), "load_frac_of_read": mm(load_fracs, 3)},
    }))


if __name__ == "__main__":
    main()
