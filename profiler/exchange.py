"""Cross-rank exchanges of per-rank step statistics, and the straggler report.

Every N steps each rank summarises its window of steps as a :class:`RankStats` and hands it to
a :class:`~profiler.api.StatsExchange`, which returns every rank's. Two are built in, found by
name in :data:`EXCHANGES` as any third party's (register one there, or through the
``elastic_run.profiler_exchanges`` entry-point group):

- ``collective``: with a torch.distributed process group, one ``all_gather`` of a packed
  float64 vector (no pickling), on the training thread;
- ``store``: each rank writes its stats as JSON bytes under a key prefix of the rendezvous
  store and waits (``Store.wait``) until every rank's entry for the window is there, on a
  background thread, so the training loop never blocks on the store.

A rank is a straggler when its median *busy* time (step time less communication, which is
where fast ranks wait for slow ones) exceeds the median over ranks by ``threshold_frac``.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from elastic.errors import ConfigError
from elastic.registry import Registry

from .api import ExchangeSettings, RankStats, StatsExchange, StragglerReport
from .errors import ExchangeError, ProfilerConfigError

__all__ = ["detect_stragglers", "CollectiveExchange", "StoreExchange", "EXCHANGES",
           "create_exchange", "check_exchange_name"]

log = logging.getLogger("profiler")

#: name -> factory ``(ExchangeSettings) -> Optional[StatsExchange]`` (None: nobody to talk to).
EXCHANGES: Registry[Optional[StatsExchange]] = Registry("profiler exchange",
                                                       "elastic_run.profiler_exchanges")
EXCHANGES.register("collective", "profiler.exchange:collective_exchange")
EXCHANGES.register("store", "profiler.exchange:store_exchange")

#: Names the profiler resolves itself rather than through the registry.
RESOLVED_NAMES = ("auto", "none")


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


def _process_group() -> Any:
    """torch.distributed if the job initialised a process group (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def check_exchange_name(name: str) -> None:
    """Fail early, with the known names, on an exchange nobody registered."""
    if name in RESOLVED_NAMES:
        return
    try:
        EXCHANGES.get(name)
    except ConfigError:
        known = ", ".join(RESOLVED_NAMES + tuple(EXCHANGES.names()))
        raise ProfilerConfigError(f"unknown exchange {name!r}; known: {known}") from None


def create_exchange(name: str, settings: ExchangeSettings) -> Optional[StatsExchange]:
    """The exchange called ``name``; ``auto``: the collective with a process group, else the
    store when one is given, else none; ``none``: None."""
    if name == "none":
        return None
    if name == "auto":
        if _process_group() is not None:
            name = "collective"
        elif settings.store is not None:
            name = "store"
        else:
            if settings.world_size > 1:
                log.debug("profiler: no process group and no store; straggler reports are off")
            return None
        factory = EXCHANGES.get(name)
        return factory(settings) if name == "collective" or settings.world_size > 1 else None
    return EXCHANGES.get(name)(settings)


class CollectiveExchange(StatsExchange):
    """One ``all_gather`` of a packed float64 tensor on the default process group."""

    name = "collective"
    inline = True

    def __init__(self, world_size: Optional[int] = None) -> None:
        self.world_size = world_size

    def exchange(self, stats: RankStats) -> List[RankStats]:
        import torch
        import torch.distributed as dist

        try:
            world_size = dist.get_world_size()
            device: Any = "cpu"
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            mine = torch.tensor(stats.to_vector(), dtype=torch.float64, device=device)
            gathered = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
            rows = torch.stack(gathered).cpu().tolist()
        except Exception as exc:
            raise ExchangeError(f"profiler stats all_gather failed: {exc}") from exc
        parsed = [RankStats.from_vector(row) for row in rows]
        return [s for s in parsed if s is not None]


def collective_exchange(settings: ExchangeSettings) -> Optional[CollectiveExchange]:
    """The collective exchange; None in a group of one (nobody to compare with)."""
    dist = _process_group()
    if dist is None:
        raise ProfilerConfigError(
            "exchange='collective' needs an initialised torch.distributed process group")
    world_size = dist.get_world_size()
    return CollectiveExchange(world_size) if world_size > 1 else None


class StoreExchange(StatsExchange):
    """Per-rank stats as JSON under ``{prefix}g{generation}/rank/``; read back once all are in.

    Rank 0 also publishes the latest report at ``{prefix}g{generation}/report`` so an agent
    (or anyone with store access) can act on it.
    """

    name = "store"
    inline = False

    def __init__(self, store, prefix: str, rank: int, world_size: int,
                 timeout_s: float = 60.0) -> None:
        self._store = store
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._stop = threading.Event()

    def rank_prefix(self, generation: int) -> str:
        return f"{self._prefix}g{generation}/rank/"

    def report_key(self, generation: int) -> str:
        return f"{self._prefix}g{generation}/report"

    def exchange(self, stats: RankStats) -> Optional[List[RankStats]]:
        value = json.dumps(stats.to_json(), separators=(",", ":")).encode()
        try:
            self._store.put(f"{self.rank_prefix(stats.generation)}{stats.rank:06d}", value)
        except Exception as exc:
            raise ExchangeError(f"could not publish step stats to the store: {exc}") from exc
        try:
            return self._collect(stats)
        except Exception as exc:
            raise ExchangeError(f"store exchange failed: {exc}") from exc

    def publish(self, report: StragglerReport) -> None:
        if self.rank != 0:
            return
        try:
            self._store.put(self.report_key(report.generation),
                            json.dumps(report.to_json(), separators=(",", ":")).encode())
        except Exception as exc:
            log.warning("profiler: could not publish the straggler report: %s", exc)

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

    def _collect(self, mine: RankStats) -> Optional[List[RankStats]]:
        prefix = self.rank_prefix(mine.generation)
        expected = self.world_size or 1
        deadline = time.monotonic() + self.timeout_s
        found, revision = self._read(prefix, mine.window, mine.generation)
        while len(found) < expected and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = self._store.wait(prefix, revision, min(left, 0.5))
            if events:
                found, revision = self._read(prefix, mine.window, mine.generation)
        if self._stop.is_set() and len(found) < expected:
            return None
        return list(found.values())

    def close(self) -> None:
        self._stop.set()


def store_exchange(settings: ExchangeSettings) -> StoreExchange:
    """The store exchange, under ``{store_prefix}{run_id}/``."""
    if settings.store is None:
        raise ProfilerConfigError("exchange='store' needs a store= argument")
    prefix = settings.store_prefix.rstrip("/") + f"/{settings.run_id}/"
    return StoreExchange(settings.store, prefix, settings.rank, settings.world_size,
                         settings.timeout_s)
