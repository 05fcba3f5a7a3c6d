"""Background device samplers: NVML on a GPU, psutil (process and CPU) otherwise.

A daemon thread samples at 1-10 Hz into a queue of timestamped samples; a step's record gets
:meth:`Sampler.window` of the samples taken up to the step's end and after the previous one
(the latest sample before it when a step was shorter than the sampling interval). Records are
built later than the steps run, off the training thread, so windows go by timestamps, not by
when they are asked for. Throttle reasons are OR-ed over the window, counters (energy) keep their
latest value. Without NVML (no ``pynvml``, no driver, no GPU) :func:`create_sampler` logs one
line and falls back to psutil; it never raises for a missing device.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable, Deque, Dict, Optional, Tuple

from .api import Sampler
from .errors import ProfilerConfigError

__all__ = ["NvmlSampler", "PsutilSampler", "create_sampler"]

log = logging.getLogger("profiler")

_MASK_KEYS = frozenset({"throttle_reasons_mask"})
_LATEST_KEYS = frozenset({"energy_j", "mem_total_bytes"})
_MAX_QUEUED = 4096  # samples kept for windows not yet asked for (minutes at 10 Hz)


class _ThreadSampler(Sampler):
    """The sampling thread and window arithmetic; subclasses read one sample."""

    def __init__(self, hz: float) -> None:
        if not 0 < hz <= 100:
            raise ProfilerConfigError(f"sample rate must be in (0, 100] Hz, got {hz}")
        self.interval_s = 1.0 / hz
        self._lock = threading.Lock()
        self._queue: Deque[Tuple[float, Dict[str, float]]] = collections.deque(maxlen=_MAX_QUEUED)
        self._last: Dict[str, float] = {}  # the latest sample handed out in a window
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.samples_taken = 0

    def _read(self) -> Dict[str, float]:
        raise NotImplementedError

    def sample_once(self) -> Dict[str, float]:
        """Take one sample now (stamped with ``time.perf_counter()``) and queue it."""
        values = self._read()
        now = time.perf_counter()
        with self._lock:
            self._queue.append((now, values))
            self.samples_taken += 1
        return values

    def start(self) -> None:
        if self._thread is not None:
            return
        self.sample_once()  # the first step has a value even if it is shorter than an interval
        self._thread = threading.Thread(target=self._run, name=f"profiler-{self.source}-sampler",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception as exc:  # a flaky device read must not kill training
                log.debug("profiler: %s sample failed: %s", self.source, exc)

    def window(self, until_s: Optional[float] = None) -> Dict[str, float]:
        queue = self._queue
        with self._lock:
            taken = []
            while queue and (until_s is None or queue[0][0] <= until_s):
                taken.append(queue.popleft()[1])
        if not taken:
            return dict(self._last)
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        masks: Dict[str, int] = {}
        for values in taken:
            for key, value in values.items():
                if key in _MASK_KEYS:
                    masks[key] = masks.get(key, 0) | int(value)
                else:
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
        last = self._last = taken[-1]
        out = {key: last.get(key, total) if key in _LATEST_KEYS else total / counts[key]
               for key, total in sums.items()}
        for key, mask in masks.items():
            out[key] = float(mask)
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._shutdown()

    def _shutdown(self) -> None:
        pass


class NvmlSampler(_ThreadSampler):
    """Utilisation, memory, power, energy, SM clock, throttle reasons and temperature of one GPU."""

    source = "nvml"

    def __init__(self, device_index: int = 0, hz: float = 5.0, nvml=None) -> None:
        super().__init__(hz)
        if nvml is None:
            import pynvml  # the caller (create_sampler) handles ImportError
            nvml = pynvml
        self._nvml = nvml
        nvml.nvmlInit()
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:
            nvml.nvmlShutdown()
            raise
        self.device_index = device_index
        self._readers = self._make_readers()
        self._broken: set = set()

    def _make_readers(self) -> Dict[str, Callable[[], Dict[str, float]]]:
        """Metric groups, one NVML call each; a group the board does not support is dropped."""
        nv, h = self._nvml, self._handle
        throttle = getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksEventReasons

        def utilization() -> Dict[str, float]:
            u = nv.nvmlDeviceGetUtilizationRates(h)
            return {"gpu_util_pct": float(u.gpu), "mem_util_pct": float(u.memory)}

        def memory() -> Dict[str, float]:
            m = nv.nvmlDeviceGetMemoryInfo(h)
            return {"mem_used_bytes": float(m.used), "mem_total_bytes": float(m.total)}

        return {
            "utilization": utilization,
            "memory": memory,
            "power": lambda: {"power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3},  # milliwatts
            "energy": lambda: {"energy_j": nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3},  # mJ
            "clock": lambda: {"sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))},
            "throttle": lambda: {"throttle_reasons_mask": float(throttle(h))},
            "temperature": lambda: {"temperature_c": float(
                nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))},
        }

    def _read(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for group, read in self._readers.items():
            if group in self._broken:
                continue
            try:
                out.update(read())
            except self._nvml.NVMLError as exc:  # e.g. NotSupported on this board: drop it
                self._broken.add(group)
                log.debug("profiler: NVML %s unavailable: %s", group, exc)
        return out

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class PsutilSampler(_ThreadSampler):
    """System and process CPU utilisation and memory: the fallback without a GPU."""

    source = "psutil"

    def __init__(self, hz: float = 5.0) -> None:
        super().__init__(hz)
        import psutil  # a base dependency

        self._psutil = psutil
        self._proc = psutil.Process()
        psutil.cpu_percent(None)  # prime the deltas
        t = os.times()
        self._cpu_mark = (t.user + t.system, time.monotonic())

    def _proc_cpu_pct(self) -> float:
        """What ``Process.cpu_percent(None)`` gives (user + system time of the process over
        wall time since the previous call, not divided by the CPU count), from ``os.times()``:
        one cheap syscall instead of reading and parsing /proc/self/stat."""
        t = os.times()
        cpu_s, now = t.user + t.system, time.monotonic()
        prev_cpu_s, prev = self._cpu_mark
        self._cpu_mark = (cpu_s, now)
        return max(0.0, (cpu_s - prev_cpu_s) / (now - prev) * 100.0) if now > prev else 0.0

    def _read(self) -> Dict[str, float]:
        ps = self._psutil
        return {
            "cpu_util_pct": float(ps.cpu_percent(None)),
            "proc_cpu_pct": self._proc_cpu_pct(),
            "rss_bytes": float(self._proc.memory_info().rss),
            "mem_used_pct": float(ps.virtual_memory().percent),
        }


_notice_given = False


def _notice(reason: str) -> None:
    global _notice_given
    if not _notice_given:
        _notice_given = True
        log.warning("profiler: NVML unavailable (%s); sampling CPU and process metrics with "
                    "psutil instead", reason)


def create_sampler(kind: str = "auto", device_index: int = 0, hz: float = 5.0) -> Optional[Sampler]:
    """``auto``: NVML if it initialises, else psutil (one notice); ``nvml``, ``psutil``, ``none``."""
    if kind not in ("auto", "nvml", "psutil", "none"):
        raise ProfilerConfigError(f"unknown sampler {kind!r}; known: auto, nvml, psutil, none")
    if not 0 < hz <= 100:
        raise ProfilerConfigError(f"sample rate must be in (0, 100] Hz, got {hz}")
    if kind == "none":
        return None
    if kind in ("auto", "nvml"):
        try:
            return NvmlSampler(device_index, hz)
        except ImportError:
            if kind == "nvml":
                from elastic.lazy import require
                require("pynvml", "NVML device metrics")
            reason = "pynvml is not installed"
        except Exception as exc:  # NVMLError: no driver, no device, bad index
            if kind == "nvml":
                raise
            reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        _notice(reason)
    return PsutilSampler(hz)
