"""Profiler overhead on a ~10 ms PyTorch training step: none vs ours vs torch.profiler.

Side by side in one run, robust to a shared, noisy 2-core machine: the configurations take
turns in short blocks of steps on the same model, in a new random order every round, each
block after a garbage collection and two untimed plain steps (so none inherits another's
leftovers), and other processes' bursts hit all of them alike. Each step is timed on its own
(wall clock, from fetching its batch to the end of everything the profiler does at the
step's end); each block's CPU time is read too.

Paired figures per configuration, each the median over rounds of (the configuration's
block / the plain block of the same round) - 1, with a distribution-free 95% confidence
interval of that median, and an A/A row (the plain loop in its own block of every round) for
the noise floor:

  wall overhead:  of the median wall time per step. What a user sees, but on a shared
                  machine the noisiest;
  CPU overhead:   one statistic for every configuration: the training thread's CPU time of
                  the block's cheapest step (other processes only add to it, through cache and
                  core contention, while a profiler's cost is in every step) plus the CPU time
                  per step of the process's other threads during the block (torch.profiler's
                  own threads, if any), where the profiler's own writer and sampler threads
                  (alive all run) are charged to its blocks only, together with reading and
                  writing out its block's remaining steps at the block's end. Conservative
                  for ours: its background work overlaps the step on a free core.

``overhead_frac`` and ``torch_profiler_overhead_frac`` are the CPU figures. ``per_step_cpu_us``
is the training thread's CPU time inside the profiler per step (target <= 10 us), read from
the thread's CPU clock around every call the training thread makes into the profiler (the
step context, the loader wrapper, the module, backward and optimizer hooks) in extra blocks of
real steps after the timed rounds, less what the meter's own clock reads cost: stable on a
noisy machine, since other processes do not run on this thread's clock and the window is only
the profiler's code. The meter's own cost is read the same way, cold: around a call into a C
no-op at the same kinds of call sites (module and optimizer hooks, around the step and the
loader) in control blocks of real steps. After a real step the thread clock's own reads (a
system call) cost a few microseconds, not the 0.6 us they cost warm; the figure less only the
warm cost is printed beside it (``per_step_cpu_us_warm_floor``, how this figure was first
defined).
(The paired difference of the cheapest steps' thread CPU, ours minus plain, is printed beside
it with its CI and the A/A row's: it includes the cache effects on the step, but at this
machine's noise its CI is about +-100 us.)

  ours:            one StepProfiler for the whole run (always on) with the PyTorch hooks
                   attached for its blocks (forward, backward, optimizer), the data phase via
                   wrap_loader, samples and FLOPs per step, JSON lines, the Chrome trace and
                   the background device sampler (psutil here), all on;
  torch.profiler:  torch.profiler.profile(activities=[CPU]) recording every step
                   (its post-processing at exit is reported apart, not counted per step).

Also printed: the profiler's direct cost per step on a near-empty step (warm caches: a lower
bound; after a real step the caches are cold and the same code costs several times more).

Usage: python benchmarks/profiler.py [--quick] [--rounds N] [--steps N]. Last line: one JSON
object with ``overhead_frac``, ``torch_profiler_overhead_frac``, ``per_step_cpu_us`` and
``per_step_cpu_us_warm_floor``.
"""
from __future__ import annotations

import argparse
import functools
import gc
import inspect
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from profiler import StepProfiler  # noqa: E402

TARGET_STEP_S = 0.010
PHASE_EVERY = inspect.signature(StepProfiler).parameters["phase_every"].default


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
        for _ in range(3):  # calibrate the batch size to the target step time
            per_step = self.time_plain(15)
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

    def time_plain(self, n: int) -> float:
        """Calibration: the median CPU time of the training thread per step (CPU time, not
        wall time: other processes taking the core must not shrink the batch)."""
        times = []
        clock = time.thread_time
        for x, y in self.stream(n):
            t0 = clock()
            self.step(x, y)
            times.append(clock() - t0)
        return statistics.median(times)


ON, PRE, OFF = "on", "pre", "off"  # ours' steps: hooks in, its end puts them in, neither


