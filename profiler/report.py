"""Offline summary of a run directory: per-phase percentiles, throughput, MFU, stragglers, plots.

Reads every ``rank-*.jsonl`` under the run directory (the profiler's JSON lines), so it works on
a directory gathered from many nodes; used by ``elastic-prof report``.

Sampled phases (the automatic hooks time one step in ``phase_every``): every step counts in
the step time, throughput, MFU and the straggler verdict; a phase's percentiles are over the
steps that timed it (its ``steps`` column), and its share and mean in the plots are over the
steps that could have it: the sampled steps for an automatic phase (``SAMPLED_PHASES``), all
steps for any other (:func:`profiler.windows.phase_means`).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .api import PHASES, SAMPLED_PHASES, RankStats, StepRecord, StragglerReport
from .errors import NoRecordsError, ProfilerConfigError
from .exchange import detect_stragglers
from .windows import phase_means

__all__ = ["PhaseSummary", "RankSummary", "RunSummary", "load_run", "summarize",
           "format_summary", "write_plots"]


@dataclass(frozen=True)
class PhaseSummary:
    name: str
    steps: int  # steps in which the phase occurred
    p50_s: float
    p95_s: float
    mean_s: float
    share: float  # of the step time of the steps that could have the phase (all, or the sampled)


@dataclass(frozen=True)
class RankSummary:
    rank: int
    steps: int
    step_p50_s: float
    step_p95_s: float
    busy_p50_s: float
    samples_per_s: Optional[float]
    mfu_p50: Optional[float]


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    steps: int
    generations: Tuple[int, ...]
    timers: Tuple[str, ...]
    step: PhaseSummary
    phases: Tuple[PhaseSummary, ...]
    ranks: Tuple[RankSummary, ...]
    throughput_samples_per_s: Optional[float]
    mfu_p50: Optional[float]
    threshold_frac: float
    stragglers: Tuple[int, ...]
    slowdown: Dict[int, float] = field(default_factory=dict)
    live_reports: int = 0
    live_named: Dict[int, int] = field(default_factory=dict)
    device: Dict[str, float] = field(default_factory=dict)
    sampled_steps: int = 0  # steps that carry the sampled (automatic hook) phases

    def to_json(self) -> dict:
        def phase(p: PhaseSummary) -> dict:
            return {"name": p.name, "steps": p.steps, "p50_s": p.p50_s, "p95_s": p.p95_s,
                    "mean_s": p.mean_s, "share": p.share}
        return {
            "run_dir": self.run_dir, "steps": self.steps, "generations": list(self.generations),
            "timers": list(self.timers), "step": phase(self.step),
            "phases": [phase(p) for p in self.phases],
            "ranks": [{"rank": r.rank, "steps": r.steps, "step_p50_s": r.step_p50_s,
                       "step_p95_s": r.step_p95_s, "busy_p50_s": r.busy_p50_s,
                       "samples_per_s": r.samples_per_s, "mfu_p50": r.mfu_p50} for r in self.ranks],
            "throughput_samples_per_s": self.throughput_samples_per_s, "mfu_p50": self.mfu_p50,
            "threshold_frac": self.threshold_frac, "stragglers": list(self.stragglers),
            "slowdown": {str(k): v for k, v in self.slowdown.items()},
            "live_reports": self.live_reports,
            "live_named": {str(k): v for k, v in self.live_named.items()},
            "device": self.device, "sampled_steps": self.sampled_steps,
        }


def load_run(run_dir: str) -> Tuple[Dict[int, List[StepRecord]], List[StragglerReport]]:
    """Step records by rank (in step order) and the live straggler reports of a run directory."""
    if not os.path.isdir(run_dir):
        raise NoRecordsError(f"{run_dir}: not a directory")
    paths = sorted(glob.glob(os.path.join(run_dir, "**", "rank-*.jsonl"), recursive=True))
    by_rank: Dict[int, List[StepRecord]] = {}
    reports: List[StragglerReport] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    kind = obj.get("kind")
                    if kind == "step":
                        rec = StepRecord.from_json(obj)
                        by_rank.setdefault(rec.rank, []).append(rec)
                    elif kind == "stragglers":
                        reports.append(StragglerReport.from_json(obj))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut short by a crash
    if not by_rank:
        raise NoRecordsError(f"no profiler step records (rank-*.jsonl) under {run_dir}")
    for records in by_rank.values():
        records.sort(key=lambda r: (r.generation, r.wall_time_s))
    return by_rank, reports


def _pct(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _phase(name: str, values: List[float], total_time: float) -> PhaseSummary:
    return PhaseSummary(name, len(values), _pct(values, 50), _pct(values, 95),
                        sum(values) / len(values), sum(values) / total_time if total_time else 0.0)


def _unsampled_seen(records: Sequence[StepRecord]) -> set:
    """The phases seen on a step without the sampled phases (timed on every step)."""
    return {n for r in records if not r.sampled for n in r.phases_s}


def summarize(run_dir: str, threshold_frac: float = 0.1, warmup_steps: int = 2) -> RunSummary:
    """Summarise a run; the first ``warmup_steps`` of each rank are left out when it has more."""
    if threshold_frac < 0:
        raise ProfilerConfigError(f"threshold must be >= 0, got {threshold_frac}")
    if warmup_steps < 0:
        raise ProfilerConfigError(f"warmup must be >= 0, got {warmup_steps}")
    by_rank, reports = load_run(run_dir)
    kept: Dict[int, List[StepRecord]] = {
        rank: recs[warmup_steps:] if len(recs) > warmup_steps else recs
        for rank, recs in by_rank.items()}
    all_recs = [r for recs in kept.values() for r in recs]
    total_time = sum(r.step_time_s for r in all_recs)
    sampled_time = sum(r.step_time_s for r in all_recs if r.sampled)
    unsampled_seen = _unsampled_seen(all_recs)
    step = _phase("step", [r.step_time_s for r in all_recs], total_time)
    names = [p for p in PHASES if any(p in r.phases_s for r in all_recs)]
    names += sorted({n for r in all_recs for n in r.phases_s} - set(names))
    phases = tuple(_phase(n, [r.phases_s[n] for r in all_recs if n in r.phases_s],
                          sampled_time if n in SAMPLED_PHASES and n not in unsampled_seen
                          else total_time)
                   for n in names)
    ranks = []
    stats = []
    throughput = 0.0
    any_samples = False
    for rank in sorted(kept):
        recs = kept[rank]
        times = [r.step_time_s for r in recs]
        busy = [r.busy_s for r in recs]
        with_samples = [r for r in recs if r.samples]
        sps = None
        if with_samples:
            sps = sum(r.samples or 0 for r in with_samples) / sum(r.step_time_s for r in with_samples)
            throughput += sps
            any_samples = True
        mfus = [r.mfu for r in recs if r.mfu is not None]
        ranks.append(RankSummary(rank, len(recs), _pct(times, 50), _pct(times, 95),
                                 _pct(busy, 50), sps, _pct(mfus, 50) if mfus else None))
        stats.append(RankStats(rank=rank, generation=recs[-1].generation, window=0,
                               step=recs[-1].step, steps=len(recs), step_p50_s=_pct(times, 50),
                               busy_p50_s=_pct(busy, 50)))
    offline = detect_stragglers(stats, threshold_frac)
    mfus = [r.mfu for r in all_recs if r.mfu is not None]
    named: Dict[int, int] = {}
    for rep in reports:
        for rank in rep.stragglers:
            named[rank] = named.get(rank, 0) + 1
    device_keys = sorted({k for r in all_recs for k in r.device})
    device = {}
    for key in device_keys:
        values = [r.device[key] for r in all_recs if key in r.device]
        if key.endswith("_mask"):
            mask = 0
            for v in values:
                mask |= int(v)
            device[key] = float(mask)
        else:
            device[key] = sum(values) / len(values)
    return RunSummary(
        run_dir=os.path.abspath(run_dir), steps=len(all_recs),
        generations=tuple(sorted({r.generation for r in all_recs})),
        timers=tuple(sorted({r.timer for r in all_recs})), step=step, phases=phases,
        ranks=tuple(ranks), throughput_samples_per_s=throughput if any_samples else None,
        mfu_p50=_pct(mfus, 50) if mfus else None, threshold_frac=threshold_frac,
        stragglers=offline.stragglers,
        slowdown={s.rank: offline.slowdown(s.rank) for s in stats},
        live_reports=len(reports), live_named=named, device=device,
        sampled_steps=sum(1 for r in all_recs if r.sampled))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def format_summary(s: RunSummary) -> str:
    """The human-readable table ``elastic-prof report`` prints."""
    lines = [f"elastic-prof report: {s.run_dir}",
             f"ranks: {len(s.ranks)}  steps: {s.steps}  generations: "
             f"{','.join(map(str, s.generations))}  timer: {','.join(s.timers)}"]
    if s.sampled_steps < s.steps:
        lines.append(f"automatic phases sampled on {s.sampled_steps} of {s.steps} steps; a "
                     "phase's share is of the steps that could time it")
    lines.append("")
    lines.append(f"{'phase':<12} {'steps':>7} {'p50 ms':>10} {'p95 ms':>10} {'mean ms':>10} {'share':>7}")
    for p in (s.step,) + s.phases:
        lines.append(f"{p.name:<12} {p.steps:>7} {_ms(p.p50_s):>10} {_ms(p.p95_s):>10} "
                     f"{_ms(p.mean_s):>10} {p.share * 100:>6.1f}%")
    lines.append("")
    lines.append(f"{'rank':<6} {'steps':>7} {'step p50 ms':>12} {'step p95 ms':>12} "
                 f"{'busy p50 ms':>12} {'samples/s':>11} {'MFU':>7}")
    for r in s.ranks:
        sps = f"{r.samples_per_s:.1f}" if r.samples_per_s is not None else "-"
        mfu = f"{r.mfu_p50 * 100:.1f}%" if r.mfu_p50 is not None else "-"
        lines.append(f"{r.rank:<6} {r.steps:>7} {_ms(r.step_p50_s):>12} {_ms(r.step_p95_s):>12} "
                     f"{_ms(r.busy_p50_s):>12} {sps:>11} {mfu:>7}")
    lines.append("")
    if s.throughput_samples_per_s is not None:
        lines.append(f"throughput: {s.throughput_samples_per_s:.1f} samples/s (all ranks)")
    else:
        lines.append("throughput: n/a (no samples recorded)")
    if s.mfu_p50 is not None:
        lines.append(f"MFU: {s.mfu_p50 * 100:.1f}% (p50)")
    else:
        lines.append("MFU: n/a (no FLOPs or peak FLOP/s recorded)")
    threshold = f"busy p50 > median +{s.threshold_frac * 100:.0f}%"
    if s.stragglers:
        named = ", ".join(f"rank {r} (+{s.slowdown[r] * 100:.0f}%)" for r in s.stragglers)
        lines.append(f"stragglers ({threshold}): {named}")
    else:
        lines.append(f"stragglers ({threshold}): none")
    if s.live_reports:
        named = ", ".join(f"rank {r} in {n}" for r, n in sorted(s.live_named.items())) or "no rank"
        lines.append(f"live straggler reports: {s.live_reports} ({named})")
    if s.device:
        lines.append("device (mean): " + ", ".join(
            f"{k}={v:.4g}" for k, v in s.device.items()))
    return "\n".join(lines)


def write_plots(run_dir: str, out_dir: str, warmup_steps: int = 0) -> List[str]:
    """``step_time.png`` (step time per rank over steps) and ``phases.png`` (mean phase
    breakdown per rank). Uses matplotlib's Agg backend: no display needed."""
    from elastic.lazy import require

    matplotlib = require("matplotlib", "elastic-prof report plots")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "elastic-prof report plots")
    by_rank, _ = load_run(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for rank in sorted(by_rank):
        recs = by_rank[rank]
        ax.plot([r.step for r in recs], [r.step_time_s * 1e3 for r in recs], lw=0.8,
                label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_title("Step time per rank")
    ax.grid(alpha=0.3)
    if len(by_rank) <= 16:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, "step_time.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ranks = sorted(by_rank)
    names = [p for p in PHASES if p != "comm"]
    names += sorted({n for recs in by_rank.values() for r in recs for n in r.phases_s}
                    - set(PHASES))
    bottoms = [0.0] * len(ranks)
    means = {}
    for rank in ranks:
        recs = by_rank[rank][warmup_steps:] or by_rank[rank]
        totals = {n: sum(r.phases_s.get(n, 0.0) for r in recs) for n in names + ["comm"]}
        means[rank] = {n: v * 1e3 for n, v in phase_means(
            totals, len(recs), sum(1 for r in recs if r.sampled), _unsampled_seen(recs)).items()}
        means[rank]["step"] = sum(r.step_time_s for r in recs) / len(recs) * 1e3
    xs = list(range(len(ranks)))
    for name in names + ["other"]:
        if name == "other":
            heights = [max(0.0, means[r]["step"] - sum(means[r][n] for n in names)) for r in ranks]
        else:
            heights = [means[r][name] for r in ranks]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottoms, label=name, width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    comm = [means[r]["comm"] for r in ranks]
    if any(comm):
        ax.scatter(xs, comm, marker="_", s=400, color="black", label="comm (overlaps)", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"rank {r}" for r in ranks])
    ax.set_ylabel("mean time per step (ms)")
    ax.set_title("Phase breakdown per rank")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, "phases.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths
