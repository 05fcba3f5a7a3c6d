"""Step clocks: the monotonic wall clock on a CPU, a pool of CUDA events on a GPU.

Both hand out opaque *marks*. A CPU mark is a ``perf_counter()`` float, ready at once. A CUDA
mark is an event recorded on the current stream: recording it costs microseconds and never
synchronises; the profiler asks ``ready()`` of a step's last mark at later step ends and only
then reads the elapsed times, so the hot path never waits for the GPU. Those reads happen on
the profiler's writer thread, which calls ``bind_thread()`` first (CUDA's current device is
per thread: without it the thread would open a context on GPU 0).
"""
from __future__ import annotations

import time
from typing import Any, List

__all__ = ["CpuClock", "CudaClock"]


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