def weights(every: int) -> Dict[str, float]:
    """The long-run share of each kind of step with the phases sampled on 1 step in
    ``every``: the sampled one, the one before it (whose end puts the hooks in), the rest."""
    if every == 1:
        return {ON: 1.0, PRE: 0.0, OFF: 0.0}
    return {ON: 1.0 / every, PRE: 1.0 / every, OFF: (every - 2.0) / every}


def by_kind(values: List[float], kinds: List[str], every: int, stat) -> float:
    """``stat`` of the values of each kind of step, weighted by its long-run share."""
    total = 0.0
    for kind, weight in weights(every).items():
        if weight:
            total += weight * stat([v for v, k in zip(values, kinds) if k == kind])
    return total


class Measured:
    """One block's measurements: wall and training-thread CPU time of each step, and the CPU
    time per step of the process's other threads that the configuration is charged with.
    ``kinds``: ours' blocks only, each step's kind (``ON``, ``PRE``, ``OFF``)."""

    __slots__ = ("steps_s", "step_cpu_s", "other_cpu_s", "kinds")

    def __init__(self, steps_s: List[float], step_cpu_s: List[float], other_cpu_s: float) -> None:
        self.steps_s = steps_s
        self.step_cpu_s = step_cpu_s
        self.other_cpu_s = other_cpu_s / len(steps_s)
        self.kinds: List[str] = []

    def thread_stat(self, kinds: List[str], every: int) -> float:
        """The training thread's CPU per step, one statistic for every configuration: the
        cheapest step at each kind of position of ours' block of the same round (its
        sampled steps, the steps before them, the others), weighted by that kind's long-run
        share (1/N, 1/N, (N-2)/N). With the phases on every step it is the block's cheapest
        step; with one step in N sampled it charges ours' sampled steps and the steps that
        put the hooks in, amortized over N steps, and the other configurations the steps at
        the same positions."""
        return by_kind(self.step_cpu_s, kinds, every, min)

    def cpu_stat(self, kinds: List[str], every: int) -> float:
        """The CPU statistic every configuration is compared by (see the module's doc)."""
        return self.thread_stat(kinds, every) + self.other_cpu_s


def _timed_loop(n: int, it, run_step, ours: "Ours") -> Measured:
    """Time ``n`` steps one by one (wall clock and the thread's CPU time), and the CPU time of
    the process's other threads during the block, less the always-on profiler's threads (which
    :func:`block_ours` charges to its own blocks)."""
    out, out_cpu = [], []
    clock, cpu, tcpu = time.perf_counter, time.process_time, time.thread_time
    p0, b0, c0 = ours.cpu_s(ours.threads), tcpu(), cpu()
    for _ in range(n):
        t0, tc0 = clock(), tcpu()
        x, y = next(it)
        run_step(x, y)
        out_cpu.append(tcpu() - tc0)
        out.append(clock() - t0)
    other = (cpu() - c0) - (tcpu() - b0) - (ours.cpu_s(ours.threads) - p0)
    return Measured(out, out_cpu, max(0.0, other))


class Ours:
    """One StepProfiler for the whole run, as in training (always on): JSON lines, trace,
    sampler, samples and FLOPs per step; its hooks are attached for each of its blocks and
    detached after, so the other configurations run the bare model. Its own threads' CPU
    time is read from their per-thread clocks (Linux)."""

    def __init__(self, w: Workload, tmp: str, phase_every: int) -> None:
        self.prof = StepProfiler(os.path.join(tmp, "ours"), exchange="none",
                                 flops_per_step=6.0 * w.params * w.batch, peak_flops=1e12,
                                 phase_every=phase_every)
        self.steps = 0
        self.sampler_s = 0.0
        self.writer_s = 0.0
        threads = {t.name: t for t in threading.enumerate() if t.name.startswith("profiler-")}
        self.writer = threads.pop("profiler-writer")
        self.samplers = list(threads.values())  # profiler-psutil-sampler or -nvml-
        self.threads = [self.writer] + self.samplers

    @staticmethod
    def cpu_s(threads) -> float:
        return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads)


