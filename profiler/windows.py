"""Exchange windows: each rank's summary of every ``exchange_every`` steps, and its exchange.

:class:`StatsWindow` gathers the current window's step times as records are built (off the
training thread); at the end of a window the profiler takes a :class:`RankStats` from it and
hands it to an :class:`ExchangeRunner`, which runs the job's
:class:`~profiler.api.StatsExchange` (inline, or on a background thread that skips to the
newest window when it falls behind), builds the :class:`StragglerReport` and passes it on.
"""
from __future__ import annotations

import logging
import queue
import statistics
import threading
from typing import AbstractSet, Callable, Dict, List, Mapping, Optional, Set

from .api import PHASES, SAMPLED_PHASES, RankStats, StatsExchange, StragglerReport
from .exchange import detect_stragglers

__all__ = ["StatsWindow", "ExchangeRunner", "phase_means"]

log = logging.getLogger("profiler")


def phase_means(totals: Mapping[str, float], steps: int, sampled_steps: int,
                unsampled_seen: AbstractSet[str]) -> Dict[str, float]:
    """Mean seconds per step of each phase from its total over ``steps`` steps, of which
    ``sampled_steps`` carried the sampled phases: a phase of :data:`SAMPLED_PHASES` (the
    automatic hooks') over the sampled steps only, where it could be timed, unless it was seen
    on an unsampled step too (``unsampled_seen``: the user times it on every step); any other
    phase over all steps. 0.0 when no step could have it."""
    out: Dict[str, float] = {}
    for name, total in totals.items():
        n = sampled_steps if name in SAMPLED_PHASES and name not in unsampled_seen else steps
        out[name] = total / n if n else 0.0
    return out


class StatsWindow:
    """The current window's step times, busy times, samples and phase totals (a phase's
    mean is over the steps that could have it, see :func:`phase_means`)."""

    def __init__(self) -> None:
        self.active = True  # off once it is known that there is no exchange
        self.index = 0  # of the next window taken
        self.step_s: List[float] = []
        self.busy_s: List[float] = []
        self._samples = 0.0
        self._phases: Dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._sampled = 0
        self._unsampled_seen: Set[str] = set()

    def add(self, step_time_s: float, phases_s: Mapping[str, float],
            samples: Optional[int], sampled: bool = True) -> None:
        self.step_s.append(step_time_s)
        self.busy_s.append(step_time_s - phases_s.get("comm", 0.0))
        if samples:
            self._samples += samples
        if sampled:
            self._sampled += 1
        totals = self._phases
        for name, seconds in phases_s.items():
            if name in totals:
                totals[name] += seconds
                if not sampled:
                    self._unsampled_seen.add(name)

    def take(self, rank: int, generation: int, last_step: int) -> Optional[RankStats]:
        """This window's summary (None if it has no steps); starts the next window."""
        steps = len(self.step_s)
        if not steps:
            return None
        total_s = sum(self.step_s)
        stats = RankStats(
            rank=rank, generation=generation, window=self.index, step=last_step, steps=steps,
            step_p50_s=statistics.median(self.step_s), busy_p50_s=statistics.median(self.busy_s),
            samples_per_s=self._samples / total_s if total_s > 0 else 0.0,
            phases_s=phase_means(self._phases, steps, self._sampled, self._unsampled_seen))
        self.clear()
        self.index += 1
        return stats

    def clear(self) -> None:
        self.step_s = []
        self.busy_s = []
        self._samples = 0.0
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._sampled = 0
        self._unsampled_seen = set()


class ExchangeRunner:
    """Runs ``exchange`` for each submitted window and calls ``on_report`` with the result.

    An inline exchange runs in :meth:`submit` (its errors reach the caller); any other on a
    daemon thread, where an error is logged and that window has no report.
    """

    def __init__(self, exchange: StatsExchange, threshold_frac: float, world_size: int,
                 on_report: Callable[[StragglerReport], None]) -> None:
        self.exchange = exchange
        self.threshold_frac = threshold_frac
        self.world_size = world_size
        self._on_report = on_report
        self._queue: "queue.Queue[Optional[RankStats]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        if not exchange.inline:
            self._thread = threading.Thread(target=self._run, name="profiler-exchange",
                                            daemon=True)
            self._thread.start()

    def submit(self, stats: RankStats) -> None:
        if self._thread is None:
            self._handle(stats)
        else:
            self._queue.put(stats)

    def _handle(self, stats: RankStats) -> None:
        ranks = self.exchange.exchange(stats)
        if ranks is None:
            return
        report = detect_stragglers(ranks, self.threshold_frac, self.world_size,
                                   source=self.exchange.name)
        self.exchange.publish(report)
        self._on_report(report)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            last = False
            while True:  # skip to the newest window if we fell behind
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    last = True
                    break
                item = newer
            try:
                self._handle(item)
            except Exception as exc:
                log.warning("profiler: %s", exc)
            if last:
                return

    def close(self, drain_timeout_s: float = 2.0) -> None:
        """Give the last submitted window up to ``drain_timeout_s`` to complete, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=drain_timeout_s)
        self.exchange.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
