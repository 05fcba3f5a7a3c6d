"""The :class:`StepProfiler`: an always-on, per-step record for every step of every rank.

Cheap by construction, because after a real training step the caches are cold and every line
of Python on the training thread costs ten times its warm price: a step or phase boundary is
one clock read (``perf_counter()`` on a CPU, a CUDA event from a pool on a GPU) and a list
append, and a finished step is one tuple appended to a deque. A background writer thread
turns those tuples into :class:`StepRecord` s (elapsed times, throughput, MFU, the device
sampler's window) every 250 ms and writes them to the outputs (a buffered JSON line, trace
events, gauges). On a GPU it reads a step's events only once they have completed, so nothing
synchronises with the device, except the training thread once per exchange window, which
reads every finished step before the cross-rank exchange.
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import re
import statistics
import sys
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence

from elastic.world import World

from ._clock import CpuClock, CudaClock
from .api import PHASES, RankStats, Sampler, Sink, StepRecord, StragglerReport
from .errors import ProfilerConfigError, ProfilerUsageError
from .sampler import create_sampler
from .sinks import ChromeTraceSink, JsonlSink, PrometheusSink, TensorBoardSink

__all__ = ["StepProfiler", "PEAK_FLOPS"]

log = logging.getLogger("profiler")

_PHASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_perf = time.perf_counter
_MAX_CARRY = 4096  # phase intervals kept for the next step while no step opens

#: Dense BF16/FP16 tensor-core peaks (FLOP/s) by GPU name fragment, for MFU when no peak is given.
PEAK_FLOPS = {
    "B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "V100": 125e12,
}


class _Phase:
    """A reusable context manager for one phase name; re-entering an open phase is a no-op.

    ``begin``/``end`` take and ignore any arguments so they can be registered directly as
    hooks (an optimizer's step pre/post hooks call them with ``(optimizer, args, kwargs)``).
    """

    __slots__ = ("_prof", "name", "_depth", "_mark")

    def __init__(self, prof: "StepProfiler", name: str) -> None:
        self._prof = prof
        self.name = name
        self._depth = 0
        self._mark = None

    def begin(self, *_: Any) -> None:
        if self._depth:
            self._depth += 1
            return
        self._depth = 1
        prof = self._prof
        self._mark = mark = prof._mark()
        if not prof._in_step and prof._carry_start is None:
            prof._carry_start = (mark, _perf() if prof._cuda else mark)

    def end(self, *_: Any) -> None:
        depth = self._depth
        if depth != 1:
            if depth:
                self._depth = depth - 1
            return
        self._depth = 0
        prof = self._prof
        intervals = prof._intervals
        intervals.append((self.name, self._mark, prof._mark()))
        if not prof._in_step and len(intervals) > _MAX_CARRY:  # phases but never a step
            del intervals[:-_MAX_CARRY // 2]

    def cancel(self) -> None:
        """Forget an open phase that measured nothing (the loader was exhausted)."""
        if self._depth:
            self._depth -= 1
            prof = self._prof
            if self._depth == 0 and not prof._in_step and not prof._intervals:
                prof._carry_start = None

    __enter__ = begin

    def __exit__(self, *exc: Any) -> None:
        self.end()


class _Step:
    """The step context manager: two clock reads, a few attribute stores and one append.

    Everything else a finished step needs (elapsed times, the record, device window,
    outputs) is done later, off the training thread, from the raw tuple appended here.
    """

    __slots__ = ("_prof",)

    def __init__(self, prof: "StepProfiler") -> None:
        self._prof = prof

    def __enter__(self) -> "_Step":
        p = self._prof
        if p._in_step or p._closed:
            p._refuse_step()
        p._in_step = True
        start = p._carry_start
        if start is None:
            mark = p._mark()
            p._start = (mark, _perf() if p._cuda else mark)
        else:
            p._start = start
            p._carry_start = None
        p._cur_step = p._next_step
        p._next_step += 1
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        p = self._prof
        if not p._in_step:
            return
        end = p._mark()
        p._in_step = False
        intervals = p._intervals
        p._intervals = []
        if exc_type is not None:  # a failed step is not a measurement
            if p._cuda:
                p._clock.release([p._start[0], end] + [m for _, a, b in intervals for m in (a, b)])
            return
        p._raw.append((p._cur_step, p._start, end, _perf() if p._cuda else end, intervals,
                       p._next_samples, p._next_flops,
                       p._take_comm() if p._comm_intervals else None))
        p._ended += 1
        if p._ended >= p._boundary:
            p._at_boundary()


class _Writer:
    """Turns raw steps into records and hands them to the sinks, on a background thread.

    The training thread only appends to deques (thread-safe, no lock, no wake-up); every
    ``interval_s`` this thread reads the finished steps (on a GPU: those whose events have
    completed, never waiting), builds their records and writes them to the sinks in step
    order, a batch at a time (one file write per sink). All of that runs beside the training
    step (PyTorch releases the GIL in its kernels), not inside it.
    """

    def __init__(self, sinks: List[Sink], collect: Callable[[], None],
                 bind_thread: Optional[Callable[[], None]] = None,
                 interval_s: float = 0.25) -> None:
        self._sinks = sinks
        self._bind_thread = bind_thread
        self._collect = weakref.WeakMethod(collect)  # the profiler may be dropped unclosed
        self._queue: Deque[tuple] = collections.deque()
        self.lock = threading.Lock()  # held while writing to the sinks
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._failed: set = set()
        self._thread = threading.Thread(target=self._run, name="profiler-writer", daemon=True)
        self._thread.start()

    def put(self, record: StepRecord, intervals: Sequence[tuple]) -> None:
        self._queue.append((record, intervals))

    def _warn_once(self, key: Any, what: str, exc: BaseException) -> None:
        if key not in self._failed:
            self._failed.add(key)
            log.warning("profiler: %s failed: %s", what, exc)

    def drain(self) -> None:
        with self.lock:
            queue = self._queue
            while queue:
                batch = []
                while queue and len(batch) < 256:
                    batch.append(queue.popleft())
                for sink in self._sinks:
                    try:
                        sink.write_steps(batch)
                    except Exception as exc:
                        self._warn_once(id(sink), type(sink).__name__, exc)

    def _run(self) -> None:
        if self._bind_thread is not None:
            try:
                self._bind_thread()
            except Exception as exc:
                self._warn_once("bind", "binding the writer thread to the device", exc)
        while not self._stop.wait(self._interval_s):
            collect = self._collect()
            if collect is not None:
                try:
                    collect()
                except Exception as exc:  # must not kill the thread; say it once
                    self._warn_once("collect", "reading finished steps", exc)
                del collect
            self.drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.drain()


class StepProfiler:
    """Per-step timing, phases, device metrics, cross-rank stragglers, and their outputs.

    ``with prof.step(samples=n):`` around each training step, ``with prof.phase("forward"):``
    inside it (or :meth:`attach` for automatic PyTorch hooks). Phases timed outside a step
    (the data loading before it) count towards the next step. ``run_dir`` receives
    ``rank-NNNNN.jsonl`` (always) and a Chrome trace (``trace=True``).
    """

    def __init__(self, run_dir: Optional[str] = None, *, world: Optional[World] = None,
                 timer: Any = "auto", sampler: str = "auto", sample_hz: float = 5.0,
                 device_index: Optional[int] = None, trace: bool = True,
                 prometheus_port: Optional[int] = None, prometheus_addr: str = "127.0.0.1",
                 tensorboard_dir: Optional[str] = None, tensorboard_every: int = 10,
                 exchange: str = "auto", exchange_every: int = 50,
                 straggler_threshold: float = 0.1, store: Any = None,
                 store_prefix: str = "/elastic-prof/", exchange_timeout_s: float = 60.0,
                 peak_flops: Optional[float] = None, flops_per_step: Optional[float] = None,
                 history: int = 1024, sinks: Sequence[Sink] = ()) -> None:
        if exchange not in ("auto", "collective", "store", "none"):
            raise ProfilerConfigError(
                f"unknown exchange {exchange!r}; known: auto, collective, store, none")
        if isinstance(timer, str) and timer not in ("auto", "cpu", "cuda"):
            raise ProfilerConfigError(f"unknown timer {timer!r}; known: auto, cpu, cuda")
        if exchange_every < 1:
            raise ProfilerConfigError(f"exchange_every must be >= 1, got {exchange_every}")
        if not straggler_threshold >= 0:
            raise ProfilerConfigError(
                f"straggler_threshold must be >= 0, got {straggler_threshold}")
        if peak_flops is not None and not peak_flops > 0:
            raise ProfilerConfigError(f"peak_flops must be positive, got {peak_flops}")
        self.world = World.detect() if world is None else world
        self.run_dir = os.path.abspath(run_dir or os.environ.get("ELASTIC_PROF_DIR")
                                       or os.path.join("elastic-prof", self.world.run_id))
        self._clock = self._make_clock(timer)
        self._cuda = self._clock.kind == "cuda"
        self.exchange_every = exchange_every
        self.straggler_threshold = straggler_threshold
        self._exchange_mode = exchange
        self._exchange_timeout_s = exchange_timeout_s
        self._store = store
        self._store_prefix = store_prefix.rstrip("/") + f"/{self.world.run_id}/"
        self._exchange: Any = None
        self._exchange_resolved = False
        self.peak_flops = peak_flops if peak_flops is not None else self._known_peak()
        self.flops_per_step = flops_per_step

        # hot-path state (the training thread's; see _Step and _Phase)
        self._mark: Callable[[], Any] = (_perf if isinstance(self._clock, CpuClock)
                                         else self._clock.mark)
        self._in_step = False
        self._start: tuple = (None, 0.0)  # (start mark, perf_counter time) of the open step
        self._cur_step = 0
        self._intervals: List[tuple] = []  # the open step's (name, mark, mark), or the carry
        self._carry_start: Optional[tuple] = None
        self._phases: Dict[str, _Phase] = {}
        self._step_ctx = _Step(self)
        self._next_samples: Optional[int] = None
        self._next_flops: Optional[float] = None
        self._next_step = 0
        self._ended = 0
        self._boundary = exchange_every  # value of _ended at which the next window closes
        self._raw: Deque[tuple] = collections.deque()  # finished steps, not yet read
        self._wall_offset = time.time() - time.perf_counter()
        self._comm_lock = threading.Lock()
        self._comm_inflight = 0
        self._comm_start = 0.0
        self._comm_intervals: List[tuple] = []
        self._closed = False
        self._collect_lock = threading.Lock()  # reading raw steps: writer thread or on demand

        # window statistics for the exchange
        self._windowing = True  # off once it is known that there is no exchange
        self._win_step: List[float] = []
        self._win_busy: List[float] = []
        self._win_samples = 0.0
        self._win_phases: Dict[str, float] = {p: 0.0 for p in PHASES}
        self._window_index = 0

        self._records: Deque[StepRecord] = collections.deque(maxlen=history)  # the user's
        self._done: Deque[StepRecord] = collections.deque(maxlen=history)  # read, not yet moved
        self._last: Optional[StepRecord] = None
        self.last_report: Optional[StragglerReport] = None
        self._straggler_hooks: List[Callable[[StragglerReport], None]] = []
        self._hook_handles: List[Any] = []

        # outputs
        rank = self.world.rank
        self.jsonl_path = os.path.join(self.run_dir, f"rank-{rank:05d}.jsonl")
        self._sinks: List[Sink] = [JsonlSink(self.jsonl_path)]
        self.trace_path: Optional[str] = None
        self.prometheus: Optional[PrometheusSink] = None
        try:
            if trace:
                self.trace_path = os.path.join(
                    self.run_dir,
                    f"trace-rank-{rank:05d}-g{self.world.generation}-p{os.getpid()}.json")
                self._sinks.append(ChromeTraceSink(self.trace_path, rank, self.world.generation))
            if prometheus_port is not None:
                port = prometheus_port + self.world.local_rank if prometheus_port else 0
                self.prometheus = PrometheusSink(port, prometheus_addr, rank, self.world.generation)
                self._sinks.append(self.prometheus)
            if tensorboard_dir is not None:
                self._sinks.append(TensorBoardSink(tensorboard_dir, tensorboard_every, rank))
            self._sinks.extend(sinks)
            self._want_intervals = trace or any(not isinstance(s, (JsonlSink, PrometheusSink,
                                                                   TensorBoardSink))
                                                for s in self._sinks)
            index = self.world.local_rank if device_index is None else device_index
            self.sampler: Optional[Sampler] = create_sampler(sampler, index, sample_hz)
        except BaseException:
            for sink in self._sinks:
                sink.close()
            raise
        if self.sampler is not None:
            self.sampler.start()
        self._writer = _Writer(self._sinks, self._collect, getattr(self._clock, "bind_thread", None))
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().close())
        atexit.register(self._atexit)

    # -- construction helpers ------------------------------------------------------------
    def _make_clock(self, timer: Any):
        if not isinstance(timer, str):
            return timer  # a clock object with CudaClock's interface (tests, other devices)
        torch = sys.modules.get("torch")
        # auto: CUDA events only once the job has put work on the GPU (CUDA initialised);
        # a CPU job on a GPU machine keeps the wall clock.
        if timer == "cuda" or (timer == "auto" and torch is not None and torch.cuda.is_available()
                               and torch.cuda.is_initialized()):
            if torch is None:
                from elastic.lazy import require
                torch = require("torch", "CUDA step timing")
            if not torch.cuda.is_available():
                raise ProfilerConfigError("timer='cuda' but CUDA is not available")
            return CudaClock(torch)
        return CpuClock()

    def _known_peak(self) -> Optional[float]:
        if not self._cuda:
            return None
        try:
            name = sys.modules["torch"].cuda.get_device_name()
        except Exception:
            return None
        for fragment, peak in PEAK_FLOPS.items():
            if fragment in name:
                return peak
        return None

    @property
    def timer(self) -> str:
        """``cpu`` (monotonic wall clock) or ``cuda`` (CUDA events)."""
        return self._clock.kind

    @property
    def sinks(self) -> Sequence[Sink]:
        return tuple(self._sinks)

    # -- the hot path --------------------------------------------------------------------
    def step(self, samples: Optional[int] = None, flops: Optional[float] = None,
             step: Optional[int] = None) -> _Step:
        """A context manager around one training step.

        ``samples``: how many samples the step processed (throughput); ``flops``: the step's
        FLOPs (MFU, with ``peak_flops``); ``step``: an explicit step number (default: counts
        from 0, or on from the last explicit one).
        """
        self._next_samples = samples
        self._next_flops = flops
        if step is not None:
            self._next_step = step
        return self._step_ctx

    def phase(self, name: str) -> _Phase:
        """A context manager timing ``name`` (``data``, ``forward``, ``backward``, ``optimizer``,
        ``comm``, ``checkpoint`` or your own) inside the current step."""
        ctx = self._phases.get(name)
        if ctx is None:
            if not isinstance(name, str) or not _PHASE_NAME.match(name):
                raise ProfilerConfigError(
                    f"invalid phase name {name!r}: use letters, digits, '_', '.', '-'")
            ctx = self._phases[name] = _Phase(self, name)
        return ctx

    def _refuse_step(self) -> None:
        if self._closed:
            raise ProfilerUsageError("the profiler is closed")
        raise ProfilerUsageError("step() entered while a step is open; steps do not nest")

    def _take_comm(self) -> List[tuple]:
        with self._comm_lock:
            comm, self._comm_intervals = self._comm_intervals, []
        return comm

    def _at_boundary(self) -> None:
        """Every ``exchange_every`` steps, on the training thread: read every finished step
        (on a GPU this waits for the window's last step) and exchange the window's stats.
        Without an exchange (one process, ``exchange="none"``) it does nothing."""
        self._boundary += self.exchange_every
        if not self._exchange_resolved:
            self._exchange = self._resolve_exchange()
            if self._exchange is None:
                with self._collect_lock:
                    self._windowing = False
                    self._window_stats()  # drop what was gathered
        if self._exchange is not None:
            self._collect(wait_all=True)
            self._exchange_window()

    # -- reading finished steps (writer thread, or on demand) ----------------------------
    @property
    def records(self) -> Deque[StepRecord]:
        """The latest ``history`` step records, oldest first (GPU steps appear once their
        events have completed)."""
        if self._raw:
            self._collect()
        done, records = self._done, self._records
        while done:
            records.append(done.popleft())
        return records

    @property
    def last_record(self) -> Optional[StepRecord]:
        """The record of the latest finished step that has been read, or None."""
        if self._raw:
            self._collect()
        return self._last

    def _collect(self, wait_all: bool = False) -> None:
        """Turn finished steps into records, in order; on a GPU stop at the first step whose
        events have not completed unless ``wait_all``."""
        with self._collect_lock:
            raw = self._raw
            clock = self._clock
            cuda = self._cuda
            while raw:
                item = raw[0]
                if cuda and not clock.ready(item[2]):
                    if not wait_all:
                        return
                    clock.wait(item[2])
                raw.popleft()
                self._finalize(item)

    def _finalize(self, item: tuple) -> None:
        step, (start, start_perf), end, end_perf, raw_intervals, samples, flops, comm = item
        elapsed = self._clock.elapsed_s
        step_time = elapsed(start, end)
        phases: Dict[str, float] = {}
        intervals: Optional[list] = [] if self._want_intervals else None
        for name, a, b in raw_intervals:
            d = elapsed(a, b)
            phases[name] = phases.get(name, 0.0) + d
            if intervals is not None:
                intervals.append((name, elapsed(start, a), d))
        if comm:
            total = phases.get("comm", 0.0)
            for a, b in comm:
                total += b - a
                if intervals is not None:
                    intervals.append(("comm", a - start_perf, b - a))
            phases["comm"] = total
        if self._cuda:
            self._clock.release([start, end] + [m for _, a, b in raw_intervals for m in (a, b)])
        samples = None if samples is None else int(samples)
        sps = samples / step_time if samples and step_time > 0 else None
        if flops is None:
            flops = self.flops_per_step
        if flops is not None:
            flops = float(flops)
        mfu = (flops / step_time / self.peak_flops
               if flops and self.peak_flops and step_time > 0 else None)
        record = StepRecord(step, self.world.rank, self.world.generation,
                            self._wall_offset + start_perf, step_time, phases, samples, sps,
                            flops, mfu, self.sampler.window(end_perf) if self.sampler else {},
                            self._clock.kind)
        self._writer.put(record, intervals or ())
        self._done.append(record)
        self._last = record
        if not self._windowing:
            return
        self._win_step.append(step_time)
        self._win_busy.append(step_time - phases.get("comm", 0.0))
        if samples:
            self._win_samples += samples
        win = self._win_phases
        for name, d in phases.items():
            if name in win:
                win[name] += d

    # -- communication time from hooks (any thread) --------------------------------------
    def comm_begin(self) -> None:
        """Mark the start of an asynchronous collective (the DDP comm hook calls this)."""
        with self._comm_lock:
            if self._comm_inflight == 0:
                self._comm_start = time.perf_counter()
            self._comm_inflight += 1

    def comm_end(self) -> None:
        """Mark the end of one; time with any collective in flight counts as ``comm``."""
        with self._comm_lock:
            if self._comm_inflight == 0:
                return
            self._comm_inflight -= 1
            if self._comm_inflight == 0:
                self._comm_intervals.append((self._comm_start, time.perf_counter()))

    # -- cross-rank exchange -------------------------------------------------------------
    def _resolve_exchange(self) -> Any:
        self._exchange_resolved = True
        mode = self._exchange_mode
        if mode == "none":
            return None
        dist = sys.modules.get("torch.distributed")
        has_group = bool(dist is not None and dist.is_available() and dist.is_initialized())
        from .exchange import CollectiveExchange, StoreExchange

        if mode in ("auto", "collective") and has_group:
            if dist.get_world_size() > 1:
                return CollectiveExchange(self.straggler_threshold)
            return None
        if mode == "collective":
            raise ProfilerConfigError(
                "exchange='collective' needs an initialised torch.distributed process group")
        if mode in ("auto", "store") and self._store is not None:
            if self.world.world_size > 1 or mode == "store":
                return StoreExchange(self._store, self._store_prefix, self.world.rank,
                                     self.world.world_size, self.straggler_threshold,
                                     self._on_report, self._exchange_timeout_s)
            return None
        if mode == "store":
            raise ProfilerConfigError("exchange='store' needs a store= argument")
        if self.world.world_size > 1:
            log.debug("profiler: no process group and no store; straggler reports are off")
        return None

    def _window_stats(self) -> Optional[RankStats]:
        steps = len(self._win_step)
        if not steps:
            return None
        total_time = sum(self._win_step)
        stats = RankStats(
            rank=self.world.rank, generation=self.world.generation, window=self._window_index,
            step=self._last.step if self._last else 0, steps=steps,
            step_p50_s=statistics.median(self._win_step),
            busy_p50_s=statistics.median(self._win_busy),
            samples_per_s=self._win_samples / total_time if total_time > 0 else 0.0,
            phases_s={p: v / steps for p, v in self._win_phases.items()})
        self._win_step = []
        self._win_busy = []
        self._win_samples = 0.0
        self._win_phases = {p: 0.0 for p in PHASES}
        self._window_index += 1
        return stats

    def _exchange_window(self) -> None:
        with self._collect_lock:
            stats = self._window_stats()
        if stats is None:
            return
        from .exchange import CollectiveExchange

        if isinstance(self._exchange, CollectiveExchange):
            self._on_report(self._exchange.exchange(stats))
        else:
            self._exchange.submit(stats)

    def _on_report(self, report: StragglerReport) -> None:
        self.last_report = report
        if self.world.rank == 0:
            if report.stragglers:
                log.warning("profiler: %s", report.describe())
            for sink in self._sinks:
                try:
                    sink.write_report(report)
                except Exception as exc:
                    log.warning("profiler: writing a straggler report failed: %s", exc)
        for hook in list(self._straggler_hooks):
            try:
                hook(report)
            except Exception:
                log.exception("profiler: a straggler hook failed")

    def add_straggler_hook(self, hook: Callable[[StragglerReport], None]) -> Callable[[], None]:
        """Call ``hook(report)`` with every straggler report (from the training thread with a
        process group, from a background thread with a store). Returns a remover."""
        self._straggler_hooks.append(hook)
        return lambda: hook in self._straggler_hooks and self._straggler_hooks.remove(hook)

    # -- integrations --------------------------------------------------------------------
    def attach(self, model: Any = None, optimizer: Any = None, comm_hook: Any = None) -> None:
        """Automatic PyTorch phases: forward/backward from module hooks, ``optimizer`` from
        optimizer step hooks, ``comm`` from a DDP communication hook when ``model`` is a
        ``DistributedDataParallel`` (wrapping ``comm_hook``, default allreduce)."""
        from .hooks import attach_torch

        self._hook_handles.extend(attach_torch(self, model, optimizer, comm_hook))

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` added (``close()`` does it too). A DDP
        communication hook stays: DDP cannot unregister one (it keeps timing ``comm``)."""
        handles, self._hook_handles = self._hook_handles, []
        for handle in handles:
            try:
                handle.remove()
            except Exception:
                pass

    def wrap_loader(self, iterable: Iterable) -> Iterator:
        """Yield from ``iterable``, timing each fetch as the ``data`` phase of the next step."""
        data = self.phase("data")
        iterator = iter(iterable)
        while True:
            data.begin()
            try:
                item = next(iterator)
            except StopIteration:
                data.cancel()
                return
            except BaseException:
                data.cancel()
                raise
            data.end()
            yield item

    def keras_callback(self, batch_size: Optional[int] = None) -> Any:
        """A ``keras.callbacks.Callback`` that makes every Keras training batch a step."""
        from .hooks import keras_callback

        return keras_callback(self, batch_size)

    def set_world(self, world: Optional[World] = None) -> None:
        """New rank facts after a re-rendezvous (in-process recovery; default: detected anew,
        :meth:`elastic.World.detect`): later records carry the new generation; a new rank
        gets its own JSON lines file."""
        self._collect(wait_all=True)
        old = self.world
        world = World.detect() if world is None else world
        self.world = world
        if world.rank != old.rank:
            self._writer.drain()
            self.jsonl_path = os.path.join(self.run_dir, f"rank-{world.rank:05d}.jsonl")
            with self._writer.lock:
                self._sinks[0].close()
                self._sinks[0] = JsonlSink(self.jsonl_path)
        if (world.generation, world.world_size) != (old.generation, old.world_size):
            if self._exchange is not None and hasattr(self._exchange, "close"):
                self._exchange.close(0.0)
            self._exchange = None
            self._exchange_resolved = False
            with self._collect_lock:
                self._windowing = True

    # -- lifecycle -----------------------------------------------------------------------
    def flush(self) -> None:
        """Read every finished step (waiting for the GPU if needed) and flush the outputs."""
        self._collect(wait_all=True)
        self._writer.drain()
        for sink in self._sinks:
            sink.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._in_step = False
        try:
            self._collect(wait_all=True)
        finally:
            self._closed = True
            self.detach()
            if self._exchange is not None and hasattr(self._exchange, "close"):
                self._exchange.close()
            if self.sampler is not None:
                self.sampler.stop()
            self._writer.close()
            for sink in self._sinks:
                try:
                    sink.close()
                except Exception as exc:
                    log.warning("profiler: closing %s failed: %s", type(sink).__name__, exc)
            atexit.unregister(self._atexit)

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
