"""Profiler overhead on a ~10 ms PyTorch training step: none vs ours vs torch.profiler.

Side by side in one run: the configurations take turns in short blocks of steps on the same
model (round-robin, order rotated every round), so drift and noise from other processes hit
all of them alike. Each step is timed on its own (wall clock, including fetching its batch and
everything the profiler does at the step's end). The reported overhead is paired and robust
to a shared machine: in every round, the fastest step of a configuration's block against the
fastest step of the plain block of the same round; the median over rounds of that ratio,
minus one. The per-step work a profiler adds is in every step, so it is in the fastest one
too, while other processes' interference is not. Shown beside it: the same from the 10th and
50th percentiles of all steps and from block means, an A/A row (the plain loop against
itself: the noise floor), and the profiler's direct cost per step on a near-empty step.

  ours:            StepProfiler with the PyTorch hooks attached (forward, backward, optimizer),
                   the data phase via wrap_loader, samples and FLOPs per step, JSON lines,
                   the Chrome trace and the background device sampler, all on;
  torch.profiler:  torch.profiler.profile(activities=[CPU]) recording every step
                   (its post-processing at exit is reported apart, not counted per step).

Usage: python benchmarks/profiler.py [--quick]. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from profiler import StepProfiler  # noqa: E402

TARGET_STEP_S = 0.010


class Block(torch.nn.Module):
    """A pre-norm MLP block with a residual, as in a transformer: a realistic mix of ops."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def make_model(width: int, depth: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[Block(width) for _ in range(depth)], torch.nn.LayerNorm(width),
                               torch.nn.Linear(width, 10))


class Workload:
    """A model, an optimizer and a ring of batches sized so one step takes about 10 ms."""

    def __init__(self, width: int = 128, depth: int = 4) -> None:
        torch.manual_seed(0)
        self.model = make_model(width, depth)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.width = width
        self.depth = depth
        self.batch = 64
        self.batches = []
        self._make_batches()
        for _ in range(3):  # calibrate the batch size to the target step time (best of 5)
            per_step = min(self.time_plain(10) / 10 for _ in range(5))
            self.batch = max(8, int(self.batch * TARGET_STEP_S / per_step))
            self._make_batches()
        self.params = sum(p.numel() for p in self.model.parameters())

    def _make_batches(self) -> None:
        self.batches = [(torch.randn(self.batch, self.width), torch.randint(0, 10, (self.batch,)))
                        for _ in range(8)]

    def step(self, x, y) -> None:
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def stream(self, n: int):
        for i in range(n):
            yield self.batches[i % len(self.batches)]

    def time_plain(self, n: int) -> float:  # calibration only
        t0 = time.perf_counter()
        for x, y in self.stream(n):
            self.step(x, y)
        return time.perf_counter() - t0


def block_plain(w: Workload, n: int, tmp: str) -> List[float]:
    out = []
    clock = time.perf_counter
    it = w.stream(n)
    for _ in range(n):
        t0 = clock()
        x, y = next(it)
        w.step(x, y)
        out.append(clock() - t0)
    return out


def block_ours(w: Workload, n: int, tmp: str) -> List[float]:
    prof = StepProfiler(os.path.join(tmp, "ours"), exchange="none",
                        flops_per_step=6.0 * w.params * w.batch, peak_flops=1e12)
    prof.attach(w.model, w.opt)
    out = []
    clock = time.perf_counter
    it = prof.wrap_loader(w.stream(n))
    for _ in range(n):
        t0 = clock()
        x, y = next(it)
        with prof.step(samples=w.batch):
            w.step(x, y)
        out.append(clock() - t0)
    prof.close()
    assert len(prof.records) == n and "backward" in prof.last_record.phases_s
    return out


_torch_exit_s: List[float] = []


def block_torch_profiler(w: Workload, n: int, tmp: str) -> List[float]:
    from torch.profiler import ProfilerActivity, profile

    out = []
    clock = time.perf_counter
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as tp:
        it = w.stream(n)
        for _ in range(n):
            t0 = clock()
            x, y = next(it)
            w.step(x, y)
            tp.step()
            out.append(clock() - t0)
        exit_start = clock()
    _torch_exit_s.append(clock() - exit_start)
    return out


