"""Horovod, built from source by `make setup`, has PyTorch, TensorFlow and Gloo and runs allreduce."""
import os
import re
import subprocess
import sys

import pytest

from needs import missing, needs

from paths import BIN  # noqa: E402
HOROVODRUN = os.path.join(BIN, "horovodrun")

pytestmark = needs(tools=["horovodrun"], why="Horovod built by make setup")


def check_build() -> str:
    res = subprocess.run([HOROVODRUN, "--check-build"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def built_with(output: str, name: str) -> bool:
    return re.search(rf"\[X\] {name}\b", output) is not None


def test_check_build_lists_pytorch_tensorflow_and_gloo():
    out = check_build()
    assert built_with(out, "PyTorch"), out
    if not built_with(out, "TensorFlow"):
        missing("Horovod's TensorFlow half (horovodrun --check-build lists no TensorFlow)",
                "make setup builds Horovod with TensorFlow; see its build log")
    assert built_with(out, "Gloo"), out
    assert not built_with(out, "MPI"), out


ALLREDUCE = {
    "PyTorch": """
import torch, horovod.torch as hvd
hvd.init()
x = torch.tensor([float(hvd.rank() + 1)])
s = hvd.allreduce(x, op=hvd.Sum)
print(f"RANK {hvd.rank()} SIZE {hvd.size()} SUM {s.item():.0f}", flush=True)
""",
    "TensorFlow": """
import tensorflow as tf, horovod.tensorflow as hvd
hvd.init()
s = hvd.allreduce(tf.constant([float(hvd.rank() + 1)]), op=hvd.Sum)
print(f"RANK {hvd.rank()} SIZE {hvd.size()} SUM {float(s.numpy()[0]):.0f}", flush=True)
""",
}


@pytest.mark.parametrize("framework", sorted(ALLREDUCE))
def test_two_rank_allreduce_over_gloo(framework, tmp_path):
    if framework == "TensorFlow" and not built_with(check_build(), "TensorFlow"):
        missing("Horovod's TensorFlow half (horovodrun --check-build lists no TensorFlow)",
                "make setup builds Horovod with TensorFlow; see its build log")
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE[framework])
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    res = subprocess.run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
                          sys.executable, str(script)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert re.search(rf"RANK {rank} SIZE 2 SUM 3\b", out), out[-4000:]
