"""Unmodified Horovod Elastic scripts (``@hvd.elastic.run``, ``hvd.elastic.TorchState`` /
``KerasState``, ``state.commit()``, reset callbacks) under ``elastic-run --framework horovod``:
after one worker's SIGKILL the survivors reset in place through Horovod's own elastic path
(same PIDs, reset callbacks run), the replacement takes the state by Horovod's broadcast,
and no step is lost: the job ends where a fault-free run ends."""
import os
import re
import signal
import subprocess
import sys

import pytest

from inproc_checks import STEPS, assert_same_params, steps
from needs import needs

from paths import ELASTIC_RUN  # noqa: E402
WORKERS = os.path.join(os.path.dirname(__file__), "workers")
TORCH_SCRIPT = os.path.join(WORKERS, "hvd_elastic_torch.py")
KERAS_SCRIPT = os.path.join(WORKERS, "hvd_elastic_keras.py")


needs_hvd_torch = needs("horovod.torch", why="Horovod built by make setup")


@needs_hvd_torch
@pytest.mark.parametrize("victim_rank", ["0", "1"])
def test_unmodified_hvd_elastic_torch_script_survives_a_worker_kill(procs, tmp_path, reference, victim_rank):
    out = tmp_path / "params.json"
    procs.start("job", [ELASTIC_RUN, "--framework", "horovod", "--nproc-per-node", "2", "--max-restarts", "1",
                        TORCH_SCRIPT, "--steps", str(STEPS), "--step-delay", "0.03", "--out", str(out)])
    procs.wait_for_output("job", "STEP step=10 rank=1", timeout_s=120)
    first = {r["rank"]: r["pid"] for r in steps(procs.output("job")) if r["gen"] == "1"}
    victim = int(first[victim_rank])
    survivor = next(pid for rank, pid in first.items() if rank != victim_rank)
    os.kill(victim, signal.SIGKILL)
    result = procs.wait(timeout_s=120)["job"]
    text = result.output
    assert result.returncode == 0, text[-4000:]
    records = steps(text)
    later = [r for r in records if r["gen"] != "1"]
    assert later, text[-4000:]
    # The survivor kept its process and is rank 0 of the new round (it holds the state).
    assert {r["pid"] for r in later if r["rank"] == "0"} == {survivor}, text[-4000:]
    replacement = {r["pid"] for r in later if r["rank"] == "1"}
    assert len(replacement) == 1 and str(victim) not in replacement and survivor not in replacement
    # The replacement started from the survivors' last commit, by Horovod's broadcast.
    assert min(int(r["step"]) for r in later if r["rank"] == "1") > 2, text[-4000:]
    assert "workers re-formed in place" in text and "re-formed in" in text
    assert f"DONE rank=0 pid={survivor} resets=[2]" in text  # Horovod's reset callbacks ran
    assert text.count("DONE") == 2
    assert_same_params(out, reference)  # no step lost, none repeated: the fault-free run's parameters


@needs_hvd_torch
def test_unmodified_hvd_elastic_script_runs_alone_without_elastic_run(tmp_path):
    """Outside elastic-run the script is Horovod's: one process, a world of one."""
    res = subprocess.run([sys.executable, TORCH_SCRIPT, "--steps", "4"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DONE rank=0" in res.stdout and "resets=[]" in res.stdout


needs_hvd_keras = needs("horovod.tensorflow", "tf_keras", why="Horovod with TensorFlow and tf-keras, by make setup")


@needs_hvd_keras
def test_unmodified_hvd_elastic_keras_script_survives_a_worker_kill(procs, tmp_path):
    """Horovod's Keras elastic state needs Keras 2 (tf-keras, TF_USE_LEGACY_KERAS=1), as under
    horovodrun; rank 0 is killed, so the survivor must become rank 0 to broadcast its state."""
    epochs, batches = 3, 12
    procs.start("job", [ELASTIC_RUN, "--framework", "horovod", "--nproc-per-node", "2", "--max-restarts", "1",
                        KERAS_SCRIPT, "--epochs", str(epochs), "--batches", str(batches), "--step-delay", "0.05"],
                env={"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    procs.wait_for_output("job", "STEP step=8 rank=1", timeout_s=180)
    first = {r["rank"]: r["pid"] for r in steps(procs.output("job")) if r["gen"] == "1"}
    victim, survivor = int(first["0"]), first["1"]
    os.kill(victim, signal.SIGKILL)
    result = procs.wait(timeout_s=180)["job"]
    text = result.output
    assert result.returncode == 0, text[-4000:]
    records = steps(text)
    before = [int(r["step"]) for r in records if r["gen"] == "1" and r["pid"] == survivor]
    later = [r for r in records if r["gen"] != "1"]
    assert {r["pid"] for r in later if r["rank"] == "0"} == {survivor}, text[-4000:]  # same process, rank 0 now
    fresh = [int(r["step"]) for r in later if r["rank"] == "1"]
    assert fresh and str(victim) not in {r["pid"] for r in later}
    # Rolled back to the last commit (every 2 batches), and the replacement took that state.
    resumed = min(int(r["step"]) for r in later if r["pid"] == survivor)
    assert max(before) - 2 <= resumed - 1 <= max(before), text[-4000:]
    assert min(fresh) == resumed, text[-4000:]
    done = re.findall(r"DONE rank=(\d) pid=(\d+) steps=(\d+) resets=(\[.*?\])", text)
    assert len(done) == 2 and len({d[2] for d in done}) == 1, text[-4000:]
    assert int(done[0][2]) >= epochs * batches  # no batch lost
    assert ("0", survivor, done[0][2], "[2]") in done  # Horovod's reset callback ran in the survivor


@needs_hvd_torch
def test_a_dead_node_is_left_out_at_once_and_its_death_is_not_charged(procs, tmp_path, reference):
    """Two nodes; the second one's agent is SIGKILLed (its worker dies with it) while its lease
    has seconds to run. The survivor reports the lost peer, its agent opens the next round at
    once, and the job goes on at world size 1 in the same process, with --max-restarts 0."""
    from services import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "params.json"

    def agent(name):
        procs.start(name, [ELASTIC_RUN, "--framework", "horovod", "--nnodes", "1:2", "--nproc-per-node", "1",
                           "--rdzv-endpoint", endpoint, "--rdzv-id", "lost-peer", "--max-restarts", "0",
                           "--rdzv-conf", "last_call_timeout=0.5,lease_ttl=8,join_timeout=60",
                           TORCH_SCRIPT, "--steps", str(STEPS), "--step-delay", "0.1", "--out", str(out)])

    agent("a0")
    procs.wait_for_output("a0", "listening", timeout_s=60)
    agent("a1")
    procs.wait_for_output("a1", "world=2", timeout_s=120)  # a1 joined: a scale-up, in place
    procs.signal("a1", signal.SIGKILL)  # the agent alone: its worker dies with it (PDEATHSIG)
    result = procs.wait(timeout_s=120, names=["a0"])["a0"]
    text = result.output
    assert result.returncode == 0, text[-4000:]
    records = steps(text)
    assert len({r["pid"] for r in records}) == 1, text[-4000:]  # a0's worker never restarted
    assert records[-1]["world"] == "1" and any(r["world"] == "2" for r in records)
    assert "lost a peer" in text and "restart budget" not in text, text[-4000:]
    assert_same_params(out, reference)  # no step lost across 1 -> 2 -> 1