class _quiet_stderr:
    """Kineto prints start/stop lines on fd 2 for every profile; keep the output readable."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)


CONFIGS = [("none", block_plain), ("ours (hooks on)", block_ours),
           ("torch.profiler", block_torch_profiler), ("none again (A/A)", block_plain)]


def direct_cost_us(reps: int = 30, n: int = 200) -> Dict[str, float]:
    """The profiler's own cost per step on a near-empty step (tiny model, hooks on): best of
    ``reps`` runs, against the same loop without the profiler. Far less exposed to noise
    than a 10 ms step, so it shows what the side-by-side figure should come to."""
    torch.manual_seed(0)
    tiny, tiny_p = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt, opt_p = torch.optim.SGD(tiny.parameters(), lr=0.1), torch.optim.SGD(tiny_p.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    data = [x] * n
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        prof = StepProfiler(tmp, exchange="none")
        prof.attach(tiny_p, opt_p)
        best_plain = best_prof = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in data:
                loss = tiny(b).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            best_plain = min(best_plain, (time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for b in prof.wrap_loader(data):
                with prof.step(samples=4):
                    loss = tiny_p(b).sum()
                    opt_p.zero_grad()
                    loss.backward()
                    opt_p.step()
            best_prof = min(best_prof, (time.perf_counter() - t0) / n)
        prof.close()
    return {"plain_us": best_plain * 1e6, "profiled_us": best_prof * 1e6,
            "cost_us": (best_prof - best_plain) * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 30 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per block")
    args = parser.parse_args(argv)
    rounds = args.rounds or (20 if args.quick else 100)
    steps = args.steps or (20 if args.quick else 30)
    torch.set_num_threads(1)
    import logging
    logging.getLogger("profiler").setLevel(logging.ERROR)  # the no-GPU notice, once per run

    w = Workload()
    steps_s: Dict[str, List[float]] = {name: [] for name, _ in CONFIGS}
    block_means: Dict[str, List[float]] = {name: [] for name, _ in CONFIGS}
    block_mins: Dict[str, List[float]] = {name: [] for name, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        for name, fn in CONFIGS:  # warm-up of every path (imports, allocator, first trace)
            fn(w, 10, tmp)
        _torch_exit_s.clear()
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for name, fn in order:
                times = fn(w, steps, tmp)
                steps_s[name].extend(times)
                block_means[name].append(sum(times) / len(times))
                block_mins[name].append(min(times))

    def q(values, frac):
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(frac * len(ordered)))]

    base_p10 = q(steps_s["none"], 0.10)
    base_p50 = q(steps_s["none"], 0.50)
    ovh_p10 = {n: q(v, 0.10) / base_p10 - 1.0 for n, v in steps_s.items()}
    ovh_p50 = {n: q(v, 0.50) / base_p50 - 1.0 for n, v in steps_s.items()}
    ovh_blocks = {n: statistics.median(m / b - 1.0 for m, b in zip(v, block_means["none"]))
                  for n, v in block_means.items()}
    ovh_mins = {n: statistics.median(m / b - 1.0 for m, b in zip(v, block_mins["none"]))
                for n, v in block_mins.items()}

    print(f"profiler overhead on a PyTorch training step ({w.depth} pre-norm MLP blocks of width "
          f"{w.width}, AdamW, batch {w.batch}, 1 thread): {rounds} rounds x {steps} steps per configuration, "
          f"configurations interleaved")
    print(f"{'configuration':<18} {'p10 ms':>8} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'ovh@p10':>8} {'ovh@p50':>8} {'ovh blocks':>11} {'ovh mins':>9} {'us/step@p10':>12}")
    for name, _ in CONFIGS:
        v = steps_s[name]
        print(f"{name:<18} {q(v, .1) * 1e3:>8.3f} {q(v, .5) * 1e3:>8.3f} {q(v, .9) * 1e3:>8.3f} "
              f"{ovh_p10[name] * 100:>7.2f}% {ovh_p50[name] * 100:>7.2f}% "
              f"{ovh_blocks[name] * 100:>10.2f}% {ovh_mins[name] * 100:>8.2f}% "
              f"{(q(v, .1) - base_p10) * 1e6:>12.1f}")
    if _torch_exit_s:
        print(f"torch.profiler post-processing at exit: {statistics.median(_torch_exit_s) * 1e3:.1f} ms "
              f"per block of {steps} steps (not counted above)")
    print("reported: 'ovh mins' = median over rounds of (fastest step of the block / fastest "
          "step of the plain block of the same round) - 1; the A/A row is the noise floor")
    direct = direct_cost_us()
    print(f"direct cost of ours on a near-empty step (best of 30): {direct['cost_us']:.1f} us/step "
          f"({direct['profiled_us']:.1f} vs {direct['plain_us']:.1f} us), i.e. "
          f"{direct['cost_us'] / (base_p10 * 1e6) * 100:.2f}% of the {base_p10 * 1e3:.1f} ms step; "
          f"the A/A row shows the noise floor of the side-by-side figures")
    sys.stdout.flush()
    print(json.dumps({"overhead_frac": round(ovh_mins["ours (hooks on)"], 5),
                      "torch_profiler_overhead_frac": round(ovh_mins["torch.profiler"], 5)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
