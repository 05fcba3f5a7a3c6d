"""The chaos workloads on loopback: real launchers, 2 workers, a few steps; the step log is
well formed and the exactly-once audit is clean."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from paths import BIN, ELASTIC_RUN, REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.chaos import goodput as gp  # noqa: E402
from benchmarks.chaos import workload  # noqa: E402
from benchmarks.chaos.steplog import read_dir  # noqa: E402

PLAIN = os.path.join(REPO, "benchmarks", "chaos", "train_plain.py")
ELASTIC = os.path.join(REPO, "benchmarks", "chaos", "train_elastic.py")
TORCHRUN = os.path.join(BIN, "torchrun")
STEPS = 30


def launch(argv: list, cwd: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the job hung past {timeout_s:.0f}s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def check_log(log_dir: str, steps: int, world: int) -> gp.RunFigures:
    recs = read_dir(log_dir)
    step_recs = [r for r in recs if r.kind == "step"]
    assert len(step_recs) == steps * world
    for r in step_recs:
        assert r.t_start <= r.t_end and r.world_size == world and 0 <= r.rank < world
        assert len(r.samples) == workload.GLOBAL_BATCH // world and r.host and r.pid > 0
        assert (r.checksum is not None) == (r.step % 10 == 0)
        assert r.epoch == (r.step - 1) // workload.STEPS_PER_EPOCH
    starts = [r for r in recs if r.kind == "start" and r.source != "launch"]
    assert sorted(r.rank for r in starts) == list(range(world))
    fig = gp.analyze(recs, [], min(r.t for r in recs), num_samples=workload.NUM_SAMPLES,
                     steps_per_epoch=workload.STEPS_PER_EPOCH)
    assert (fig.last_step, fig.kept_steps, fig.executed_steps) == (steps, steps, steps)
    assert fig.audit.duplicated_samples == 0 and fig.audit.missing_samples == 0
    assert fig.audit.incomplete_steps == 0 and fig.audit.missing_steps == 0
    assert fig.checksums_checked == steps // 10 and fig.checksum_mismatches == 0
    assert 0 < fig.goodput <= 1
    return fig


@pytest.mark.parametrize("launcher", ["torchrun", "elastic-run"])
def test_plain_script(launcher, tmp_path):
    head = ([TORCHRUN, "--standalone"] if launcher == "torchrun" else [ELASTIC_RUN]) + ["--nproc-per-node", "2"]
    log, ck = tmp_path / "log", tmp_path / "ck"
    out = finish(launch(head + [PLAIN, "--log-dir", str(log), "--ckpt-dir", str(ck), "--total-steps", str(STEPS),
                                "--launcher", launcher], str(tmp_path)), 150)
    fig = check_log(str(log), STEPS, 2)
    assert fig.ckpt_published == 1, out[-2000:]  # step 20
    assert os.path.exists(ck / "latest.pt")


def test_elastic_script(tmp_path):
    workload.write_dataset(str(tmp_path / "data"))
    log, ck = tmp_path / "log", tmp_path / "ck"
    out = finish(launch([ELASTIC_RUN, "--nproc-per-node", "2", ELASTIC, "--data", str(tmp_path / "data"),
                         "--log-dir", str(log), "--ckpt-dir", str(ck), "--total-steps", str(STEPS)], str(tmp_path)),
                 150)
    fig = check_log(str(log), STEPS, 2)
    assert fig.ckpt_published == 1, out[-2000:]
    from checkpoint import Checkpointer

    assert Checkpointer(str(ck), rank=0, world_size=1, memory=False).latest_step() == 20


@pytest.mark.slow
def test_elastic_script_exactly_once_across_a_worker_kill(tmp_path):
    """SIGKILL of rank 1 mid-run: the survivor re-forms in place, the replacement takes its
    peers' state; every sample of every complete epoch is trained on exactly once."""
    workload.write_dataset(str(tmp_path / "data"))
    log, ck = tmp_path / "log", tmp_path / "ck"
    steps = 120
    proc = launch([ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "3", ELASTIC, "--data",
                   str(tmp_path / "data"), "--log-dir", str(log), "--ckpt-dir", str(ck), "--total-steps",
                   str(steps)], str(tmp_path))
    deadline = time.monotonic() + 90
    victim = None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        recs = read_dir(str(log)) if log.exists() else []
        done = [r for r in recs if r.kind == "step" and r.rank == 1 and r.step >= 35]
        victim = done[0].pid if done else None
        time.sleep(0.2)
    assert victim is not None, "rank 1 never reached step 35"
    os.kill(victim, signal.SIGKILL)
    finish(proc, 120)
    recs = read_dir(str(log))
    fig = gp.analyze(recs, [], min(r.t for r in recs), num_samples=workload.NUM_SAMPLES,
                     steps_per_epoch=workload.STEPS_PER_EPOCH)
    assert fig.last_step == steps and fig.kept_steps == steps
    assert fig.audit.duplicated_samples == 0 and fig.audit.missing_samples == 0
    assert fig.audit.incomplete_steps == 0 and fig.audit.missing_steps == 0
    assert fig.checksum_mismatches == 0
    assert fig.reformations >= 1
    assert any(r.kind == "start" and r.pid != victim and r.rank == 1 and r.t > min(x.t for x in recs) + 1
               for r in recs)  # a replacement started
