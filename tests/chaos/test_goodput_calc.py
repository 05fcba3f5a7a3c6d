"""benchmarks/chaos/goodput.py on synthetic step logs: every figure, exactly.

The logs are built by hand: 2 ranks, steps of exactly 1 s (binary-exact times), 8 samples an
epoch, a global batch of 4 (2 steps an epoch). Nothing here starts a process.
"""
from __future__ import annotations

import os
import sys

import pytest

from paths import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.chaos import goodput as gp  # noqa: E402
from benchmarks.chaos.steplog import Record, StepLog, read_dir, read_lines  # noqa: E402

N, SPE = 8, 2  # samples an epoch, steps an epoch


def samples(step: int, rank: int) -> tuple:
    """Epoch order is the identity; a step takes 4 consecutive ids, rank r the r-th pair."""
    k = (step - 1) % SPE
    return (4 * k + 2 * rank, 4 * k + 2 * rank + 1)


def step(s: int, t0: float, *, world: int = 2, gen: int = 1, host: str = "h", ids=None, checksum=None,
         ranks=None) -> list:
    out = []
    for r in (range(world) if ranks is None else ranks):
        out.append(Record(kind="step", t=t0 + 1, host=f"{host}{r}", pid=100 + r, rank=r, world_size=world,
                          generation=gen, step=s, epoch=(s - 1) // SPE, t_start=t0 + 0.25 * r,
                          t_end=t0 + 1, samples=samples(s, r) if ids is None else ids[r],
                          checksum=checksum if not isinstance(checksum, list) else checksum[r]))
    return out


def event(kind: str, t: float, *, gen: int = 1, world: int = 2, host: str = "h0", rank: int = 0) -> Record:
    return Record(kind=kind, t=t, host=host, pid=1, rank=rank, world_size=world, generation=gen)


def clean_run(n_steps: int = 6, t_first: float = 1.0) -> list:
    recs = [event("start", 0.5), event("start", 0.5, host="h1", rank=1)]
    for s in range(1, n_steps + 1):
        recs += step(s, t_first + s - 1)
    return recs


def test_clean_run():
    fig = gp.analyze(clean_run(), [], 0.0, num_samples=N, steps_per_epoch=SPE)
    assert fig.goodput == pytest.approx(6 / 7)
    assert (fig.last_step, fig.kept_steps, fig.executed_steps) == (6, 6, 6)
    assert fig.audit.duplicated_samples == 0 and fig.audit.missing_samples == 0
    assert fig.audit.per_epoch == {0: (0, 0, True), 1: (0, 0, True), 2: (0, 0, True)}
    assert fig.audit.incomplete_steps == 0 and fig.audit.missing_steps == 0
    assert fig.reformations == 0


def rollback_run() -> list:
    """Steps 1-4 at t 1-5; a kill at t 5.0; workers start again at t 6 and resume from step 2
    (a checkpoint): steps 3 and 4 are redone at t 7-9, then 5 and 6 at t 9-11."""
    recs = [event("start", 0.5), event("start", 0.5, host="h1", rank=1)]
    for s in range(1, 5):
        recs += step(s, s)
    recs += [event("start", 6.0, gen=2), event("start", 6.5, gen=2, host="h1", rank=1)]
    for s, t in ((3, 7), (4, 8), (5, 9), (6, 10)):
        recs += step(s, t, gen=2)
    return recs


def test_redone_steps_count_only_their_last_execution():
    recs = rollback_run()
    execs = gp.executions(recs)
    kept = gp.kept_executions(execs)
    assert len(execs) == 8
    assert [(e.step, e.t_start) for e in kept] == [(1, 1), (2, 2), (3, 7), (4, 8), (5, 9), (6, 10)]
    assert gp.goodput(kept, 0.0) == pytest.approx(6 / 11)  # 6 s of kept steps over 11 s
    fig = gp.analyze(recs, [{"kind": "kill_worker", "host": "h1", "t_inject": 5.0, "t_end": 5.0}], 0.0,
                     num_samples=N, steps_per_epoch=SPE)
    (f,) = fig.faults
    assert f.detect_s == 1.0  # the kill at 5.0, workers start at 6.0
    assert f.recover_s == 3.0  # step 3 (redone) started at 7 and ended at 8
    assert f.steps_lost == 2  # step 4 was done; the job went on from step 2
    assert (f.world_before, f.world_after) == (2, 2)
    assert f.reformations == 1 and f.spurious_reformations == 0 and f.recovered
    assert fig.audit.duplicated_samples == 0 and fig.audit.missing_samples == 0
    assert fig.reformations == 1


