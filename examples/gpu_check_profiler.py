"""GPU check of the profiler: CUDA-event timing and real NVML metrics on a real GPU.

Run on a machine with a CUDA GPU (it exits 2 without one):

    python examples/gpu_check_profiler.py [--steps 300] [--hidden 4096]

It runs examples/profiled_train.py on the GPU (the profiler picks CUDA events because CUDA is
available, and NVML because the driver is there), then checks and prints: every record was
timed with CUDA events, the NVML metrics (utilisation, memory, power, energy, SM clock,
throttle reasons, temperature) are attached to steps, the hot path did not synchronise
(records trail the running step), MFU from the known peak of the GPU, and the
``elastic-prof report`` table. Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NVML_KEYS = ("gpu_util_pct", "mem_util_pct", "mem_used_bytes", "power_w", "energy_j",
             "sm_clock_mhz", "throttle_reasons_mask", "temperature_c")


def lag_check(hidden: int) -> dict:
    """In-process: while steps run, records trail behind (events are read later, no sync)."""
    import torch

    from profiler import StepProfiler

    model = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(1024, hidden, device="cuda")
    with tempfile.TemporaryDirectory() as d:
        prof = StepProfiler(d, sampler="nvml", exchange="none")
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
        torch.cuda.synchronize()
        gpu_s = time.perf_counter() - t0
        prof.close()
        records = list(prof.records)
    return {"timer": prof.timer, "max_lag_steps": max(lags), "mean_lag_steps": sum(lags) / len(lags),
            "host_loop_s": host_s, "gpu_done_s": gpu_s,
            "sum_step_time_s": sum(r.step_time_s for r in records),
            "phases": sorted(records[-1].phases_s), "records": len(records)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check_profiler: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check_profiler: needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")

    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-profiler-") as tmp:
        run_dir = os.path.join(tmp, "run")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "profiled_train.py"),
                              "--run-dir", run_dir, "--steps", str(args.steps), "--device", "cuda",
                              "--hidden", str(args.hidden), "--batch-size", "512"],
                             env=env, capture_output=True, text=True, timeout=900)
        print(res.stdout.strip())
        if res.returncode != 0:
            print(res.stderr[-4000:], file=sys.stderr)
            return 1
        with open(os.path.join(run_dir, "rank-00000.jsonl")) as f:
            steps = [json.loads(l) for l in f if '"kind":"step"' in l]
        timers = {s["timer"] for s in steps}
        if timers != {"cuda"}:
            failures.append(f"timers {timers}, expected cuda events")
        device = steps[-1].get("device", {})
        missing = [k for k in NVML_KEYS if k not in device]
        if missing:
            failures.append(f"NVML metrics missing: {missing} (device: {sorted(device)})")
        print("device metrics of the last step:", json.dumps(device))
        from profiler.report import format_summary, summarize, write_plots

        summary = summarize(run_dir)
        print(format_summary(summary))
        plots = write_plots(run_dir, os.path.join(tmp, "plots"))
        print("plots written:", [os.path.basename(p) for p in plots])

    lag = lag_check(args.hidden)
    print(f"lazy event reads: records trail the running step by up to {lag['max_lag_steps']} steps "
          f"(mean {lag['mean_lag_steps']:.2f}); host loop {lag['host_loop_s'] * 1e3:.1f} ms, GPU done "
          f"{lag['gpu_done_s'] * 1e3:.1f} ms, sum of event step times {lag['sum_step_time_s'] * 1e3:.1f} ms")
    if lag["timer"] != "cuda":
        failures.append("lag check did not use CUDA events")
    for f in failures:
        print("FAIL:", f)
    print(json.dumps({"ok": not failures, "timer": sorted(timers), "nvml_keys": sorted(device),
                      "step_p50_s": summary.step.p50_s, "mfu_p50": summary.mfu_p50,
                      "max_lag_steps": lag["max_lag_steps"]}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