def _settle(w: Workload) -> None:
    """Between blocks, untimed: collect garbage and run two plain steps, so no block inherits
    the previous one's leftovers (torch.profiler leaves many objects and a busy allocator)."""
    gc.collect()
    for x, y in w.stream(2):
        w.step(x, y)


def block_plain(w: Workload, n: int, ours: Ours) -> Measured:
    return _timed_loop(n, w.stream(n), w.step, ours)


def block_ours(w: Workload, n: int, ours: Ours) -> Measured:
    prof = ours.prof
    prof.attach(w.model, w.opt)
    step, batch, train = prof.step, w.batch, w.step

    def run_step(x, y):
        with step(samples=batch):
            train(x, y)

    s0, w0 = ours.cpu_s(ours.samplers), ours.cpu_s([ours.writer])
    block = _timed_loop(n, prof.wrap_loader(w.stream(n)), run_step, ours)
    t0 = time.thread_time()
    prof._collect()  # the writer's batch for the rest of this block (no file flush): charged
    prof._writer.drain()
    writer_s = ours.cpu_s([ours.writer]) - w0 + time.thread_time() - t0
    sampler_s = ours.cpu_s(ours.samplers) - s0
    ours.writer_s += writer_s
    ours.sampler_s += sampler_s
    block.other_cpu_s += (writer_s + sampler_s) / n
    prof.detach()
    ours.steps += n
    records = list(prof.records)[-n:]
    # every step is a record with its step time; the sampled ones carry every phase
    assert len(records) == n and all(r.step_time_s > 0 and "data" in r.phases_s for r in records)
    assert sum(r.sampled for r in records) == n // prof.phase_every
    assert all({"forward", "backward", "optimizer"} <= set(r.phases_s) for r in records if r.sampled)
    # a step before a sampled one (the next record's, or for the last, the hooks now in)
    after = [r.sampled for r in records[1:]] + [prof._phase_on]
    block.kinds = [ON if r.sampled else PRE if nxt else OFF for r, nxt in zip(records, after)]
    return block


class _Meter:
    """The training thread's CPU time inside the profiler's own code, from the thread's CPU
    clock around each outermost call into it (nested calls are not counted twice), by the
    kind of call site: ``step`` (opening, entering and leaving the step), ``hook`` (called by
    torch: module, autograd and optimizer hooks) and ``fetch`` (the loader, see
    :meth:`iterate`). Each kind has its control (what the meter itself reads there)."""

    KINDS = ("step", "hook", "fetch")

    def __init__(self) -> None:
        self.s = dict.fromkeys(self.KINDS, 0.0)  # CPU seconds by kind
        self.n = dict.fromkeys(self.KINDS, 0)  # calls by kind
        self._depth = 0

    def snapshot(self) -> Dict[str, Tuple[float, int]]:
        return {k: (self.s[k], self.n[k]) for k in self.KINDS}

    def wrap(self, fn, kind: str):
        """``fn`` metered. Inside the window the call has the form the real caller's has:
        Python code calls a hook or ``__exit__`` with 2 to 4 positional arguments and
        ``step(samples=...)`` with a keyword, calls that CPython 3.11 makes without a C
        frame; C calls the backward hooks (1 argument or none), through a C frame, as
        ``fn(*args)`` does. (``fn(*args)`` for every call would charge the profiler a C frame
        that the real Python callers do not pay.)"""
        clock = time.thread_time
        meter = self

        def timed(*args, **kwargs):
            if meter._depth:
                return fn(*args, **kwargs)
            meter._depth = 1
            n = len(args)
            try:
                if n == 2 and not kwargs:
                    a, b = args
                    t0 = clock()
                    return fn(a, b)
                if n == 3 and not kwargs:
                    a, b, c = args
                    t0 = clock()
                    return fn(a, b, c)
                if n == 4 and not kwargs:
                    a, b, c, d = args
                    t0 = clock()
                    return fn(a, b, c, d)
                if n == 0 and list(kwargs) == ["samples"]:
                    samples = kwargs["samples"]
                    t0 = clock()
                    return fn(samples=samples)
                t0 = clock()
                return fn(*args, **kwargs)
            finally:
                meter.s[kind] += clock() - t0
                meter.n[kind] += 1
                meter._depth = 0
        return timed

    def wrap_noop(self, kind: str):
        """A call site's control: meters a call into a C function doing nothing
        (``object``'s ``__subclasshook__`` takes any arguments) and returns None."""
        clock = time.thread_time
        meter = self
        fn = object.__subclasshook__

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                fn(*args, **kwargs)
            finally:
                meter.s[kind] += clock() - t0
                meter.n[kind] += 1
        return timed

    def iterate(self, iterator, inner):
        """Iterate ``iterator(source)`` (the profiler's loader wrapper, or :func:`plain` for
        the control) metering each ``next`` of it as a ``fetch``, less the time spent in
        ``next`` of ``inner`` (the user's loader) inside it. What is left includes the
        meter's own clock reads and the call into its ``Inner`` through the iterator slot,
        as a ``for`` loop calls a loader: the control measures exactly that."""
        clock = time.thread_time
        meter = self

        class Inner:
            def __iter__(self):
                return self

            def __next__(self):
                t0 = clock()
                try:
                    return next(inner)
                finally:
                    meter.s["fetch"] -= clock() - t0

        fetch = iterator(Inner()).__next__
        while True:
            t0 = clock()
            try:
                item = fetch()
            except StopIteration:
                return
            finally:
                meter.s["fetch"] += clock() - t0
                meter.n["fetch"] += 1
            yield item


