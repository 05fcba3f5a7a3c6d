"""@elastic.run: survivors recover inside their processes (same PIDs) and end where a
fault-free run ends; new workers get their state from peers by broadcast."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from services import free_port

ELASTIC_RUN = os.path.join(os.path.dirname(sys.executable), "elastic-run")
TRAIN = os.path.join(os.path.dirname(__file__), "workers", "inproc_train.py")
STEPS = 40
ARGS = ["--steps", str(STEPS), "--step-delay", "0.02"]


def steps(output):
    return [dict(kv.split("=", 1) for kv in m.group(1).split()) for m in re.finditer(r"STEP (.*)", output)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Final parameters of a fault-free run: one plain process, no launcher at all."""
    out = tmp_path_factory.mktemp("ref") / "params.json"
    res = subprocess.run([sys.executable, TRAIN, "--steps", str(STEPS), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DONE rank=0" in res.stdout and "resets=[]" in res.stdout
    return json.loads(out.read_text())


def assert_same_params(path, reference):
    got = json.loads(open(path).read())
    assert got.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(np.array(got[key]), np.array(reference[key]), rtol=1e-4, atol=1e-5)


def pids_by_rank(records, gen):
    return {r["rank"]: r["pid"] for r in records if r["gen"] == gen}


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_survivors_recover_in_process_after_a_worker_dies_or_hangs(procs, tmp_path, reference, how):
    out = tmp_path / "params.json"
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "3", "--max-restarts", "2", TRAIN, *ARGS, "--out", str(out)])
    procs.wait_for_output("job", "STEP step=12 rank=1", timeout_s=120)
    victim = int(pids_by_rank(steps(procs.output("job")), "1")["1"])
    os.kill(victim, getattr(signal, how))
    out_text = procs.wait(timeout_s=120)["job"].output
    records = steps(out_text)
    before, after = pids_by_rank(records, "1"), pids_by_rank(records, "2")
    assert set(after) == {"0", "1", "2"}, out_text[-3000:]
    survivors = [r for r in ("0", "2")]
    assert all(before[r] == after[r] for r in survivors)  # same processes, recovered in place
    assert after["1"] != str(victim)  # a replacement took the dead rank's place...
    assert min(int(r["step"]) for r in records if r["pid"] == after["1"]) > 1  # ...with the state of its peers
    assert "re-formed in" in out_text and "workers re-formed in place" in out_text
    if how == "SIGSTOP":
        assert "is stopped; killing it" in out_text
    assert out_text.count("DONE") == 3
    assert_same_params(out, reference)


def test_scale_up_two_to_three_in_process(procs, tmp_path, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "params.json"

    def agent(name):
        procs.start(name, [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
                           "--rdzv-id", "grow", "--rdzv-conf", "last_call_timeout=0.5,lease_ttl=2,join_timeout=60",
                           TRAIN, *ARGS, "--out", str(out), "--hold-at-step", "20", "--hold-until-world", "3"])

    agent("a0")
    procs.wait_for_output("a0", "listening", timeout_s=60)
    agent("a1")
    procs.wait_for_output("a0", "STEP step=8 ", timeout_s=120)
    first = {n: steps(procs.output(n))[0]["pid"] for n in ("a0", "a1")}
    agent("a2")
    results = procs.wait(timeout_s=180)
    for name in ("a0", "a1"):
        recs = steps(results[name].output)
        assert {r["pid"] for r in recs} == {first[name]}  # never restarted
        assert recs[-1]["world"] == "3" and "resets=[3]" in results[name].output
    newcomer = steps(results["a2"].output)
    assert newcomer[0]["world"] == "3" and int(newcomer[0]["step"]) > 8  # state came from peers
    assert_same_params(out, reference)


def test_is_recoverable():
    from elastic import MembershipChangedError
    from elastic.recovery import is_recoverable

    assert is_recoverable(MembershipChangedError("x"))
    assert is_recoverable(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert not is_recoverable(ValueError("a bug in train()"))
    assert not is_recoverable(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
