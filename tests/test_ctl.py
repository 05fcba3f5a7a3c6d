"""``elastic-run ctl`` against real agents: separate ``elastic-run`` processes on one embedded
endpoint, workers that run until a file appears, and the CLI as a separate process each time.

What ``ctl`` prints is checked against the truth the agents and workers print themselves
(worker PIDs, node ranks, the agents' own PIDs in the node ids) and against how they end.
"""
import json
import os
import re
import socket
import subprocess
import time

from elastic.control import EXIT_DRAINED
from services import free_port

from paths import ELASTIC_RUN, REPO  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "workers", "rank_info.py")
FAST = "last_call_timeout=0.5,lease_ttl=2,join_timeout=60"
RUN_ID = "ctljob"
CTL_TIMEOUT_S = 60


def _clean_env(**extra):
    """This environment without the rendezvous variables a test must set itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "ELASTIC_RDZV_", "ELASTIC_RUN_PREFIX"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def ctl(*argv, env=None, cwd=None):
    """``elastic-run ctl ARGV`` as its own process, with a hard timeout."""
    return subprocess.run([ELASTIC_RUN, "ctl", *argv], check=False, capture_output=True, text=True,
                          timeout=CTL_TIMEOUT_S, env=env or _clean_env(), cwd=cwd, stdin=subprocess.DEVNULL)


class Job:
    """Two agents (``--nnodes 1:3``, one worker each) on one embedded endpoint."""

    def __init__(self, procs, token=None):
        self.procs = procs
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.conf = FAST + (f",token={token}" if token else "")
        self.token = token
        # a0 starts first and hosts the rendezvous server (it must outlive a1 to be drained)
        self.start("a0")
        procs.wait_for_output("a0", "listening", timeout_s=60)
        self.start("a1")
        for name in ("a0", "a1"):
            procs.wait_for_output(name, "world=2 ", timeout_s=90)
        self.truth = {name: workers(procs.output(name))[-1] for name in ("a0", "a1")}

    def start(self, name):
        self.procs.start(name, [ELASTIC_RUN, "--nnodes", "1:3", "--nproc-per-node", "1",
                                "--rdzv-endpoint", self.endpoint, "--rdzv-id", RUN_ID, "--rdzv-conf", self.conf,
                                WORKER, "--mode", "wait"])

    def flags(self, token="same"):
        token = self.token if token == "same" else token
        return ["--rdzv-endpoint", self.endpoint, "--rdzv-id", RUN_ID,
                *(["--rdzv-conf", f"token={token}"] if token else [])]

    def ctl(self, verb, *argv, token="same"):
        return ctl(verb, *argv, *self.flags(token))

    def status(self):
        r = self.ctl("status", "--json")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 1, r.stdout  # one JSON object per line
        return json.loads(lines[0])

    def status_until(self, predicate, what, timeout_s=60):
        """Read ``ctl status --json`` until ``predicate`` holds (the agents publish on their own time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"status never showed {what}: {status}"
            time.sleep(0.1)

    def node_id_prefix(self, name):
        return f"{socket.gethostname()}-{self.procs[name].pid}-"


def workers(output):
    """The WORKER lines an agent's workers printed, as dicts."""
    return [dict(kv.split("=", 1) for kv in m.group(1).split()) for m in re.finditer(r"WORKER (.*)", output)]


def one_error_line(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elastic-run ctl: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running_with_pids(status):
    return (status["state"] == "running" and len(status["nodes"]) == status["num_nodes"]
            and all(n["state"] == "running" and n["worker_pids"] for n in status["nodes"]))


def test_status_events_health_and_bad_requests(procs, tmp_path):
    job = Job(procs, token="abc")
    status = job.status_until(running_with_pids, "2 running nodes with workers")
    assert status["run_id"] == RUN_ID and status["world_size"] == 2 and status["num_nodes"] == 2
    assert (status["min_nodes"], status["max_nodes"]) == (1, 3) and status["generation"] >= 1
    by_rank = {n["node_rank"]: n for n in status["nodes"]}
    assert sorted(by_rank) == [0, 1]
    for name, truth in job.truth.items():  # what each agent's worker printed about itself
        node = by_rank[int(truth["node_rank"])]
        assert node["node_id"].startswith(job.node_id_prefix(name)), (name, node)
        assert node["worker_pids"] == [int(truth["pid"])] and pid_exists(int(truth["pid"]))
        assert node["nproc"] == 1 and node["draining"] is False and node["drain"] is None
        assert 0 <= node["lease_age_s"] < 60 and node["generation"] == status["generation"]

    # the human form: a header, then one line per node
    r = job.ctl("status")
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert re.search(rf"job {RUN_ID}: running .*world size 2 .*nodes 2 .*range 1:3 "
                     r".*desired - .*restarts 0/0", head), head
    assert rows[0].split() == ["NODE", "HOST", "RANK", "STATE", "DRAINING", "LEASE", "PIDS", "STEP", "CKPT"]
    for node, row in zip(sorted(status["nodes"], key=lambda n: n["node_rank"]), rows[1:]):
        cells = row.split()
        assert cells[0] == node["node_id"] and cells[2] == str(node["node_rank"]) and cells[3] == "running"
        assert cells[6] == ",".join(map(str, node["worker_pids"]))
    assert len(rows) == 3, r.stdout

    # the flags may come before the verb, and default from PET_* as the launcher's do
    r = ctl("--rdzv-id", RUN_ID, "--rdzv-conf", "token=abc", "status", "--json",
            env=_clean_env(PET_RDZV_ENDPOINT=job.endpoint))
    assert r.returncode == 0 and json.loads(r.stdout)["num_nodes"] == 2, r.stderr
    r = ctl("status", "--json", env=_clean_env(PET_RDZV_ENDPOINT=job.endpoint, PET_RDZV_ID=RUN_ID,
                                                ELASTIC_RDZV_TOKEN="abc"))
    assert r.returncode == 0 and json.loads(r.stdout)["run_id"] == RUN_ID, r.stderr

    # events: the round that formed the job, with its world size and nodes
    r = job.ctl("events", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    rounds = [e for e in events if e["name"] == "round" and e["generation"] == status["generation"]]
    assert len(rounds) == 1, events
    assert rounds[0]["details"]["world_size"] == 2
    assert sorted(rounds[0]["details"]["nodes"]) == sorted(n["node_id"] for n in status["nodes"])
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    r = job.ctl("events", "--json", "--since", seqs[-1])
    assert r.returncode == 0 and all(json.loads(line)["seq"] > seqs[-1] for line in r.stdout.splitlines())
    r = job.ctl("events")
    assert r.returncode == 0 and re.search(r"\bround\b.*world_size=2", r.stdout), r.stdout
    # --follow with --timeout: what is kept, then it ends once no event came for that long
    r = job.ctl("events", "--follow", "--timeout", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["seq"] for line in r.stdout.splitlines()][:len(seqs)] == seqs

    # health: 0 while running; a stale-lease bound nobody can meet fails it
    r = job.ctl("health")
    assert r.returncode == 0 and r.stdout.startswith("ok: "), (r.stdout, r.stderr)
    r = job.ctl("health", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["healthy"] is True and json.loads(r.stdout)["problems"] == []
    r = job.ctl("health", "--json", "--max-lease-age", "0.000001")
    assert r.returncode == 1 and json.loads(r.stdout)["healthy"] is False, (r.stdout, r.stderr)

    # bad requests: one line, exit 2, and the job is untouched
    one_error_line(job.ctl("scale", "5"), "5 nodes", "1:3")
    one_error_line(job.ctl("drain", "no-such-node"), "no-such-node")
    one_error_line(job.ctl("undrain", "7"), "'7'")
    one_error_line(job.ctl("set-range", "3:1"), "3:1")
    one_error_line(job.ctl("set-range", "x"), "MIN:MAX")
    one_error_line(job.ctl("drain", "0", "--reason", "whim"), "whim")
    one_error_line(job.ctl("drain", "0", "--deadline", "-1"), "--deadline")
    one_error_line(ctl("status", "--rdzv-endpoint", job.endpoint, "--rdzv-id", "not-this-job",
                       "--rdzv-conf", "token=abc"), "no job", "not-this-job")
    one_error_line(job.ctl("status", token="wrong"), "token")
    one_error_line(job.ctl("status", token=None), "token")
    one_error_line(ctl("status", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", RUN_ID), "cannot reach")
    one_error_line(ctl("status"), "--rdzv-endpoint")  # nothing to connect to
    one_error_line(ctl("frobnicate"), "frobnicate")
    one_error_line(ctl(), "VERB")
    after = job.status()
    assert after["num_nodes"] == 2 and after["generation"] == status["generation"]
    assert after["desired_nodes"] is None and (after["min_nodes"], after["max_nodes"]) == (1, 3)
    assert not any(n["draining"] for n in after["nodes"])

    # stop: every agent ends with exit 0; then the store (hosted by a0) is gone: health fails
    r = job.ctl("stop")
    assert r.returncode == 0, r.stderr
    procs.wait(timeout_s=90, names=["a0", "a1"])
    r = job.ctl("health")
    assert r.returncode != 0


def test_drain_scale_range_and_stop(procs, tmp_path):
    job = Job(procs)
    status = job.status_until(running_with_pids, "2 running nodes with workers")
    gen = status["generation"]
    # a1 leaves: a0 hosts the store, which must outlive the job's other nodes
    leaving, staying = "a1", "a0"
    leaving_rank = int(job.truth[leaving]["node_rank"])
    leaving_id = next(n["node_id"] for n in status["nodes"] if n["node_rank"] == leaving_rank)
    staying_id = next(n["node_id"] for n in status["nodes"] if n["node_rank"] != leaving_rank)
    assert leaving_id.startswith(job.node_id_prefix(leaving)) and staying_id.startswith(job.node_id_prefix(staying))

    # watchers, started before anything changes, must see the changes as they happen
    procs.start("watch", [ELASTIC_RUN, "ctl", "status", "--watch", "--json", "--interval", "5", *job.flags()])
    procs.start("follow", [ELASTIC_RUN, "ctl", "events", "--follow", "--json", *job.flags()])
    procs.wait_for_output("watch", '"num_nodes": 2', timeout_s=60)
    procs.wait_for_output("follow", '"name": "round"', timeout_s=60)

    # the range and the desired size change on the running job (and show in status)
    r = job.ctl("set-range", "1", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"]["max_nodes"] == 2
    r = job.ctl("scale", "2")
    assert r.returncode == 0 and "desired 2 nodes" in r.stdout, (r.stdout, r.stderr)
    one_error_line(job.ctl("scale", "3"), "1:2")  # the new range holds
    status = job.status()
    assert (status["min_nodes"], status["max_nodes"], status["desired_nodes"]) == (1, 2, 2)
    assert status["num_nodes"] == 2 and status["generation"] == gen  # nothing drained, no new round

    # undrain of a node that was not asked to drain changes nothing
    r = job.ctl("undrain", staying_id)
    assert r.returncode == 0 and staying_id in r.stdout, (r.stdout, r.stderr)

    # drain by node rank: that agent's workers stop, it leaves and says "drained"
    r = job.ctl("drain", str(leaving_rank), "--deadline", "20", "--json")
    assert r.returncode == 0, r.stderr
    asked = json.loads(r.stdout)
    assert asked["node"]["node_id"] == leaving_id and asked["deadline_s"] == 20 and asked["reason"] == "maintenance"
    gone = procs.wait(timeout_s=90, names=[leaving], check=False)[leaving]
    assert gone.returncode == EXIT_DRAINED, gone.describe()
    procs.wait_for_output(staying, "world=1 ", timeout_s=90)

    status = job.status_until(lambda s: s["num_nodes"] == 1 and s["state"] == "running", "1 node")
    assert status["world_size"] == 1 and status["generation"] > gen
    assert [n["node_id"] for n in status["nodes"] if n["node_rank"] is not None] == [staying_id]
    assert status["nodes"][0]["worker_pids"] == [int(workers(procs.output(staying))[-1]["pid"])]
    r = job.ctl("health")
    assert r.returncode == 0, (r.stdout, r.stderr)
    one_error_line(job.ctl("drain", leaving_id), leaving_id)  # it left: no such node any more

    # the watchers saw it live: a one-node status, and the drain and the next round as events
    procs.wait_for_output("watch", '"num_nodes": 1', timeout_s=60)
    procs.wait_for_output("follow", '"name": "drained"', timeout_s=60)
    procs.wait_for_output("follow", '"world_size": 1', timeout_s=60)
    followed = [json.loads(line) for line in procs.output("follow").splitlines() if line.startswith("{")]
    drained = [e for e in followed if e["name"] == "drained"]
    assert [e["node"] for e in drained] == [leaving_id]
    assert any(e["name"] == "round" and e["generation"] == status["generation"]
               and e["details"]["world_size"] == 1 for e in followed)

    # stop: the last agent ends with exit 0, and the watchers end with it (its store goes away)
    r = job.ctl("stop")
    assert r.returncode == 0 and "stop requested" in r.stdout, (r.stdout, r.stderr)
    procs.wait(timeout_s=90, names=[staying])
    ended = procs.wait(timeout_s=60, names=["watch", "follow"], check=False)
    assert not any(r.hung for r in ended.values()), [r.describe() for r in ended.values()]
    assert all(r.returncode in (0, 1) for r in ended.values()), [r.describe() for r in ended.values()]


def test_a_script_named_ctl_runs_as_dot_slash_ctl(procs, tmp_path):
    script = tmp_path / "ctl"
    script.write_text("import os\nprint('SCRIPT ctl ran, world', os.environ['WORLD_SIZE'])\n")
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "1", "./ctl"])
    out = procs.wait(timeout_s=90)["job"].output
    assert "SCRIPT ctl ran, world 1" in out
    # while the bare word is the subcommand (its help says how to run such a script)
    r = ctl("--help", cwd=str(tmp_path))
    assert r.returncode == 0 and "elastic-run ./ctl" in r.stdout and "SCRIPT" not in r.stdout
    for verb in ("status", "scale", "set-range", "drain", "undrain", "stop", "events", "health"):
        assert verb in r.stdout


def test_on_etcd_with_torchrun_spellings_until_the_job_has_stopped(procs, etcd_server):
    run_id = f"ctl-etcd-{free_port()}"
    procs.start("e0", [ELASTIC_RUN, "--nnodes", "1:3", "--nproc-per-node", "1", "--rdzv-backend", "etcd",
                       "--rdzv-endpoint", etcd_server.endpoint, "--rdzv-id", run_id, "--rdzv-conf", FAST,
                       WORKER, "--mode", "wait"])
    procs.wait_for_output("e0", "world=1 ", timeout_s=90)
    pid = int(workers(procs.output("e0"))[-1]["pid"])
    # torchrun's underscore spellings and its etcd-v2 alias, with the agents' --rdzv-conf as it was
    flags = ["--rdzv_backend", "etcd-v2", "--rdzv_endpoint", etcd_server.endpoint, "--rdzv_id", run_id,
             "--rdzv_conf", FAST]
    deadline = time.monotonic() + 60
    while True:
        r = ctl("status", "--json", *flags)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        if running_with_pids(status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["world_size"] == 1 and status["num_nodes"] == 1
    assert (status["min_nodes"], status["max_nodes"]) == (1, 3)
    (node,) = status["nodes"]
    assert node["node_rank"] == 0 and node["worker_pids"] == [pid] and node["node_id"].startswith(
        f"{socket.gethostname()}-{procs['e0'].pid}-")
    r = ctl("health", *flags)
    assert r.returncode == 0, (r.stdout, r.stderr)

    # the store outlives the job: a watch ends by itself when the job has stopped
    procs.start("watch", [ELASTIC_RUN, "ctl", "status", "--watch", "--interval", "1", *flags])
    procs.wait_for_output("watch", f"job {run_id}: running", timeout_s=60)
    r = ctl("stop", "--json", *flags)
    assert r.returncode == 0 and json.loads(r.stdout) == {"verb": "stop", "run_id": run_id, "graceful": True}
    procs.wait(timeout_s=90, names=["e0", "watch"])
    assert f"job {run_id}: stopped" in procs.output("watch")
    r = ctl("status", "--json", *flags)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "stopped", (r.stdout, r.stderr)
    r = ctl("health", *flags)
    assert r.returncode == 1 and r.stdout.startswith("unhealthy: ") and "stopped" in r.stdout, (r.stdout, r.stderr)


def test_from_inside_a_worker_with_no_flags(procs):
    # standalone: a private store on a free port, a random token and run id, all only in the
    # worker's environment; the worker's own pid must be in what ctl reports
    worker = os.path.join(os.path.dirname(WORKER), "ctl_from_worker.py")
    procs.start("job", [ELASTIC_RUN, "--nproc-per-node", "1", worker], env=_clean_env())
    out = procs.wait(timeout_s=120)["job"].output
    m = re.search(r"CTL run=(\S+) state=(\S+) world=(\d+) mine=(\d+) env_run=(\S+)", out)
    assert m, out
    assert m.group(1) == m.group(5) and m.group(2) == "running" and m.group(3) == "1" and m.group(4) == "1", out