def test_a_run_that_hung_is_charged_until_it_was_stopped():
    kept = gp.kept_executions(gp.executions(clean_run()))  # last step ends at 7
    assert gp.goodput(kept, 0.0, t_stop=12.0) == pytest.approx(6 / 12)
    assert gp.goodput(kept, 0.0, t_stop=5.0) == pytest.approx(6 / 7)
    fig = gp.analyze(clean_run(), [], 0.0, num_samples=N, steps_per_epoch=SPE, t_stop=12.0)
    assert fig.wall_s == 12.0 and fig.goodput == pytest.approx(0.5)
    assert gp.goodput_vs_fault_free(kept, 0.0, kept, 0.0, t_stop=14.0) == pytest.approx(0.5)


def test_goodput_vs_fault_free():
    chaos = gp.kept_executions(gp.executions(rollback_run()))
    ff = gp.kept_executions(gp.executions(clean_run()))
    assert gp.goodput_vs_fault_free(chaos, 0.0, ff, 0.0) == pytest.approx(7 / 11)
    # a fault-free run that stopped at step 4: extrapolated at its 1 s step period
    ff4 = gp.kept_executions(gp.executions(clean_run(4)))
    assert gp.wall_to_step(ff4, 0.0, 6) == pytest.approx(7.0)


def test_a_rollback_that_is_not_redone_yet_is_not_kept():
    """Step 4's first execution was thrown away by a rollback to step 2; the run ended at step 3
    redone: only steps 1, 2, 3 (the redone one) are kept."""
    recs = [event("start", 0.5)]
    for s in range(1, 5):
        recs += step(s, s)
    recs += [event("reform", 6.0, gen=2)] + step(3, 7, gen=2)
    kept = gp.kept_executions(gp.executions(recs))
    assert [(e.step, e.t_start) for e in kept] == [(1, 1), (2, 2), (3, 7)]


def test_duplicate_and_missing_samples():
    """Step 2 (the epoch's second) re-reads the first step's ids on rank 1 (a sampler that split
    the epoch differently after a resize): 2 duplicates, and 2 samples of epoch 0 never seen."""
    recs = clean_run()
    recs = [r for r in recs if not (r.kind == "step" and r.step == 2)]
    recs += step(2, 2, ids=[samples(2, 0), samples(1, 1)])
    fig = gp.analyze(recs, [], 0.0, num_samples=N, steps_per_epoch=SPE)
    assert fig.audit.duplicated_samples == 2
    assert fig.audit.missing_samples == 2
    assert fig.audit.per_epoch[0] == (2, 2, True)
    assert fig.audit.per_epoch[1] == (0, 0, True)


def test_the_partial_last_epoch_is_audited_for_duplicates_only():
    recs = clean_run(5)  # epoch 2 has only its first step
    fig = gp.analyze(recs, [], 0.0, num_samples=N, steps_per_epoch=SPE)
    assert fig.audit.per_epoch[2] == (0, 0, False)
    assert fig.audit.missing_samples == 0


def test_a_missing_rank_line_and_a_missing_step():
    recs = [r for r in clean_run() if not (r.kind == "step" and r.step == 3 and r.rank == 1)]
    recs = [r for r in recs if not (r.kind == "step" and r.step == 5)]
    fig = gp.analyze(recs, [], 0.0, num_samples=N, steps_per_epoch=SPE)
    assert fig.audit.incomplete_steps == 1
    assert fig.audit.missing_steps == 1
    assert fig.audit.missing_samples == 6  # step 3's rank 1 pair (epoch 1), step 5's four (epoch 2)


def test_a_step_that_completed_on_some_ranks_only_leaves_its_samples_unverified():
    """Rank 1 was stopped mid-ring at step 3: rank 0 completed and logged it, rank 1 never
    did; its 2 samples are unverified, not missing (with the global batch known)."""
    recs = [r for r in clean_run() if not (r.kind == "step" and r.step == 3 and r.rank == 1)]
    a = gp.audit(gp.kept_executions(gp.executions(recs)), N, SPE, global_batch=4)
    assert (a.missing_samples, a.unverified_samples, a.incomplete_steps) == (0, 2, 1)
    # a sample missing besides the unverified slots is still missing
    recs = [r for r in recs if not (r.kind == "step" and r.step == 4)] + step(4, 4, ids=[(4, 4), samples(4, 1)])
    a = gp.audit(gp.kept_executions(gp.executions(recs)), N, SPE, global_batch=4)
    assert (a.duplicated_samples, a.missing_samples, a.unverified_samples) == (1, 1, 2)


