"""Records and small interfaces of the profiler.

A :class:`StepRecord` is what every step of every rank produces (one JSON line); a
:class:`RankStats` is one rank's summary of a window of steps, exchanged across ranks every N
steps; a :class:`StragglerReport` compares those summaries. Outputs implement :class:`Sink`,
device samplers implement :class:`Sampler`, and the ways ranks share their summaries implement
:class:`StatsExchange` (registered by name in ``profiler.exchange.EXCHANGES``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

__all__ = ["PHASES", "SAMPLED_PHASES", "StepRecord", "PhaseInterval", "RankStats",
           "StragglerReport", "Sink", "Sampler", "ExchangeSettings", "StatsExchange"]

#: The standard phases, in the order they are packed for the cross-rank exchange.
PHASES: Tuple[str, ...] = ("data", "forward", "backward", "optimizer", "comm", "checkpoint")

#: The phases the automatic PyTorch hooks time, on the sampled steps only (``phase_every``).
SAMPLED_PHASES: Tuple[str, ...] = ("forward", "backward", "optimizer")


class PhaseInterval(NamedTuple):
    """One timed interval of a phase, relative to the start of its step (for traces).

    A named tuple rather than a dataclass: several are made per step on the hot path, and
    sinks also accept plain ``(name, start_s, duration_s)`` tuples.
    """

    name: str
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class StepRecord:
    """One step of one rank: wall time, phase times, throughput and device averages.

    ``sampled`` is False on a step for which the automatic PyTorch hooks were off (they time
    ``forward``, ``backward`` and ``optimizer`` on every ``phase_every``-th step only): its
    step time, samples, FLOPs, device metrics and the phases timed on every step (``data``
    from the loader wrapper, ``comm`` from the DDP hook, those in ``phase()`` blocks) are
    there, the automatic phases are not. A step with every phase timed is ``sampled``.
    """

    step: int
    rank: int
    generation: int
    wall_time_s: float  # Unix time at the start of the step
    step_time_s: float
    phases_s: Mapping[str, float] = field(default_factory=dict)
    samples: Optional[int] = None
    samples_per_s: Optional[float] = None
    flops: Optional[float] = None
    mfu: Optional[float] = None
    device: Mapping[str, float] = field(default_factory=dict)
    timer: str = "cpu"
    sampled: bool = True

    @property
    def busy_s(self) -> float:
        """Step time less the time spent in communication (waiting on other ranks)."""
        return max(0.0, self.step_time_s - self.phases_s.get("comm", 0.0))

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "kind": "step", "step": self.step, "rank": self.rank, "generation": self.generation,
            "wall_time_s": self.wall_time_s, "step_time_s": self.step_time_s,
            "phases_s": dict(self.phases_s), "timer": self.timer, "sampled": self.sampled,
        }
        for name in ("samples", "samples_per_s", "flops", "mfu"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.device:
            out["device"] = dict(self.device)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "StepRecord":
        return cls(
            step=int(obj["step"]), rank=int(obj["rank"]), generation=int(obj.get("generation", 0)),
            wall_time_s=float(obj["wall_time_s"]), step_time_s=float(obj["step_time_s"]),
            phases_s={str(k): float(v) for k, v in (obj.get("phases_s") or {}).items()},
            samples=obj.get("samples"), samples_per_s=obj.get("samples_per_s"),
            flops=obj.get("flops"), mfu=obj.get("mfu"),
            device={str(k): float(v) for k, v in (obj.get("device") or {}).items()},
            timer=str(obj.get("timer", "cpu")), sampled=bool(obj.get("sampled", True)),
        )


@dataclass(frozen=True)
class RankStats:
    """One rank's summary of a window of steps; packs into a fixed-length float vector."""

    rank: int
    generation: int
    window: int  # index of the exchange window (0, 1, ...)
    step: int  # last step of the window
    steps: int  # steps in the window
    step_p50_s: float
    busy_p50_s: float
    samples_per_s: float = 0.0
    phases_s: Mapping[str, float] = field(default_factory=dict)  # mean per standard phase

    VECTOR_LEN = 9 + len(PHASES)

    def to_vector(self) -> Tuple[float, ...]:
        head = (self.rank, self.generation, self.window, self.step, self.steps, self.step_p50_s,
                self.busy_p50_s, self.samples_per_s, 1.0)  # the last 1.0 marks a filled slot
        return tuple(float(v) for v in head) + tuple(float(self.phases_s.get(p, 0.0)) for p in PHASES)

    @classmethod
    def from_vector(cls, vec: Sequence[float]) -> Optional["RankStats"]:
        if len(vec) != cls.VECTOR_LEN or vec[8] != 1.0:
            return None
        return cls(rank=int(vec[0]), generation=int(vec[1]), window=int(vec[2]), step=int(vec[3]),
                   steps=int(vec[4]), step_p50_s=float(vec[5]), busy_p50_s=float(vec[6]),
                   samples_per_s=float(vec[7]),
                   phases_s={p: float(v) for p, v in zip(PHASES, vec[9:])})

    def to_json(self) -> Dict[str, Any]:
        return {"rank": self.rank, "generation": self.generation, "window": self.window,
                "step": self.step, "steps": self.steps, "step_p50_s": self.step_p50_s,
                "busy_p50_s": self.busy_p50_s, "samples_per_s": self.samples_per_s,
                "phases_s": dict(self.phases_s)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "RankStats":
        return cls(rank=int(obj["rank"]), generation=int(obj["generation"]),
                   window=int(obj["window"]), step=int(obj["step"]), steps=int(obj["steps"]),
                   step_p50_s=float(obj["step_p50_s"]), busy_p50_s=float(obj["busy_p50_s"]),
                   samples_per_s=float(obj.get("samples_per_s", 0.0)),
                   phases_s={str(k): float(v) for k, v in (obj.get("phases_s") or {}).items()})


@dataclass(frozen=True)
class StragglerReport:
    """Ranks whose busy time (step time less comm) exceeds the median by ``threshold_frac``."""

    generation: int
    window: int
    step: int
    threshold_frac: float
    median_busy_s: float
    ranks: Tuple[RankStats, ...]
    stragglers: Tuple[int, ...]
    missing: Tuple[int, ...] = ()
    source: str = ""  # "collective" or "store"

    def slowdown(self, rank: int) -> float:
        """The rank's busy time over the median, minus one (0.25: 25% slower than the median)."""
        for stats in self.ranks:
            if stats.rank == rank:
                return stats.busy_p50_s / self.median_busy_s - 1.0 if self.median_busy_s else 0.0
        raise KeyError(rank)

    def describe(self) -> str:
        """One line for logs."""
        if not self.stragglers:
            return (f"no stragglers at step {self.step} (gen {self.generation}, "
                    f"{len(self.ranks)} ranks, median busy {self.median_busy_s * 1e3:.2f} ms)")
        parts = []
        by_rank = {s.rank: s for s in self.ranks}
        for rank in self.stragglers:
            parts.append(f"rank {rank} busy {by_rank[rank].busy_p50_s * 1e3:.2f} ms "
                         f"(+{self.slowdown(rank) * 100:.0f}%)")
        return (f"stragglers at step {self.step} (gen {self.generation}): " + ", ".join(parts)
                + f" vs median {self.median_busy_s * 1e3:.2f} ms")

    def to_json(self) -> Dict[str, Any]:
        return {"kind": "stragglers", "generation": self.generation, "window": self.window,
                "step": self.step, "threshold_frac": self.threshold_frac,
                "median_busy_s": self.median_busy_s, "stragglers": list(self.stragglers),
                "missing": list(self.missing), "source": self.source,
                "ranks": [s.to_json() for s in self.ranks]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "StragglerReport":
        return cls(generation=int(obj["generation"]), window=int(obj["window"]),
                   step=int(obj["step"]), threshold_frac=float(obj["threshold_frac"]),
                   median_busy_s=float(obj["median_busy_s"]),
                   ranks=tuple(RankStats.from_json(r) for r in obj.get("ranks", ())),
                   stragglers=tuple(int(r) for r in obj.get("stragglers", ())),
                   missing=tuple(int(r) for r in obj.get("missing", ())),
                   source=str(obj.get("source", "")))


class Sink(abc.ABC):
    """An output of step records (JSON lines, a trace, Prometheus, TensorBoard)."""

    @abc.abstractmethod
    def write_step(self, record: StepRecord, intervals: Sequence[PhaseInterval]) -> None:
        """Called once per finished step, in step order, on the profiler's writer thread."""

    def write_steps(self, items: Sequence[Tuple[StepRecord, Sequence[PhaseInterval]]]) -> None:
        """A batch of finished steps, in step order: what the writer thread calls. Override
        it to write a batch at once (one ``write`` for many lines); the default calls
        :meth:`write_step` for each."""
        for record, intervals in items:
            self.write_step(record, intervals)

    def write_report(self, report: StragglerReport) -> None:  # noqa: B027 - optional hook: a sink may ignore reports
        """Called with each straggler report (possibly from a background thread)."""

    def flush(self) -> None:  # noqa: B027 - optional hook: a sink without a buffer
        """Push buffered output to its destination."""

    def close(self) -> None:  # noqa: B027 - optional hook: a sink holding nothing
        """Flush and release resources."""


class Sampler(abc.ABC):
    """A background sampler of device metrics; steps read window averages from it."""

    source: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Start sampling (a daemon thread)."""

    @abc.abstractmethod
    def window(self, until_s: Optional[float] = None) -> Dict[str, float]:
        """Averages of the samples taken since the previous call and up to ``until_s`` (a
        ``time.perf_counter()`` time; None: up to now), or the latest sample before if none."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop sampling and release the device library."""


@dataclass(frozen=True)
class ExchangeSettings:
    """What an exchange is built from: the rank's facts and the profiler's exchange settings."""

    rank: int
    world_size: int
    generation: int
    run_id: str
    store: Any = None  # an ``elastic.store`` Store, for exchanges over the job's store
    store_prefix: str = "/elastic-prof/"  # the run's key prefix in that store
    timeout_s: float = 60.0  # how long to wait for the other ranks of a window


class StatsExchange(abc.ABC):
    """A way for ranks to share their window summaries (a collective, the job's store, ...).

    Made by a factory registered by name (``profiler.exchange.EXCHANGES``) from an
    :class:`ExchangeSettings`. An ``inline`` exchange is called on the training thread, in the
    same order on every rank (what a collective needs); any other runs on a background thread,
    so the training loop never waits for a slow rank.
    """

    #: The report's ``source``.
    name: str = ""
    #: Call :meth:`exchange` on the training thread (True) or on a background thread (False).
    inline: bool = False
    #: The ranks taking part, where the exchange knows better than the profiler's world (a
    #: process group's size); None: the world's.
    world_size: Optional[int] = None

    @abc.abstractmethod
    def exchange(self, stats: RankStats) -> Optional[Sequence[RankStats]]:
        """Publish this rank's stats for a window and return every rank's (those in by the
        timeout), or None when closed before the window completed."""

    def publish(self, report: StragglerReport) -> None:  # noqa: B027 - optional hook: an exchange may not publish
        """Called with the report built from what :meth:`exchange` returned."""

    def close(self) -> None:  # noqa: B027 - optional hook: an exchange holding nothing
        """Stop waiting (a pending :meth:`exchange` returns soon) and release resources."""
