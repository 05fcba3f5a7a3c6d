"""@elastic.run: survivors recover inside their processes (same PIDs) and end where a
fault-free run ends; new workers get their state from peers by broadcast."""
import os
import re
import signal

import numpy as np
import pytest

from inproc_checks import STEPS, assert_same_params, steps
from needs import needs
from services import free_port

from paths import ELASTIC_RUN  # noqa: E402
TRAIN = os.path.join(os.path.dirname(__file__), "workers", "inproc_train.py")
HVD_TRAIN = os.path.join(os.path.dirname(__file__), "workers", "inproc_hvd_train.py")
SAMPLER = os.path.join(os.path.dirname(__file__), "workers", "inproc_sampler.py")
ARGS = ["--steps", str(STEPS), "--step-delay", "0.02"]


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


@needs("horovod.torch", why="Horovod built by make setup")
def test_horovod_survivors_recover_in_process_after_a_kill(procs, tmp_path, reference):
    """The same kill under --framework horovod: survivors hvd.shutdown()/hvd.init() in place."""
    out = tmp_path / "params.json"
    procs.start("job", [ELASTIC_RUN, "--framework", "horovod", "--nproc-per-node", "3", "--max-restarts", "2",
                        HVD_TRAIN, *ARGS, "--out", str(out)])
    procs.wait_for_output("job", "STEP step=12 rank=1", timeout_s=120)
    victim = int(pids_by_rank(steps(procs.output("job")), "1")["1"])
    os.kill(victim, signal.SIGKILL)
    out_text = procs.wait(timeout_s=120)["job"].output
    records = steps(out_text)
    before, after = pids_by_rank(records, "1"), pids_by_rank(records, "2")
    assert set(after) == {"0", "1", "2"}, out_text[-3000:]
    assert before["0"] == after["0"] and before["2"] == after["2"]  # same processes
    assert after["1"] != str(victim)
    assert min(int(r["step"]) for r in records if r["pid"] == after["1"]) > 1  # state from its peers
    # the survivors' Horovod collectives failed (the peer closed its connections)...
    assert re.search(r"rank [02]: .*(Horovod|Connection closed by peer|Connection reset by peer).*; recovering "
                     r"in process", out_text), out_text[-3000:]
    assert "re-formed in" in out_text and "workers re-formed in place" in out_text  # ...recovered in place
    assert out_text.count("DONE") == 3
    assert all(f"pid={before[r]} resets=[3" in out_text for r in ("0", "2"))  # reset callbacks ran
    assert_same_params(out, reference)


def batches(output):
    return [dict(kv.split("=", 1) for kv in m.group(1).split()) for m in re.finditer(r"BATCH (.*)", output)]


