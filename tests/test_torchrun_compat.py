"""elastic-run takes every torchrun flag with torchrun's meaning (issue 12).

The flag list is not ours: it is read from torchrun's own parser
(``torch.distributed.run.get_args_parser()``), so a flag torchrun adds fails here until
elastic-run takes it too. Behaviour is checked on real ``elastic-run`` processes.
"""
import argparse
import os
import re
import signal
import tempfile

import pytest

from launchers.cli import build_parser, config_from_args, parse_args
from launchers.config import LaunchConfig, store_conf
from launchers.launch import rendezvous_settings
from launchers.numa import bind_cpus, format_cpu_list, parse_cpu_list

from paths import ELASTIC_RUN  # noqa: E402
HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "workers", "env_report.py")
FAKE_NVML = os.path.join(HERE, "fake_nvml")

# A valid torchrun value for each string-typed flag (the others come from the action itself:
# its choices, or its int/float type). A flag torchrun adds that is not here fails the test.
VALUES = {
    "nnodes": "1", "nproc_per_node": "2", "rdzv_backend": "c10d", "rdzv_endpoint": "127.0.0.1:29999",
    "rdzv_id": "job7", "rdzv_conf": "join_timeout=30,last_call_timeout=1,close_timeout=5,read_timeout=9",
    "event_log_handler": "console", "role": "trainer", "log_dir": "LOGDIR", "redirects": "0:1,1:2",
    "tee": "3", "local_ranks_filter": "0,1", "duplicate_stdout_filters": "apple,orange",
    "duplicate_stderr_filters": "pear", "master_addr": "127.0.0.1", "local_addr": "127.0.0.1",
    "logs_specs": "default", "signals_to_handle": "SIGTERM,SIGINT,SIGUSR1", "shutdown_timeout": "7",
    "node_rank": "0", "master_port": "29511", "max_restarts": "2", "monitor_interval": "0.5",
}
# What the positional argument is when a switch changes its meaning.
SCRIPT_FOR = {"module": "json.tool", "no_python": "true"}


def torchrun_options():
    """(option string, action) for every optional argument of torchrun's parser, both spellings."""
    from torch.distributed.run import get_args_parser

    for action in get_args_parser()._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        for option in action.option_strings:
            yield option, action


def _values(action):
    if action.nargs == 0:
        return [None]
    if action.choices:
        return [str(c) for c in action.choices]
    if action.dest in VALUES:
        return [VALUES[action.dest]]
    if action.type is int:
        return ["1"]
    if action.type is float:
        return ["0.5"]
    raise AssertionError(f"torchrun flag {action.option_strings} is new: give it a value in VALUES")


CASES = [pytest.param(option, action, value, id=f"{option}={value}")
         for option, action in torchrun_options() for value in _values(action)]


@pytest.mark.parametrize("option, action, value", CASES)
def test_every_torchrun_flag_is_accepted_with_a_valid_config(option, action, value, tmp_path, monkeypatch):
    from torch.distributed.run import get_args_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # --redirects without --log-dir makes one
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN", raising=False)
    script = SCRIPT_FOR.get(action.dest, REPORT)
    value = value.replace("LOGDIR", str(tmp_path / "logs")) if value else value
    argv = [option] + ([value] if value is not None else []) + [script, "--x", "1"]
    theirs = get_args_parser().parse_args(argv)  # the value is valid for torchrun itself
    ours = parse_args(argv)
    assert getattr(ours, action.dest) == (True if value is None else value)
    assert ours.training_script == theirs.training_script == script
    assert ours.training_script_args == theirs.training_script_args == ["--x", "1"]
    config = config_from_args(ours)
    assert isinstance(config, LaunchConfig)
    assert config.entrypoint == (script, "--x", "1")


