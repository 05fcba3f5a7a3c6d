"""A user's mistake gets one clear line on stderr and a non-zero exit, never a traceback."""
import os
import subprocess
import sys

import pytest

from services import free_port

ELASTIC_RUN = os.path.join(os.path.dirname(sys.executable), "elastic-run")
WORKER = os.path.join(os.path.dirname(__file__), "workers", "rank_info.py")


def run(*argv, timeout=60, env=None):
    return subprocess.run([ELASTIC_RUN, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(res, *fragments):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("elastic-run: error:")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("nnodes, message", [
    ("3:1", "MIN (3) is greater than MAX (1)"),
    ("0", "at least 1"),
    ("abc", "expected N or MIN:MAX"),
    ("1:2:3", "expected N or MIN:MAX"),
])
def test_invalid_nnodes(nnodes, message):
    assert_one_line_error(run("--nnodes", nnodes, WORKER), f"--nnodes {nnodes!r}", message)


def test_missing_script():
    assert_one_line_error(run("/no/such/train.py"), "training script '/no/such/train.py' not found")


def test_bad_nproc_and_conf():
    assert_one_line_error(run("--nproc-per-node", "two", WORKER), "--nproc-per-node 'two'")
    assert_one_line_error(run("--nproc-per-node", "0", WORKER), "at least 1")
    assert_one_line_error(run("--rdzv-endpoint", "127.0.0.1:1", "--rdzv-conf", "bogus=1", WORKER), "unknown key")
    assert_one_line_error(run("--rdzv-backend", "zookeeper", WORKER), "--rdzv-backend 'zookeeper'")


def test_unreachable_endpoint():
    port = free_port()  # nothing listens there, and is_host=false forbids hosting it
    res = run("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "is_host=false,timeout_s=2",
              WORKER)
    assert_one_line_error(res, f"127.0.0.1:{port}")


def test_wrong_token_is_rejected(procs):
    port = free_port()
    procs.start("host", [ELASTIC_RUN, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                         "--rdzv-conf", "token=right-secret,join_timeout=60", WORKER])
    procs.wait_for_output("host", "listening", timeout_s=30)
    res = run("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", "token=wrong-secret", WORKER)
    assert_one_line_error(res)
    assert "token" in res.stderr.lower() or "auth" in res.stderr.lower()
    assert "WORKER" not in res.stdout  # nothing ran on the impostor node


def test_etcd_down(etcd_server_fn):
    endpoint = etcd_server_fn.endpoint
    etcd_server_fn.stop()
    res = run("--nnodes", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint", endpoint, "--rdzv-conf", "timeout=2",
              WORKER, timeout=90)
    assert_one_line_error(res, endpoint)


def test_too_few_nodes_time_out():
    res = run("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf", "join_timeout=1", WORKER)
    assert_one_line_error(res, "need 2 node(s)")