def test_sampler_position_survives_a_kill_exactly_once(procs, tmp_path):
    """An ElasticDataLoader in the TorchState: across a SIGKILL and in-process recovery every
    sample of the epoch is trained on exactly once (rolled-back steps are redone, not skipped)."""
    import dataload

    n, world, batch = 120, 3, 2
    data = tmp_path / "ds"
    dataload.write_shards({"id": np.arange(n, dtype=np.int64),
                           "x": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)},
                          str(data), samples_per_shard=16)
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", str(world), "--max-restarts", "2", SAMPLER, str(data),
                        "--batch-size", str(batch), "--step-delay", "0.05"])
    procs.wait_for_output("job", "BATCH gen=1 step=6 rank=1", timeout_s=120)
    victim = int(next(r["pid"] for r in batches(procs.output("job")) if r["rank"] == "1"))
    os.kill(victim, signal.SIGKILL)
    out_text = procs.wait(timeout_s=120)["job"].output
    records = batches(out_text)
    assert "1" in {r["gen"] for r in records} and "2" in {r["gen"] for r in records}, out_text[-3000:]
    assert out_text.count("DONE") == world and out_text.count("epoch=1") == world
    # Per step, the newest generation that ran it is the one whose update was kept.
    newest = {}
    for r in records:
        newest[int(r["step"])] = max(newest.get(int(r["step"]), 0), int(r["gen"]))
    kept = [r for r in records if int(r["gen"]) == newest[int(r["step"])]]
    assert sorted(newest) == list(range(1, n // (world * batch) + 1))
    for step in newest:
        assert sorted(r["rank"] for r in kept if int(r["step"]) == step) == ["0", "1", "2"], step
    seen = sorted(int(i) for r in kept for i in r["ids"].split(","))
    assert seen == list(range(n))  # each sample exactly once: none replayed, none skipped
    assert min(s for s, g in newest.items() if g > 1) > 1, out_text[-6000:]  # resumed mid-epoch
    survivors = {r["rank"]: r["pid"] for r in records if r["gen"] == "1" and r["rank"] != "1"}
    assert all(r["pid"] == survivors[r["rank"]] for r in records if r["gen"] == "2" and r["rank"] != "1")


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
    import torch.distributed as dist

    from elastic import MembershipChangedError
    from elastic.recovery import is_recoverable

    assert is_recoverable(MembershipChangedError("x"))
    assert is_recoverable(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29586"))
    assert is_recoverable(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:17055: "
                                       "Connection reset by peer. This is typically caused by a remote worker"))
    assert is_recoverable(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
                                       "for recv operation to complete"))
    assert is_recoverable(dist.DistNetworkError("failed to recv, got 0 bytes"))
    assert is_recoverable(dist.DistBackendError("NCCL communicator was aborted on rank 1"))
    assert is_recoverable(dist.DistStoreError("Timed out after 61 seconds waiting for clients. 2/3 clients joined."))
    # bugs, even when they name the transport: raised at once, no new round awaited
    assert not is_recoverable(ValueError("a bug in train()"))
    assert not is_recoverable(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_recoverable(RuntimeError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)"))
    assert not is_recoverable(dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1, invalid usage"))
    assert not is_recoverable(RuntimeError("[enforce fail at gloo/transport/tcp/pair.cc:456] op.preamble.length "
                                           "<= op.nbytes. 8 vs 4. Received data size doesn't match expected size."))
    assert not is_recoverable(RuntimeError("gloo socket error in a user op"))  # "gloo", "socket" alone: a bug
    assert not is_recoverable(dist.DistStoreError("key 'x' not found"))


@pytest.mark.parametrize("bug", ["size", "op"])
def test_a_collective_bug_fails_the_job_instead_of_waiting_for_a_round(procs, bug):
    """Real Gloo mismatches under @elastic.run with --max-restarts 0: a size mismatch aborts
    one rank (its failure is charged), an op mismatch times both ranks out with nobody lost
    (the round that comes back with every node is charged). Either way the job ends with the
    documented failure, well before the 300 s a wait for a new round would take."""
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "0",
                        os.path.join(os.path.dirname(TRAIN), "inproc_bug.py"), "--bug", bug])
    result = procs.wait(timeout_s=90, check=False)["job"]
    out = result.output
    assert result.returncode == 1, out[-3000:]
    assert "restart budget exhausted (0 restarts)" in out and "DONE" not in out
    if bug == "size":
        assert "collective mismatch" in out  # Gloo's own words, from the aborted rank
    else:
        assert "no node was lost" in out


@needs("horovod.torch", why="Horovod built by make setup")
def test_horovod_errors_are_recoverable():
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

    from elastic.recovery import is_recoverable

    assert is_recoverable(HorovodInternalError("Horovod has been shut down. This was caused by an exception"))
    assert is_recoverable(HostsUpdatedInterrupt(False))
    assert not is_recoverable(HorovodInternalError("Mismatched allreduce tensor shapes: [3] vs [4]"))



def test_a_round_that_breaks_while_it_forms_is_left_at_once(procs, tmp_path):
    """A worker starts for a round whose rank-0 node (the host of that round's TCPStore) dies
    before the worker reaches init: it must move on to the next round as soon as it opens,
    not retry the dead TCPStore for @elastic.run's whole timeout_s (600 s here; the harness's
    deadline is far below it)."""
    port = free_port()
    procs.start("rdzv", [os.path.join(os.path.dirname(ELASTIC_RUN), "elastic-rendezvous"), "serve",
                         "--host", "127.0.0.1", "--port", str(port)])
    procs.wait_for_output("rdzv", "listening", timeout_s=60)

    def agent(name, *extra):
        procs.start(name, [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1",
                           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "broken", "--rdzv-conf",
                           "is_host=false,last_call_timeout=0.5,lease_ttl=2,join_timeout=60",
                           "--max-restarts", "0", TRAIN, *ARGS, "--timeout-s", "600", "--hold-at-step", "10",
                           "--hold-until-world", "3", *extra])

    agent("a0")
    agent("a1")
    procs.wait_for_output("a0", "STEP step=10 ", timeout_s=120)  # held there until the job grows
    agent("a2", "--stall-before-init", "8")
    procs.wait_for_output("a2", "STALL", timeout_s=120)  # a2's worker, started for the round of 3
    procs.signal("a0", signal.SIGKILL, group=True)  # rank 0 dies: that round's TCPStore is gone
    results = procs.wait(timeout_s=150, names=["a1", "a2"])
    for name in ("a1", "a2"):
        out = results[name].output
        recs = steps(out)
        assert len({r["pid"] for r in recs}) == 1, out[-3000:]  # in place, never restarted
        assert recs[-1]["world"] == "2" and int(recs[-1]["step"]) == STEPS, out[-3000:]
    a2 = results["a2"].output
    assert "changed while it formed" in a2 and a2.count("started 1 worker(s)") == 1, a2[-3000:]