@pytest.mark.parametrize("option, action", [(o, a) for o, a in torchrun_options() if o == a.option_strings[-1]],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_every_torchrun_flag_reads_its_pet_variable(option, action, monkeypatch):
    value = "1" if action.nargs == 0 else _values(action)[-1].replace("LOGDIR", "/tmp/x")
    monkeypatch.setenv(f"PET_{action.dest.upper()}", value)
    ns = build_parser().parse_args([REPORT])
    assert getattr(ns, action.dest) == (True if action.nargs == 0 else value)


def test_the_torchrun_forms_of_tee_and_redirects_pick_the_console_ranks(tmp_path):
    def console(*flags, nproc=3):
        args = parse_args(["--nproc-per-node", str(nproc), "--log-dir", str(tmp_path), *flags, REPORT])
        return config_from_args(args).console_local_ranks

    assert console() is None  # torchrun: --log-dir alone keeps the console
    assert console("-r", "3") == ()  # everything to the files only
    assert console("-r", "3", "-t", "0:3") == (0,)  # rank 0 teed back to the console
    assert console("-r", "0:1,2:2") == (1,)
    assert console("--local-ranks-filter", "0,2") == (0, 2)
    assert console("--local_ranks_filter", "2", "-r", "2:3") == ()


def test_rdzv_conf_keys_of_torchrun_c10d_map_onto_our_settings():
    def config(conf, backend="embedded"):
        return LaunchConfig(entrypoint=(REPORT,), rdzv_backend=backend, rdzv_endpoint="127.0.0.1:1",
                            rdzv_conf=conf, min_nodes=1, max_nodes=2)

    s = rendezvous_settings(config({"join_timeout": "12", "last_call_timeout": "4"}))
    assert (s.join_timeout_s, s.last_call_s) == (12, 4)
    assert rendezvous_settings(config({"timeout": "7"})).join_timeout_s == 7  # etcd's name, its alias
    assert rendezvous_settings(config({"keep_alive_interval": "2", "keep_alive_max_attempt": "4"})).lease_ttl_s == 8
    assert rendezvous_settings(config({"lease_ttl": "3", "keep_alive_interval": "2"})).lease_ttl_s == 3
    assert config({"close_timeout": "9"}).conf_seconds("close_timeout", 600) == 9
    every = {"timeout": "1", "join_timeout": "1", "last_call_timeout": "1", "close_timeout": "1", "read_timeout": "3",
             "is_host": "true", "heartbeat_timeout": "5", "keep_alive_interval": "5", "keep_alive_max_attempt": "3",
             "store_type": "tcp"}
    assert store_conf(config(every).rdzv_conf, "embedded") == {"timeout_s": "3"}  # read_timeout: per request
    etcd = config({**every, "ca_cert": "ca.pem", "ssl_cert": "c.pem", "ssl_cert_key": "k.pem", "tls": "1",
                   "timeout_s": "4", "protocol": "https"}, backend="etcd")
    assert store_conf(etcd.rdzv_conf, "etcd") == {"cacert": "ca.pem", "cert": "c.pem", "key": "k.pem", "tls": "1",
                                                  "timeout_s": "4", "protocol": "https"}


def test_timeout_alias_bounds_the_wait_for_a_round(procs):
    from services import free_port

    procs.start("job", [ELASTIC_RUN, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                        "--rdzv-conf", "timeout=1", REPORT])
    result = procs.wait(timeout_s=60, check=False)["job"]
    assert result.returncode == 2, result.output
    # a lone node on a fresh store opens round 1 and waits in it (not "no round formed")
    assert "elastic-run: error: round 1 did not close within 1s (need 2 node(s) for job 'none')" \
        in result.output, result.output


def reports(output):
    return [dict(kv.split("=", 1) for kv in m.group(1).split()) for m in re.finditer(r"REPORT (.*)", output)]


def test_local_ranks_filter_shows_only_those_ranks(procs):
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--local-ranks-filter", "1", REPORT])
    out = procs.wait(timeout_s=60)["job"].output
    assert [r["local_rank"] for r in reports(out)] == ["1"]
    assert "STDERR rank=1" in out and "STDERR rank=0" not in out


def test_redirected_rank_goes_to_its_file_only(procs, tmp_path):
    logs = tmp_path / "logs"
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--rdzv-id", "r", "--log-dir", str(logs),
                        "--redirects", "0:3", REPORT])
    out = procs.wait(timeout_s=60)["job"].output
    assert [r["local_rank"] for r in reports(out)] == ["1"]
    assert "local_rank=0" in (logs / "r" / "attempt_1" / "0" / "stdout.log").read_text()