def test_spurious_reformation_under_packet_loss():
    recs = clean_run()
    recs.append(event("reform", 3.5, gen=2))
    recs.append(event("reform", 3.75, gen=2, host="h1", rank=1))
    faults = [{"kind": "degrade", "host": "h1", "t_inject": 2.5, "t_end": 4.5},
              {"kind": "kill_worker", "host": "h1", "t_inject": 5.5, "t_end": 5.5}]
    fig = gp.analyze(recs, faults, 0.0, num_samples=N, steps_per_epoch=SPE)
    loss, kill = fig.faults
    assert loss.reformations == 1 and loss.spurious_reformations == 1
    assert loss.detect_s == 1.0
    assert kill.reformations == 0 and kill.detect_s is None
    assert kill.recover_s == 0.5  # no disruption: the step running at 5.5 ended at 6.0
    assert kill.steps_lost == 0


def test_reformations_cluster_in_time():
    recs = [event("start", 0.0), event("start", 1.5), event("start", 3.0), event("reform", 10.0)]
    assert [len(r.records) for r in gp.reformations(recs)] == [3, 1]


def test_an_unrecovered_fault():
    recs = clean_run()
    fig = gp.analyze(recs, [{"kind": "power_off", "host": "h1", "t_inject": 7.5, "t_end": None}], 0.0,
                     num_samples=N, steps_per_epoch=SPE)
    (f,) = fig.faults
    assert not f.recovered and f.recover_s is None and f.detect_s is None  # no step after 7.5
    assert f.world_before == 2 and f.world_after is None


def test_checksums_across_ranks():
    recs = clean_run()
    recs = [r for r in recs if not (r.kind == "step" and r.step in (2, 4))]
    recs += step(2, 2, checksum="aa") + step(4, 4, checksum=["aa", "ab"])
    execs = gp.executions(recs)
    assert gp.checksum_mismatches(execs) == (2, 1)


def test_checkpoint_publishes():
    recs = clean_run()
    ck = dict(kind="ckpt", pid=1, step=2, generation=1)
    recs.append(Record(t=2.5, t_start=2.0, host="h1", published=True, **ck))
    recs.append(Record(t=4.2, t_start=3.5, host="h1", published=True, **ck))  # saved while cut off
    recs.append(Record(t=4.5, t_start=3.5, host="h0", published=True, **ck))
    recs.append(Record(t=4.6, t_start=3.6, host="h1", published=False, **ck))
    faults = [{"kind": "partition", "host": "h1", "t_inject": 3.0, "t_end": 4.0}]
    fig = gp.analyze(recs, faults, 0.0, num_samples=N, steps_per_epoch=SPE,
                     manifests=[(20, 1, 10.0), (40, 3, 11.0), (60, 2, 12.0), (80, 3, 13.0)])
    assert fig.ckpt_published == 3
    assert fig.partitioned_publishes == 1
    assert fig.stale_publishes == 1  # step 60's generation 2 after step 40's 3
    assert gp.stale_manifests([(20, 1, 10.0), (40, 2, 11.0)]) == 0


def test_projection_and_steady_goodput():
    ff = gp.kept_executions(gp.executions(clean_run()))
    assert gp.steady_goodput(ff) == pytest.approx(1.0)
    assert gp.projected_goodput(10.8, 10800.0, 1.0) == pytest.approx(0.999)
    assert gp.projected_goodput(20000.0, 10800.0, 1.0) == 0.0


def test_steplog_round_trip(tmp_path):
    log = StepLog(str(tmp_path), launcher="x")
    log.start(rank=0, world_size=2, generation=1, step=0, source="scratch")
    log.step(t_start=1.0, t_end=2.0, step=1, epoch=0, generation=1, rank=0, world_size=2, samples=[3, 4],
             checksum=None)
    log.ckpt(step=1, generation=1, rank=0, world_size=2, published=True, t_save=1.5)
    log.close()
    with open(log.path, "a") as f:
        f.write('{"kind":"step","t":3')  # a SIGKILL mid-write: skipped
    recs = read_dir(str(tmp_path))
    assert [r.kind for r in recs] == ["start", "step", "ckpt"] or \
        sorted(r.kind for r in recs) == ["ckpt", "start", "step"]
    st = next(r for r in recs if r.kind == "step")
    assert st.samples == (3, 4) and st.pid == os.getpid() and st.launcher == "x"
    assert read_lines(["", "not json", '{"kind":"reform","t":1,"host":"a","pid":2}']) == \
        [Record(kind="reform", t=1, host="a", pid=2)]
