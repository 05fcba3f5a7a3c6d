"""elastic-run end to end: real agents, real worker processes, the real embedded server.

Each agent is a separate `elastic-run` process; "nodes" are agents on this machine.
"""
import os
import re
import signal
import socket
import time

import pytest

from elastic.control import EXIT_DRAINED
from services import free_port

from paths import ELASTIC_RUN, REPO  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "workers", "rank_info.py")
FAST = "last_call_timeout=0.5,lease_ttl=2,join_timeout=60"


def agent_argv(endpoint, *flags, nnodes="2", nproc=1, conf=FAST, run_id="job", mode="exit", backend="embedded"):
    return [ELASTIC_RUN, "--nnodes", nnodes, "--nproc-per-node", str(nproc), "--rdzv-backend", backend,
            "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", conf, *flags,
            WORKER, "--mode", mode]


def workers(output):
    """Parse the WORKER lines of an agent's output into dicts."""
    return [dict(kv.split("=", 1) for kv in m.group(1).split())
            for m in re.finditer(r"WORKER (.*)", output)]


def wait_gone(pid, timeout_s):
    """Whether ``pid`` ended (gone, or a zombie nobody has reaped yet) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_standalone_ddp_example_trains_to_accuracy(procs):
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", os.path.join(REPO, "examples", "torch_ddp.py"),
                        "--epochs", "6"])
    out = procs.wait(timeout_s=180)["job"].output
    acc = float(re.search(r"final test accuracy ([0-9.]+)", out).group(1))
    assert acc >= 0.9, out[-3000:]
    assert "world size 2" in out


def test_round_forms_at_max_without_waiting_for_last_call(procs):
    endpoint = f"127.0.0.1:{free_port()}"
    conf = "last_call_timeout=600,lease_ttl=2,join_timeout=120"
    for i in range(3):
        procs.start(f"a{i}", agent_argv(endpoint, nnodes="2:3", nproc=2, conf=conf))
    # A 600 s last call cannot have passed: the round must close at MAX (3 nodes).
    results = procs.wait(timeout_s=90)
    seen = [w for r in results.values() for w in workers(r.output)]
    assert sorted(int(w["rank"]) for w in seen) == list(range(6))
    assert {w["world"] for w in seen} == {"6"} and {w["nodes"] for w in seen} == {"3"}
    assert {w["gen"] for w in seen} == {"1"}
    assert len({w["master"] for w in seen}) == 1
    by_node = {}
    for w in seen:
        by_node.setdefault(w["node_rank"], set()).add(int(w["rank"]))
    assert by_node == {"0": {0, 1}, "1": {2, 3}, "2": {4, 5}}


def test_round_forms_at_min_after_last_call(procs):
    endpoint = f"127.0.0.1:{free_port()}"
    for i in range(2):
        procs.start(f"a{i}", agent_argv(endpoint, nnodes="2:4"))
    results = procs.wait(timeout_s=90)
    seen = [w for r in results.values() for w in workers(r.output)]
    assert sorted(w["rank"] for w in seen) == ["0", "1"] and {w["world"] for w in seen} == {"2"}


def test_scale_up_when_an_agent_joins_mid_run(procs, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    for i in range(2):
        procs.start(f"a{i}", agent_argv(endpoint, nnodes="2:3", mode="wait"))
    for i in range(2):
        procs.wait_for_output(f"a{i}", "world=2 ", timeout_s=60)
    procs.start("a2", agent_argv(endpoint, nnodes="2:3", mode="wait"))
    for i in range(3):
        procs.wait_for_output(f"a{i}", "world=3 ", timeout_s=60)
    (tmp_path / "finish").write_text("")
    results = procs.wait(timeout_s=60)
    last = {name: workers(r.output)[-1] for name, r in results.items()}
    assert {w["world"] for w in last.values()} == {"3"}
    assert len({w["gen"] for w in last.values()}) == 1 and int(last["a0"]["gen"]) >= 2
    # survivors keep their ranks, the newcomer is appended
    assert last["a2"]["rank"] == "2"
    first = {name: workers(results[name].output)[0]["rank"] for name in ("a0", "a1")}
    assert {last[n]["rank"] for n in ("a0", "a1")} == {"0", "1"}
    assert all(last[n]["rank"] == first[n] for n in ("a0", "a1"))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_scale_down_when_an_agent_dies_or_leaves(procs, tmp_path, how):
    endpoint = f"127.0.0.1:{free_port()}"
    # a0 starts first and hosts the rendezvous server; a2 is the one that goes away.
    procs.start("a0", agent_argv(endpoint, nnodes="2:3", mode="wait"))
    procs.wait_for_output("a0", "listening", timeout_s=30)
    for i in (1, 2):
        procs.start(f"a{i}", agent_argv(endpoint, nnodes="2:3", mode="wait"))
    for i in range(3):
        procs.wait_for_output(f"a{i}", "world=3 ", timeout_s=60)
    worker_pid = int(workers(procs.output("a2"))[-1]["pid"])
    seen = {i: len(procs.output(f"a{i}")) for i in range(2)}  # a first round may have had 2
    procs.signal("a2", getattr(signal, how))
    for i in range(2):
        procs.wait_for_output(f"a{i}", "world=2 ", timeout_s=60, after=seen[i])
    gone = procs.wait(timeout_s=30, names=["a2"], check=False)["a2"]
    if how == "SIGKILL":
        assert gone.signal == signal.SIGKILL
    else:  # SIGTERM drains the node: its workers stop, it leaves, its agent says "drained"
        assert gone.returncode == EXIT_DRAINED
    assert wait_gone(worker_pid, timeout_s=30)  # the dead node's worker died with it
    (tmp_path / "finish").write_text("")
    results = procs.wait(timeout_s=60, names=["a0", "a1"])
    assert {workers(r.output)[-1]["world"] for r in results.values()} == {"2"}
    if how == "SIGTERM":  # a clean leave is noticed at once, not after the lease expires
        assert "left or died" in results["a0"].output + results["a1"].output


def test_worker_crash_is_restarted_within_the_budget(procs):
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "1", WORKER, "--mode", "crash-once"])
    out = procs.wait(timeout_s=60)["job"].output
    seen = workers(out)
    assert [w["restart"] for w in seen if w["rank"] == "1"] == ["0", "1"]
    assert "crash on the first attempt" in out


def test_exhausted_budget_fails_the_job_with_a_summary(procs):
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--max-restarts", "2", WORKER, "--mode", "fail"])
    result = procs.wait(timeout_s=60, check=False)["job"]
    assert result.returncode == 1
    summary = result.output[result.output.index("restart budget exhausted"):]
    assert "(2 restarts)" in summary
    assert re.search(r"first failure: rank 1 \(local rank 1, pid \d+\) exited with code 1", summary)
    assert 'raise ValueError("boom")' in summary and "ValueError: boom" in summary
    assert len([w for w in workers(result.output) if w["rank"] == "1"]) == 3  # first run + 2 restarts


def test_static_node_ranks(procs):
    port = free_port()
    for rank in (1, 0):
        procs.start(f"n{rank}", [ELASTIC_RUN, "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(rank),
                                 "--master-addr", "127.0.0.1", "--master-port", str(port), WORKER])
    results = procs.wait(timeout_s=60)
    for rank in (0, 1):
        assert {w["node_rank"] for w in workers(results[f"n{rank}"].output)} == {str(rank)}
        assert sorted(w["rank"] for w in workers(results[f"n{rank}"].output)) == [str(2 * rank), str(2 * rank + 1)]


def test_pet_environment_variables_are_read(procs):
    procs.start("job", [ELASTIC_RUN, WORKER], env={"PET_NPROC_PER_NODE": "3", "PET_RDZV_ID": "kubeflow-job"})
    seen = workers(procs.wait(timeout_s=60)["job"].output)
    assert sorted(w["rank"] for w in seen) == ["0", "1", "2"]
    assert {w["run"] for w in seen} == {"kubeflow-job"}


def test_log_dir_keeps_per_rank_logs(procs, tmp_path):
    log_dir = tmp_path / "logs"
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--rdzv-id", "logged", "--log-dir", str(log_dir),
                        "--redirects", "3", WORKER])
    out = procs.wait(timeout_s=60)["job"].output
    assert "WORKER" not in out  # redirected without --tee: worker output goes to the files only
    for local_rank in (0, 1):
        text = (log_dir / "logged" / "attempt_1" / str(local_rank) / "stdout.log").read_text()
        assert f"local_rank={local_rank}" in text


def test_etcd_backend_forms_a_round(procs, etcd_server):
    run_id = f"etcd-{free_port()}"
    for i in range(2):
        procs.start(f"e{i}", agent_argv(etcd_server.endpoint, nproc=2, backend="etcd", run_id=run_id))
    results = procs.wait(timeout_s=90)
    seen = [w for r in results.values() for w in workers(r.output)]
    assert sorted(w["rank"] for w in seen) == ["0", "1", "2", "3"] and {w["world"] for w in seen} == {"4"}


def test_garbage_to_the_server_does_not_disturb_a_running_job(procs, tmp_path):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    for i in range(2):
        procs.start(f"a{i}", agent_argv(endpoint, mode="wait"))
    for i in range(2):
        procs.wait_for_output(f"a{i}", "world=2 ", timeout_s=60)
    for payload in (b"\xff" * 64, b"\x7f\xff\xff\xffjunk", b"GET / HTTP/1.1\r\n\r\n", b"\x00\x00\x00\x05{bad}"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
    half_open = socket.create_connection(("127.0.0.1", port), timeout=5)  # says nothing at all
    try:
        (tmp_path / "finish").write_text("")
        results = procs.wait(timeout_s=60)
    finally:
        half_open.close()
    assert all(workers(r.output)[-1]["gen"] == "1" for r in results.values())  # no spurious new round
