"""Horovod, TensorFlow and PyTorch under `elastic-run`, end to end: real agents, real workers.

Each example trains on scikit-learn's digits. Every framework gets one elastic run with two
agents (separate `elastic-run` processes on 127.0.0.1): a0 starts alone (world 1), a1 joins
mid-run (scale-up: world 2), then a1's agent is SIGKILLed (scale-down: world 1) and a0 trains
to the end, resuming from the checkpoint each time. a0, started first, hosts the embedded
rendezvous server and is never the one that goes away.
"""
import os
import re
import signal
import time

import pytest

from needs import needs
from services import free_port

from paths import ELASTIC_RUN, REPO  # noqa: E402
EXAMPLES = os.path.join(REPO, "examples")
FAST = "last_call_timeout=0.5,lease_ttl=2,join_timeout=120"
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "ELASTIC_LOG_LEVEL": "INFO"}

pytestmark = needs("horovod.torch", "horovod.tensorflow", tools=["horovodrun"], why="Horovod built by make setup")

# example -> (accuracy it reaches on 2 workers in the epochs given, epochs)
EXAMPLE_ACCURACY = {
    "horovod_torch.py": (0.9, 6),
    "tf_keras_mwms.py": (0.9, 6),
    "horovod_keras.py": (0.85, 6),
}


def final_accuracy(out: str) -> float:
    m = re.search(r"final test accuracy ([0-9.]+)", out)
    assert m, out[-4000:]
    return float(m.group(1))


def wait_for_line(procs, name: str, pattern: str, timeout_s: float, start: int = 0) -> int:
    """Block until a line matching ``pattern`` appears in ``name``'s output after offset
    ``start``; returns the offset just past it. An exit or the deadline fails the test."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while True:
        out = procs.output(name)
        m = rx.search(out, start)
        if m:
            return m.end()
        if procs[name].poll() is not None or time.monotonic() > deadline:
            procs.wait(timeout_s=0, check=False)
            raise AssertionError(f"{name} never printed /{pattern}/ (exit {procs[name].poll()}):\n"
                                 + out[-6000:])
        time.sleep(0.05)  # polling a growing log file: the line is the signal


@pytest.mark.parametrize("example", [
    "horovod_torch.py", "horovod_keras.py",
    # trained in test_scale_up_then_down_during_training[tensorflow] too (2 workers mid-run): slow
    pytest.param("tf_keras_mwms.py", marks=pytest.mark.slow)])
def test_example_trains_on_two_workers(procs, tmp_path, example):
    acc, epochs = EXAMPLE_ACCURACY[example]
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", os.path.join(EXAMPLES, example),
                        "--epochs", str(epochs), "--ckpt-dir", str(tmp_path / "ckpt")], env=QUIET)
    out = procs.wait(timeout_s=240)["job"].output
    assert final_accuracy(out) >= acc, out[-3000:]
    assert re.search(r"final test accuracy [0-9.]+ world size 2", out), out[-3000:]
    assert "resumed" not in out  # a fresh directory: trained from scratch


# framework -> (example, extra args, accuracy reached after the world changes 1 -> 2 -> 1)
ELASTIC = {
    "torch": ("torch_ddp.py", ["--epochs", "8", "--step-delay", "0.04"], 0.9),
    "horovod": ("horovod_torch.py", ["--epochs", "8", "--step-delay", "0.04"], 0.9),
    "tensorflow": ("tf_keras_mwms.py", ["--epochs", "8", "--step-delay", "0.05", "--save-steps", "5"], 0.9),
}


def elastic_agent(endpoint, framework, ckpt, *flags):
    example, args, _ = ELASTIC[framework]
    return [ELASTIC_RUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, *flags,
            "--rdzv-id", f"fw-{framework}", "--rdzv-conf", FAST, "--framework", framework,
            # a dead peer breaks the survivor's collectives before its lease expires: that is a
            # worker failure, restarted from the job's budget
            "--max-restarts", "3",
            os.path.join(EXAMPLES, example), *args, "--ckpt-dir", str(ckpt)]


@pytest.mark.parametrize("framework", sorted(ELASTIC))
def test_scale_up_then_down_during_training(procs, tmp_path, framework):
    endpoint = f"127.0.0.1:{free_port()}"
    ckpt = tmp_path / "ckpt"
    epochs = int(ELASTIC[framework][1][1])
    procs.start("a0", elastic_agent(endpoint, framework, ckpt), env=QUIET)
    at = wait_for_line(procs, "a0", rf"epoch 1/{epochs} .*world size 1 ", timeout_s=120)
    # scale-up: a second agent joins mid-run. Without standbys it joins at once, instead of
    # after warming them (seconds of TensorFlow import on a loaded machine, during which a0
    # could train to the end): the world changes while a0 is surely still training.
    procs.start("a1", elastic_agent(endpoint, framework, ckpt, "--no-standby"), env=QUIET)
    at = wait_for_line(procs, "a0", rf"epoch \d+/{epochs} .*world size 2 ", timeout_s=120, start=at)
    # scale-down: the second agent is SIGKILLed (its worker dies with it)
    procs.signal("a1", signal.SIGKILL)
    at = wait_for_line(procs, "a0", rf"epoch \d+/{epochs} .*world size 1 ", timeout_s=120, start=at)
    out = procs.wait(timeout_s=180, names=["a0"])["a0"].output
    gone = procs.wait(timeout_s=10, names=["a1"], check=False)["a1"]
    assert gone.signal == signal.SIGKILL
    assert final_accuracy(out) >= ELASTIC[framework][2], out[-4000:]
    sizes = [int(w) for w in re.findall(rf"epoch \d+/{epochs} .*world size (\d+) ", out)]
    # the world grew, then shrank, and the epochs went on across both changes
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    first_two, last_two = sizes.index(2), len(sizes) - 1 - sizes[::-1].index(2)
    assert all(s == 2 for s in sizes[first_two:last_two + 1]) and sizes[last_two + 1:] and \
        all(s == 1 for s in sizes[last_two + 1:]), sizes
    done = [int(e) for e in re.findall(rf"epoch (\d+)/{epochs} ", out)]
    assert done[-1] == epochs and len(set(done)) == epochs, done  # every epoch, to the end
    # every restart resumed from a checkpoint instead of starting over
    assert len(re.findall(r"resumed from", out)) >= 2, out[-4000:]
    gens = [int(g) for g in re.findall(r"generation (\d+)", out)]
    assert gens == sorted(gens) and gens[-1] >= 3, gens