def plain(source):
    """The control of the loader wrapper: the loader as a ``for`` loop iterates it (through
    its iterator slot, from C), passed through unchanged (``islice`` without a stop)."""
    return itertools.islice(source, None)


def _meter_floor_s(reps: int = 20000) -> Dict[str, float]:
    """What the meter reads warm around an empty call and around a fetch of the control
    (its own clock reads and its ``Inner``): the warm floor per call of each kind."""
    m = _Meter()
    f = m.wrap(lambda *a: None, "step")
    for _ in range(reps):
        f()
    for _ in m.iterate(plain, iter(range(reps))):
        pass
    call = m.s["step"] / m.n["step"]
    return {"step": call, "hook": call, "fetch": m.s["fetch"] / m.n["fetch"]}


def block_control_metered(w: Workload, n: int, meter: _Meter) -> None:
    """A block of plain steps with the meter's control at the sites where ours is called:
    forward pre/post hooks and optimizer pre/post hooks (``hook``), twice before and once
    after the step (``step``: a call into nothing), and around each fetch (the loader's
    metering without the profiler's wrapper): what the meter reads, with the caches as cold."""
    hook, boundary = meter.wrap_noop("hook"), meter.wrap_noop("step")
    handles = [w.model.register_forward_pre_hook(hook), w.model.register_forward_hook(hook),
               w.opt.register_step_pre_hook(hook), w.opt.register_step_post_hook(hook)]
    try:
        for x, y in meter.iterate(plain, w.stream(n)):
            boundary()
            boundary()
            w.step(x, y)
            boundary()
    finally:
        for handle in handles:
            handle.remove()


def block_ours_metered(w: Workload, n: int, ours: Ours, meter: _Meter) -> List[tuple]:
    """A block of ours in which every entry of the training thread into the profiler is
    metered: ``step()`` and the step context (which puts the sampled phases' hooks in and
    takes them out), the loader wrapper (less the loader itself), the module hooks, the
    backward start and end, and the optimizer hooks. Returns, per step, ``(kind of step,
    {kind of call site: (CPU s, calls)})`` from its fetch to the end of the step."""
    from profiler import hooks

    prof = ours.prof
    context = type(prof._steps.context)  # the step context's class (one per profiler)
    saved = {name: context.__dict__[name] for name in ("__enter__", "__exit__")}
    context.__enter__ = staticmethod(meter.wrap(saved["__enter__"].__func__, "step"))  # C only
    context.__exit__ = meter.wrap(saved["__exit__"], "step")
    per_step: List[tuple] = []
    try:
        instrument = functools.partial(meter.wrap, kind="hook")
        for handle in hooks.attach_torch(prof, w.model, w.opt, instrument=instrument):
            prof._add_hook_handle(handle)  # as attach() does: paused off the sampled steps
        step, batch, train = meter.wrap(prof.step, "step"), w.batch, w.step  # the closure
        last = meter.snapshot()
        for x, y in meter.iterate(prof.wrap_loader, w.stream(n)):
            sampled = prof._phase_on
            with step(samples=batch):
                train(x, y)
            now = meter.snapshot()
            kind = ON if sampled else PRE if prof._phase_on else OFF  # PRE: its end put them in
            per_step.append((kind, {k: (now[k][0] - last[k][0], now[k][1] - last[k][1])
                                    for k in now}))
            last = now
        prof.detach()
    finally:
        for name, attr in saved.items():
            setattr(context, name, attr)
    return per_step


