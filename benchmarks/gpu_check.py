"""Device check of the GPU paths: profiler on CUDA, checkpoints of GPU tensors, NCCL recovery.

    python benchmarks/gpu_check.py [--quick] [--gpu-size-gb 4] [--cpu-size-mb 64] [--dir /tmp]
                                   [--only profiler,checkpoint,recovery]

(``--quick``, as ``make bench`` runs every benchmark: 1 GiB of GPU state, 16 MiB of CPU state.)

Meant for a machine with a CUDA GPU (it finishes in well under 5 minutes there), and runs on a
CPU-only machine too: the CUDA parts are then skipped with the reason, and what can run on the
CPU runs instead, so the check itself is tested without a GPU (tests/test_gpu_check.py).

1. ``profiler_cuda``: examples/profiled_train.py on the GPU (the profiler picks CUDA events
   because CUDA is initialised, NVML because the driver is there); checks that every record was
   timed with CUDA events, the NVML metrics are attached to steps, the step breakdown (phases)
   and ``elastic-prof report``'s table, MFU from the known peak, and that event reads stay off
   the hot path: while the loop runs, finished records trail the running step (no sync per
   step). Without CUDA: ``profiler_cpu`` runs the same example on the CPU (perf_counter timer,
   psutil metrics) and the CUDA part is skipped.
2. ``checkpoint_gpu``: ``checkpoint.Checkpointer.save()`` of ``--gpu-size-gb`` GiB of GPU tensors:
   its stall (until ``save()`` returns: the state may be modified) against a pinned
   device-to-host copy into preallocated buffers (the floor) and against
   ``torch.distributed.checkpoint.async_save`` with a reused ``DefaultStager`` (its stall is until
   its staging completes, when the state may be modified; the time until it returns is printed
   too); then persist, ``verify()`` (the manifest's CRC32s), a load back into GPU tensors and a
   device-side checksum of every tensor against the original's. Without CUDA:
   ``checkpoint_cpu`` does the same with ``--cpu-size-mb`` MiB of CPU tensors (the floor is a
   plain copy) and the GPU part is skipped.
3. ``recovery_nccl``: a 2-worker ``elastic-run`` job whose ``@elastic.run`` loop does DDP over
   NCCL (one GPU per worker); once both step, rank 1 is SIGKILLed and the survivor must keep its
   PID, re-form (in place) and step again at world size 2 with a fresh rank 1. Needs 2 GPUs,
   skipped with the reason otherwise; then ``recovery_gloo`` runs the same harness over gloo
   on the CPU (unless ``--no-gloo-fallback``), so the harness is known to work.

Each part prints a verdict line ``VERDICT <part>: PASS|FAIL|SKIP (reason)``; the last line is
one JSON object: ``ok`` (no FAIL), ``cuda``, ``gpus``, ``device``, ``versions`` and ``parts``
(per part: ``verdict``, ``reason`` and its figures).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NVML_KEYS = ("gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "energy_j",
             "sm_clock_mhz", "throttle_reasons_mask", "temperature_c")
PSUTIL_KEYS = ("cpu_util_pct", "proc_cpu_pct", "rss_bytes", "mem_used_pct")
PHASES = {"data", "forward", "backward", "optimizer"}
ELASTIC_RUN = os.path.join(os.path.dirname(sys.executable), "elastic-run")


class Skip(Exception):
    """A part that cannot run here; the message is the reason."""


class Fail(Exception):
    """A part that ran and found a problem; the message says which."""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


# -- 1. profiler ------------------------------------------------------------------------------
def lag_check(hidden: int, device: str) -> dict:
    """In-process: while the steps run, finished records trail the running step (event reads
    happen later on the writer thread; the hot path does not synchronise)."""
    import torch

    from profiler import StepProfiler

    model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(1024, hidden, device=device)
    with tempfile.TemporaryDirectory() as d:
        prof = StepProfiler(d, sampler="nvml" if device == "cuda" else "psutil", exchange="none")
        prof.attach(model, opt)
        lags = []
        t0 = time.perf_counter()
        for i in range(100):
            with prof.step(samples=1024):
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            done = prof.last_record.step if prof.last_record else -1
            lags.append(i - done)
        host_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.synchronize()
        device_s = time.perf_counter() - t0
        prof.close()
        records = list(prof.records)
    return {"timer": prof.timer, "max_lag_steps": max(lags), "mean_lag_steps": sum(lags) / len(lags),
            "host_loop_s": host_s, "device_done_s": device_s,
            "sum_step_time_s": sum(r.step_time_s for r in records), "records": len(records)}


def check_profiler(device: str, steps: int, hidden: int, batch: int) -> dict:
    from profiler.report import format_summary, summarize, write_plots

    with tempfile.TemporaryDirectory(prefix="gpu-check-profiler-") as tmp:
        run_dir = os.path.join(tmp, "run")
        res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "profiled_train.py"),
                              "--run-dir", run_dir, "--steps", str(steps), "--device", device,
                              "--hidden", str(hidden), "--batch-size", str(batch)],
                             env=_env(), capture_output=True, text=True, timeout=600)
        print(res.stdout.strip())
        if res.returncode != 0:
            raise Fail(f"profiled_train.py exited {res.returncode}: "
                       + (res.stderr.strip().splitlines() or ["?"])[-1])
        with open(os.path.join(run_dir, "rank-00000.jsonl")) as f:
            records = [json.loads(line) for line in f if '"kind":"step"' in line]
        summary = summarize(run_dir)
        print(format_summary(summary))
        plots = write_plots(run_dir, os.path.join(tmp, "plots"))
    problems = []
    timers = sorted({r["timer"] for r in records})
    want_timer = "cuda" if device == "cuda" else "cpu"
    if timers != [want_timer]:
        problems.append(f"timers {timers}, expected {want_timer}")
    if len(records) != steps:
        problems.append(f"{len(records)} step records for {steps} steps")
    device_metrics = records[-1].get("device", {}) if records else {}
    want_keys = NVML_KEYS if device == "cuda" else PSUTIL_KEYS
    # a metric the board does not support is dropped (documented): utilisation and memory
    # are what every NVIDIA board reports
    must = ("gpu_util_pct", "mem_used_bytes") if device == "cuda" else ("cpu_util_pct", "rss_bytes")
    missing = [k for k in must if k not in device_metrics]
    if missing:
        hint = (" - NVML was not used: is pynvml installed (pip install 'elastic-run[gpu]') and "
                "the driver loaded?" if device == "cuda" and "cpu_util_pct" in device_metrics else "")
        problems.append(f"device metrics missing: {missing} (got {sorted(device_metrics)}){hint}")
    phases = sorted(records[-1]["phases_s"]) if records else []
    if not PHASES <= set(phases):
        problems.append(f"phases {phases}, expected at least {sorted(PHASES)}")
    print("device metrics of the last step:", json.dumps(device_metrics))
    print("phases of the last step (ms):",
          {k: round(v * 1e3, 3) for k, v in (records[-1]["phases_s"].items() if records else [])})
    lag = lag_check(hidden, device)
    print(f"event reads: finished records trail the running step by up to {lag['max_lag_steps']} "
          f"steps (mean {lag['mean_lag_steps']:.2f}); host loop {lag['host_loop_s'] * 1e3:.1f} ms, "
          f"device done {lag['device_done_s'] * 1e3:.1f} ms, sum of step times "
          f"{lag['sum_step_time_s'] * 1e3:.1f} ms")
    if lag["timer"] != want_timer:
        problems.append(f"lag check timed with {lag['timer']}, expected {want_timer}")
    if device == "cuda" and lag["max_lag_steps"] < 1:
        problems.append("records never trailed the running step: the hot path synchronised")
    figures = {"timer": timers, "device_metrics": sorted(device_metrics),
               "nvml_missing": [k for k in want_keys if k not in device_metrics],
               "phases": phases, "step_p50_s": summary.step.p50_s, "mfu_p50": summary.mfu_p50,
               "max_lag_steps": lag["max_lag_steps"], "mean_lag_steps": round(lag["mean_lag_steps"], 3),
               "plots": [os.path.basename(p) for p in plots]}
    if problems:
        raise Fail("; ".join(problems), figures)
    return figures


# -- 2. checkpoint ----------------------------------------------------------------------------
def _make_state(torch, nbytes: int, device: str) -> dict:
    n_big = 8
    rows = max(1, nbytes // n_big // (4 * 4096))
    gen = torch.Generator(device=device).manual_seed(0)
    model = {f"layer{i}.weight": torch.empty(rows, 4096, device=device).uniform_(-1, 1, generator=gen)
             for i in range(n_big)}
    model.update({f"layer{i}.bias": torch.full((4096,), float(i), device=device) for i in range(n_big)})
    return {"model": model, "step": 0}


def _checksums(torch, tensors: Dict[str, "object"]) -> Dict[str, int]:
    """An exact checksum per tensor, computed where the tensor lives (sum of its 32-bit words
    as int64, and of the words times their position mod 2**31-1 so that order counts)."""
    out = {}
    for k, t in tensors.items():
        words = t.detach().contiguous().view(-1).view(torch.int32).to(torch.int64)
        pos = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 2147483647
        out[k] = (int(words.sum()), int(((words % 2147483647) * pos % 2147483647).sum()))
    return out


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_checkpoint(device: str, nbytes: int, workdir: str, saves: int = 2) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from checkpoint import Checkpointer

    work = tempfile.mkdtemp(prefix="gpu-check-ckpt-", dir=workdir)
    try:
        state = _make_state(torch, nbytes, device)
        _sync(torch, device)
        total = sum(t.numel() * t.element_size() for t in state["model"].values())
        before = _checksums(torch, state["model"])

        # the floor: one copy to host memory, into preallocated (pinned, for a GPU) buffers
        pin = device == "cuda"
        dst = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in state["model"].items()}
        copies = []
        for _ in range(1 + saves):
            t0 = time.perf_counter()
            for k, v in state["model"].items():
                dst[k].copy_(v, non_blocking=pin)
            _sync(torch, device)
            copies.append(time.perf_counter() - t0)
        copy_s = statistics.median(copies[1:])
        del dst

        # ours: stall until save() returns, then persist; /dev/shm as the node-memory tier
        # only when it has room (a container's default /dev/shm is 64 MiB)
        shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        memory = shm_free > 2 * total
        url = os.path.join(work, "ours")
        ck = Checkpointer(url, keep=1, rank=0, world_size=1, run_id="gpu-check", memory=memory,
                          memory_dir=tempfile.mkdtemp(prefix="gpu-check-", dir="/dev/shm") if memory else None)
        stalls, persists = [], []
        for step in range(1 + saves):
            state["step"] = step
            t0 = time.perf_counter()
            ck.save(step, state)
            t1 = time.perf_counter()
            ck.wait()
            stalls.append(t1 - t0)
            persists.append(time.perf_counter() - t0)
        stall_s, persist_s = statistics.median(stalls[1:]), statistics.median(persists[1:])
        problems = ck.verify(saves)
        # load back onto the device, into fresh tensors, from storage (a fresh reader)
        reader = Checkpointer(url, rank=0, world_size=1, run_id="gpu-check", memory=False)
        target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "step": 0}
        t0 = time.perf_counter()
        loaded = reader.load(target=target)
        _sync(torch, device)
        load_s = time.perf_counter() - t0
        on_device = all(t.device.type == device for t in loaded["model"].values())
        after = _checksums(torch, loaded["model"])
        bad = sorted(k for k in before if before[k] != after.get(k))
        if loaded["step"] != saves:
            problems.append(f"loaded step {loaded['step']}, saved {saves}")
        reader.close()
        ck.drop_memory()
        ck.close()
        del loaded, target
        shutil.rmtree(url, ignore_errors=True)

        # DCP async_save with one DefaultStager reused across saves, as its users run it
        dcp_stalls, dcp_returns, dcp_totals = [], [], []
        dcp_note = ""
        if not dist.is_initialized():
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=0, world_size=1)
        options = (StagingOptions() if device == "cuda" else  # pinned, non-blocking need a GPU
                   StagingOptions(use_pinned_memory=False, use_non_blocking_copy=False))
        stager = DefaultStager(options)
        try:
            for i in range(1 + saves):
                path = os.path.join(work, f"dcp{i}")
                t0 = time.perf_counter()
                resp = dcp.async_save({"model": state["model"]}, checkpoint_id=path, async_stager=stager)
                t1 = time.perf_counter()
                staged = getattr(resp, "staging_completion", None)
                if staged is not None:
                    staged.result()
                t2 = time.perf_counter()
                (resp.upload_completion if staged is not None else resp).result()
                dcp_returns.append(t1 - t0)
                dcp_stalls.append(t2 - t0)
                dcp_totals.append(time.perf_counter() - t0)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            stager.close()
            dist.destroy_process_group()
        dcp_stall_s = statistics.median(dcp_stalls[1:])
        figures = {"device": device, "state_bytes": total, "node_memory_tier": memory,
                   "copy_s": round(copy_s, 4), "copy_kind": "pinned D2H" if pin else "memcpy",
                   "stall_s": round(stall_s, 4), "stall_first_s": round(stalls[0], 4),
                   "stall_frac_of_copy": round(stall_s / copy_s, 3),
                   "persist_s": round(persist_s, 4), "persist_gb_per_s": round(total / persist_s / 1e9, 3),
                   "dcp_async_stall_s": round(dcp_stall_s, 4),
                   "dcp_async_return_s": round(statistics.median(dcp_returns[1:]), 4),
                   "dcp_async_total_s": round(statistics.median(dcp_totals[1:]), 4),
                   "stall_frac_of_dcp": round(stall_s / dcp_stall_s, 3) if dcp_stall_s else None,
                   "load_s": round(load_s, 4), "load_on_device": on_device,
                   "checksums_ok": not bad, "verify_problems": problems}
        gib = total / 2**30
        tier = 'node-memory tier on' if memory else 'no node-memory tier: /dev/shm too small'
        print(f"{gib:.2f} GiB of {device} tensors ({tier}):")
        print(f"  {'copy to host (' + figures['copy_kind'] + ')':<34} {copy_s:8.3f} s   floor")
        print(f"  {'ours: save() stall':<34} {stall_s:8.3f} s   {stall_s / copy_s:.2f}x the copy "
              f"(first save {stalls[0]:.3f} s: allocates staging)")
        print(f"  {'DCP async_save stall (staged)':<34} {dcp_stall_s:8.3f} s   returns after "
              f"{figures['dcp_async_return_s']:.3f} s; ours is {figures['stall_frac_of_dcp']}x it {dcp_note}")
        print(f"  {'ours: save -> committed':<34} {persist_s:8.3f} s   {figures['persist_gb_per_s']:.2f} GB/s")
        print(f"  {'DCP async_save -> written':<34} {figures['dcp_async_total_s']:8.3f} s")
        print(f"  {'ours: load back to ' + device:<34} {load_s:8.3f} s   checksums "
              f"{'match' if not bad else 'DIFFER: ' + ', '.join(bad[:4])}; verify(): {problems or 'ok'}")
        failures = []
        if bad:
            failures.append(f"checksums differ after load: {bad[:4]}")
        if problems:
            failures.append(f"verify(): {problems[:2]}")
        if not on_device:
            failures.append(f"loaded tensors are not on {device}")
        if failures:
            raise Fail("; ".join(failures), figures)
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- 3. recovery ------------------------------------------------------------------------------
WORKER = r'''
import os, sys, time
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
import elastic

device_type, max_steps = sys.argv[1], int(sys.argv[2])
local = int(os.environ["LOCAL_RANK"])
device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
state = elastic.TorchState(model=model, optimizer=opt, step=0)
x, y = torch.randn(64, 256, device=device), torch.randint(0, 10, (64,), device=device)


@elastic.run(timeout_s=60)
def train(state):
    import torch.distributed as dist
    env = os.environ
    rank = int(env["RANK"])
    net = DDP(state.model, device_ids=[local] if device.type == "cuda" else None)
    while state.step < max_steps:
        state.optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        state.optimizer.step()
        state.step += 1
        print(f"STEP {rank} {state.step} {time.time():.6f} {os.getpid()} {env['WORLD_SIZE']} "
              f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')} {dist.get_backend()}", flush=True)
        time.sleep(0.01)
        state.commit()


train(state)
'''


def check_recovery(device: str, kill_at: int = 100, after: int = 20, timeout_s: float = 150.0) -> dict:
    """2 workers; SIGKILL rank 1 once both stepped ``kill_at`` steps; PASS when rank 0 (same
    PID) steps ``after`` more steps at world size 2 in a re-formed group with a new rank 1."""
    tmp = tempfile.mkdtemp(prefix="gpu-check-recovery-")
    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
        f.write(WORKER)
    argv = [ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "3", "--framework", "torch",
            script, device, "100000"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_env(), cwd=tmp)
    lines: List[str] = []
    steps: Dict[str, list] = {"0": [], "1": []}  # rank -> [(step, time, pid, world, restart, backend)]
    killed = {}
    done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            parts = line.split("]:", 1)[-1].split()
            if parts[:1] != ["STEP"] or len(parts) < 8:
                continue
            rank, step, at, pid, world, restart, backend = parts[1:8]
            steps.setdefault(rank, []).append((int(step), float(at), int(pid), world, restart, backend))
            if not killed and len(steps["0"]) >= kill_at and len(steps["1"]) >= kill_at:
                killed.update(at=time.time(), pid=steps["1"][-1][2], rank0_pid=steps["0"][-1][2],
                              restart=steps["0"][-1][4])
                os.kill(killed["pid"], signal.SIGKILL)
            if killed:
                later = [s for s in steps["0"] if s[4] != killed["restart"]]
                if len(later) >= after and any(s[2] != killed["pid"] for s in steps["1"][-3:]):
                    done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    t_start = time.time()
    done.wait(timeout_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    tail = "".join(lines[-15:])
    backend = steps["0"][0][5] if steps["0"] else None
    if not killed:
        raise Fail(f"the job did not reach {kill_at} steps on both ranks within {timeout_s:.0f} s; "
                   f"last output:\n{tail}", {"backend": backend})
    later0 = [s for s in steps["0"] if s[1] > killed["at"] and s[4] != killed["restart"]]
    new1 = [s for s in steps["1"] if s[1] > killed["at"] and s[2] != killed["pid"]]
    figures = {"backend": backend, "start_to_kill_s": round(killed["at"] - t_start, 2),
               "pause_s": round(later0[0][1] - killed["at"], 4) if later0 else None,
               "survivor_same_pid": bool(later0) and all(s[2] == killed["rank0_pid"] for s in later0),
               "world_after": sorted({s[3] for s in later0}), "steps_after": len(later0),
               "new_rank1_pid": bool(new1)}
    print(f"  backend {backend}; killed rank 1 (pid {killed['pid']}) after {kill_at} steps; "
          f"survivor's pause to its next step in the re-formed group: {figures['pause_s']} s; "
          f"survivor kept its pid: {figures['survivor_same_pid']}; world size after: "
          f"{figures['world_after']}; a new rank 1 stepped: {figures['new_rank1_pid']}")
    problems = []
    if len(later0) < after:
        problems.append(f"survivor made {len(later0)} steps after the kill (want {after})")
    if later0 and not figures["survivor_same_pid"]:
        problems.append("the survivor was restarted (its pid changed): not in place")
    if later0 and figures["world_after"] != ["2"]:
        problems.append(f"world size after the kill {figures['world_after']}, want 2")
    if not new1:
        problems.append("no replacement rank 1 stepped")
    if problems:
        raise Fail("; ".join(problems) + f"; last output:\n{tail}", figures)
    return figures


# -- driver -----------------------------------------------------------------------------------
def _fail_figures(exc: Exception) -> dict:
    return exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}


def run_part(name: str, fn: Callable[[], dict], results: dict) -> None:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        figures = fn()
        verdict, reason = "PASS", ""
    except Skip as exc:
        figures, verdict, reason = {}, "SKIP", str(exc)
    except Fail as exc:
        figures, verdict, reason = _fail_figures(exc), "FAIL", str(exc.args[0])
    except Exception as exc:  # a bug or an unexpected error of the path under test
        traceback.print_exc()
        figures, verdict, reason = {}, "FAIL", f"{type(exc).__name__}: {exc}"
    took = time.perf_counter() - t0
    results[name] = {"verdict": verdict, "reason": reason, "seconds": round(took, 2), **figures}
    first = reason.splitlines()[0] if reason else ""
    print(f"VERDICT {name}: {verdict}" + (f" ({first})" if first else "") + f" [{took:.1f} s]",
          flush=True)


def skip(reason: str) -> Callable[[], dict]:
    def fn() -> dict:
        raise Skip(reason)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller: 1 GiB of GPU state, 16 MiB of CPU state, 100 profiler steps")
    ap.add_argument("--gpu-size-gb", type=float, default=None, help="GPU state to checkpoint (GiB, default 4)")
    ap.add_argument("--cpu-size-mb", type=int, default=None,
                    help="CPU state to checkpoint without CUDA (MiB, default 64)")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: temp dir)")
    ap.add_argument("--steps", type=int, default=None, help="profiler example steps (CUDA, default 300)")
    ap.add_argument("--hidden", type=int, default=4096, help="profiler example width (CUDA)")
    ap.add_argument("--only", default="profiler,checkpoint,recovery")
    ap.add_argument("--no-gloo-fallback", action="store_true",
                    help="without 2 GPUs, do not run the recovery harness over gloo instead")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if args.gpu_size_gb is None:
        args.gpu_size_gb = 1.0 if args.quick else 4.0
    if args.cpu_size_mb is None:
        args.cpu_size_mb = 16 if args.quick else 64
    if args.steps is None:
        args.steps = 100 if args.quick else 300

    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "nccl": None, "driver": None}
    if cuda:
        try:
            versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            pass
        try:
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            versions["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        except Exception as exc:
            versions["driver"] = f"NVML unavailable: {exc}"
    print(f"gpu_check: {device_name}, {gpus} GPU(s); " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + f"; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    no_cuda = "no CUDA device visible (torch.cuda.is_available() is False)"
    workdir = args.dir or tempfile.gettempdir()
    results: dict = {}
    if "profiler" in only:
        if cuda:
            run_part("profiler_cuda", lambda: check_profiler("cuda", args.steps, args.hidden, 512), results)
        else:
            run_part("profiler_cuda", skip(no_cuda), results)
            run_part("profiler_cpu", lambda: check_profiler("cpu", 60, 64, 64), results)
    if "checkpoint" in only:
        if cuda:
            run_part("checkpoint_gpu", lambda: check_checkpoint(
                "cuda", int(args.gpu_size_gb * 2**30), workdir), results)
        else:
            run_part("checkpoint_gpu", skip(no_cuda), results)
            run_part("checkpoint_cpu", lambda: check_checkpoint(
                "cpu", args.cpu_size_mb << 20, workdir), results)
    if "recovery" in only:
        if gpus >= 2:
            run_part("recovery_nccl", lambda: check_recovery("cuda"), results)
        else:
            why = no_cuda if not cuda else f"NCCL recovery needs 2 GPUs (one per worker); {gpus} visible"
            run_part("recovery_nccl", skip(why), results)
            if not args.no_gloo_fallback:
                run_part("recovery_gloo", lambda: check_recovery("cpu"), results)
    print("\n" + "\n".join(f"{name:<16} {r['verdict']}" + (f"  ({r['reason'].splitlines()[0]})" if r["reason"] else "")
                           for name, r in results.items()))
    ok = all(r["verdict"] != "FAIL" for r in results.values())
    print(json.dumps({"ok": ok, "cuda": cuda, "gpus": gpus, "device": device_name,
                      "versions": versions, "parts": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
