"""A node that dies is a membership change, not a failure: it costs no restart."""
import os
import re
import signal
import sys

from services import free_port

ELASTIC_RUN = os.path.join(os.path.dirname(sys.executable), "elastic-run")
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
    procs.signal("a1", signal.SIGKILL)
    result = procs.wait(timeout_s=180, names=["a0"])["a0"]
    out = result.output
    # Usually the survivor's worker dies of the broken connection first ("after losing a
    # peer"); on a loaded machine the lease may expire first. Either way: no restart charged.
    assert "left or died" in out, out[-3000:]
    assert "restart budget exhausted" not in out and result.returncode == 0
    gens = [int(g) for g in re.findall(r"round (\d+): node rank", out)]
    assert gens[-1] > gens[0] and "world size 1" in out.split("left or died")[-1]
    assert "STEP 399 " in out.split("left or died")[-1]  # the survivor trained to the end
