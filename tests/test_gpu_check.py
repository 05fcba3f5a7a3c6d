"""benchmarks/gpu_check.py, the device check of the GPU paths, run on this CPU-only machine:
the CUDA parts skip with a reason, the CPU stand-ins run and pass, the last line is JSON."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from paths import REPO  # noqa: E402
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: run benchmarks/gpu_check.py itself on it")
    res = subprocess.run([sys.executable, SCRIPT, "--cpu-size-mb", "8",
                          "--dir", str(tmp_path_factory.mktemp("gpu-check"))],
                         capture_output=True, text=True, timeout=280, cwd=REPO)
    return res


def test_verdicts_and_json(cpu_run):
    out = cpu_run.stdout
    assert cpu_run.returncode == 0, out[-3000:] + cpu_run.stderr[-3000:]
    verdicts = dict(re.findall(r"^VERDICT (\w+): (PASS|FAIL|SKIP)", out, re.M))
    assert verdicts == {"profiler_cuda": "SKIP", "profiler_cpu": "PASS",
                        "checkpoint_gpu": "SKIP", "checkpoint_cpu": "PASS",
                        "recovery_nccl": "SKIP", "recovery_gloo": "PASS"}, out[-3000:]
    # a skip says why
    for part in ("profiler_cuda", "checkpoint_gpu", "recovery_nccl"):
        assert re.search(rf"^VERDICT {part}: SKIP \(no CUDA device visible", out, re.M)

    result = json.loads(out.strip().splitlines()[-1])
    assert {"ok", "cuda", "gpus", "device", "versions", "parts"} <= set(result)
    assert result["ok"] is True and result["cuda"] is False and result["gpus"] == 0
    assert {"python", "torch"} <= set(result["versions"])
    parts = result["parts"]
    assert set(parts) == set(verdicts)
    for name, part in parts.items():
        assert part["verdict"] == verdicts[name]
        assert bool(part["reason"]) == (part["verdict"] == "SKIP")

    ckpt = parts["checkpoint_cpu"]
    assert ckpt["checksums_ok"] is True and ckpt["verify_problems"] == []
    assert ckpt["load_on_device"] is True and ckpt["state_bytes"] >= 8 << 20
    for key in ("copy_s", "stall_s", "persist_s", "dcp_async_stall_s", "load_s"):
        assert ckpt[key] > 0, key
    prof = parts["profiler_cpu"]
    assert prof["timer"] == ["cpu"]
    assert {"data", "forward", "backward", "optimizer"} <= set(prof["phases"])
    rec = parts["recovery_gloo"]
    assert rec["backend"] == "gloo" and rec["survivor_same_pid"] is True
    assert rec["world_after"] == ["2"] and rec["new_rank1_pid"] is True