def test_virtual_local_rank(procs):
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--virtual-local-rank", REPORT],
                env={"CUDA_VISIBLE_DEVICES": "5,7"})
    seen = sorted(reports(procs.wait(timeout_s=60)["job"].output), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"], r["cuda"]) for r in seen] == [("0", "0", "5"), ("1", "0", "7")]


@pytest.mark.parametrize("sig, flags", [
    (signal.SIGHUP, []),  # in torchrun's default set
    (signal.SIGUSR2, ["--signals-to-handle", "SIGTERM,SIGUSR2"]),
])
def test_signals_to_handle_stop_the_workers_and_exit_128_plus_n(procs, sig, flags):
    procs.start("job", [ELASTIC_RUN, *flags, REPORT, "--wait"])
    procs.wait_for_output("job", "REPORT", timeout_s=60)
    pid = int(reports(procs.output("job"))[0]["pid"])
    procs.signal("job", sig)
    result = procs.wait(timeout_s=60, check=False)["job"]
    assert result.returncode == 128 + sig, result.output
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"


# -- --numa-binding ----------------------------------------------------------------------------
def test_binding_modes_follow_torch():
    nodes = [{0, 1, 2, 3}, {0, 1, 2, 3}, {4, 5, 6, 7}]
    sockets = [set(range(8))] * 3
    allowed = set(range(8))

    def cores(cpu):  # two hyperthreads per core: (0,1), (2,3), ...
        return frozenset({cpu - cpu % 2, cpu - cpu % 2 + 1})

    def caches(cpu):  # one L3 per four CPUs
        return frozenset(range(cpu - cpu % 4, cpu - cpu % 4 + 4))

    assert bind_cpus("node", 1, nodes, sockets, allowed) == {0, 1, 2, 3}
    assert bind_cpus("socket", 2, nodes, sockets, allowed) == set(range(8))
    assert [bind_cpus("exclusive", g, nodes, sockets, allowed, core_of=cores) for g in range(3)] == [
        {0, 1}, {2, 3}, {4, 5, 6, 7}]
    assert [bind_cpus("core-complex", g, nodes, sockets, allowed, cache_of=caches) for g in range(3)] == [
        {0, 1, 2, 3}, {0, 1, 2, 3}, {4, 5, 6, 7}]
    assert bind_cpus("node", 2, nodes, sockets, {0, 4}) == {4}  # never outside what we may use
    assert parse_cpu_list("0-2,4,6-7") == {0, 1, 2, 4, 6, 7} and format_cpu_list({0, 1, 2, 4, 6, 7}) == "0-2,4,6-7"


needs_two_cpus = pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")


@needs_two_cpus
@pytest.mark.parametrize("mode, nodes, expected, flags", [
    ("node", "0;1", ["0", "1"], []),
    ("node", "0;1", ["0", "1"], ["--no-standby"]),
    ("exclusive", "0-1;0-1", ["0", "1"], []),  # one node, two GPUs: a core each
    ("socket", "0;1", ["0,1", "0,1"], []),
])
def test_numa_binding_pins_real_workers(procs, mode, nodes, expected, flags):
    env = {"PYTHONPATH": os.pathsep.join([FAKE_NVML, os.path.dirname(HERE)]), "FAKE_NVML_DEVICES": "2",
           "FAKE_NVML_CPU_AFFINITY": nodes}
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "2", "--numa-binding", mode, *flags, REPORT], env=env)
    seen = sorted(reports(procs.wait(timeout_s=60)["job"].output), key=lambda r: r["local_rank"])
    assert [r["cpus"] for r in seen] == expected
    assert [r["allowed"] for r in seen] == [e.replace("0,1", "0-1") for e in expected]


def test_numa_binding_without_nvml_is_one_line_exit_2(procs):
    env = {"PYTHONPATH": os.pathsep.join([FAKE_NVML, os.path.dirname(HERE)]), "FAKE_NVML_INIT_ERROR": "9"}
    procs.start("job", [ELASTIC_RUN, "--numa-binding", "node", REPORT], env=env)
    result = procs.wait(timeout_s=60, check=False)["job"]
    assert result.returncode == 2
    errors = [line for line in result.output.splitlines() if line.startswith("elastic-run: error:")]
    assert len(errors) == 1 and "--numa-binding needs NVIDIA GPUs (NVML)" in errors[0], result.output
    assert "Traceback" not in result.output and "REPORT" not in result.output
