"""The profiler's writer thread: records out to the sinks, off the training thread."""
from __future__ import annotations

import collections
import logging
import threading
import weakref
from typing import Any, Callable, Deque, List, Optional, Sequence

from .api import Sink, StepRecord

__all__ = ["Writer"]

log = logging.getLogger("profiler")


class Writer:
    """Turns raw steps into records and hands them to the sinks, on a background thread.

    The training thread only appends stamps to a deque (thread-safe, no lock, no wake-up);
    every ``interval_s`` this thread assembles them into steps, reads the finished ones (on a
    GPU: those whose events have completed, never waiting), builds their records and writes
    them to the sinks in step order, a batch at a time (one file write per sink). All of that runs beside the training
    step (PyTorch releases the GIL in its kernels), not inside it.
    """

    def __init__(self, sinks: List[Sink], collect: Callable[[], None],
                 bind_thread: Optional[Callable[[], None]] = None,
                 interval_s: float = 0.25, tend: Optional[Callable[[], None]] = None) -> None:
        self._sinks = sinks
        self._bind_thread = bind_thread
        self._collect = weakref.WeakMethod(collect)  # the profiler may be dropped unclosed
        # upkeep off the training thread (the hooks' pools), after each collect
        self._tend = weakref.WeakMethod(tend) if tend is not None else None
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
                batch: List[tuple] = []
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
            tend = self._tend() if self._tend is not None else None
            if tend is not None:
                try:
                    tend()
                except Exception as exc:
                    self._warn_once("tend", "the hooks' upkeep", exc)
                del tend
            self.drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.drain()

