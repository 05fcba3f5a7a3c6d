"""The control plane end to end: real agents on one embedded endpoint, a JobController in this
process, and a simulated kubelet / scheduler taking nodes away, scaling, stopping.

Every node is an ``elastic-run`` process; a0 hosts the rendezvous server, so the node a
scheduler takes away is never a0 (README: a job that must survive losing any node runs its
store apart, ``elastic-rendezvous`` or etcd).
"""
import json
import os
import re
import signal
import threading

import pytest

from elastic.control import EXIT_DRAINED, JobController, JobState, NodeState
from services import free_port

from paths import ELASTIC_RUN  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "workers", "control_train.py")
FAST = "last_call_timeout=0.5,lease_ttl=3,join_timeout=60"


def agent(endpoint, *worker_args, nnodes="2:3", run_id="job", flags=()):
    return [ELASTIC_RUN, "--nnodes", nnodes, "--nproc-per-node", "1", "--max-restarts", "0",
            "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", FAST, *flags,
            WORKER, *worker_args]


def steps(output):
    return [{k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
            for m in re.finditer(r"STEP (step=\d+ rank=\d+ world=\d+ pid=\d+)", output)]


def saved(output):
    return [dict(kv.split("=") for kv in m.group(1).split()) for m in re.finditer(r"SAVED (.*)", output)]


def start_job(procs, n, *worker_args, nnodes="2:3", flags=()):
    endpoint = f"127.0.0.1:{free_port()}"
    procs.start("a0", agent(endpoint, *worker_args, nnodes=nnodes, flags=flags))
    procs.wait_for_output("a0", "listening", timeout_s=30)
    for i in range(1, n):
        procs.start(f"a{i}", agent(endpoint, *worker_args, nnodes=nnodes, flags=flags))
    for i in range(n):
        procs.wait_for_output(f"a{i}", f"world={n} ", timeout_s=90)
    return endpoint, JobController.connect(endpoint, run_id="job")


def node_of(ctl, procs, name):
    """The node status of agent ``name`` (matched by its worker's pid)."""
    pid = steps(procs.output(name))[-1]["pid"]
    return next(n for n in ctl.status().nodes if pid in n.worker_pids)


def highest_rank_agent(ctl, procs, names):
    """Which of ``names`` runs the node of the highest node rank (the one a scale-down drains)."""
    ranked = {node_of(ctl, procs, n).node_rank: n for n in names}
    return ranked[max(ranked)]


def test_a_kubelet_takes_a_node_away_and_no_step_is_lost(procs, tmp_path):
    """preStop (the drain), SIGTERM, SIGKILL after the grace: the job goes on at 2 nodes with
    --max-restarts 0, survivors keep their PIDs, the drained node saved the last step it
    completed and the survivors go on from exactly there; its agent says "drained"."""
    endpoint, ctl = start_job(procs, 3)
    with ctl:
        for name in ("a0", "a1", "a2"):  # commit 1 reported its step (synchronously) before step 5 ran
            procs.wait_for_output(name, "step=5 ", timeout_s=30)
        status = ctl.status()
        assert (status.state, status.num_nodes, status.world_size, status.restarts) == (JobState.RUNNING, 3, 3, 0)
        assert (status.min_nodes, status.max_nodes, status.desired_nodes) == (2, 3, None)
        assert all(n.last_step >= 1 and n.state is NodeState.RUNNING for n in status.nodes)
        assert sorted(n.node_rank for n in status.nodes) == [0, 1, 2]
        victim = node_of(ctl, procs, "a2")
        assert victim.state is NodeState.RUNNING and victim.node_rank is not None and victim.lease_age_s < 10
        first_pids = {name: steps(procs.output(name))[0]["pid"] for name in ("a0", "a1")}
        seen = {name: len(procs.output(name)) for name in ("a0", "a1")}
        ctl.drain(victim.node_id, deadline_s=20, reason="preemption")  # the preStop hook
        procs.signal("a2", signal.SIGTERM)  # then the kubelet's SIGTERM
        gone = procs.wait(timeout_s=30, names=["a2"], check=False)["a2"]  # SIGKILL after the grace
        assert gone.returncode == EXIT_DRAINED, gone.describe()
        for name in ("a0", "a1"):
            procs.wait_for_output(name, "world=2 ", timeout_s=60, after=seen[name])
        last_done = max(s["step"] for s in steps(procs.output("a2")))
        (save,) = saved(procs.output("a2"))
        assert (int(save["step"]), save["reason"]) == (last_done, "drain")
        for name in ("a0", "a1"):
            after = [s for s in steps(procs.output(name)[seen[name]:]) if s["world"] == 2]
            assert after[0]["step"] == last_done + 1  # resumed at the drained node's last step
            assert {s["pid"] for s in steps(procs.output(name))} == {first_pids[name]}
        status = ctl.wait_for(num_nodes=2, timeout_s=30)
        assert status.restarts == 0 and victim.node_id not in {n.node_id for n in status.nodes}
        names = [(e.name, e.node) for e in ctl.events()]
        assert ("drain", victim.node_id) in names and ("drained", victim.node_id) in names
        rounds = [e for e in ctl.events() if e.name == "round"]
        assert [e.details["world_size"] for e in rounds][-1] == 2
        (tmp_path / "finish").write_text("")
        results = procs.wait(timeout_s=60, names=["a0", "a1"])
        assert all(r.returncode == 0 for r in results.values())


def test_scale_down_and_up_and_the_range_under_elastic_run(procs, tmp_path):
    endpoint, ctl = start_job(procs, 3, nnodes="1:3")
    with ctl:
        with pytest.raises(Exception, match="range is 1:3"):
            ctl.scale(4)
        last = highest_rank_agent(ctl, procs, ["a1", "a2"])
        status = ctl.scale(2, wait=True, timeout_s=60)
        assert (status.num_nodes, status.desired_nodes, status.restarts) == (2, 2, 0)
        assert procs.wait(timeout_s=30, names=[last], check=False)[last].returncode == EXIT_DRAINED
        kept = [n for n in ("a0", "a1", "a2") if n != last]
        ctl.scale(3)  # a new node is let in at once, without a last call
        procs.start("a3", agent(endpoint, nnodes="1:3"))
        status = ctl.wait_for(num_nodes=3, timeout_s=60)
        assert status.world_size == 3 and status.restarts == 0
        status = ctl.set_range(1, 2)  # the highest node rank drains to fit the new range
        status = ctl.wait_for(num_nodes=2, timeout_s=60)
        assert (status.min_nodes, status.max_nodes) == (1, 2)
        assert all(len({s["pid"] for s in steps(procs.output(n))}) == 1 for n in kept)  # never restarted
        assert ctl.status().restarts == 0
        (tmp_path / "finish").write_text("")
        procs.wait(timeout_s=90, names=["a0"])  # a round broken while forming costs up to timeout_s


def test_scale_down_on_the_restart_path(procs, tmp_path):
    """A plain script: the drained node's worker gets SIGTERM (after the drain is published)
    and saves; the others restart from their checkpoint, without spending the budget."""
    endpoint, ctl = start_job(procs, 3, "--plain", nnodes="1:3")
    with ctl:
        last = highest_rank_agent(ctl, procs, ["a1", "a2"])
        status = ctl.scale(2, wait=True, timeout_s=60)
        assert (status.num_nodes, status.restarts) == (2, 0)
        gone = procs.wait(timeout_s=30, names=[last], check=False)[last]
        assert gone.returncode == EXIT_DRAINED, gone.describe()
        assert [s["reason"] for s in saved(procs.output(last))] in (["sigterm"], ["poll"])
        ctl.scale(3)
        procs.start("a3", agent(endpoint, "--plain", nnodes="1:3"))
        assert ctl.wait_for(num_nodes=3, timeout_s=60).restarts == 0
        ctl.set_range(1, 2)  # the highest node rank drains to fit
        status = ctl.wait_for(num_nodes=2, timeout_s=60)
        assert (status.min_nodes, status.max_nodes, status.restarts) == (1, 2, 0)
        (tmp_path / "finish").write_text("")
        codes = {n: r.returncode for n, r in procs.wait(timeout_s=90, check=False).items()}
        assert sorted(codes.values()) == [0, 0, EXIT_DRAINED, EXIT_DRAINED], codes


def test_stop_ends_every_node_with_a_final_save_and_exit_0(procs):
    endpoint, ctl = start_job(procs, 2, nnodes="2")
    with ctl:
        ctl.stop()
        results = procs.wait(timeout_s=60, names=["a0", "a1"], check=False)
        assert {n: r.returncode for n, r in results.items()} == {"a0": 0, "a1": 0}
    final = [saved(results[n].output) for n in ("a0", "a1")]
    assert all(len(s) == 1 and s[0]["reason"] == "drain" for s in final)
    assert final[0][0]["step"] == final[1][0]["step"]  # both at the same commit


def test_a_deadline_shorter_than_a_step(procs, tmp_path):
    """A step takes 4 s, the deadline is 0.5 s: the node leaves at the deadline (killed) and the
    job goes on at 2 nodes, with --max-restarts 0."""
    endpoint, ctl = start_job(procs, 3, "--step-s", "4")
    with ctl:
        victim = node_of(ctl, procs, "a2")
        seen = {name: len(procs.output(name)) for name in ("a0", "a1")}
        ctl.drain(victim.node_id, deadline_s=0.5)
        gone = procs.wait(timeout_s=30, names=["a2"], check=False)["a2"]
        assert gone.returncode == EXIT_DRAINED
        for name in ("a0", "a1"):
            procs.wait_for_output(name, "world=2 ", timeout_s=60, after=seen[name])
        assert ctl.status().restarts == 0
        (tmp_path / "finish").write_text("")
        procs.wait(timeout_s=60, names=["a0", "a1"])


def test_bad_requests_are_one_line_user_errors(procs):
    from elastic.errors import UserError

    endpoint, ctl = start_job(procs, 2, nnodes="2:3")
    with ctl:
        with pytest.raises(UserError, match="no node 'nope'"):
            ctl.drain("nope")
        with pytest.raises(UserError, match="drain reason 'lunch'"):
            ctl.drain(ctl.status().nodes[0].node_id, reason="lunch")
        with pytest.raises(UserError, match="invalid node range 3:2"):
            ctl.set_range(3, 2)
    with JobController.connect(endpoint, run_id="other-job") as other:
        with pytest.raises(UserError, match="no job 'other-job'"):
            other.status()


def test_start_from_a_non_main_thread(tmp_path, monkeypatch):
    """As a Ray actor or an operator's thread would: no signal handlers, a handle to steer it."""
    from launchers import LaunchConfig, start

    monkeypatch.chdir(tmp_path)
    config = LaunchConfig(entrypoint=(WORKER, "--steps", "40", "--step-s", "0.02"), rdzv_backend="embedded",
                          rdzv_endpoint=f"127.0.0.1:{free_port()}", run_id="threaded",
                          rdzv_conf={"last_call_timeout": "0.2"}, on_event=lambda e: seen.append(e))
    out, seen = {}, []

    def operator():
        handle = start(config)
        status = handle.controller.wait_for(num_nodes=1, timeout_s=60)
        out["status"] = status
        out["code"] = handle.wait(timeout_s=120)
        out["node"] = handle.node_id

    t = threading.Thread(target=operator)
    t.start()
    t.join(150)
    assert not t.is_alive()
    assert out["code"] == 0
    assert out["status"].world_size == 1 and out["status"].nodes[0].node_id == out["node"]
    assert json.dumps(out["status"].to_json())  # the record serialises as /status serves it
    names = [e.name for e in seen]  # the on_event hook saw this node's events, in order
    assert names[0] == "join" and "round" in names and names[-1] == "succeeded"
    assert all(e.node == out["node"] for e in seen)
