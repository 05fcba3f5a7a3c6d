"""Goodput and exactly-once analysis over step logs (``steplog``) and fault records.

Pure functions of the records; nothing here starts a process. Definitions:

- An *execution* of step ``s``: the ``step`` records of every rank that ran ``s`` together.
  The ranks of one execution all-reduce, so their ``[t_start, t_end]`` intervals overlap; two
  executions of the same step (before and after a rollback) do not. Records of a step are
  grouped by that overlap, so nothing depends on how a launcher numbers its rounds.
- *Kept* executions: the run's final trajectory, walked backwards from the execution that ended
  last: for each step below, the latest execution of it that ended before the kept execution
  of the next step started. A step redone after a rollback counts only its last execution;
  work that a rollback threw away is never kept. ("Before" compares starts: one rank may
  start step s+1 while another still ends step s.)
- ``goodput``: the time covered by kept executions (the union of their ``[min t_start,
  max t_end]``) / (end of the last kept step - launch); a run stopped from outside at
  ``t_stop`` after it stopped stepping is charged until ``t_stop``.
- ``goodput_vs_fault_free``: the fault-free run's wall time to the same step / this run's.
- A *re-formation*: ``start`` and ``reform`` records (a worker started, or re-formed in place)
  clustered in time (records less than ``REFORM_GAP_S`` apart are one re-formation).
- Per fault: ``detect_s`` injection -> the first re-formation after it; ``recover_s``
  injection -> the end of the first kept step that started after that re-formation (without
  one: the first kept step that ended after the injection); ``steps_lost``: the last step
  completed before the re-formation minus the step the job resumed from (clipped at 0);
  world size before (last kept step before the injection) and after (first kept step after
  the recovery); ``reformations``: re-formations from the injection until the next fault.
  Faults that should not disturb the job (``NO_REFORM_KINDS``: packet loss, a CPU straggler)
  count every re-formation they see as spurious.
- Exactly-once audit over the kept executions, per epoch: a sample id seen k > 1 times adds
  k - 1 duplicates; a sample of a complete epoch never seen is missing (the last, partial
  epoch is audited for duplicates only), unless a kept step lacks some ranks' lines (a
  collective that completed on some ranks only): up to that many slots are *unverified*.
- Rank consistency: at every execution with checksums, all ranks' checksums agree.
- Projection: the measured cost per fault (chaos wall time - fault-free wall time to the same
  step, over the number of faults) applied to one fault per ``mtbf_s``, on the fault-free
  run's steady-state goodput (its step time over its wall time after the first step).
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .steplog import Record

__all__ = ["Execution", "Reformation", "FaultFigures", "Audit", "RunFigures", "executions",
           "kept_executions", "reformations", "goodput", "wall_to_step", "goodput_vs_fault_free",
           "audit", "checksum_mismatches", "stale_manifests", "fault_figures", "projected_goodput", "analyze",
           "NO_REFORM_KINDS", "REFORM_GAP_S"]

#: start/reform records closer than this are one re-formation.
REFORM_GAP_S = 2.0
#: Fault kinds after which any re-formation is spurious (substrings of the kind's name).
NO_REFORM_KINDS = ("loss", "degrade", "straggler", "cpu")


@dataclass(frozen=True)
class Execution:
    step: int
    t_start: float  # the earliest rank's start
    t_end: float  # the latest rank's end
    records: tuple

    @property
    def world_size(self) -> int:
        return max(r.world_size for r in self.records)

    @property
    def epoch(self) -> int:
        return self.records[0].epoch

    @property
    def ranks(self) -> int:
        return len({r.rank for r in self.records})


@dataclass(frozen=True)
class Reformation:
    t: float  # the first record of it
    t_last: float
    records: tuple

    @property
    def world_size(self) -> int:
        return max(r.world_size for r in self.records)


@dataclass(frozen=True)
class FaultFigures:
    kind: str
    host: str
    t_inject: float
    detect_s: Optional[float]
    recover_s: Optional[float]
    steps_lost: int
    world_before: Optional[int]
    world_after: Optional[int]
    reformations: int
    spurious_reformations: int
    recovered: bool


@dataclass(frozen=True)
class Audit:
    duplicated_samples: int
    missing_samples: int
    per_epoch: dict = field(default_factory=dict)  # epoch -> (duplicated, missing, complete)
    incomplete_steps: int = 0  # kept executions with fewer rank lines than their world size
    missing_steps: int = 0  # step numbers below the last one with no kept execution
    unverified_samples: int = 0  # sample slots of kept steps whose rank lines are missing


@dataclass(frozen=True)
class RunFigures:
    goodput: float
    wall_s: float
    last_step: int
    kept_steps: int
    executed_steps: int
    audit: Audit
    checksums_checked: int
    checksum_mismatches: int
    faults: tuple
    reformations: int  # after the launch's
    ckpt_published: int
    stale_publishes: int  # manifests older than one published before them (stale_manifests)
    partitioned_publishes: int  # published from a save a host began while it was cut off


def _as_fault(f):
    if isinstance(f, dict):
        return _Fault(f["kind"], f.get("host", ""), float(f["t_inject"]), f.get("t_end"))
    return _Fault(f.kind, getattr(f, "host", ""), float(f.t_inject), getattr(f, "t_end", None))


@dataclass(frozen=True)
class _Fault:
    kind: str
    host: str
    t_inject: float
    t_end: Optional[float]


def executions(records: Iterable[Record]) -> list:
    """Step records grouped into executions, ordered by start."""
    by_step: dict = defaultdict(list)
    for r in records:
        if r.kind == "step":
            by_step[r.step].append(r)
    out = []
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r.t_start)
        group: list = []
        end = float("-inf")
        for r in recs:
            if group and r.t_start > end:
                out.append(_execution(step, group))
                group, end = [], float("-inf")
            group.append(r)
            end = max(end, r.t_end)
        out.append(_execution(step, group))
    out.sort(key=lambda e: (e.t_start, e.step))
    return out


def _execution(step: int, group: list) -> Execution:
    return Execution(step, min(r.t_start for r in group), max(r.t_end for r in group), tuple(group))


def kept_executions(execs: Sequence[Execution]) -> list:
    """The final trajectory (see the module doc), oldest step first."""
    if not execs:
        return []
    by_step: dict = defaultdict(list)
    for e in execs:
        by_step[e.step].append(e)
    last = max(execs, key=lambda e: (e.t_end, e.step))
    kept = [last]
    for s in range(last.step - 1, 0, -1):
        # ranks overlap steps (one starts step s+1 while another still ends s), so "before" is
        # by start: the latest execution of s that started before the kept one of s+1
        before = [e for e in by_step.get(s, ()) if e.t_start < kept[-1].t_start]
        if not before:
            continue  # a gap: counted by the audit as a missing step
        kept.append(max(before, key=lambda e: e.t_start))
    kept.reverse()
    return kept


def _union_s(intervals: Iterable[tuple]) -> float:
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def goodput(kept: Sequence[Execution], t_launch: float, t_stop: Optional[float] = None) -> float:
    """``t_stop``: when the run was stopped from outside (a job stopped at a deadline that had
    stopped stepping long before is charged the time it hung)."""
    if not kept:
        return 0.0
    wall = max(kept[-1].t_end, t_stop or 0.0) - t_launch
    return _union_s((e.t_start, e.t_end) for e in kept) / wall if wall > 0 else 0.0


def wall_to_step(kept: Sequence[Execution], t_launch: float, step: int) -> Optional[float]:
    """Launch -> the end of ``step`` in this run; past its last step, extrapolated at its
    median step period. None without steps."""
    if not kept:
        return None
    for e in kept:
        if e.step == step:
            return e.t_end - t_launch
    last = kept[-1]
    if step < last.step:  # a gap in the trajectory: the next kept step after it
        return next(e.t_end for e in kept if e.step > step) - t_launch
    periods = [b.t_end - a.t_end for a, b in zip(kept, kept[1:]) if b.step == a.step + 1]
    period = statistics.median(periods) if periods else 0.0
    return last.t_end - t_launch + (step - last.step) * period


def goodput_vs_fault_free(kept: Sequence[Execution], t_launch: float, ff_kept: Sequence[Execution],
                          ff_launch: float, t_stop: Optional[float] = None) -> Optional[float]:
    if not kept or not ff_kept:
        return None
    ff = wall_to_step(ff_kept, ff_launch, kept[-1].step)
    wall = max(kept[-1].t_end, t_stop or 0.0) - t_launch
    return ff / wall if ff is not None and wall > 0 else None


def reformations(records: Iterable[Record], gap_s: float = REFORM_GAP_S) -> list:
    evs = sorted((r for r in records if r.kind in ("start", "reform")), key=lambda r: r.t)
    out: list = []
    group: list = []
    for r in evs:
        if group and r.t - group[-1].t > gap_s:
            out.append(Reformation(group[0].t, group[-1].t, tuple(group)))
            group = []
        group.append(r)
    if group:
        out.append(Reformation(group[0].t, group[-1].t, tuple(group)))
    return out


def audit(kept: Sequence[Execution], num_samples: int, steps_per_epoch: int,
          global_batch: Optional[int] = None) -> Audit:
    """The exactly-once audit. With ``global_batch``, a kept step whose lines of some ranks are
    missing (a collective that completed on some ranks only: the others were stopped or lost
    mid-ring, and the survivors' state, which holds every rank's gradient, is the one kept) has
    ``global_batch - logged`` unverified sample slots; an epoch's missing samples up to its
    unverified slots are counted as unverified, not missing."""
    per_epoch_counts: dict = defaultdict(Counter)
    steps_of_epoch: dict = defaultdict(set)
    unlogged: Counter = Counter()
    incomplete = 0
    for e in kept:
        if e.ranks < e.world_size:
            incomplete += 1
            if global_batch is not None:
                unlogged[e.epoch] += max(0, global_batch - sum(len(r.samples) for r in e.records))
        steps_of_epoch[e.epoch].add(e.step)
        for r in e.records:
            per_epoch_counts[e.epoch].update(r.samples)
    last_step = kept[-1].step if kept else 0
    kept_steps = {e.step for e in kept}
    missing_steps = sum(1 for s in range(1, last_step + 1) if s not in kept_steps)
    dup_total = miss_total = unverified = 0
    per_epoch = {}
    for epoch in sorted(per_epoch_counts):
        counts = per_epoch_counts[epoch]
        dup = sum(c - 1 for c in counts.values() if c > 1)
        complete = (epoch + 1) * steps_per_epoch <= last_step
        miss = sum(1 for i in range(num_samples) if i not in counts) if complete else 0
        covered = min(miss, unlogged[epoch]) if complete else unlogged[epoch]
        miss -= min(miss, unlogged[epoch])
        per_epoch[epoch] = (dup, miss, complete)
        dup_total += dup
        miss_total += miss
        unverified += covered
    return Audit(dup_total, miss_total, per_epoch, incomplete, missing_steps, unverified)


def checksum_mismatches(execs: Sequence[Execution]) -> tuple:
    """(executions checked, executions whose ranks disagree)."""
    checked = bad = 0
    for e in execs:
        sums = {r.checksum for r in e.records if r.checksum is not None}
        if sums:
            checked += 1
            bad += len(sums) > 1
    return checked, bad


def fault_figures(faults: Sequence, kept: Sequence[Execution], execs: Sequence[Execution],
                  reforms: Sequence[Reformation]) -> list:
    fs = sorted((_as_fault(f) for f in faults), key=lambda f: f.t_inject)
    out = []
    for i, f in enumerate(fs):
        t_next = fs[i + 1].t_inject if i + 1 < len(fs) else float("inf")
        seen = [r for r in reforms if f.t_inject <= r.t < t_next]
        detect = seen[0] if seen else None
        if detect is not None:
            first = next((e for e in kept if e.t_start >= detect.t), None)
            done = [e for e in execs if e.t_end <= detect.t]
            last_before = max(done, key=lambda e: e.t_end).step if done else 0
            lost = max(0, last_before - (first.step - 1)) if first is not None else 0
        else:
            first = next((e for e in kept if e.t_end > f.t_inject), None)
            lost = 0
        before = [e for e in kept if e.t_end <= f.t_inject]
        no_reform = any(k in f.kind.lower() for k in NO_REFORM_KINDS)
        out.append(FaultFigures(
            kind=f.kind, host=f.host, t_inject=f.t_inject,
            detect_s=None if detect is None else round(detect.t - f.t_inject, 3),
            recover_s=None if first is None else round(first.t_end - f.t_inject, 3),
            steps_lost=lost,
            world_before=before[-1].world_size if before else None,
            world_after=None if first is None else first.world_size,
            reformations=len(seen), spurious_reformations=len(seen) if no_reform else 0,
            recovered=first is not None))
    return out


def projected_goodput(cost_per_fault_s: float, mtbf_s: float, steady_goodput: float) -> float:
    return max(0.0, steady_goodput * (1.0 - cost_per_fault_s / mtbf_s))


def steady_goodput(kept: Sequence[Execution]) -> Optional[float]:
    """Kept step time over the wall time from the first step's start to the last's end."""
    if not kept:
        return None
    wall = kept[-1].t_end - kept[0].t_start
    return _union_s((e.t_start, e.t_end) for e in kept) / wall if wall > 0 else None


def stale_manifests(manifests: Iterable[tuple]) -> int:
    """Published checkpoints (``(step, generation, created_unix_s)``, from their manifests) whose
    generation is older than that of one published before them: a stale writer that got
    through the fence."""
    stale, newest = 0, -1
    for _step, gen, _t in sorted(manifests, key=lambda m: (m[2], m[0])):
        if gen < newest:
            stale += 1
        newest = max(newest, gen)
    return stale


def _publish_checks(records: Sequence[Record], faults: Sequence) -> tuple:
    """(checkpoints published, those whose save began on a host while it was cut off)."""
    published = [r for r in records if r.kind == "ckpt" and r.published]
    cut = 0
    for f in map(_as_fault, faults):
        if "partition" not in f.kind.lower() or f.t_end is None:
            continue
        cut += sum(1 for r in published if r.host == f.host and f.t_inject <= r.t_start <= f.t_end)
    return len(published), cut


def analyze(records: Sequence[Record], faults: Sequence, t_launch: float, *, num_samples: int,
            steps_per_epoch: int, manifests: Iterable[tuple] = (), t_stop: Optional[float] = None,
            global_batch: Optional[int] = None) -> RunFigures:
    """Every figure of one run. ``manifests``: ``(step, generation, created_unix_s)`` of the
    published checkpoints, when the run used ``checkpoint.Checkpointer``. ``t_stop``: when the
    run was stopped from outside (its wall time runs to then if it stepped no more)."""
    execs = executions(records)
    kept = kept_executions(execs)
    reforms = reformations(records)
    checked, bad = checksum_mismatches(execs)
    n_pub, cut = _publish_checks(records, faults)
    return RunFigures(
        goodput=goodput(kept, t_launch, t_stop),
        wall_s=max(kept[-1].t_end, t_stop or 0.0) - t_launch if kept else 0.0,
        last_step=kept[-1].step if kept else 0, kept_steps=len(kept), executed_steps=len(execs),
        audit=audit(kept, num_samples, steps_per_epoch, global_batch), checksums_checked=checked,
        checksum_mismatches=bad, faults=tuple(fault_figures(faults, kept, execs, reforms)),
        reformations=max(0, len(reforms) - 1), ckpt_published=n_pub,
        stale_publishes=stale_manifests(manifests), partitioned_publishes=cut)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m benchmarks.chaos.goodput LOG_DIR``: the figures of one run's step logs
    (launch = the first record; no faults)."""
    import argparse
    import dataclasses
    import json

    from . import workload
    from .steplog import read_dir

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("log_dir")
    args = p.parse_args(argv)
    recs = read_dir(args.log_dir)
    if not recs:
        raise SystemExit(f"no records under {args.log_dir}")
    fig = analyze(recs, [], recs[0].t, num_samples=workload.NUM_SAMPLES,
                  steps_per_epoch=workload.STEPS_PER_EPOCH)
    print(json.dumps(dataclasses.asdict(fig), default=str))


if __name__ == "__main__":
    main()
