"""Outputs of step records: JSON lines (always on), a Chrome/Perfetto trace, a Prometheus
endpoint and TensorBoard scalars. ``write_steps`` (a batch of steps, in step order) runs on the
profiler's writer thread (not the training thread); writes are buffered and flushed about
once a second.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import types
from typing import Any, Dict, Optional, Sequence, TextIO, Tuple

from .api import PHASES, PhaseInterval, Sink, StepRecord, StragglerReport

__all__ = ["JsonlSink", "ChromeTraceSink", "PrometheusSink", "TensorBoardSink"]

_BUFFER_BYTES = 1 << 16


_KEYS: Dict[str, str] = {}


def _key(name: str) -> str:
    encoded = _KEYS.get(name)
    if encoded is None:
        encoded = _KEYS[name] = json.dumps(str(name))
    return encoded


def _num(value: float) -> str:
    text = repr(float(value))
    return text if text[-1] not in "fn" else json.dumps(float(value))  # inf/nan as json does


def step_json(record: StepRecord) -> str:
    """``json.dumps(record.to_json())`` in a few microseconds: a fixed layout, cached keys."""
    r = record
    parts = ['{"kind":"step","step":%d,"rank":%d,"generation":%d,"wall_time_s":%s,'
             '"step_time_s":%s,"phases_s":{' % (r.step, r.rank, r.generation,
                                                _num(r.wall_time_s), _num(r.step_time_s)),
             ",".join([f"{_key(k)}:{_num(v)}" for k, v in r.phases_s.items()]),
             '},"timer":', _key(r.timer), ',"sampled":true' if r.sampled else ',"sampled":false']
    if r.samples is not None:
        parts.append(',"samples":%d' % r.samples)
    if r.samples_per_s is not None:
        parts.append(',"samples_per_s":' + _num(r.samples_per_s))
    if r.flops is not None:
        parts.append(',"flops":' + _num(r.flops))
    if r.mfu is not None:
        parts.append(',"mfu":' + _num(r.mfu))
    if r.device:
        parts.append(',"device":{' + ",".join([f"{_key(k)}:{_num(v)}" for k, v in r.device.items()])
                     + "}")
    parts.append("}")
    return "".join(parts)


class JsonlSink(Sink):
    """One JSON object per line: ``{"kind": "step", ...}`` and ``{"kind": "stragglers", ...}``."""

    def __init__(self, path: str, flush_every_s: float = 1.0) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._file: Optional[TextIO] = open(path, "a", buffering=_BUFFER_BYTES, encoding="utf-8")
        self._lock = threading.Lock()
        self._flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode

    def _write(self, obj: Dict[str, Any]) -> None:
        self._write_line(self._dumps(obj) + "\n")

    def _write_line(self, line: str) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            now = time.monotonic()
            if now - self._last_flush >= self._flush_every_s:
                self._file.flush()
                self._last_flush = now

    def write_step(self, record: StepRecord, intervals: Sequence[PhaseInterval]) -> None:
        self._write_line(step_json(record) + "\n")

    def write_steps(self, items: Sequence[Tuple[StepRecord, Sequence[PhaseInterval]]]) -> None:
        self._write_line("".join([step_json(record) + "\n" for record, _ in items]))

    def write_report(self, report: StragglerReport) -> None:
        self._write(report.to_json())

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class ChromeTraceSink(Sink):
    """Trace Event Format (``chrome://tracing``, Perfetto): one complete event per step and
    per phase interval; pid is the rank, so the files of all ranks can be merged. A step's
    ``args`` say whether it is ``sampled`` (carries the automatic hooks' phases).

    Events are streamed to the file as they come; :meth:`close` writes the closing brackets.
    """

    def __init__(self, path: str, rank: int, generation: int = 0) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._pid = int(rank)
        self._file: Optional[TextIO] = open(path, "w", buffering=_BUFFER_BYTES, encoding="utf-8")
        self._lock = threading.Lock()
        meta = [
            {"name": "process_name", "ph": "M", "pid": self._pid, "tid": 0,
             "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": self._pid, "tid": 0,
             "args": {"sort_index": self._pid}},
            {"name": "thread_name", "ph": "M", "pid": self._pid, "tid": 0, "args": {"name": "steps"}},
            {"name": "thread_name", "ph": "M", "pid": self._pid, "tid": 1, "args": {"name": "phases"}},
            {"name": "thread_name", "ph": "M", "pid": self._pid, "tid": 2, "args": {"name": "comm"}},
        ]
        self._file.write('{"displayTimeUnit":"ms","otherData":{"generation":%d},"traceEvents":[\n'
                         % generation + ",\n".join(json.dumps(m) for m in meta))

    def _events(self, record: StepRecord, intervals: Sequence[PhaseInterval], parts: list) -> None:
        t0_us = record.wall_time_s * 1e6
        pid = self._pid
        # Names are validated identifiers, so plain formatting makes valid JSON without escaping.
        parts.append(',\n{"name":"step %d","cat":"step","ph":"X","pid":%d,"tid":0,"ts":%.3f,'
                     '"dur":%.3f,"args":{"step":%d,"generation":%d,"sampled":%s}}'
                     % (record.step, pid, t0_us, record.step_time_s * 1e6, record.step,
                        record.generation, "true" if record.sampled else "false"))
        for name, start_s, dur_s in intervals:
            parts.append(',\n{"name":"%s","cat":"phase","ph":"X","pid":%d,"tid":%d,"ts":%.3f,'
                         '"dur":%.3f}' % (name, pid, 2 if name == "comm" else 1,
                                          t0_us + start_s * 1e6, dur_s * 1e6))

    def _write(self, text: str) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(text)

    def write_step(self, record: StepRecord, intervals: Sequence[PhaseInterval]) -> None:
        parts: list = []
        self._events(record, intervals, parts)
        self._write("".join(parts))

    def write_steps(self, items: Sequence[Tuple[StepRecord, Sequence[PhaseInterval]]]) -> None:
        parts: list = []
        for record, intervals in items:
            self._events(record, intervals, parts)
        self._write("".join(parts))

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write("\n]}\n")
                self._file.close()
                self._file = None


class PrometheusSink(Sink):
    """A ``/metrics`` HTTP endpoint (prometheus_client) with its own registry.

    ``port`` 0 picks a free port; :attr:`port` is the one bound.
    """

    def __init__(self, port: int = 0, addr: str = "127.0.0.1", rank: int = 0,
                 generation: int = 0) -> None:
        from elastic.lazy import require

        prom = require("prometheus_client", "the Prometheus endpoint")
        self.registry = prom.CollectorRegistry()
        labels = ["rank"]
        r = str(rank)
        self._steps = prom.Counter("elastic_prof_steps", "Steps finished", labels,
                                   registry=self.registry).labels(r)
        self._step_time = prom.Histogram(
            "elastic_prof_step_seconds", "Step wall time", labels, registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
        ).labels(r)
        self._last_step = prom.Gauge("elastic_prof_last_step_seconds", "Time of the last step",
                                     labels, registry=self.registry).labels(r)
        phase = prom.Gauge("elastic_prof_phase_seconds",
                           "Phase time in the latest sampled step (one with every phase timed)",
                           ["rank", "phase"], registry=self.registry)
        self._phase_gauge = phase
        self._phases = {p: phase.labels(r, p) for p in PHASES}
        self._throughput = prom.Gauge("elastic_prof_samples_per_second", "Samples per second",
                                      labels, registry=self.registry).labels(r)
        self._mfu = prom.Gauge("elastic_prof_mfu", "Model FLOPs utilisation (0-1)", labels,
                               registry=self.registry).labels(r)
        self._generation = prom.Gauge("elastic_prof_generation", "Rendezvous generation", labels,
                                      registry=self.registry).labels(r)
        self._generation.set(generation)
        self._generation_value = generation
        device = prom.Gauge("elastic_prof_device", "Device metric window average",
                            ["rank", "metric"], registry=self.registry)
        self._device_gauge = device
        self._device: Dict[str, Any] = {}
        self._stragglers = prom.Gauge("elastic_prof_straggler", "1 if the rank is a straggler",
                                      ["rank"], registry=self.registry)
        self._rank_label = r
        self._server, self._thread = self._serve(prom, port, addr)
        self.port = self._server.server_port
        self.addr = addr

    def _serve(self, prom: Any, port: int, addr: str):
        result = prom.start_http_server(port, addr=addr, registry=self.registry)
        if not isinstance(result, tuple):  # prometheus_client < 0.19 returned nothing
            raise RuntimeError("prometheus_client >= 0.19 is required")
        return result

    def write_step(self, record: StepRecord, intervals: Sequence[PhaseInterval]) -> None:
        self.write_steps(((record, intervals),))

    def write_steps(self, items: Sequence[Tuple[StepRecord, Sequence[PhaseInterval]]]) -> None:
        if not items:
            return
        self._steps.inc(len(items))
        for record, _ in items:
            self._step_time.observe(record.step_time_s)
        # gauges hold the latest values: set them once per batch
        record = items[-1][0]
        self._last_step.set(record.step_time_s)
        # the phases of the latest step that timed them all (a batch without one keeps the
        # previous values: an unsampled step has no forward, backward or optimizer time)
        sampled = next((r for r, _ in reversed(items) if r.sampled), None)
        if sampled is not None:
            phases = sampled.phases_s
            for name, gauge in self._phases.items():
                gauge.set(phases.get(name, 0.0))
        if record.samples_per_s is not None:
            self._throughput.set(record.samples_per_s)
        if record.mfu is not None:
            self._mfu.set(record.mfu)
        if self._generation_value != record.generation:  # rare: a new round
            self._generation_value = record.generation
            self._generation.set(record.generation)
        for key, value in record.device.items():
            gauge = self._device.get(key)
            if gauge is None:
                gauge = self._device[key] = self._device_gauge.labels(self._rank_label, key)
            gauge.set(value)

    def write_report(self, report: StragglerReport) -> None:
        slow = set(report.stragglers)
        for stats in report.ranks:
            self._stragglers.labels(str(stats.rank)).set(1.0 if stats.rank in slow else 0.0)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


class TensorBoardSink(Sink):
    """TensorBoard scalars every ``every`` steps, through tensorboard's own event writer.

    The step's scalars (time, throughput, MFU, device) at every ``every``-th step number;
    the phases of the first sampled step (one with every phase timed) at or after it.
    """

    def __init__(self, logdir: str, every: int = 10, rank: int = 0) -> None:
        from elastic.lazy import require

        if "tensorflow" not in sys.modules and "tensorboard.compat.notf" not in sys.modules:
            # tensorboard's documented switch to its TF stub: writing scalars must not pull in
            # TensorFlow (seconds of import) into a PyTorch job. A TF job has TF loaded already.
            sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
        writer_mod = require("tensorboard.summary.writer.event_file_writer", "TensorBoard scalars")
        self._event_pb2 = require("tensorboard.compat.proto.event_pb2", "TensorBoard scalars")
        self._summary_pb2 = require("tensorboard.compat.proto.summary_pb2", "TensorBoard scalars")
        self.logdir = os.path.join(logdir, f"rank-{rank}")
        os.makedirs(self.logdir, exist_ok=True)
        self._writer = writer_mod.EventFileWriter(self.logdir)
        self._every = max(1, int(every))
        self._phases_due = True  # the next sampled step writes its phases

    def write_step(self, record: StepRecord, intervals: Sequence[PhaseInterval]) -> None:
        scalars: Dict[str, float] = {}
        if not record.step % self._every:
            self._phases_due = True
        if record.sampled and self._phases_due:
            self._phases_due = False
            for name, value in record.phases_s.items():
                scalars[f"phase/{name}_s"] = value
        if record.step % self._every:
            if scalars:
                self._add(record, scalars)
            return
        scalars["step_time_s"] = record.step_time_s
        if record.samples_per_s is not None:
            scalars["samples_per_s"] = record.samples_per_s
        if record.mfu is not None:
            scalars["mfu"] = record.mfu
        for name, value in record.device.items():
            scalars[f"device/{name}"] = value
        self._add(record, scalars)

    def _add(self, record: StepRecord, scalars: Dict[str, float]) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()])
        self._writer.add_event(self._event_pb2.Event(wall_time=record.wall_time_s,
                                                     step=record.step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
