"""elastic-run flags on real processes, each by an effect a user can see: -m, --no-python,
--tee, --preload, --local-addr, --monitor-interval, --nproc-per-node cpu, and TLS settings of
the embedded store through --rdzv-conf. (Parsing of every torchrun flag: test_torchrun_compat.)"""
import os
import re

import pytest

from needs import require
from services import free_port

from paths import ELASTIC_RUN  # noqa: E402
HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "workers", "env_report.py")
RANK_INFO = os.path.join(HERE, "workers", "rank_info.py")

# A worker that says how it was started: as a module or a script, with which argv, whether
# `colorsys` (which nothing of ours imports) was already imported before its first line ran,
# and the MASTER_ADDR of its round.
PROBE = '''\
import os, sys
PRELOADED = "colorsys" in sys.modules
spec = __spec__.name if __spec__ is not None else None
print(f"PROBE rank={os.environ['RANK']} world={os.environ['WORLD_SIZE']} name={__name__} spec={spec} "
      f"preloaded={PRELOADED} master={os.environ['MASTER_ADDR']} argv={'|'.join(sys.argv[1:])}", flush=True)
'''


def probes(output):
    return sorted((dict(kv.split("=", 1) for kv in m.group(1).split())
                   for m in re.finditer(r"PROBE (.*)", output)), key=lambda r: r["rank"])


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "flagprobe.py").write_text(PROBE)
    return tmp_path / "flagprobe.py"


def run_job(procs, argv, timeout_s=60, env=None, name="job"):
    procs.start(name, [ELASTIC_RUN, *argv], env=env)
    return procs.wait(timeout_s=timeout_s, names=[name])[name].output


def test_module_runs_as_python_m(procs, probe):
    """-m NAME: the module (found from the working directory, as python -m does) runs as
    __main__ with its own spec, and the arguments after it reach it."""
    out = run_job(procs, ["--nproc-per-node", "2", "-m", "flagprobe", "--lr", "0.1"])
    seen = probes(out)
    assert [(p["rank"], p["name"], p["spec"], p["argv"]) for p in seen] == [
        ("0", "__main__", "flagprobe", "--lr|0.1"), ("1", "__main__", "flagprobe", "--lr|0.1")]
    # the same file as a script has no module spec: -m made the difference
    seen = probes(run_job(procs, ["--nproc-per-node", "1", str(probe)], name="script"))
    assert [(p["name"], p["spec"]) for p in seen] == [("__main__", "None")]


def test_no_python_runs_an_executable_with_the_worker_environment(procs):
    """--no-python: the entrypoint is executed as is (here a shell), not through python."""
    out = run_job(procs, ["--nproc-per-node", "2", "--no-python", "sh", "-c",
                          'echo "SHELL rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK"'])
    lines = sorted(re.findall(r"SHELL (rank=\d world=\d local=\d)", out))
    assert lines == ["rank=0 world=2 local=0", "rank=1 world=2 local=1"], out


def test_tee_sends_a_redirected_rank_to_the_console_too(procs, tmp_path):
    """--redirects 3 --tee 0:3: both ranks' output goes to their log files; rank 0's also to
    the console, rank 1's not."""
    logs = tmp_path / "logs"
    out = run_job(procs, ["--nproc-per-node", "2", "--rdzv-id", "t", "--log-dir", str(logs),
                          "--redirects", "3", "--tee", "0:3", REPORT])
    assert re.findall(r"REPORT rank=(\d)", out) == ["0"], out
    assert "STDERR rank=0" in out and "STDERR rank=1" not in out
    for rank in (0, 1):
        files = logs / "t" / "attempt_1" / str(rank)
        assert f"REPORT rank={rank}" in (files / "stdout.log").read_text()
        assert f"STDERR rank={rank}" in (files / "stderr.log").read_text()


def test_tee_alone_keeps_the_console_and_fills_the_files(procs, tmp_path):
    logs = tmp_path / "logs"
    out = run_job(procs, ["--nproc-per-node", "2", "--rdzv-id", "t", "--log-dir", str(logs), "--tee", "3", REPORT])
    assert sorted(re.findall(r"REPORT rank=(\d)", out)) == ["0", "1"], out
    for rank in (0, 1):
        assert f"REPORT rank={rank}" in (logs / "t" / "attempt_1" / str(rank) / "stdout.log").read_text()


@pytest.mark.parametrize("flags, preloaded", [
    (["--preload", "colorsys"], "True"),  # the standby imported it before the script ran
    ([], "False"),  # a script that imports no framework: nothing is preloaded
    (["--preload", "colorsys", "--no-standby"], "False"),  # cold workers: nothing ahead of time
])
def test_preload_imports_modules_in_the_standby_before_the_script(procs, probe, flags, preloaded):
    seen = probes(run_job(procs, ["--nproc-per-node", "2", *flags, str(probe)]))
    assert [(p["rank"], p["preloaded"]) for p in seen] == [("0", preloaded), ("1", preloaded)]


def test_local_addr_is_the_address_the_round_publishes(procs, probe):
    """--local-addr: the node's address in the round, hence rank 0's MASTER_ADDR (on both
    nodes of a two-node job)."""
    port = free_port()
    conf = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf",
            "token=s3cret,join_timeout=120,lease_ttl=10"]
    procs.start("host", [ELASTIC_RUN, *conf, "--node-rank", "0", "--local-addr", "127.0.0.7", str(probe)])
    procs.start("other", [ELASTIC_RUN, *conf, "--node-rank", "1", "--local-addr", "127.0.0.8", str(probe)])
    results = procs.wait(timeout_s=90)
    seen = probes(results["host"].output + results["other"].output)
    assert [(p["rank"], p["world"], p["master"]) for p in seen] == [("0", "2", "127.0.0.7"), ("1", "2", "127.0.0.7")]


