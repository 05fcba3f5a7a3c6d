"""A node that dies is a membership change, not a failure: it costs no restart."""
import os
import re
import signal

import pytest

from needs import require
from services import free_port

from paths import ELASTIC_RUN  # noqa: E402
STEPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "_ddp_steps.py")


def test_node_death_mid_collective_costs_no_restart(procs):
    endpoint = f"127.0.0.1:{free_port()}"

    def agent(name):
        # --max-restarts 0: the job survives only if the lost node is not charged as a failure
        procs.start(name, [ELASTIC_RUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "0",
                           "--rdzv-endpoint", endpoint, "--rdzv-id", "loss",
                           "--rdzv-conf", "last_call_timeout=1,lease_ttl=2,join_timeout=60", STEPS, "400"])

    agent("a0")
    procs.wait_for_output("a0", "listening", timeout_s=60)
    agent("a1")
    procs.wait_for_output("a0", "world size 2", timeout_s=120)
    procs.wait_for_output("a0", "STEP 20 ", timeout_s=120)
    killed = len(procs.output("a0"))
    procs.signal("a1", signal.SIGKILL)
    result = procs.wait(timeout_s=180, names=["a0"])["a0"]
    out, after = result.output, result.output[killed:]
    assert result.returncode == 0 and "restart budget exhausted" not in out, out[-3000:]
    # The survivor's worker dies of the broken connection; its agent opens the next round at
    # once (a lost peer), without waiting for a1's lease, and charges nothing.
    assert "a worker lost a peer" in after and "restart 1/0" not in out, after[-3000:]
    gens = [int(g) for g in re.findall(r"round (\d+): node rank", out)]
    assert gens[-1] > gens[0] and "world size 1" in after
    assert "STEP 399 " in after.split("world size 1")[-1]  # the survivor trained to the end


FW_STEPS = os.path.join(os.path.dirname(STEPS), "_fw_steps.py")


@pytest.mark.parametrize("framework", ["horovod", "tensorflow"])
def test_node_death_costs_no_restart_under_horovod_and_tensorflow(procs, tmp_path, framework):
    """The same rule for Horovod (its collective fails on the lost peer: a new round at once)
    and TensorFlow (gRPC waits: the dead node's lease decides), restart path, --max-restarts 0."""
    require("horovod.torch" if framework == "horovod" else "tensorflow")
    endpoint = f"127.0.0.1:{free_port()}"

    def agent(name):
        procs.start(name, [ELASTIC_RUN, "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "0",
                           "--framework", framework, "--rdzv-endpoint", endpoint, "--rdzv-id", "loss",
                           "--rdzv-conf", "last_call_timeout=1,lease_ttl=2,join_timeout=120",
                           FW_STEPS, framework, str(tmp_path / "ckpt")])

    agent("a0")
    procs.wait_for_output("a0", "listening", timeout_s=60)
    agent("a1")
    procs.wait_for_output("a0", "world size 2", timeout_s=180)
    # rank 0 prints the steps: on a0, or on a1 when a slow rejoin put a1 first
    first = "a0" if "node rank 0 of 2" in procs.output("a0") else "a1"
    procs.wait_for_output(first, "STEP ", timeout_s=180, after=len(procs.output(first).split("world size 2")[0]))
    killed = len(procs.output("a0"))
    procs.signal("a1", signal.SIGKILL)
    procs.wait_for_output("a0", "world size 1", timeout_s=120, after=killed)
    resumed = procs.output("a0").index("world size 1", killed)
    procs.wait_for_output("a0", "STEP ", timeout_s=180, after=resumed)  # the survivor trains on
    out = procs.output("a0")
    assert procs["a0"].poll() is None, out[-3000:]
    assert "restart budget exhausted" not in out and "restart 1/0" not in out, out[-3000:]
