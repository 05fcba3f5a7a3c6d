"""One source of rank facts, elastic.World.detect(): every launcher's variables, and under a
real horovodrun the checkpoint, the data loader and the profiler agree with Horovod."""
import json
import os
import subprocess
import sys

import pytest

from elastic import World
from needs import require, require_tool

REPORT = os.path.join(os.path.dirname(__file__), "workers", "world_report.py")
from paths import REPO  # noqa: E402


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (3, 4, 1, 2)),
    ({"RANK": "0", "WORLD_SIZE": "2", "HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, (0, 2, 0, 1)),  # torchrun wins
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "3", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}, (1, 3, 1, 2)),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1", "c:1"]},
                               "task": {"type": "worker", "index": 2}})}, (2, 3, 0, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (2, 4, 0, 2)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 0, 1)),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
      "SLURM_NODEID": "1", "SLURM_STEP_ID": "0"}, (3, 4, 1, 2)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, (0, 1, 0, 1)),  # the batch script itself: one process
])
def test_detect_reads_each_launcher(env, want):
    w = World.detect(env)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size) == want


def test_detect_keeps_our_generation_and_run_id():
    w = World.detect({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "ELASTIC_GENERATION": "7",
                      "TORCHELASTIC_RUN_ID": "job"})
    assert (w.generation, w.run_id) == (7, "job")


def test_under_horovodrun_every_part_agrees_with_horovod(tmp_path):
    """No RANK/WORLD_SIZE under horovodrun: the profiler used to think every rank was 0."""
    horovodrun = require_tool("horovodrun", "Horovod built by make setup")
    require("horovod.torch", "Horovod built by make setup")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=os.path.dirname(horovodrun) + os.pathsep + env["PATH"],
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    res = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
                          sys.executable, REPORT, str(tmp_path / "ck"), str(tmp_path / "prof")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    rows = sorted(line.split("WORLD ", 1)[1] for line in out.splitlines() if "WORLD " in line)
    assert rows == [f"hvd={r}/2 detect={r}/2 ckpt={r}/2 sampler={r}/2 profiler={r}/2" for r in (0, 1)], out[-4000:]
