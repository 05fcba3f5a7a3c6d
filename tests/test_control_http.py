"""The agent's HTTP control port: a real ``elastic-run`` job (or a real agent started in this
process with ``launchers.start``) and real requests on loopback sockets.

/healthz, /readyz, /status and /metrics are checked against what is true of the job; a POST
/drain makes the agent exit 75 with its worker gone; a stuck agent loop fails /healthz; the
token rules (required off loopback, Bearer compared in constant time) and every bad request
(one line, a 4xx, never a traceback).
"""
import http.client
import json
import os
import re
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from elastic.control import EXIT_DRAINED, JobController, NodeState
from elastic.control.http import ControlServer, is_loopback
from elastic.errors import ConfigError
from launchers import LaunchConfig, start

from paths import ELASTIC_RUN  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "workers", "control_worker.py")
LISTENING = re.compile(r"control port listening on 127\.0\.0\.1:(\d+)")


def request(port, method, path, token=None, host="127.0.0.1", headers=None):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode("utf-8")
    finally:
        conn.close()


def poll(port, path, want, timeout_s=30.0, **kw):
    """Ask ``path`` until it answers ``want`` (a deadline fails, with the last answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, _, body = request(port, "GET", path, **kw)
        if code == want:
            return body
        assert time.monotonic() < deadline, f"GET {path}: still {code} {body!r} after {timeout_s}s"
        time.sleep(0.05)


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? "
                     r"(-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|NaN|[+-]Inf)$")


def parse_metrics(text):
    """Parse the Prometheus text format strictly: every line a HELP, a TYPE or a well-formed
    sample; every family with exactly one HELP and one TYPE, before its samples; names
    prefixed ``elastic_``. Returns {(name, frozenset(labels)): value} and {name: type}."""
    assert text.endswith("\n")
    helps, types, samples = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps and help_text.strip(), line
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name not in types and kind in ("gauge", "counter"), line
            assert name in helps, f"TYPE before HELP: {line}"
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"malformed sample line {line!r}"
            name, labels, value = m.groups()
            assert name in types and name in helps, f"sample without HELP/TYPE: {line}"
            pairs = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(_LABEL, labels or ""))
            key = (name, frozenset((k, v.strip('"')) for k, v in pairs))
            assert key not in samples, f"duplicate sample {line}"
            samples[key] = float(value)
    assert all(name.startswith("elastic_") for name in types), sorted(types)
    assert set(helps) == set(types)
    return samples, types


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone too
    except OSError:
        return True


def test_endpoints_of_a_running_job_and_a_drain(procs, tmp_path):
    """An ``elastic-run --control-port 0`` job: every endpoint tells the truth about it, bad
    requests are one line, and ``POST /drain`` ends the node with exit 75, its worker gone."""
    procs.start("job", [ELASTIC_RUN, "--standalone", "--nproc-per-node", "1", "--max-restarts", "2",
                        "--control-port", "0", WORKER, "--dir", str(tmp_path)])
    procs.wait_for_output("job", "REPORTED pid=", timeout_s=60)
    port = int(LISTENING.search(procs.output("job")).group(1))
    worker_pid = int(re.search(r"REPORTED pid=(\d+) rank=0 world=1", procs.output("job")).group(1))

    assert request(port, "GET", "/healthz")[::2] == (200, "ok\n")
    assert poll(port, "/readyz", 200) == "ready\n"

    code, headers, body = request(port, "GET", "/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    status = json.loads(body)
    assert (status["state"], status["world_size"], status["num_nodes"]) == ("running", 1, 1)
    assert (status["min_nodes"], status["max_nodes"], status["restarts"], status["max_restarts"]) == (1, 1, 0, 2)
    (node,) = status["nodes"]
    assert node["node_id"] == status["node_id"] and status["agent"] == {"state": "running", "healthy": True}
    assert (node["state"], node["node_rank"], node["worker_pids"]) == ("running", 0, [worker_pid])
    assert (node["last_step"], node["last_checkpoint_step"]) == (25, 20)

    code, headers, body = request(port, "GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples, types = parse_metrics(body)
    assert value(samples, "elastic_world_size") == 1
    assert value(samples, "elastic_nodes") == 1 and value(samples, "elastic_nodes_max") == 1
    assert value(samples, "elastic_generation") == status["generation"] >= 1
    assert value(samples, "elastic_restarts_total") == 0 and value(samples, "elastic_restarts_budget") == 2
    assert value(samples, "elastic_job_state", state="running") == 1
    assert value(samples, "elastic_job_state", state="forming") == 0
    assert value(samples, "elastic_node_state", state="running") == 1
    assert value(samples, "elastic_node_workers") == 1 and value(samples, "elastic_agent_healthy") == 1
    assert (value(samples, "elastic_last_step"), value(samples, "elastic_last_checkpoint_step")) == (25, 20)
    assert value(samples, "elastic_checkpoint_age_steps") == 5
    assert value(samples, "elastic_checkpoint_age_seconds") >= 0
    assert value(samples, "elastic_rendezvous_total") == 1 and value(samples, "elastic_rendezvous_seconds_total") > 0
    assert value(samples, "elastic_events_total", event="round") == 1
    assert not [k for k in samples if k[0] in ("elastic_round_changes_total", "elastic_drains_total")]
    assert types["elastic_restarts_total"] == "counter" and types["elastic_world_size"] == "gauge"

    # Bad requests: a status code and one line, never a traceback.
    bad = [("GET", "/nope", 404), ("POST", "/healthz", 405), ("DELETE", "/status", 405), ("PUT", "/drain", 405),
           ("POST", "/drain?deadline_s=soon", 400), ("POST", "/drain?deadline_s=-1", 400),
           ("POST", "/drain?deadline_s=nan", 400), ("POST", "/drain?reason=stop", 400),
           ("POST", "/drain?reason=preemption&reason=maintenance", 400), ("POST", "/drain?node=x", 400),
           ("GET", "/status?verbose=1", 400)]
    for method, path, want in bad:
        code, _, body = request(port, method, path)
        assert code == want, (method, path, code, body)
        assert body.count("\n") == 1 and "Traceback" not in body, (method, path, body)
    assert request(port, "POST", "/healthz")[1]["Allow"] == "GET, HEAD"
    assert poll(port, "/readyz", 200) == "ready\n"  # none of that drained the node

    code, _, body = request(port, "POST", "/drain?deadline_s=20&reason=preemption")
    assert code == 202, body
    drain = json.loads(body)
    assert (drain["node_id"], drain["reason"], drain["deadline_s"], drain["already_draining"]) == \
        (status["node_id"], "preemption", 20.0, False)
    end = procs.wait(timeout_s=60, names=["job"], check=False)["job"]
    assert end.returncode == EXIT_DRAINED, end.describe()
    assert f"WORKER_TERM pid={worker_pid}" in end.output
    assert pid_gone(worker_pid)
    assert "event drain" in end.output and "reason=preemption" in end.output


@pytest.fixture
def inproc_job(tmp_path):
    """A real one-node job whose agent runs in a thread of this process (``launchers.start``),
    on its own embedded store with a token; ``hook`` receives every event it emits."""
    seen, hooks = [], []

    def on_event(event):
        seen.append(event)
        for hook in hooks:
            hook(event)

    token = uuid.uuid4().hex
    config = LaunchConfig(entrypoint=(WORKER, "--dir", str(tmp_path)), rdzv_backend="embedded",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"http-{uuid.uuid4().hex[:8]}",
                          rdzv_conf={"token": token}, log_dir=str(tmp_path / "logs"), on_event=on_event)
    handle = start(config)
    job = SimpleNamespace(handle=handle, agent=handle._node.agent, token=token, dir=tmp_path, hooks=hooks, events=seen)
    try:
        ctl = JobController(handle._node.store, config.run_id)
        deadline = time.monotonic() + 60
        while True:  # running, and its worker reported its step
            try:
                nodes = ctl.status().nodes
            except Exception:
                nodes = ()
            if nodes and nodes[0].state is NodeState.RUNNING and nodes[0].last_step == 25:
                break
            assert handle.running() and time.monotonic() < deadline, "the in-process job did not start"
            time.sleep(0.05)
        yield job
    finally:
        (tmp_path / "finish").touch()
        handle.wait(timeout_s=60)
        assert not handle.running(), "the in-process agent did not end"


def test_healthz_fails_while_the_agent_loop_is_stuck(inproc_job):
    """The agent loop blocks (in an event hook, after its worker failed): /healthz turns 503
    and says why, /metrics says so too; released, the loop goes on and the agent ends."""
    release, stuck = threading.Event(), threading.Event()

    def block(event):
        if event.name == "failure":
            stuck.set()
            release.wait(60)

    inproc_job.hooks.append(block)
    with ControlServer(inproc_job.agent, "127.0.0.1", 0, stall_s=2.0) as server:
        try:
            assert poll(server.port, "/healthz", 200) == "ok\n"  # polled: a loaded machine may pause the loop
            (inproc_job.dir / "fail").touch()
            assert stuck.wait(30), "the worker's failure never reached the agent loop"
            body = poll(server.port, "/healthz", 503)
            assert body.startswith("agent loop stalled: last pass") and "limit 2s" in body and "\n" not in body[:-1]
            samples, _ = parse_metrics(request(server.port, "GET", "/metrics")[2])
            assert value(samples, "elastic_agent_healthy") == 0
            assert value(samples, "elastic_agent_loop_age_seconds") >= 2
            assert value(samples, "elastic_round_changes_total", cause="worker_failed") == 1
            assert value(samples, "elastic_events_total", event="failure") == 1
        finally:
            release.set()
        assert inproc_job.handle.wait(timeout_s=60) == 1  # --max-restarts 0: the failure ends the job
        assert request(server.port, "GET", "/healthz")[0] == 503  # the agent has ended


def test_token_required_off_loopback_and_checked(inproc_job):
    """Off loopback a token is required (no token: refused before binding anything); with one
    required, every request needs ``Authorization: Bearer <token>``; on loopback none is."""
    agent, token = inproc_job.agent, inproc_job.token
    for host in ("0.0.0.0", "", "::"):
        with pytest.raises(ConfigError, match="needs the job's token"):
            ControlServer(agent, host, 0)
    with pytest.raises(ConfigError, match="needs the job's token"):
        ControlServer(agent, "127.0.0.1", 0, require_token=True)
    assert ControlServer(agent, "0.0.0.0", 0, token=token).require_token  # constructed, never bound
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")

    with ControlServer(agent, "127.0.0.1", 0, token=token, require_token=True) as server:
        for path in ("/healthz", "/status", "/metrics", "/nope", "/drain"):
            for tok in (None, "wrong", token + "x", token[:-1], ""):
                code, headers, body = request(server.port, "POST" if path == "/drain" else "GET", path, token=tok)
                assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (path, tok, code, body)
        code, _, body = request(server.port, "GET", "/healthz", headers={"Authorization": f"Basic {token}"})
        assert code == 401
        assert request(server.port, "GET", "/healthz", token=token)[::2] == (200, "ok\n")
        assert request(server.port, "GET", "/nope", token=token)[0] == 404
        status = json.loads(request(server.port, "GET", "/status", token=token)[2])
        assert status["node_id"] == agent.handler.node.node_id and status["world_size"] == 1

    # On loopback (127.0.0.2 is loopback too) a token is not asked for.
    with ControlServer(agent, "127.0.0.2", 0, token=token) as server:
        assert not server.require_token
        assert request(server.port, "GET", "/readyz", host="127.0.0.2")[::2] == (200, "ready\n")
    # After stop() nothing listens there any more.
    with pytest.raises(OSError):
        request(server.port, "GET", "/healthz", host="127.0.0.2")
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        return  # no IPv6 here
    with ControlServer(agent, "::1", 0, token=token) as server:  # IPv6 loopback: no token either
        assert not server.require_token and server.url == f"http://[::1]:{server.port}"
        assert request(server.port, "GET", "/healthz", host="::1")[::2] == (200, "ok\n")


def test_cli_refuses_a_control_port_off_loopback_without_a_token(procs, tmp_path):
    """``--control-host 0.0.0.0`` on a job without a token: one line, exit 2, nothing served."""
    from services import free_port

    no_token = {"ELASTIC_RDZV_TOKEN": "", "ELASTIC_RDZV_TOKEN_FILE": ""}
    procs.start("job", [ELASTIC_RUN, "--nnodes", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                        "--rdzv-id", "offloop", "--control-host", "0.0.0.0", "--control-port", "0",
                        WORKER, "--dir", str(tmp_path)], env=no_token)
    end = procs.wait(timeout_s=60, names=["job"], check=False)["job"]
    assert end.returncode == 2, end.describe()
    lines = [line for line in end.output.splitlines() if "needs the job's token" in line]
    assert len(lines) == 1 and "Traceback" not in end.output, end.output
    assert "control port listening" not in end.output and "REPORTED" not in end.output


def test_a_drain_over_http_is_counted_and_ends_the_node(inproc_job):
    """POST /drain without a deadline: the agent exits 75; its /metrics count the drain (by
    reason) and the round change it caused, its probes then fail, a second drain is refused."""
    with ControlServer(inproc_job.agent, "127.0.0.1", 0) as server:
        code, _, body = request(server.port, "POST", "/drain?reason=scale_down")
        assert code == 202, body
        drain = json.loads(body)
        assert (drain["reason"], drain["deadline_s"], drain["deadline"]) == ("scale_down", None, None)
        assert inproc_job.handle.wait(timeout_s=60) == EXIT_DRAINED
        samples, _ = parse_metrics(request(server.port, "GET", "/metrics")[2])
        assert value(samples, "elastic_drains_total", reason="scale_down") == 1
        assert value(samples, "elastic_round_changes_total", cause="drain") == 1
        assert value(samples, "elastic_events_total", event="drained") == 1
        assert value(samples, "elastic_node_state", state="drained") == 1
        assert value(samples, "elastic_node_state", state="running") == 0
        assert value(samples, "elastic_node_workers") == 0
        assert request(server.port, "GET", "/healthz")[::2] == (503, "agent has ended (node drained)\n")
        assert request(server.port, "GET", "/readyz")[::2] == (503, "not ready: node drained\n")
        code, _, body = request(server.port, "POST", "/drain")
        assert code == 409 and body.count("\n") == 1 and "has ended (drained)" in body
        assert [e.name for e in inproc_job.events].count("drain") == 1
