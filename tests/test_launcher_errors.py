"""A user's mistake gets one clear line on stderr and exit code 2, never a traceback."""
import os
import re
import subprocess

import pytest

from services import free_port

from paths import ELASTIC_RUN  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "workers", "rank_info.py")


def run(*argv, timeout=60, env=None):
    return subprocess.run([ELASTIC_RUN, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("elastic-run: error:")]
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
    assert_one_line_error(res, f"the rendezvous server 127.0.0.1:{port} refused us: wrong rendezvous token")
    assert "WORKER" not in res.stdout  # nothing ran on the impostor node


def test_etcd_down(etcd_server_fn):
    endpoint = etcd_server_fn.endpoint
    etcd_server_fn.stop()
    res = run("--nnodes", "2", "--rdzv-backend", "etcd", "--rdzv-endpoint", endpoint, "--rdzv-conf", "read_timeout=2",
              WORKER, timeout=90)
    assert_one_line_error(res, endpoint)


def test_too_few_nodes_time_out():
    res = run("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf", "join_timeout=1", WORKER)
    assert_one_line_error(res, "need 2 node(s)")


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus", WORKER], "unrecognized arguments: --bogus"),
    (["--start-method", "thread", WORKER], "--start-method"),
    (["--numa-binding", "everywhere", WORKER], "--numa-binding"),
    ([], "training_script"),
    (["--max-restarts", "many", WORKER], "--max-restarts 'many'"),
    (["--redirects", "7", WORKER], "--redirects '7'"),
    (["--tee", "0:x", WORKER], "--tee '0:x'"),
    (["--local-ranks-filter", "first", WORKER], "--local-ranks-filter 'first'"),
    (["--signals-to-handle", "SIGFOO", WORKER], "unknown signal 'SIGFOO'"),
    (["--signals-to-handle", "SIGKILL", WORKER], "SIGKILL cannot be handled"),
    (["--shutdown-timeout", "soon", WORKER], "--shutdown-timeout 'soon'"),
    (["--no-python", "--nproc-per-node", "1", "/missing/tool"], "executable '/missing/tool' not found"),
    (["--no-python", "no-such-tool-on-path-xyz"], "executable 'no-such-tool-on-path-xyz' not found"),
    (["-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
    (["-m", "json.no_such_submodule"], "no module named 'json.no_such_submodule'"),
    (["-m", "--no-python", "json"], "exclude each other"),
    (["--rdzv-conf", "store_type=file", "--rdzv-endpoint", "127.0.0.1:1", WORKER], "store_type"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, fragment):
    res = run(*argv)
    assert_one_line_error(res, fragment)
    assert "usage:" not in res.stderr


def _own_non_loopback_address():
    """An address of this machine that is not loopback (the launcher must refuse before using it)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for addr in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out):
        if not addr.startswith("127."):
            return addr
    return "0.0.0.0"


def test_multi_node_without_token_is_refused_up_front_on_the_hosting_node():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_RDZV_TOKEN")}
    addr = _own_non_loopback_address()
    res = subprocess.run([ELASTIC_RUN, "--nnodes", "2", "--rdzv-endpoint", f"{addr}:{free_port()}", WORKER],
                         capture_output=True, text=True, timeout=60, env=env)
    assert_one_line_error(res, "token_file=", "ELASTIC_RDZV_TOKEN", "not a loopback address")
    assert "listening" not in res.stderr  # refused before a server or a connection


def test_multi_node_without_token_is_refused_on_a_joining_node(procs):
    port = free_port()
    procs.start("host", [ELASTIC_RUN, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                         "--rdzv-conf", "token=the-secret,join_timeout=60", WORKER])
    procs.wait_for_output("host", "listening", timeout_s=30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_RDZV_TOKEN")}
    res = subprocess.run([ELASTIC_RUN, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", WORKER],
                         capture_output=True, text=True, timeout=60, env=env)
    assert_one_line_error(res, "requires a token", "token_file=", "ELASTIC_RDZV_TOKEN")
    assert "WORKER" not in res.stdout