_torch_exit_s: List[float] = []


def block_torch_profiler(w: Workload, n: int, ours: Ours) -> Measured:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as tp:
        def run_step(x, y):
            w.step(x, y)
            tp.step()

        block = _timed_loop(n, w.stream(n), run_step, ours)
        exit_start = time.perf_counter()
    _torch_exit_s.append(time.perf_counter() - exit_start)
    return block


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


def direct_cost_us(phase_every: int, reps: int = 30, n: int = 200) -> Dict[str, float]:
    """The profiler's own cost per step on a near-empty step (tiny model, hooks on): best of
    ``reps`` runs, against the same loop without the profiler. Warm caches make this a lower
    bound: after a real step the profiler's code runs with cold caches, several times slower."""
    torch.manual_seed(0)
    tiny, tiny_p = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt, opt_p = torch.optim.SGD(tiny.parameters(), lr=0.1), torch.optim.SGD(tiny_p.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    data = [x] * n
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        prof = StepProfiler(tmp, exchange="none", phase_every=phase_every)
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


def median_ci(values: List[float]) -> Tuple[float, float, float]:
    """The median and a distribution-free ~95% confidence interval for it (order statistics
    of the binomial(n, 1/2) interval)."""
    v = sorted(values)
    n = len(v)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    return statistics.median(v), v[lo], v[hi]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a minute or two)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (quick 40, full 150)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per block (default: about 20, a multiple of --phase-every)")
    parser.add_argument("--phase-every", type=int, default=PHASE_EVERY,
                        help="ours' StepProfiler(phase_every=): the automatic phases on one step "
                             f"in N (default {PHASE_EVERY}, the profiler's own default)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (40 if args.quick else 150)
    every = args.phase_every
    steps = args.steps or every * max(1, round(20 / every))  # about 20, a multiple of N
    if every < 1 or steps % every:
        parser.error(f"--steps ({steps}) must be a multiple of --phase-every ({every}), "
                     "so that every block holds the same number of sampled steps")
    torch.set_num_threads(1)
    import logging
    logging.getLogger("profiler").setLevel(logging.ERROR)  # the no-GPU notice, once per run

    w = Workload()
    names = [name for name, _ in CONFIGS]
    blocks: Dict[str, List[Measured]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        ours = Ours(w, tmp, every)
        for _name, fn in CONFIGS:  # warm-up of every path (imports, allocator, first trace)
            fn(w, steps, ours)
        _torch_exit_s.clear()
        ours.prof.flush()
        ours.steps, ours.sampler_s, ours.writer_s = 0, 0.0, 0.0
        rng = random.Random(0)
        for _round in range(rounds):
            order = list(CONFIGS)
            rng.shuffle(order)  # a new order every round: no configuration always follows another
            for name, fn in order:
                _settle(w)
                blocks[name].append(fn(w, steps, ours))
        writer_s = ours.writer_s
        warm_floor = _meter_floor_s()
        per_step: List[tuple] = []  # per metered step: (kind, {site kind: (CPU s, calls)})
        controls: List[Dict[str, float]] = []  # per control block: the meter's cost per call
        for _block in range(max(10, rounds // 3)):  # after the timed rounds, with real steps between
            _settle(w)
            per_step += block_ours_metered(w, steps, ours, _Meter())
            _settle(w)
            control = _Meter()
            block_control_metered(w, steps, control)
            controls.append({k: control.s[k] / control.n[k] for k in _Meter.KINDS})
        cold_floor = {k: statistics.median(c[k] for c in controls) for k in _Meter.KINDS}

        def net(row, floor):
            return sum(s - n * floor[k] for k, (s, n) in row[1].items())

        kinds = [r[0] for r in per_step]

        def amortized(values):
            """Per step over a run: the median of each kind of step (sampled, before a
            sampled one, other), weighted by its share (1/N, 1/N, (N-2)/N)."""
            return by_kind(values, kinds, every, statistics.median)

        metered = [net(r, cold_floor) for r in per_step]
        warm = [net(r, warm_floor) for r in per_step]
        per_step_cpu_s = amortized(metered)

        def of(kind):
            return [v for k, v in zip(kinds, metered) if k == kind]

        def med_us(kind):
            values = of(kind)
            return round(statistics.median(values) * 1e6, 2) if values else None

        def calls(kind):
            counts = [sum(n for k, (_, n) in r[1].items() if k != "fetch")
                      for r in per_step if r[0] == kind]
            return statistics.median(counts) if counts else 0
        ours.prof.close()
        records = len(ours.prof.records)

    base = blocks["none"]
    masks = [b.kinds for b in blocks["ours (hooks on)"]]  # ours' kinds of steps, per round
    all_steps = {n: [s for b in blocks[n] for s in b.steps_s] for n in names}

    def paired(name, stat):
        return median_ci([stat(b, m) / stat(a, m) - 1.0
                          for b, a, m in zip(blocks[name], base, masks)])

    wall = {n: paired(n, lambda b, m: statistics.median(b.steps_s)) for n in names}
    # one CPU statistic for every configuration (Measured.cpu_stat)
    cpu = {n: paired(n, lambda b, m: b.cpu_stat(m, every)) for n in names}
    # the training thread's own cost: its statistic, ours minus plain, per round
    thread = {n: median_ci([b.thread_stat(m, every) - a.thread_stat(m, every)
                            for b, a, m in zip(blocks[n], base, masks)]) for n in names}
    base_cpu_s = statistics.median(b.cpu_stat(m, every) for b, m in zip(base, masks))

    def ci(m):
        return f"{m[0] * 100:>6.2f}% [{m[1] * 100:>6.2f}, {m[2] * 100:>6.2f}]"

    print(f"versions: python {platform.python_version()}, torch {torch.__version__}; torch.profiler "
          f"with activities=[CPU], record every step; ours: StepProfiler(exchange='none', psutil "
          f"sampler at its default rate, JSON lines, trace, phase_every={every}) with hooks: every "
          f"step recorded, forward/backward/optimizer on 1 step in {every}")
    print(f"profiler overhead on a PyTorch training step ({w.depth} pre-norm MLP blocks of width "
          f"{w.width}, AdamW, batch {w.batch}, 1 thread; {base_cpu_s * 1e3:.1f} ms CPU per plain "
          f"step): {rounds} rounds x {steps} steps per configuration, interleaved, a new random "
          f"order every round; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'configuration':<18} {'p50 ms':>7} {'p90 ms':>7} {'wall overhead [95% CI]':>26} "
          f"{'CPU overhead [95% CI]':>26} {'CPU us/step':>11}")
    for name in names:
        v = sorted(all_steps[name])
        print(f"{name:<18} {statistics.median(v) * 1e3:>7.2f} {v[int(.9 * len(v))] * 1e3:>7.2f} "
              f"{ci(wall[name]):>26} {ci(cpu[name]):>26} {cpu[name][0] * base_cpu_s * 1e6:>11.1f}")
    t = thread["ours (hooks on)"]
    aa = thread["none again (A/A)"]
    print(f"ours, split: training thread {t[0] * 1e6:.1f} us/step [{t[1] * 1e6:.1f}, {t[2] * 1e6:.1f}] "
          f"(paired thread statistic; the A/A row's: {aa[0] * 1e6:.1f} [{aa[1] * 1e6:.1f}, "
          f"{aa[2] * 1e6:.1f}]; torch.profiler's: {thread['torch.profiler'][0] * 1e6:.1f}), "
          f"its writer thread {writer_s / ours.steps * 1e6:.1f} us/step and sampler "
          f"thread {ours.sampler_s / ours.steps * 1e6:.1f} us/step (measured: {writer_s * 1e3:.1f} "
          f"and {ours.sampler_s * 1e3:.1f} ms CPU for {ours.steps} steps; {records} records)")
    if _torch_exit_s:
        print(f"torch.profiler post-processing at exit: {statistics.median(_torch_exit_s) * 1e3:.1f} ms "
              f"per block of {steps} steps (not counted above)")
    print("wall overhead: median over rounds of (median wall time per step of the block / the "
          "same of the plain block of the same round) - 1, with a distribution-free 95% CI of "
          "that median; other processes on the machine make it noisy. CPU overhead: the same "
          "for one statistic, the training thread's CPU time of the block's cheapest step (other "
          "processes only add to it, a profiler's cost is in every step; with phases sampled on "
          "1 step in N: the cheapest at ours' sampled positions and at the positions before "
          "them weighted 1/N each, the cheapest elsewhere (N-2)/N, for every configuration "
          "alike) plus the CPU per step of "
          "the process's other threads during the block, the profiler's writer and sampler "
          "charged to its blocks only (conservative: that work overlaps the step on a free core). "
          "The A/A row is the noise floor. overhead_frac is ours' CPU figure, "
          "torch_profiler_overhead_frac torch.profiler's; per_step_cpu_us the training thread's "
          "added CPU per step (target <= 10 us).")
    print(f"per_step_cpu_us: the training thread's CPU time inside the profiler's code, metered "
          f"by its thread clock around every call into it, per step over a run: "
          f"{per_step_cpu_s * 1e6:.1f} us/step (target <= 10) = the medians of the sampled steps "
          f"({med_us(ON)} us: {len(of(ON))} steps, {calls(ON):.0f} calls and a fetch each) and of "
          f"the steps before them, whose end puts the hooks in ({med_us(PRE)} us: {len(of(PRE))} "
          f"steps), 1 step in {every} each, and of the other steps ({med_us(OFF)} us: "
          f"{len(of(OFF))} steps, {calls(OFF):.0f} calls and a fetch each) for the rest; the mean "
          f"over all {len(metered)} metered real steps: {statistics.mean(metered) * 1e6:.1f} us. "
          f"Less what the meter reads at the same kinds of sites, cold, medians of {len(controls)} "
          f"control blocks: {cold_floor['step'] * 1e6:.2f} us per call at the step's start and end "
          f"(around a C no-op), {cold_floor['hook'] * 1e6:.2f} us per hook call, "
          f"{cold_floor['fetch'] * 1e6:.2f} us per fetch (around the plain loader); less only its "
          f"warm cost ({warm_floor['step'] * 1e6:.2f} us per call, {warm_floor['fetch'] * 1e6:.2f} "
          f"per fetch): {amortized(warm) * 1e6:.1f} us/step")
    direct = direct_cost_us(every)
    print(f"direct cost of ours on a near-empty step (warm caches, best of 30): "
          f"{direct['cost_us']:.1f} us/step ({direct['profiled_us']:.1f} vs "
          f"{direct['plain_us']:.1f} us); after a real step the caches are cold and the same "
          f"code costs several times that")
    sys.stdout.flush()
    print(json.dumps({"overhead_frac": round(cpu["ours (hooks on)"][0], 5),
                      "torch_profiler_overhead_frac": round(cpu["torch.profiler"][0], 5),
                      "per_step_cpu_us": round(per_step_cpu_s * 1e6, 2),
                      "per_step_cpu_us_warm_floor": round(amortized(warm) * 1e6, 2),
                      "phase_every": every,
                      "per_step_cpu_us_sampled_step": med_us(ON),
                      "per_step_cpu_us_step_before_sampled": med_us(PRE),
                      "per_step_cpu_us_other_steps": med_us(OFF)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
