"""Cross-rank exchange of per-rank step statistics and the straggler report.

Every N steps each rank summarises its window of steps as a :class:`RankStats`. With a
torch.distributed process group, one ``all_gather`` of a packed float64 vector (no pickling)
gives every rank everyone's stats; without one, each rank writes its stats as JSON bytes under
a key prefix of the rendezvous store and a background thread waits (``Store.wait``) until every
rank's entry for the window is there, so the training loop never blocks on the store.

A rank is a straggler when its median *busy* time (step time less communication, which is
where fast ranks wait for slow ones) exceeds the median over ranks by ``threshold_frac``.
"""
from __future__ import annotations

import json
import logging
import queue
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from .api import RankStats, StragglerReport
from .errors import ExchangeError

__all__ = ["detect_stragglers", "CollectiveExchange", "StoreExchange"]

log = logging.getLogger("profiler")


def detect_stragglers(stats: Sequence[RankStats], threshold_frac: float,
                      world_size: Optional[int] = None, source: str = "") -> StragglerReport:
    """Name the ranks whose ``busy_p50_s`` exceeds the median over ranks by ``threshold_frac``."""
    ranks = tuple(sorted(stats, key=lambda s: s.rank))
    if not ranks:
        raise ExchangeError("no rank statistics to compare")
    median = statistics.median(s.busy_p50_s for s in ranks)
    limit = median * (1.0 + threshold_frac)
    slow = tuple(s.rank for s in ranks if s.busy_p50_s > limit)
    present = {s.rank for s in ranks}
    missing = tuple(r for r in range(world_size or 0) if r not in present)
    newest = max(ranks, key=lambda s: s.window)
    return StragglerReport(generation=newest.generation, window=newest.window, step=newest.step,
                           threshold_frac=threshold_frac, median_busy_s=median, ranks=ranks,
                           stragglers=slow, missing=missing, source=source)


class CollectiveExchange:
    """One ``all_gather`` of a packed float64 tensor on the default process group."""

    def __init__(self, threshold_frac: float) -> None:
        self.threshold_frac = threshold_frac

    def exchange(self, stats: RankStats) -> StragglerReport:
        import torch
        import torch.distributed as dist

        try:
            world_size = dist.get_world_size()
            device = "cpu"
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            mine = torch.tensor(stats.to_vector(), dtype=torch.float64, device=device)
            gathered = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
            rows = torch.stack(gathered).cpu().tolist()
        except Exception as exc:
            raise ExchangeError(f"profiler stats all_gather failed: {exc}") from exc
        parsed = [RankStats.from_vector(row) for row in rows]
        return detect_stragglers([s for s in parsed if s is not None], self.threshold_frac,
                                 world_size, source="collective")


class StoreExchange:
    """Per-rank stats as JSON under ``{prefix}g{generation}/rank/``; reports from a thread.

    Rank 0 also publishes the latest report at ``{prefix}g{generation}/report`` so an agent
    (or anyone with store access) can act on it.
    """

    def __init__(self, store, prefix: str, rank: int, world_size: int, threshold_frac: float,
                 on_report: Callable[[StragglerReport], None], timeout_s: float = 60.0) -> None:
        self._store = store
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.rank = rank
        self.world_size = world_size
        self.threshold_frac = threshold_frac
        self._on_report = on_report
        self.timeout_s = timeout_s
        self._queue: "queue.Queue[Optional[RankStats]]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profiler-store-exchange",
                                        daemon=True)
        self._thread.start()

    def rank_prefix(self, generation: int) -> str:
        return f"{self._prefix}g{generation}/rank/"

    def report_key(self, generation: int) -> str:
        return f"{self._prefix}g{generation}/report"

    def submit(self, stats: RankStats) -> None:
        """Hand this rank's stats to the thread, which publishes them and waits for the others."""
        self._queue.put(stats)

    def _run(self) -> None:
        while not self._stop.is_set():
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
            self._handle(item)
            if last:
                return

    def _handle(self, item: RankStats) -> None:
        value = json.dumps(item.to_json(), separators=(",", ":")).encode()
        try:
            self._store.put(f"{self.rank_prefix(item.generation)}{item.rank:06d}", value)
        except Exception as exc:
            log.warning("profiler: could not publish step stats to the store: %s", exc)
            return
        try:
            report = self._collect(item)
        except Exception as exc:
            log.warning("profiler: store exchange failed: %s", exc)
            return
        if report is None:
            return
        if self.rank == 0:
            try:
                self._store.put(self.report_key(report.generation),
                                json.dumps(report.to_json(), separators=(",", ":")).encode())
            except Exception as exc:
                log.warning("profiler: could not publish the straggler report: %s", exc)
        self._on_report(report)

    def _read(self, prefix: str, window: int, generation: int) -> tuple:
        kvs, revision = self._store.get_prefix(prefix)
        found: Dict[int, RankStats] = {}
        for kv in kvs:
            try:
                stats = RankStats.from_json(json.loads(kv.value))
            except (ValueError, KeyError, TypeError):
                continue
            if stats.generation == generation and stats.window >= window:
                found[stats.rank] = stats
        return found, revision

    def _collect(self, mine: RankStats) -> Optional[StragglerReport]:
        prefix = self.rank_prefix(mine.generation)
        deadline = time.monotonic() + self.timeout_s
        found, revision = self._read(prefix, mine.window, mine.generation)
        while len(found) < self.world_size and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = self._store.wait(prefix, revision, min(left, 0.5))
            if events:
                found, revision = self._read(prefix, mine.window, mine.generation)
        if self._stop.is_set() and len(found) < self.world_size:
            return None
        return detect_stragglers(list(found.values()), self.threshold_frac, self.world_size,
                                 source="store")

    def close(self, drain_timeout_s: float = 2.0) -> None:
        """Give the last submitted window up to ``drain_timeout_s`` to complete, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=drain_timeout_s)
        self._stop.set()
        self._thread.join(timeout=5)
