"""The profiler across real processes: a slow rank named over gloo, and `elastic-prof report`
on the output of a real run of the example; the Keras callback in a real TensorFlow fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from needs import require
from services import free_port  # noqa: E402

from paths import REPO  # noqa: E402
EXAMPLE = os.path.join(REPO, "examples", "profiled_train.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




def elastic_prof(*args, timeout=120):
    exe = os.path.join(os.path.dirname(sys.executable), "elastic-prof")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "profiler.cli"]
    return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_slow_rank_is_named_and_report_summarises_the_run(procs, tmp_path):
    run_dir = tmp_path / "run"
    world_size, slow_rank = 3, 1
    port = free_port()
    for rank in range(world_size):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.start(f"rank{rank}", [EXAMPLE, "--run-dir", str(run_dir), "--steps", "40",
                                    "--exchange-every", "10", "--threshold", "0.5",
                                    "--slow-rank", str(slow_rank), "--slow-s", "0.03",
                                    "--checkpoint-every", "20", "--peak-flops", "1e11"],
                    env=env, python=True)
    # meanwhile the same example alone: no process group, no RANK variables
    solo_dir = tmp_path / "solo"
    procs.start("solo", [EXAMPLE, "--run-dir", str(solo_dir), "--steps", "30",
                         "--checkpoint-every", "0"], python=True)
    results = procs.wait(timeout_s=240)
    out0 = results["rank0"].output
    assert "straggler report: stragglers at step" in out0 and "rank 1 busy" in out0, out0[-3000:]

    # the live reports (one all_gather every 10 steps) are in rank 0's JSON lines
    with open(run_dir / "rank-00000.jsonl") as f:
        lines = [json.loads(line) for line in f]
    reports = [rec for rec in lines if rec["kind"] == "stragglers"]
    assert len(reports) == 4
    assert all(r["stragglers"] == [slow_rank] for r in reports), reports
    assert all(r["source"] == "collective" and len(r["ranks"]) == world_size for r in reports)
    steps = [rec for rec in lines if rec["kind"] == "step"]
    assert len(steps) == 40
    assert {"data", "forward", "backward", "optimizer", "comm"} <= set(steps[-1]["phases_s"])

    res = elastic_prof("report", str(run_dir))
    assert res.returncode == 0, res.stderr
    table = res.stdout
    for text in ("ranks: 3  steps: 114", "p50 ms", "p95 ms", "throughput:", "samples/s",
                 "MFU: ", "stragglers (busy p50 > median +10%): rank 1",
                 "live straggler reports: 4 (rank 1 in 4)"):
        assert text in table, table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    for phase in ("step", "data", "forward", "backward", "optimizer", "comm", "checkpoint"):
        assert phase in rows, table
        p50, p95 = float(rows[phase][2]), float(rows[phase][3])
        assert 0 <= p50 <= p95
    for name in ("step_time.png", "phases.png"):
        path = run_dir / "report" / name
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        import matplotlib.image
        height, width, _ = matplotlib.image.imread(str(path)).shape
        assert width > 300 and height > 200

    summary = json.loads(elastic_prof("report", str(run_dir), "--json", "--no-plots").stdout)
    assert summary["stragglers"] == [slow_rank]
    assert [r["rank"] for r in summary["ranks"]] == [0, 1, 2]
    assert summary["mfu_p50"] is not None and 0 < summary["mfu_p50"] < 10
    busy = {r["rank"]: r["busy_p50_s"] for r in summary["ranks"]}
    assert busy[slow_rank] > 0.03  # the sleep is busy time; the others' wait is comm

    assert "rank 0: 30 steps" in results["solo"].output
    rep = elastic_prof("report", str(solo_dir), "--out", str(tmp_path / "plots"))
    assert rep.returncode == 0, rep.stderr
    assert "ranks: 1  steps: 28" in rep.stdout and "stragglers (busy p50 > median +10%): none" in rep.stdout
    assert "MFU: n/a" in rep.stdout
    assert (tmp_path / "plots" / "phases.png").read_bytes().startswith(PNG_SIGNATURE)


def test_report_errors_are_one_line(tmp_path):
    res = elastic_prof("report", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip() == f"elastic-prof: error: no profiler step records (rank-*.jsonl) under {tmp_path}"
    (tmp_path / "rank-00000.jsonl").write_text('{"kind":"step","step":0,"rank":0,"wall_time_s":1,'
                                               '"step_time_s":0.01}\n{"kind":"step", "trunc')
    res = elastic_prof("report", str(tmp_path), "--threshold", "-1")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "threshold" in res.stderr
    res = elastic_prof("report", str(tmp_path), "--no-plots")  # a torn last line is skipped
    assert res.returncode == 0 and "ranks: 1  steps: 1" in res.stdout


def test_keras_callback_makes_each_batch_a_step(tmp_path):
    require("tensorflow")
    require("sklearn", "the test extra (scikit-learn's digits)")
    code = textwrap.dedent(f"""
        import json, os
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import numpy as np
        import tensorflow as tf
        from sklearn.datasets import load_digits
        from profiler import StepProfiler
        d = load_digits()
        x, y = (d.data / 16.0).astype("float32"), d.target
        model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(32, activation="relu"),
                                     tf.keras.layers.Dense(10)])
        model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        with StepProfiler({str(tmp_path)!r}, sampler="none", trace=False) as prof:
            model.fit(x[:640], y[:640], batch_size=64, epochs=2, verbose=0,
                      callbacks=[prof.keras_callback(batch_size=64)])
        print("STEPS", len(prof.records), prof.records[-1].samples)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, PYTHONPATH=REPO))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "STEPS 20 64" in res.stdout
    with open(tmp_path / "rank-00000.jsonl") as f:
        steps = [json.loads(line) for line in f]
    assert [s["step"] for s in steps] == list(range(20))
    assert all(s["step_time_s"] > 0 and s["samples"] == 64 for s in steps)
