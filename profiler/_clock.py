"""Step clocks: the monotonic wall clock on a CPU, a pool of CUDA events on a GPU.

Both hand out opaque *marks* (the profiler pairs each device mark with a ``perf_counter()``
time for wall times, device samples and communication: :func:`host_paired`). A CPU mark is a
``perf_counter()`` float, ready at once. A CUDA mark is an event recorded on the current
stream: recording it costs microseconds and never
synchronises; the profiler asks ``ready()`` of a step's last mark at later step ends and only
then reads the elapsed times, so the hot path never waits for the GPU. Those reads happen on
the profiler's writer thread, which calls ``bind_thread()`` first (CUDA's current device is
per thread: without it the thread would open a context on GPU 0).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, List, Optional, Tuple

from .errors import ProfilerConfigError

__all__ = ["CpuClock", "CudaClock", "host_paired", "make_clock", "known_peak", "PEAK_FLOPS"]

#: Dense BF16/FP16 tensor-core peaks (FLOP/s) by GPU name fragment, for MFU when no peak is given.
PEAK_FLOPS = {
    "B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "V100": 125e12,
}


class CpuClock:
    kind = "cpu"

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    @staticmethod
    def ready(mark: Any) -> bool:
        return True

    @staticmethod
    def wait(mark: Any) -> None:
        return None

    @staticmethod
    def elapsed_s(start: Any, end: Any) -> float:
        return end - start

    def release(self, marks: List[Any]) -> None:
        return None

    def bind_thread(self) -> None:
        return None


class CudaClock:
    """CUDA events from a pool; recorded on the current stream, read once complete."""

    kind = "cuda"

    def __init__(self, torch_module: Any, max_pool: int = 4096) -> None:
        self._torch = torch_module
        self._event = torch_module.cuda.Event
        self._pool: List[Any] = []
        self._max_pool = max_pool
        self.device = torch_module.cuda.current_device()

    def bind_thread(self) -> None:
        """Make this clock's GPU the current device of the calling (reader) thread."""
        self._torch.cuda.set_device(self.device)

    def mark(self) -> Any:
        event = self._pool.pop() if self._pool else self._event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def ready(mark: Any) -> bool:
        return mark.query()

    @staticmethod
    def wait(mark: Any) -> None:
        mark.synchronize()

    @staticmethod
    def elapsed_s(start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def release(self, marks: List[Any]) -> None:
        room = self._max_pool - len(self._pool)
        if room > 0:
            self._pool.extend(marks[:room])


def host_paired(clock: Any) -> Callable[[], Tuple[Any, float]]:
    """A mark function for a device clock: ``(clock.mark(), perf_counter())``."""
    mark, perf = clock.mark, time.perf_counter

    def paired() -> Tuple[Any, float]:
        return (mark(), perf())

    return paired


def make_clock(timer: Any) -> Any:
    """The clock for ``timer``: ``cpu``, ``cuda``, ``auto`` or a clock object (tests, other
    devices). ``auto``: CUDA events only once the job has put work on the GPU (CUDA
    initialised); a CPU job on a GPU machine keeps the wall clock."""
    if not isinstance(timer, str):
        return timer
    torch = sys.modules.get("torch")
    if timer == "cuda" or (timer == "auto" and torch is not None and torch.cuda.is_available()
                           and torch.cuda.is_initialized()):
        if torch is None:
            from elastic.lazy import require
            torch = require("torch", "CUDA step timing")
        if not torch.cuda.is_available():
            raise ProfilerConfigError("timer='cuda' but CUDA is not available")
        return CudaClock(torch)
    return CpuClock()


def known_peak(clock: Any) -> Optional[float]:
    """The current GPU's peak FLOP/s from :data:`PEAK_FLOPS`, for a CUDA clock; else None."""
    if clock.kind != "cuda":
        return None
    try:
        name = sys.modules["torch"].cuda.get_device_name()
    except Exception:
        return None
    for fragment, peak in PEAK_FLOPS.items():
        if fragment in name:
            return peak
    return None
