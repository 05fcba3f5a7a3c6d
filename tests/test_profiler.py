"""The step profiler in one process: records, phases, hooks, sinks, samplers, store exchange."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from elastic import World
from elastic.errors import ConfigError, UserError
from elastic.store import create_store
from profiler import (EXCHANGES, PHASES, NvmlSampler, ProfilerConfigError, ProfilerUsageError,
                      PsutilSampler, RankStats, StatsExchange, StepProfiler, StepRecord,
                      StragglerReport, create_sampler, detect_stragglers)
from needs import require

from paths import REPO  # noqa: E402
FAKE_NVML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_nvml")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def busy_wait(seconds):
    """Spin rather than sleep, so the time is measurable CPU work in a phase."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.fixture
def fake_nvml(monkeypatch):
    """Put the fake pynvml first on sys.path for this test; the real one comes back after."""
    monkeypatch.syspath_prepend(FAKE_NVML)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    module = importlib.import_module("pynvml")
    assert getattr(module, "FAKE", False), module.__file__
    yield module
    sys.modules.pop("pynvml", None)


# -- records and phases ----------------------------------------------------------------------

def test_steps_phases_and_throughput_are_written_as_json_lines(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", trace=False) as prof:
        for _ in range(5):
            with prof.phase("data"):  # before the step: counts towards it
                busy_wait(0.002)
            with prof.step(samples=32):
                with prof.phase("forward"):
                    busy_wait(0.003)
                with prof.phase("backward"):
                    busy_wait(0.001)
                with prof.phase("my_phase"):
                    pass
    lines = read_jsonl(tmp_path / "rank-00000.jsonl")
    assert [rec["step"] for rec in lines] == [0, 1, 2, 3, 4]
    for line in lines:
        rec = StepRecord.from_json(line)
        assert rec.rank == 0 and rec.generation == 0 and rec.timer == "cpu"
        assert set(rec.phases_s) == {"data", "forward", "backward", "my_phase"}
        assert rec.phases_s["data"] >= 0.002 and rec.phases_s["forward"] >= 0.003
        # the step starts where its data phase started
        assert rec.step_time_s >= rec.phases_s["data"] + rec.phases_s["forward"] + rec.phases_s["backward"]
        assert rec.samples == 32
        assert rec.samples_per_s == pytest.approx(32 / rec.step_time_s)
        assert rec.mfu is None
        assert abs(rec.wall_time_s - time.time()) < 60
    assert prof.last_record.step == 4 and len(prof.records) == 5
    assert lines == [r.to_json() for r in prof.records]  # the fast encoder writes the same JSON


def test_fast_step_encoder_matches_json_dumps():
    from profiler.sinks import step_json

    rec = StepRecord(3, 1, 2, 1.7e9 + 0.125, 1e-05, {"forward": 0.5, "my.phase-2": 1 / 3},
                     samples=7, samples_per_s=7e5, flops=1e12, mfu=0.25,
                     device={"power_w": 250.0, "odd \"key\"": float("nan"), "t": float("inf")},
                     timer="cuda")
    assert step_json(rec) == json.dumps(rec.to_json(), separators=(",", ":"))
    bare = StepRecord(0, 0, 0, 1.0, 0.5)
    assert json.loads(step_json(bare)) == bare.to_json()


def test_world_facts_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ELASTIC_GENERATION", "7")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job9")
    monkeypatch.delenv("ELASTIC_PROF_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with StepProfiler(sampler="none", trace=False) as prof:
        with prof.step():
            pass
    assert prof.jsonl_path == str(tmp_path / "elastic-prof" / "job9" / "rank-00002.jsonl")
    (line,) = read_jsonl(prof.jsonl_path)
    assert (line["rank"], line["generation"]) == (2, 7)


def test_mfu_from_flops_and_peak(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", trace=False, peak_flops=1e9,
                      flops_per_step=1e6) as prof:
        with prof.step():
            busy_wait(0.001)
        with prof.step(flops=4e6):
            busy_wait(0.001)
    first, second = prof.records
    assert first.mfu == pytest.approx(1e6 / first.step_time_s / 1e9)
    assert second.flops == 4e6 and second.mfu == pytest.approx(4e6 / second.step_time_s / 1e9)


def test_bad_usage_is_a_clear_user_error(tmp_path):
    with pytest.raises(ProfilerConfigError, match="exchange_every"):
        StepProfiler(str(tmp_path), exchange_every=0, sampler="none")
    with pytest.raises(ConfigError, match="unknown timer"):
        StepProfiler(str(tmp_path), timer="tpu", sampler="none")
    with pytest.raises(ProfilerConfigError, match="sample rate"):
        StepProfiler(str(tmp_path), sample_hz=0)
    with StepProfiler(str(tmp_path), sampler="none", trace=False) as prof:
        with pytest.raises(ProfilerConfigError, match="invalid phase name"):
            prof.phase("no spaces please")
        with prof.step():
            with pytest.raises(ProfilerUsageError, match="do not nest"):
                with prof.step():
                    pass
    with pytest.raises(UserError, match="closed"):
        with prof.step():
            pass


def test_a_failed_step_is_not_recorded(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", trace=False) as prof:
        with prof.step():
            pass
        with pytest.raises(RuntimeError):
            with prof.step():
                raise RuntimeError("boom")
        with prof.step():
            pass
    assert [r.step for r in prof.records] == [0, 2]


def test_wrap_loader_times_data_and_stops_cleanly(tmp_path):
    def slow_items():
        for i in range(3):
            busy_wait(0.002)
            yield i

    with StepProfiler(str(tmp_path), sampler="none", trace=False) as prof:
        seen = []
        for item in prof.wrap_loader(slow_items()):
            with prof.step():
                seen.append(item)
        with prof.step():  # the exhausted fetch left nothing behind
            pass
    assert seen == [0, 1, 2]
    assert all(r.phases_s["data"] >= 0.002 for r in list(prof.records)[:3])
    assert "data" not in prof.records[-1].phases_s


# -- CUDA-style lazy reads (events complete later) ---------------------------------------------

class _Event:
    def __init__(self, clock, t):
        self.clock, self.t, self.queries = clock, t, 0


class LaggingEventClock:
    """Stands in for CUDA events (no GPU here): a mark completes only ``lag`` marks later,
    as events recorded on a busy stream; reading before completion is a test failure."""

    kind = "cuda"

    def __init__(self, lag=3):
        self.lag, self.n, self.released, self.waits = lag, 0, 0, 0
        self.now = 0.0

    def mark(self):
        self.n += 1
        self.now += 0.001
        ev = _Event(self, self.now)
        ev.index = self.n
        return ev

    def ready(self, ev):
        ev.queries += 1
        return self.n - ev.index >= self.lag

    def wait(self, ev):
        self.waits += 1
        self.n = max(self.n, ev.index + self.lag)

    def elapsed_s(self, a, b):
        assert self.n - b.index >= self.lag, "read an event before it completed"
        return b.t - a.t

    def release(self, marks):
        self.released += len(marks)


def test_gpu_style_events_are_read_later_without_waiting(tmp_path):
    clock = LaggingEventClock(lag=5)
    prof = StepProfiler(str(tmp_path), timer=clock, sampler="none", trace=True, exchange_every=1000)
    for i in range(10):
        with prof.step():
            with prof.phase("forward"):
                pass
        # 4 marks per step, lag 5: the step just ended is never complete yet
        assert prof.last_record is None or prof.last_record.step < i
    assert clock.waits == 0  # the hot path never synchronised
    assert len(prof.records) >= 8
    prof.close()  # reads the rest (waiting only now)
    assert [r.step for r in prof.records] == list(range(10))
    assert all(r.timer == "cuda" for r in prof.records)
    assert all(r.step_time_s == pytest.approx(0.003) for r in prof.records)
    assert all(r.phases_s["forward"] == pytest.approx(0.001) for r in prof.records)
    assert clock.released == 40  # every event went back to the pool
    trace = json.load(open(prof.trace_path))
    assert sum(1 for e in trace["traceEvents"] if e.get("cat") == "step") == 10


class ThreadRecordingClock(LaggingEventClock):
    """Also notes which threads read elapsed times and bind themselves to the device."""

    def __init__(self, lag=1):
        super().__init__(lag)
        self.reader_threads, self.bound_threads = [], []

    def elapsed_s(self, a, b):
        self.reader_threads.append(threading.current_thread().name)
        return super().elapsed_s(a, b)

    def bind_thread(self):
        self.bound_threads.append(threading.current_thread().name)


def test_records_are_built_off_the_training_thread(tmp_path):
    clock = ThreadRecordingClock(lag=1)
    prof = StepProfiler(str(tmp_path), timer=clock, sampler="none", trace=False,
                        exchange_every=1000)
    for _ in range(5):
        with prof.step():
            with prof.phase("forward"):
                pass
    deadline = time.monotonic() + 30
    while not clock.reader_threads and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for the writer's batch, not standing in for it
    # the training thread only appended raw steps; the writer thread read them
    assert clock.reader_threads and set(clock.reader_threads) == {"profiler-writer"}
    assert clock.bound_threads == ["profiler-writer"]
    assert clock.waits == 0
    prof.close()
    assert [r.step for r in prof.records] == [0, 1, 2, 3, 4]
    assert [rec["step"] for rec in read_jsonl(prof.jsonl_path)] == [0, 1, 2, 3, 4]


def test_without_an_exchange_no_window_statistics_pile_up(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", trace=False, exchange="none",
                      exchange_every=5) as prof:
        for _ in range(23):
            with prof.step():
                pass
        prof.flush()
        assert prof._window.step_s == [] and prof._window.active is False
    assert len(prof.records) == 23


# -- PyTorch hooks --------------------------------------------------------------------------

def test_torch_hooks_time_forward_backward_and_optimizer(tmp_path):
    torch = require("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    with StepProfiler(str(tmp_path), sampler="none", trace=False, phase_every=1) as prof:
        prof.attach(model, opt)
        for _ in range(4):
            with prof.step(samples=16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():  # evaluation between steps is not carried into a step
            model(x)
        with prof.step():
            pass
    records = list(prof.records)
    for rec in records[:4]:
        assert set(rec.phases_s) == {"forward", "backward", "optimizer"}
        assert all(v > 0 for v in rec.phases_s.values())
        assert sum(rec.phases_s.values()) <= rec.step_time_s
    assert records[4].phases_s == {}
    # close() removed the hooks: the model runs without touching the closed profiler
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def test_torch_hooks_find_backward_in_structured_and_leaf_outputs(tmp_path):
    torch = require("torch")

    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            return {"ids": x.argmax(1), "out": (None, self.lin(x))}

    class LeafOut(torch.nn.Module):  # returns its parameter: a leaf, no autograd node
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w

    x = torch.randn(5, 4)
    for model, loss_of in ((DictOut(), lambda out: out["out"][1].sum()),
                           (LeafOut(), lambda out: (out * 2).sum())):
        with StepProfiler(str(tmp_path / type(model).__name__), sampler="none", trace=False,
                          phase_every=1) as prof:
            prof.attach(model)
            for _ in range(2):
                with prof.step():
                    with prof.phase("busy"):
                        busy_wait(0.001)  # some work inside the step, before the model
                    loss = loss_of(model(x))
                    loss.backward()
        for rec in prof.records:
            assert {"forward", "backward"} <= set(rec.phases_s), (type(model).__name__, rec)
    assert not model.w._backward_hooks  # the leaf's one hook went with close()


def test_detach_removes_the_automatic_phases_and_attach_restores_them(tmp_path):
    torch = require("torch")
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)

    def train_step():
        with prof.step():
            model(x).sum().backward()
            opt.step()

    with StepProfiler(str(tmp_path), sampler="none", trace=False, phase_every=1) as prof:
        prof.attach(model, opt)
        train_step()
        prof.detach()
        train_step()
        prof.attach(model, opt)
        train_step()
    first, detached, again = prof.records
    assert set(first.phases_s) == set(again.phases_s) == {"forward", "backward", "optimizer"}
    assert detached.phases_s == {}
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_torch_backward_hook_coexists_with_the_users_own(tmp_path):
    torch = require("torch")
    model = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    seen = []
    with StepProfiler(str(tmp_path), sampler="none", trace=False, phase_every=1) as prof:
        prof.attach(model)
        for i in range(3):
            with prof.step():
                out = model(x)
                handle = out.register_hook(lambda grad: seen.append(tuple(grad.shape)))
                if i == 2:
                    handle.remove()  # the user's handle still removes only their hook
                out.square().sum().backward()
    assert seen == [(3, 2), (3, 2)]
    assert all("backward" in r.phases_s for r in prof.records)


def _hooks_in(model, opt):
    """How many hooks sit in the model's forward and the optimizer's step hook dicts."""
    return (len(model._forward_pre_hooks) + len(model._forward_hooks)
            + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks))


def test_sampled_phases_keep_every_step_and_take_the_hooks_out_between(tmp_path):
    torch = require("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 8), torch.randint(0, 2, (4,))) for _ in range(12)]
    hooks_seen = []
    with StepProfiler(str(tmp_path), sampler="none", phase_every=4) as prof:
        prof.attach(model, opt)
        for x, y in prof.wrap_loader(batches):
            with prof.step(samples=4):
                hooks_seen.append(_hooks_in(model, opt))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    # the hooks are in the dicts on every 4th step only, and gone after close()
    assert hooks_seen == [4 if i % 4 == 3 else 0 for i in range(12)]
    assert _hooks_in(model, opt) == 0
    records = list(prof.records)
    # every step is a record with its step time, samples and the phase timed on every step
    assert [r.step for r in records] == list(range(12))
    assert all(r.step_time_s > 0 and r.samples == 4 and r.phases_s["data"] > 0 for r in records)
    assert [r.sampled for r in records] == [i % 4 == 3 for i in range(12)]
    for r in records:
        if r.sampled:  # the whole breakdown, inside the step
            assert set(r.phases_s) == {"data", "forward", "backward", "optimizer"}
            assert all(v > 0 for v in r.phases_s.values())
            assert sum(r.phases_s.values()) <= r.step_time_s
        else:
            assert set(r.phases_s) == {"data"}
    # JSON lines and the trace say which steps are sampled; phases only where they were timed
    lines = read_jsonl(prof.jsonl_path)
    assert [(line["step"], line["sampled"]) for line in lines] == [(r.step, r.sampled) for r in records]
    assert [StepRecord.from_json(line) for line in lines] == records
    with open(prof.trace_path) as f:
        events = json.load(f)["traceEvents"]
    steps = [e for e in events if e.get("cat") == "step"]
    assert [(e["args"]["step"], e["args"]["sampled"]) for e in steps] == [(r.step, r.sampled) for r in records]
    forward = [e for e in events if e.get("name") == "forward"]
    assert len(forward) == 3
    for ph in forward:
        (owner,) = [s for s in steps if s["ts"] <= ph["ts"] <= s["ts"] + s["dur"]]
        assert owner["args"]["sampled"] is True


def test_sampled_phases_follow_attach_detach_and_a_failed_step(tmp_path):
    torch = require("torch")
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    seen = []

    def train_step(fail=False):
        with prof.step():
            seen.append(_hooks_in(model, opt))
            model(x).sum().backward()
            opt.step()
            if fail:
                raise RuntimeError("boom")

    with StepProfiler(str(tmp_path), sampler="none", trace=False, phase_every=3) as prof:
        train_step()  # step 0, nothing attached: every step carries all it times
        prof.attach(model, opt)  # the next sampled step is the 3rd
        train_step()  # 1
        train_step()  # 2: sampled
        with pytest.raises(RuntimeError):
            train_step(fail=True)  # not a step: the count does not move
        train_step()  # 3
        prof.detach()
        train_step()  # 4: no hooks, nothing sampled away
        prof.attach(model, opt)
        train_step()  # 5: sampled (3 steps after 2)
    assert seen == [0, 0, 4, 0, 0, 0, 4]
    by_step = {r.step: r for r in prof.records}
    assert sorted(by_step) == [0, 1, 2, 4, 5, 6]  # the failed step (3) is not recorded
    assert {s: r.sampled for s, r in by_step.items()} == {0: True, 1: False, 2: True, 4: False,
                                                       5: True, 6: True}
    assert [set(by_step[s].phases_s) for s in (0, 1, 4, 5)] == [set()] * 4
    for s in (2, 6):
        assert set(by_step[s].phases_s) == {"forward", "backward", "optimizer"}
    with pytest.raises(ProfilerConfigError, match="phase_every must be an integer >= 1, got 0"):
        StepProfiler(str(tmp_path), sampler="none", phase_every=0)


@pytest.mark.parametrize("phase_every", [1, 3])
def test_sampled_phases_and_exchange_windows_count_steps_together(tmp_path, phase_every):
    torch = require("torch")
    model = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    made = []

    def factory(settings):
        made.append(FakeExchange(settings, True))
        return made[-1]

    EXCHANGES.register("fake-windows", factory)
    try:
        with StepProfiler(str(tmp_path), world=World(rank=0, world_size=2), sampler="none",
                          trace=False, exchange="fake-windows", exchange_every=2,
                          phase_every=phase_every) as prof:
            prof.attach(model)
            for _ in range(9):
                with prof.step():
                    model(x).sum().backward()
    finally:
        EXCHANGES._entries.pop("fake-windows", None)
    sampled = [i % phase_every == phase_every - 1 for i in range(9)]
    assert [r.sampled for r in prof.records] == sampled
    assert [("forward" in r.phases_s) for r in prof.records] == sampled
    (fake,) = made
    # every window of 2 steps was exchanged, with both steps in it
    assert [(s.window, s.step, s.steps) for s in fake.seen] == [(w, 2 * w + 1, 2) for w in range(4)]


def test_a_leaf_outputs_hook_is_taken_out_off_the_sampled_steps(tmp_path):
    torch = require("torch")

    class LeafOut(torch.nn.Module):  # returns its parameter: the hook lives on the leaf
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w

    model = LeafOut()
    with StepProfiler(str(tmp_path), sampler="none", trace=False, phase_every=2) as prof:
        prof.attach(model)
        for _ in range(6):
            with prof.step():
                (model(None) * 2).sum().backward()
    assert [r.sampled for r in prof.records] == [False, True] * 3
    assert [("backward" in r.phases_s) for r in prof.records] == [False, True] * 3
    assert not model.w._backward_hooks


def test_a_fetch_after_a_loader_raised_starts_the_data_phase_anew(tmp_path):
    clock = LaggingEventClock(lag=0)  # every mark one tick (1 ms) later: exact intervals

    def broken():
        raise OSError("connection reset")
        yield  # a generator

    with StepProfiler(str(tmp_path), timer=clock, sampler="none", trace=False) as prof:
        for _ in prof.wrap_loader([1]):
            with prof.step():
                pass
        with pytest.raises(OSError):
            next(prof.wrap_loader(broken()))  # the data phase's begin, then the raise
        for _ in prof.wrap_loader([2]):  # a new loader: its fetch restarts the phase
            with prof.step():
                pass
    first, second = prof.records
    # fetch begin, fetch end, step() and the step's end: one tick apart; the failed fetch's
    # begin is neither in the second step's data phase nor in its time
    for rec in (first, second):
        assert rec.phases_s == {"data": pytest.approx(0.001)}
        assert rec.step_time_s == pytest.approx(0.003)


def test_windows_and_the_report_average_sampled_phases_over_sampled_steps(tmp_path):
    from profiler.report import format_summary, summarize
    from profiler.windows import StatsWindow

    def rec(i, sampled, phases):
        return StepRecord(i, 0, 0, 1000.0 + i, 0.010, phases, samples=8, sampled=sampled)

    records = []
    for i in range(20):
        phases = {"data": 0.001}
        if i % 10 == 9:  # the sampled steps, which also held a checkpoint
            phases.update(forward=0.003, backward=0.004, optimizer=0.001, checkpoint=0.002)
        records.append(rec(i, i % 10 == 9, phases))
    window = StatsWindow()
    for r in records:
        window.add(r.step_time_s, r.phases_s, r.samples, r.sampled)
    stats = window.take(0, 0, 19)
    assert stats.steps == 20 and stats.step_p50_s == pytest.approx(0.010)
    # forward, backward, optimizer: per sampled step; data and checkpoint: per step
    assert stats.phases_s == pytest.approx({"data": 0.001, "forward": 0.003, "backward": 0.004,
                                            "optimizer": 0.001, "comm": 0.0, "checkpoint": 0.0002})

    with open(tmp_path / "rank-00000.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    summary = summarize(str(tmp_path), warmup_steps=0)
    assert summary.steps == 20 and summary.sampled_steps == 2
    phases = {p.name: p for p in summary.phases}
    assert phases["forward"].steps == 2 and phases["forward"].p50_s == pytest.approx(0.003)
    assert phases["forward"].share == pytest.approx(0.3)  # of the sampled steps' time
    assert phases["data"].steps == 20 and phases["data"].share == pytest.approx(0.1)
    assert phases["checkpoint"].share == pytest.approx(0.02)  # of all steps' time
    assert "automatic phases sampled on 2 of 20 steps" in format_summary(summary)


# -- outputs --------------------------------------------------------------------------------

def test_chrome_trace_loads_and_phases_nest_in_their_steps(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", world=World(rank=3, world_size=4)) as prof:
        for _ in range(3):
            with prof.step():
                with prof.phase("forward"):
                    busy_wait(0.001)
                with prof.phase("optimizer"):
                    busy_wait(0.0005)
    assert os.path.basename(prof.trace_path).startswith("trace-rank-00003-g0-")
    with open(prof.trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms"
    assert {e["ph"] for e in events} == {"M", "X"}
    steps = [e for e in events if e.get("cat") == "step"]
    phases = [e for e in events if e.get("cat") == "phase"]
    assert [e["name"] for e in steps] == ["step 0", "step 1", "step 2"]
    assert len(phases) == 6 and {e["name"] for e in phases} == {"forward", "optimizer"}
    assert all(e["pid"] == 3 for e in steps + phases)
    for ph in phases:
        owner = [s for s in steps if s["ts"] <= ph["ts"] and ph["ts"] + ph["dur"] <= s["ts"] + s["dur"] + 1]
        assert len(owner) == 1, ph


def test_prometheus_endpoint_is_scraped_over_http_and_parses(tmp_path):
    parser = require("prometheus_client.parser", "the profiler extra")
    with StepProfiler(str(tmp_path), sampler="psutil", trace=False, prometheus_port=0,
                      world=World(rank=1, world_size=2)) as prof:
        for _ in range(7):
            with prof.step(samples=8):
                with prof.phase("forward"):
                    busy_wait(0.001)
        prof.flush()  # the writer thread updates the gauges within ~50 ms; flush makes it now
        port = prof.prometheus.port
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    steps = {s.name: s for s in families["elastic_prof_steps"].samples}
    assert steps["elastic_prof_steps_total"].value == 7
    assert steps["elastic_prof_steps_total"].labels == {"rank": "1"}
    hist = {s.name: s.value for s in families["elastic_prof_step_seconds"].samples}
    assert hist["elastic_prof_step_seconds_count"] == 7
    assert hist["elastic_prof_step_seconds_sum"] == pytest.approx(
        sum(r.step_time_s for r in prof.records))
    phase = {s.labels["phase"]: s.value for s in families["elastic_prof_phase_seconds"].samples}
    assert set(phase) == set(PHASES) and phase["forward"] >= 0.001
    assert families["elastic_prof_samples_per_second"].samples[0].value > 0
    device = {s.labels["metric"] for s in families["elastic_prof_device"].samples}
    assert "proc_cpu_pct" in device
    # the server is gone after close
    with pytest.raises(urllib.error.URLError) as gone:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert isinstance(gone.value.reason, ConnectionRefusedError), gone.value


def test_tensorboard_scalars_without_importing_tensorflow(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from profiler import StepProfiler
        with StepProfiler({str(tmp_path)!r}, sampler="none", trace=False,
                          tensorboard_dir={str(tmp_path / 'tb')!r}, tensorboard_every=2) as prof:
            for _ in range(6):
                with prof.step(samples=4):
                    with prof.phase("forward"):
                        pass
        print("TF", "tensorflow" in sys.modules)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator({str(tmp_path / 'tb' / 'rank-0')!r})
        acc.Reload()
        print("TAGS", sorted(acc.Tags()["scalars"]))
        print("STEPS", [e.step for e in acc.Scalars("step_time_s")])
        print("VALUES", [round(e.value, 9) == round(r.step_time_s, 9)
                         for e, r in zip(acc.Scalars("step_time_s"), list(prof.records)[::2])])
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TF False" in res.stdout
    assert "TAGS ['phase/forward_s', 'samples_per_s', 'step_time_s']" in res.stdout
    assert "STEPS [0, 2, 4]" in res.stdout
    assert "VALUES [True, True, True]" in res.stdout


def test_prometheus_and_tensorboard_take_phases_from_sampled_steps(tmp_path):
    require("prometheus_client", "the profiler extra")
    from profiler import PrometheusSink

    def rec(i, forward=None):
        phases = {"data": 0.001} if forward is None else {"data": 0.001, "forward": forward}
        return StepRecord(i, 0, 0, 1000.0 + i, 0.010, phases, sampled=forward is not None)

    sink = PrometheusSink(0)
    try:
        def gauge(phase):
            return sink.registry.get_sample_value("elastic_prof_phase_seconds",
                                                  {"rank": "0", "phase": phase})
        sink.write_steps([(rec(0, forward=0.003), ()), (rec(1), ())])
        assert gauge("forward") == 0.003  # from the latest sampled step, not the last step
        sink.write_steps([(rec(2), ())])  # a batch without a sampled step keeps the values
        assert gauge("forward") == 0.003 and gauge("data") == 0.001
        sink.write_steps([(rec(3, forward=0.005), ())])
        assert gauge("forward") == 0.005
        assert sink.registry.get_sample_value("elastic_prof_steps_total", {"rank": "0"}) == 4
    finally:
        sink.close()

    code = textwrap.dedent(f"""
        from profiler import StepRecord, TensorBoardSink
        sink = TensorBoardSink({str(tmp_path / 'tb')!r}, every=2)
        for i in range(6):  # steps 1, 3, 5 sampled (phase_every=2)
            phases = {{"data": 0.001, "forward": 0.002}} if i % 2 else {{"data": 0.001}}
            sink.write_step(StepRecord(i, 0, 0, 1000.0 + i, 0.01, phases, sampled=bool(i % 2)), ())
        sink.close()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator({str(tmp_path / 'tb' / 'rank-0')!r})
        acc.Reload()
        print("STEPS", [e.step for e in acc.Scalars("step_time_s")])
        print("FORWARD", [e.step for e in acc.Scalars("phase/forward_s")])
        print("DATA", [e.step for e in acc.Scalars("phase/data_s")])
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    # the step's scalars every 2 steps; each sampled step's whole breakdown after them
    assert "STEPS [0, 2, 4]" in res.stdout and "FORWARD [1, 3, 5]" in res.stdout
    assert "DATA [1, 3, 5]" in res.stdout


# -- device samplers ------------------------------------------------------------------------

def test_nvml_sampler_runs_against_the_fake_nvml(fake_nvml, tmp_path):
    # hz: one background sample per 1000 s, i.e. none in this test: the samples are these four
    sampler = create_sampler("auto", device_index=0, hz=0.001)
    assert isinstance(sampler, NvmlSampler)
    for _ in range(4):
        latest = sampler.sample_once()
    window = sampler.window()
    assert window["gpu_util_pct"] == 70.0  # 60/80 alternating
    assert window["mem_util_pct"] == 30.0
    assert window["mem_used_bytes"] == 10 * 1024 ** 3 and window["mem_total_bytes"] == 80 * 1024 ** 3
    assert window["power_w"] == 250.0
    assert window["energy_j"] >= 1000.0
    assert window["sm_clock_mhz"] == 1410.0
    assert window["throttle_reasons_mask"] == float(0x4 | 0x1)  # OR over the window
    assert window["temperature_c"] == 65.0
    # no new sample since: the latest one stands in
    assert latest["throttle_reasons_mask"] in (0x1, 0x4)  # one read: power cap or idle, not both
    assert sampler.window()["throttle_reasons_mask"] == latest["throttle_reasons_mask"]
    sampler.stop()
    assert fake_nvml.calls["nvmlShutdown"] == 1

    with pytest.raises(fake_nvml.NVMLError):
        create_sampler("nvml", device_index=5)  # no such device: asked for NVML, so it raises

    with StepProfiler(str(tmp_path), sampler="nvml", sample_hz=10, trace=False) as prof:
        assert prof.sampler.source == "nvml"
        for _ in range(3):
            with prof.step():
                pass
    (first, *_rest) = read_jsonl(prof.jsonl_path)
    assert first["device"]["power_w"] == 250.0 and "gpu_util_pct" in first["device"]


def test_sampler_windows_go_by_sample_time_not_by_when_asked(fake_nvml):
    sampler = create_sampler("nvml", hz=10)
    try:
        sampler.sample_once()  # 60 %
        sampler.sample_once()  # 80 %
        step_end = time.perf_counter()
        sampler.sample_once()  # 60 %, after the step ended
        # the step's record is built later; it still gets only the samples of its own time
        assert sampler.window(step_end)["gpu_util_pct"] == 70.0
        assert sampler.window(step_end)["gpu_util_pct"] == 80.0  # none new: the latest before
        assert sampler.window()["gpu_util_pct"] == 60.0
    finally:
        sampler.stop()


def test_unsupported_nvml_metric_is_dropped_not_fatal(fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_NO_ENERGY", "1")
    sampler = create_sampler("auto", hz=10)
    try:
        values = sampler.sample_once()
        assert "energy_j" not in values and values["power_w"] == 250.0
    finally:
        sampler.stop()


def _run_with_nvml(env_extra, fake=True):
    code = textwrap.dedent("""
        from profiler import StepProfiler
        import tempfile
        d = tempfile.mkdtemp()
        for _ in range(2):  # two profilers, one notice
            with StepProfiler(d, trace=False) as prof:
                with prof.step():
                    pass
        print("SOURCE", prof.sampler.source, sorted(prof.last_record.device))
    """)
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(([FAKE_NVML] if fake else []) + [REPO])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_a_driver_it_falls_back_to_psutil_with_one_notice():
    res = _run_with_nvml({"FAKE_NVML_INIT_ERROR": "9"})
    assert res.returncode == 0, res.stderr
    notices = [line for line in res.stderr.splitlines() if "NVML unavailable" in line]
    assert notices == ["profiler: NVML unavailable (NVMLError_DriverNotLoaded: Driver Not Loaded); "
                       "sampling CPU and process metrics with psutil instead"]
    assert "SOURCE psutil ['cpu_util_pct', 'mem_used_pct', 'proc_cpu_pct', 'rss_bytes']" in res.stdout


def _nvml_has_device_0() -> bool:
    """What the real NVML says here: does it initialise and hand out GPU 0?"""
    pynvml = require("pynvml", "the gpu extra")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        pynvml.nvmlDeviceGetHandleByIndex(0)
        return True
    except pynvml.NVMLError:
        return False
    finally:
        pynvml.nvmlShutdown()


def test_real_pynvml_samples_the_gpu_or_falls_back_without_one():
    """The real pynvml: NVML where it sees a GPU (a GPU machine), psutil with one notice where
    it does not (here) -- decided from NVML itself, not from what the profiler picked."""
    gpu = _nvml_has_device_0()
    res = _run_with_nvml({}, fake=False)
    assert res.returncode == 0, res.stderr
    notices = sum("NVML unavailable" in line for line in res.stderr.splitlines())
    if gpu:
        assert "SOURCE nvml" in res.stdout, res.stdout
        assert notices == 0, res.stderr
    else:
        assert "SOURCE psutil" in res.stdout, res.stdout
        assert notices == 1, res.stderr


def test_psutil_sampler_values():
    sampler = PsutilSampler(hz=10)
    try:
        busy_wait(0.05)
        values = sampler.sample_once()
        assert values["rss_bytes"] > 1e6 and 0 <= values["mem_used_pct"] <= 100
        assert 0 < values["proc_cpu_pct"] <= 100 * os.cpu_count() + 1  # it did spin
        assert 0 <= values["cpu_util_pct"] <= 100
    finally:
        sampler.stop()
    with pytest.raises(ProfilerConfigError, match="unknown sampler"):
        create_sampler("dcgm")


# -- stragglers -----------------------------------------------------------------------------

def _stats(rank, busy):
    return RankStats(rank=rank, generation=1, window=2, step=99, steps=50, step_p50_s=busy,
                     busy_p50_s=busy, phases_s={**{p: 0.0 for p in PHASES}, "forward": busy / 2})


def test_detect_stragglers_uses_the_median_and_threshold():
    report = detect_stragglers([_stats(0, 0.010), _stats(1, 0.0125), _stats(2, 0.011),
                                _stats(3, 0.030)], threshold_frac=0.1, world_size=5)
    assert report.median_busy_s == pytest.approx(0.01175)
    assert report.stragglers == (3,)  # 0.0125 is within 10% of the median
    assert report.missing == (4,)
    assert report.slowdown(3) == pytest.approx(0.030 / 0.01175 - 1)
    assert "rank 3" in report.describe()
    again = StragglerReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    assert detect_stragglers([_stats(0, 0.01), _stats(1, 0.01)], 0.1).stragglers == ()
    vec = _stats(2, 0.5).to_vector()
    assert len(vec) == RankStats.VECTOR_LEN and RankStats.from_vector(vec) == _stats(2, 0.5)
    assert RankStats.from_vector([0.0] * RankStats.VECTOR_LEN) is None  # an empty slot


def test_store_exchange_names_the_slow_rank():
    store = create_store("memory")
    world_size, steps, every = 3, 15, 5
    reports = {r: [] for r in range(world_size)}
    profs = [StepProfiler(None, world=World(rank=r, world_size=world_size, run_id="storejob"),
                          store=store, exchange="store", exchange_every=every,
                          straggler_threshold=0.5, sampler="none", trace=False,
                          exchange_timeout_s=30)
             for r in range(world_size)]
    for r, prof in enumerate(profs):
        prof.add_straggler_hook(reports[r].append)
    done = threading.Barrier(world_size, timeout=60)
    errors = []

    def rank_loop(rank):
        try:
            prof = profs[rank]
            for _ in range(steps):
                with prof.step(samples=1):
                    with prof.phase("forward"):
                        busy_wait(0.001)
                        if rank == 1:
                            time.sleep(0.02)  # the slow rank
            done.wait()
            prof.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    for rank in range(world_size):
        complete = [rep for rep in reports[rank] if not rep.missing]
        assert complete, f"rank {rank} got no complete report: {reports[rank]}"
        assert all(rep.stragglers == (1,) for rep in complete), complete
        assert all(rep.source == "store" for rep in complete)
    # rank 0 published the report under the store prefix for an agent to read
    kv = store.get("/elastic-prof/storejob/g0/report")
    published = StragglerReport.from_json(json.loads(kv.value))
    assert published.stragglers == (1,)
    kvs, _ = store.get_prefix("/elastic-prof/storejob/g0/rank/")
    assert len(kvs) == world_size and json.loads(kvs[1].value)["rank"] == 1
    rank0_lines = read_jsonl(profs[0].jsonl_path)
    assert any(rec["kind"] == "stragglers" and rec["stragglers"] == [1] for rec in rank0_lines)


class FakeExchange(StatsExchange):
    """A third party's exchange: this rank's stats plus a made-up rank 1 three times slower."""

    name = "fake"

    def __init__(self, settings, inline):
        self.settings, self.inline = settings, inline
        self.seen, self.threads, self.closed = [], [], False

    def exchange(self, stats):
        self.seen.append(stats)
        self.threads.append(threading.current_thread().name)
        other = dataclasses.replace(stats, rank=1, busy_p50_s=stats.busy_p50_s * 3)
        return [stats, other]

    def close(self):
        self.closed = True


@pytest.mark.parametrize("inline", [True, False])
def test_an_exchange_registered_by_name_is_used(tmp_path, inline):
    made = []

    def factory(settings):
        made.append(FakeExchange(settings, inline))
        return made[-1]

    name = f"fake-{'inline' if inline else 'background'}"
    EXCHANGES.register(name, factory)
    try:
        reports = []
        with StepProfiler(str(tmp_path), world=World(rank=0, world_size=2, run_id="fakejob"),
                          exchange=name, exchange_every=5, sampler="none", trace=False) as prof:
            prof.add_straggler_hook(reports.append)
            for _ in range(10):
                with prof.step():
                    with prof.phase("forward"):
                        busy_wait(0.0005)
        (fake,) = made
        assert (fake.settings.rank, fake.settings.world_size, fake.settings.run_id) == (0, 2, "fakejob")
        assert fake.closed
        windows = [(s.window, s.step) for s in fake.seen]
        if inline:  # on the training thread, every window in turn
            assert windows == [(0, 4), (1, 9)] and set(fake.threads) == {"MainThread"}
        else:  # a thread that skips to the newest window; close() let the last one finish
            assert windows in ([(0, 4), (1, 9)], [(1, 9)])
            assert set(fake.threads) == {"profiler-exchange"}
        assert [r.stragglers for r in reports] == [(1,)] * len(windows)
        assert all(r.source == "fake" and r.missing == () for r in reports)
        assert prof.last_report == reports[-1]
    finally:
        EXCHANGES._entries.pop(name, None)


def test_an_unknown_exchange_names_the_known_ones(tmp_path):
    with pytest.raises(ProfilerConfigError, match="unknown exchange 'carrier-pigeon'.*collective.*store"):
        StepProfiler(str(tmp_path), exchange="carrier-pigeon", sampler="none")


def test_nested_phases_count_once_and_a_failed_step_drops_what_it_left_open(tmp_path):
    with StepProfiler(str(tmp_path), sampler="none", trace=False) as prof:
        with prof.step():
            with prof.phase("forward"):
                with prof.phase("forward"):  # re-entered: still one interval
                    busy_wait(0.001)
                busy_wait(0.001)
        with pytest.raises(RuntimeError):
            with prof.step():
                prof.phase("backward").begin()  # a hook's begin whose end never comes
                raise RuntimeError("boom")
        with prof.step():
            with prof.phase("backward"):
                pass
    first, third = prof.records
    assert [first.step, third.step] == [0, 2]
    assert first.phases_s["forward"] >= 0.002 and set(first.phases_s) == {"forward"}
    # the open begin of the failed step did not swallow the next step's backward
    assert set(third.phases_s) == {"backward"} and third.phases_s["backward"] < 0.001


@pytest.mark.gpu
def test_cuda_events_time_steps_on_a_gpu(tmp_path):
    torch = require("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = torch.nn.Linear(1024, 1024).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(256, 1024, device="cuda")
    with StepProfiler(str(tmp_path), sampler="none") as prof:
        assert prof.timer == "cuda"
        prof.attach(model, opt)
        for _ in range(20):
            with prof.step(samples=256):
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    records = list(prof.records)
    assert [r.step for r in records] == list(range(20))
    assert all(r.timer == "cuda" and r.step_time_s > 0 for r in records)
    assert all({"forward", "backward", "optimizer"} <= set(r.phases_s) for r in records)
