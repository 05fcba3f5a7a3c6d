"""The :class:`StepProfiler`: an always-on, per-step record for every step of every rank.

Cheap by construction: on the training thread a step or phase boundary is one clock read
(``perf_counter()`` on a CPU, a CUDA event from a pool on a GPU) and one append of a small
tuple to a deque (:mod:`profiler._stamps`). A background writer thread assembles those stamps
into steps (:mod:`profiler._steps`), turns them into :class:`StepRecord` s (elapsed times,
throughput, MFU, the device sampler's window) every 250 ms and writes them to the outputs (a
buffered JSON line, trace events, gauges). On a GPU it reads a step's events only once they
have completed, so nothing synchronises with the device, except the training thread once per
exchange window, which reads every finished step before the cross-rank exchange
(:mod:`profiler.windows`).

Sampled phases: each Python function that a framework calls on the training thread costs
microseconds after a real step (cold caches), so the automatic PyTorch hooks (``forward``,
``backward``, ``optimizer``) time one step in ``phase_every``: they are put into the module's
and optimizer's hook dicts at the end of the step before a sampled step and taken out at the
end of the sampled step, and between those steps the model runs hook-free. Every step is still
a record with its step time (what the straggler detection compares), samples, FLOPs, device
metrics and the phases timed on every step (``data``, ``comm``, ``phase()`` blocks); a record
says whether it carries the sampled phases (``sampled``). Aggregates (the exchange windows,
``elastic-prof report``) take an automatic phase's mean over the sampled steps and any other
phase's over all steps (:func:`profiler.windows.phase_means`).
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import re
import threading
import time
import weakref
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

from elastic.world import World

from ._clock import PEAK_FLOPS, CpuClock, host_paired, known_peak, make_clock
from ._stamps import (COMM_BEGIN, COMM_END, CLOSED, STEP, STEP_UNSAMPLED, Code, Phase,
                      make_step, phase_codes)
from ._steps import StepAssembler, new_stamp_queue
from ._writer import Writer
from .api import ExchangeSettings, Sampler, Sink, StepRecord, StragglerReport
from .errors import ProfilerConfigError, ProfilerUsageError
from .exchange import check_exchange_name, create_exchange
from .sampler import create_sampler
from .sinks import ChromeTraceSink, JsonlSink, PrometheusSink, TensorBoardSink
from .windows import ExchangeRunner, StatsWindow

__all__ = ["StepProfiler", "PEAK_FLOPS"]

log = logging.getLogger("profiler")

_PHASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_perf = time.perf_counter


class StepProfiler:
    """Per-step timing, phases, device metrics, cross-rank stragglers, and their outputs.

    ``with prof.step(samples=n):`` around each training step, ``with prof.phase("forward"):``
    inside it (or :meth:`attach` for automatic PyTorch hooks). Phases timed outside a step
    (the data loading before it) count towards the next step. ``run_dir`` receives
    ``rank-NNNNN.jsonl`` (always) and a Chrome trace (``trace=True``). ``exchange`` names a
    :class:`~profiler.api.StatsExchange` registered in ``profiler.exchange.EXCHANGES``
    (``collective``, ``store``, or a third party's), or ``auto`` or ``none``.
    ``phase_every``: the automatic hooks time ``forward``, ``backward`` and ``optimizer`` on
    every ``phase_every``-th step (the ``phase_every``-th, the ``2 * phase_every``-th, ...);
    1 times them on every step, at a few tens of microseconds of the training thread's time
    per step; every step is recorded either way.
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
                 history: int = 1024, sinks: Sequence[Sink] = (),
                 phase_every: int = 20) -> None:
        check_exchange_name(exchange)
        if isinstance(timer, str) and timer not in ("auto", "cpu", "cuda"):
            raise ProfilerConfigError(f"unknown timer {timer!r}; known: auto, cpu, cuda")
        if exchange_every < 1:
            raise ProfilerConfigError(f"exchange_every must be >= 1, got {exchange_every}")
        if isinstance(phase_every, bool) or not isinstance(phase_every, int) or phase_every < 1:
            raise ProfilerConfigError(f"phase_every must be an integer >= 1, got {phase_every!r}")
        if not straggler_threshold >= 0:
            raise ProfilerConfigError(
                f"straggler_threshold must be >= 0, got {straggler_threshold}")
        if peak_flops is not None and not peak_flops > 0:
            raise ProfilerConfigError(f"peak_flops must be positive, got {peak_flops}")
        self.world = World.detect() if world is None else world
        self.run_dir = os.path.abspath(run_dir or os.environ.get("ELASTIC_PROF_DIR")
                                       or os.path.join("elastic-prof", self.world.run_id))
        self._clock = make_clock(timer)
        # device marks are (event, perf_counter()) pairs, read once their events complete
        self._paired = not isinstance(self._clock, CpuClock)
        self.exchange_every = exchange_every
        self.straggler_threshold = straggler_threshold
        self._exchange_name = exchange
        self._exchange_timeout_s = exchange_timeout_s
        self._store = store
        self._store_prefix = store_prefix
        self._exchange: Optional[ExchangeRunner] = None
        self._exchange_resolved = False
        self.peak_flops = peak_flops if peak_flops is not None else known_peak(self._clock)
        self.flops_per_step = flops_per_step

        # the hot path (the training thread's): stamps into a deque, see _stamps
        self._stamps: Deque[tuple] = new_stamp_queue()
        self._mark: Callable[[], Any] = host_paired(self._clock) if self._paired else _perf
        self._phases: Dict[str, Phase] = {}
        # sampled phases: the hooks are in for one step in phase_every (all of them if 1)
        self.phase_every = phase_every
        self._phase_on = phase_every == 1
        self._pausable: List[tuple] = []  # (hooks dict, key, hook) of the automatic hooks
        self._steps = make_step(self._stamps.append, self._mark, exchange_every,
                                self._refuse_step, self._at_boundary, self._toggle_phases,
                                phase_every - 1 if phase_every > 1 else 0)
        # prof.step is the closure itself (an instance attribute before the method below):
        # no bound method, no extra call on the hot path
        self._steps.open.__doc__ = StepProfiler.step.__doc__
        self.__dict__["step"] = self._steps.open

        # the reading side (writer thread, or on demand), under _collect_lock
        self._collect_lock = threading.Lock()
        self._assembler = StepAssembler(self._release if self._paired else None)
        self._raw: Deque[tuple] = collections.deque()  # finished steps, not yet read
        self._wall_offset = time.time() - time.perf_counter()
        self._window = StatsWindow()
        self._records: Deque[StepRecord] = collections.deque(maxlen=history)  # the user's
        self._done: Deque[StepRecord] = collections.deque(maxlen=history)  # read, not yet moved
        self._last: Optional[StepRecord] = None
        self.last_report: Optional[StragglerReport] = None
        self._straggler_hooks: List[Callable[[StragglerReport], None]] = []
        self._hook_handles: List[Any] = []
        self._tenders: List[Callable[[], None]] = []  # the hooks' upkeep, on the writer thread
        self._closed = False

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
        self._writer = Writer(self._sinks, self._collect, getattr(self._clock, "bind_thread", None),
                              tend=self._tend)
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            prof = ref()
            if prof is not None:
                prof.close()
        self._atexit = close_at_exit
        atexit.register(self._atexit)

    @property
    def timer(self) -> str:
        """``cpu`` (monotonic wall clock) or ``cuda`` (CUDA events)."""
        return self._clock.kind

    @property
    def sinks(self) -> Sequence[Sink]:
        return tuple(self._sinks)

    # -- the hot path --------------------------------------------------------------------
    def step(self, samples: Optional[int] = None, flops: Optional[float] = None,
             step: Optional[int] = None) -> Any:
        """A context manager around one training step.

        ``samples``: how many samples the step processed (throughput); ``flops``: the step's
        FLOPs (MFU, with ``peak_flops``); ``step``: an explicit step number (default: counts
        from 0, or on from the last explicit one).

        The call opens the step (entering the context does nothing, binds nothing, and costs
        no Python call): use it as ``with prof.step(...):``.
        """
        return self._steps.open(samples, flops, step)

    def phase(self, name: str) -> Phase:
        """A context manager timing ``name`` (``data``, ``forward``, ``backward``, ``optimizer``,
        ``comm``, ``checkpoint`` or your own) inside the current step."""
        ctx = self._phases.get(name)
        if ctx is None:
            if not isinstance(name, str) or not _PHASE_NAME.match(name):
                raise ProfilerConfigError(
                    f"invalid phase name {name!r}: use letters, digits, '_', '.', '-'")
            ctx = self._phases[name] = Phase(name, self._stamps.append, self._mark)
        return ctx

    def comm_begin(self) -> None:
        """Mark the start of an asynchronous collective (the DDP comm hook calls this; any
        thread)."""
        self._stamps.append((COMM_BEGIN, _perf()))

    def comm_end(self) -> None:
        """Mark the end of one; time with any collective in flight counts as ``comm``."""
        self._stamps.append((COMM_END, _perf()))

    def wrap_loader(self, iterable: Iterable) -> Iterator:
        """Yield from ``iterable``, timing each fetch as the ``data`` phase of the next step.

        A generator: resuming one costs less after a real step than a pipeline of C iterators
        (``zip``/``map``/``starmap``) doing the same stamps, measured (benchmarks/profiler.py).
        """
        self.phase("data")
        begin, end, cancel = phase_codes("data")
        append, mark = self._stamps.append, self._mark
        iterator = iter(iterable)
        while True:
            append((begin, mark()))
            try:
                item = next(iterator)
            except StopIteration:
                append((cancel, mark()))
                return
            except BaseException:  # the loader raised: its fetch is no measurement
                append((cancel, mark()))
                raise
            append((end, mark()))
            yield item

    @staticmethod
    def _refuse_step(state: int) -> None:
        if state == CLOSED:
            raise ProfilerUsageError("the profiler is closed")
        raise ProfilerUsageError("step() called while a step is open; steps do not nest")

    def _at_boundary(self) -> None:
        """Every ``exchange_every`` steps, on the training thread: read every finished step
        (on a GPU this waits for the window's last step) and exchange the window's stats.
        Without an exchange (one process, ``exchange="none"``) it does nothing."""
        if not self._exchange_resolved:
            self._resolve_exchange()
        if self._exchange is not None:
            self._collect(wait_all=True)
            with self._collect_lock:
                stats = self._window.take(self.world.rank, self.world.generation,
                                          self._last.step if self._last else 0)
            if stats is not None:
                self._exchange.submit(stats)

    # -- reading finished steps (writer thread, or on demand) ----------------------------
    @property
    def records(self) -> Deque[StepRecord]:
        """The latest ``history`` step records, oldest first (GPU steps appear once their
        events have completed)."""
        if self._stamps or self._raw:
            self._collect()
        done, records = self._done, self._records
        while done:
            records.append(done.popleft())
        return records

    @property
    def last_record(self) -> Optional[StepRecord]:
        """The record of the latest finished step that has been read, or None."""
        if self._stamps or self._raw:
            self._collect()
        return self._last

    def _collect(self, wait_all: bool = False) -> None:
        """Assemble the stamps into steps and turn finished steps into records, in order; on
        a GPU stop at the first step whose events have not completed unless ``wait_all``."""
        with self._collect_lock:
            self._assembler.feed(self._stamps, self._raw)
            raw = self._raw
            clock = self._clock
            paired = self._paired
            while raw:
                item = raw[0]
                if paired and not clock.ready(item[2][0]):
                    if not wait_all:
                        return
                    clock.wait(item[2][0])
                raw.popleft()
                self._finalize(item)

    def _release(self, marks: List[Any]) -> None:
        """Give a step's device events back to the pool, each once."""
        self._clock.release(list({id(m[0]): m[0] for m in marks}.values()))

    def _finalize(self, item: tuple) -> None:
        step, start, end, raw_intervals, samples, flops, comm, spare, sampled = item
        intervals: Optional[list] = [] if self._want_intervals else None
        phases: Dict[str, float] = {}
        if self._paired:
            elapsed = self._clock.elapsed_s
            start_event, start_perf = start
            end_perf = end[1]
            step_time = elapsed(start_event, end[0])
            for name, a, b in raw_intervals:
                d = elapsed(a[0], b[0])
                phases[name] = phases.get(name, 0.0) + d
                if intervals is not None:
                    intervals.append((name, elapsed(start_event, a[0]), d))
            marks = [start, end] + [m for _, a, b in raw_intervals for m in (a, b)]
            if spare is not None:
                marks.append(spare)
            self._release(marks)
        else:
            start_perf, end_perf = start, end
            step_time = end - start
            for name, a, b in raw_intervals:
                d = b - a
                phases[name] = phases.get(name, 0.0) + d
                if intervals is not None:
                    intervals.append((name, a - start, d))
        if comm:
            total = phases.get("comm", 0.0)
            for a, b in comm:
                total += b - a
                if intervals is not None:
                    intervals.append(("comm", a - start_perf, b - a))
            phases["comm"] = total
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
                            self._clock.kind, sampled)
        self._writer.put(record, intervals or ())
        self._done.append(record)
        self._last = record
        if self._window.active:
            self._window.add(step_time, phases, samples, sampled)

    # -- cross-rank exchange -------------------------------------------------------------
    def _tend(self) -> None:
        """The automatic hooks' upkeep (refilling pools), on the writer thread."""
        for tend in list(self._tenders):
            tend()

    def _resolve_exchange(self) -> None:
        self._exchange_resolved = True
        world = self.world
        settings = ExchangeSettings(
            rank=world.rank, world_size=world.world_size, generation=world.generation,
            run_id=world.run_id, store=self._store, store_prefix=self._store_prefix,
            timeout_s=self._exchange_timeout_s)
        exchange = create_exchange(self._exchange_name, settings)
        if exchange is None:
            with self._collect_lock:
                self._window.active = False
                self._window.clear()  # drop what was gathered
            return
        self._exchange = ExchangeRunner(exchange, self.straggler_threshold,
                                        exchange.world_size or world.world_size,
                                        self._on_report)

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

        def remove() -> None:
            if hook in self._straggler_hooks:
                self._straggler_hooks.remove(hook)
        return remove

    # -- integrations --------------------------------------------------------------------
    def attach(self, model: Any = None, optimizer: Any = None, comm_hook: Any = None) -> None:
        """Automatic PyTorch phases: forward/backward from module hooks, ``optimizer`` from
        optimizer step hooks (on one step in ``phase_every``), ``comm`` from a DDP
        communication hook when ``model`` is a ``DistributedDataParallel`` (wrapping
        ``comm_hook``, default allreduce; on every step)."""
        from .hooks import attach_torch

        for handle in attach_torch(self, model, optimizer, comm_hook):
            self._add_hook_handle(handle)

    def _add_hook_handle(self, handle: Any) -> None:
        """Keep a hook's handle for :meth:`detach`; a hook in a torch hooks dict (a
        ``RemovableHandle``) is taken out of it and put back for the sampled steps."""
        self._hook_handles.append(handle)
        ref, key = getattr(handle, "hooks_dict_ref", None), getattr(handle, "id", None)
        hooks = ref() if callable(ref) else None
        extra = [r() for r in getattr(handle, "extra_dict_ref", ())]  # kwargs, always-called
        if hooks is None or key not in hooks or any(d is None or key in d for d in extra):
            return  # not ours to pause: it stays in on every step (and its phase is timed there)
        self._pausable.append((hooks, key, hooks[key]))
        if not self._phase_on:
            del hooks[key]
        self._steps.set_code(self._step_code())

    def _toggle_phases(self) -> Tuple[int, Code]:
        """At the end of a step (training thread): before a sampled step put the automatic
        hooks in, after it take them out; the next countdown and step code (see
        :func:`~profiler._stamps.make_step`)."""
        if self._phase_on:
            self._phase_on = False
            for hooks, key, _ in self._pausable:
                hooks.pop(key, None)  # gone already if the user cleared the dict
            return self.phase_every - 1, STEP_UNSAMPLED if self._pausable else STEP
        self._phase_on = True
        for hooks, key, hook in self._pausable:
            hooks[key] = hook
        return 1, STEP

    def _step_code(self) -> Code:
        """A step's start code: unsampled while automatic hooks exist and are out."""
        return STEP if self._phase_on or not self._pausable else STEP_UNSAMPLED

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` added (``close()`` does it too). A DDP
        communication hook stays: DDP cannot unregister one (it keeps timing ``comm``)."""
        handles, self._hook_handles = self._hook_handles, []
        self._pausable = []
        self._tenders = []
        self._steps.set_code(STEP)
        for handle in handles:
            try:
                handle.remove()
            except Exception:
                pass

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
            if self._exchange is not None:
                self._exchange.close(0.0)
            self._exchange = None
            self._exchange_resolved = False
            with self._collect_lock:
                self._window.active = True

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
        self._steps.set_state(CLOSED)
        try:
            self._collect(wait_all=True)
        finally:
            self._closed = True
            self.detach()
            if self._exchange is not None:
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