def test_monitor_interval_is_taken_and_a_bad_one_exits_2(procs):
    out = run_job(procs, ["--nproc-per-node", "2", "--monitor-interval", "0.5", RANK_INFO], name="ok")
    assert sorted(re.findall(r"WORKER rank=(\d)", out)) == ["0", "1"]
    for bad, message in (("soon", "--monitor-interval 'soon': expected seconds"),
                         ("0", "--monitor-interval must be > 0"),
                         ("-1", "--monitor-interval must be > 0")):
        procs.start(f"bad{bad}", [ELASTIC_RUN, "--monitor-interval", bad, RANK_INFO])
        result = procs.wait(timeout_s=60, names=[f"bad{bad}"], check=False)[f"bad{bad}"]
        assert result.returncode == 2, result.output
        assert f"elastic-run: error: {message}" in result.output
        assert "WORKER" not in result.output and "Traceback" not in result.output


def test_nproc_per_node_cpu_starts_one_worker_per_core(procs):
    out = run_job(procs, ["--nproc-per-node", "cpu", RANK_INFO], timeout_s=120)
    n = os.cpu_count()
    assert sorted(int(r) for r in re.findall(r"WORKER rank=(\d+)", out)) == list(range(n))
    assert set(re.findall(r"world=(\d+)", out)) == {str(n)}


# -- TLS for the embedded store, through elastic-run's --rdzv-conf ------------------------------
def test_embedded_store_over_tls_with_client_certificates(procs, tmp_path):
    """tls_cert/tls_key/tls_ca in --rdzv-conf: the hosting node serves the store over TLS and
    requires client certificates its CA signed; a node with the same settings joins and
    the job runs; a node without TLS, or without a client certificate, exits 2 and never runs
    a worker."""
    require("cryptography", "TLS test certificates")
    from tls_certs import make_tls_files

    tls = make_tls_files(str(tmp_path))
    port = free_port()
    endpoint = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    full = f"token=s3cret,tls_cert={tls.cert},tls_key={tls.key},tls_ca={tls.ca}"
    # generous join timeout and lease: the two refused nodes come first, on a possibly busy machine
    procs.start("host", [ELASTIC_RUN, *endpoint, "--rdzv-conf", full + ",join_timeout=300,lease_ttl=10", RANK_INFO])
    procs.wait_for_output("host", "listening", timeout_s=30)

    for name, conf, message in (
        ("plain", "is_host=false,token=s3cret,timeout_s=5", "does it use TLS? then set tls_ca"),
        ("nocert", f"is_host=false,token=s3cret,tls_ca={tls.ca},timeout_s=5",
         f"the rendezvous server 127.0.0.1:{port} closed the connection during the handshake"),
    ):
        procs.start(name, [ELASTIC_RUN, *endpoint, "--rdzv-conf", conf, RANK_INFO])
        result = procs.wait(timeout_s=60, names=[name], check=False)[name]
        assert result.returncode == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("elastic-run: error:")]
        assert len(errors) == 1 and message in errors[0], result.output
        assert "WORKER" not in result.output

    procs.start("joiner", [ELASTIC_RUN, *endpoint, "--rdzv-conf", full + ",lease_ttl=10", RANK_INFO])
    results = procs.wait(timeout_s=120, names=["host", "joiner"])
    out = results["host"].output + results["joiner"].output
    assert sorted(re.findall(r"WORKER rank=(\d) .*?world=2", out)) == ["0", "1"], out


# -- etcd with client certificates, through elastic-run's --rdzv-conf ---------------------------
def test_etcd_with_client_certificates(procs, tmp_path):
    """etcd run with --client-cert-auth over TLS: elastic-run with cacert/cert/key in
    --rdzv-conf forms its round there; without a client certificate it exits 2, one line."""
    require("pyetcd", "the etcd extra")
    require("cryptography", "TLS test certificates")
    from services import EtcdServer
    from tls_certs import make_tls_files

    tls = make_tls_files(str(tmp_path))
    with EtcdServer(tls=tls, client_cert_auth=True) as etcd:
        base = ["--rdzv-backend", "etcd", "--rdzv-endpoint", etcd.endpoint]
        out = run_job(procs, [*base, "--rdzv-id", "mtls", "--nproc-per-node", "2", "--rdzv-conf",
                              f"cacert={tls.ca},cert={tls.cert},key={tls.key}", RANK_INFO], timeout_s=90)
        assert sorted(re.findall(r"WORKER rank=(\d) .*?world=2", out)) == ["0", "1"], out
        # torchrun's etcd spellings of the same settings
        out = run_job(procs, [*base, "--rdzv-id", "aliases", "--nproc-per-node", "1", "--rdzv-conf",
                              f"ca_cert={tls.ca},ssl_cert={tls.cert},ssl_cert_key={tls.key}", RANK_INFO],
                      timeout_s=90, name="aliases")
        assert re.findall(r"WORKER rank=(\d) .*?world=1", out) == ["0"], out

        procs.start("nocert", [ELASTIC_RUN, *base, "--rdzv-conf", f"cacert={tls.ca},timeout_s=3", RANK_INFO])
        result = procs.wait(timeout_s=90, names=["nocert"], check=False)["nocert"]
        assert result.returncode == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("elastic-run: error:")]
        assert len(errors) == 1 and etcd.endpoint in errors[0], result.output
        assert "WORKER" not in result.output and "Traceback" not in result.output
