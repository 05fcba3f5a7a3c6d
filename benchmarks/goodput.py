"""Goodput under a compressed, seeded fault schedule on network-namespace hosts: elastic-run
against torchrun, side by side.

    python benchmarks/goodput.py [--quick] [--duration-s S] [--seed N] [--backend embedded|etcd]
    python benchmarks/goodput.py --local [--quick]     # loopback, process faults only (no root)

On a ``benchmarks.chaos.netns.Cluster`` (hosts h1..h5, every process of the experiment inside a
host namespace) each launcher runs the same job twice: fault-free (``--fault-free-s``), then
under the schedule (``benchmarks.chaos.faults.Schedule.compressed``: a fault about every
``--period-s`` 25 s over ``--duration-s``, the same seed for both launchers). The job starts on
h1..h4 (one agent, one worker each; ``--nnodes 3:5``); h5 is the spare a scale-up starts.

- elastic-run: ``benchmarks/chaos/train_elastic.py`` (``@elastic.run``, ``ElasticDataLoader``,
  ``Checkpointer``); embedded rendezvous on h1 with a token file (or ``--backend etcd``: etcd on
  the etcd host, plus an etcd kill/restart fault).
- torchrun: ``benchmarks/chaos/train_plain.py`` (DistributedSampler, ``torch.save`` every 20
  steps); c10d rendezvous, ``--rdzv-conf is_host=true`` on h1 and ``--local-addr`` on every host.

h1 hosts the rendezvous store for both launchers, so faults target h2..h5 (the store's host is
a single point of failure for both; see issue 16). Each chaos run lasts ``--duration-s`` plus
``--tail-s`` for the last fault to recover; then every process is killed and the step logs
(``benchmarks/chaos/steplog.py``) are analysed (``benchmarks/chaos/goodput.py``): goodput,
goodput against the fault-free run, per-fault detect/recover times, steps lost, world sizes,
spurious re-formations, the exactly-once audit, checksum agreement across ranks, checkpoints
published by a partitioned host or by a stale writer, a projection at a 3 h MTBF, and whether
the newest checkpoint loads in a fresh process. The last line is one JSON object.

``--local`` runs the same thing on loopback without namespaces (hosts are labels; only the
worker SIGKILL, worker SIGSTOP/SIGCONT, scale-up and scale-down faults): a development aid
and a fallback where there is no root; its figures are not the benchmark's.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.chaos import goodput as gp  # noqa: E402
from benchmarks.chaos import workload  # noqa: E402
from benchmarks.chaos.steplog import read_dir  # noqa: E402

BIN = os.path.dirname(sys.executable)
ELASTIC_RUN = os.path.join(BIN, "elastic-run")
TORCHRUN = os.path.join(BIN, "torchrun")
PYTHON = sys.executable
TRAIN_ELASTIC = os.path.join(HERE, "chaos", "train_elastic.py")
TRAIN_PLAIN = os.path.join(HERE, "chaos", "train_plain.py")
RDZV_PORT = 29400
ETCD_PORT = 2379
MTBF_S = 3 * 3600.0
START_HOSTS = ("h1", "h2", "h3", "h4")
SPARE_HOSTS = ("h5",)
FAULT_HOSTS = ("h2", "h3", "h4", "h5")  # never h1: the rendezvous store's host
ALL_KINDS = ("kill_worker", "stop_worker", "power_off", "partition", "degrade", "cpu_quota", "scale_up",
             "scale_down")
LOCAL_KINDS = ("kill_worker", "stop_worker", "scale_up", "scale_down")


# --------------------------------------------------------------------------------------- hosts
class LocalHosts:
    """``--local``: the harness's spawn/pids/addr/close on loopback; hosts are labels."""

    def __init__(self) -> None:
        self.procs: dict = {}

    def spawn(self, name: str, argv: list, env: Optional[dict] = None, cwd: Optional[str] = None,
              log_path: Optional[str] = None) -> subprocess.Popen:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.setdefault(name, []).append(proc)
        return proc

    def addr(self, name: str) -> str:
        return "127.0.0.1"

    def pids(self, name: str) -> list:
        out = []
        for proc in self.procs.get(name, []):
            out.append(proc.pid)
            out.extend(_descendants(proc.pid))
        return [p for p in out if os.path.exists(f"/proc/{p}")]

    def close(self) -> None:
        for procs in self.procs.values():
            for proc in procs:
                _kill_tree(proc.pid)
        for procs in self.procs.values():
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()


def _descendants(pid: int) -> list:
    children: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for p in [pid] + _descendants(pid):
        for kill in (os.killpg, os.kill):
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass(frozen=True)
class LocalFault:
    kind: str
    host: str
    target: str
    t_inject: float
    t_end: Optional[float]
    detail: str


# --------------------------------------------------------------------------------------- a job
@dataclass
class Job:
    """One launcher's job on the cluster: its agents, directories and how to start a node."""
    launcher: str  # "elastic-run" or "torchrun"
    cluster: object
    workdir: str
    total_steps: int
    step_s: float
    backend: str
    token_file: str
    collective_timeout_s: float = 15.0
    port: int = RDZV_PORT
    run_id: str = "goodput"
    agents: dict = dataclasses.field(default_factory=dict)  # host -> Popen
    t_launch: float = 0.0
    t_faults: float = 0.0  # the schedule's time 0
    t_stop: Optional[float] = None  # when the run was stopped at its deadline (None: it finished)

    @property
    def log_dir(self) -> str:
        return os.path.join(self.workdir, "steps")

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.workdir, "ckpt")

    @property
    def data_dir(self) -> str:
        return os.path.join(os.path.dirname(self.workdir), "data")

    def argv(self, host: str) -> list:
        c = self.cluster
        endpoint = f"{c.addr('h1')}:{self.port}"
        common = ["--nnodes", "3:5", "--nproc-per-node", "1", "--max-restarts", "1000", "--rdzv-id", self.run_id,
                  "--local-addr", c.addr(host)]
        if self.launcher == "torchrun":
            conf = f"is_host={'true' if host == 'h1' else 'false'}"
            return [TORCHRUN, *common, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-conf", conf,
                    TRAIN_PLAIN, "--log-dir", self.log_dir, "--ckpt-dir", self.ckpt_dir,
                    "--total-steps", str(self.total_steps), "--step-s", str(self.step_s), "--launcher", "torchrun",
                    "--pg-timeout-s", str(self.collective_timeout_s)]
        if self.backend == "etcd":
            rdzv = ["--rdzv-backend", "etcd", "--rdzv-endpoint", f"{c.addr('etcd')}:{ETCD_PORT}"]
        else:
            rdzv = ["--rdzv-backend", "embedded", "--rdzv-endpoint", endpoint, "--rdzv-conf",
                    f"token_file={self.token_file}"]
        return [ELASTIC_RUN, *common, *rdzv, TRAIN_ELASTIC, "--data", self.data_dir, "--log-dir", self.log_dir,
                "--ckpt-dir", self.ckpt_dir, "--total-steps", str(self.total_steps), "--step-s", str(self.step_s),
                "--timeout-s", str(self.collective_timeout_s)]

    def start_node(self, host: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHAOS_HOST": host, "CHAOS_LAUNCHER": self.launcher,
               "OMP_NUM_THREADS": "1"}
        env.pop("ELASTIC_RDZV_TOKEN", None)
        log = os.path.join(self.workdir, f"agent-{host}-{len([k for k in self.agents if k == host])}.log")
        proc = self.cluster.spawn(host, self.argv(host), env=env, cwd=self.workdir, log_path=log)
        self.agents[host] = proc
        return proc

    def launch(self, hosts) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.t_launch = time.time()
        self.start_node(hosts[0])
        time.sleep(1.0)  # the store's host first, as a scheduler would start the rendezvous host
        for h in hosts[1:]:
            self.start_node(h)

    def last_step(self) -> int:
        try:
            recs = read_dir(self.log_dir)
        except FileNotFoundError:
            return 0
        return max((r.step for r in recs if r.kind == "step"), default=0)

    def stepping(self, world: int) -> bool:
        try:
            return any(r.kind == "step" and r.world_size >= world for r in read_dir(self.log_dir))
        except FileNotFoundError:
            return False

    def worker_pid(self, host: str) -> Optional[int]:
        """This host's newest worker, from the step logs (both launchers log it)."""
        try:
            recs = [r for r in read_dir(self.log_dir) if r.host == host and r.kind in ("start", "step")]
        except FileNotFoundError:
            return None
        for r in reversed(recs):
            if os.path.exists(f"/proc/{r.pid}"):
                return r.pid
        return None

    def finished(self) -> bool:
        return bool(self.agents) and all(p.poll() is not None for p in self.agents.values())


# --------------------------------------------------------------------------------------- running
def run_job(job: Job, hosts, deadline_s: float, faults_run: Optional[Callable] = None) -> list:
    """Launch, optionally run the fault schedule, wait for the job to finish or the deadline;
    return the fault records."""
    job.launch(hosts)
    records: list = []
    stopper = None
    deadline = job.t_launch + deadline_s
    if faults_run is not None:
        # the schedule's clock starts at the job's first step at its full size: start-up is
        # measured (goodput counts it), not faulted
        while time.time() < job.t_launch + 180 and not job.finished():
            if job.stepping(len(hosts)):
                break
            time.sleep(0.5)
        job.t_faults = time.time()
        deadline = job.t_faults + deadline_s
        stopper = faults_run(job, records)
    while time.time() < deadline:
        if job.finished() and (stopper is None or stopper.done()):
            break
        time.sleep(0.5)
    job.t_stop = time.time() if not job.finished() else None
    if stopper is not None:
        stopper.stop()
    return records


def checkpoint_loads(job: Job, cluster) -> tuple:
    """Load the newest checkpoint in a fresh process on h1; (ok, one line)."""
    if job.launcher == "torchrun":
        code = ("import sys,torch; sys.path.insert(0, %r); from benchmarks.chaos import workload; "
                "s=torch.load(%r, weights_only=True); m=workload.build_model(); m.load_state_dict(s['model']); "
                "print('LOADED step', s['step'])" % (REPO, os.path.join(job.ckpt_dir, "latest.pt")))
    else:
        code = ("import sys,torch; sys.path.insert(0, %r); from benchmarks.chaos import workload; "
                "from checkpoint import Checkpointer; c=Checkpointer(%r, rank=0, world_size=1, memory=False); "
                "s=c.load(); m=workload.build_model(); "
                "m.load_state_dict({k: torch.as_tensor(v) for k, v in s['model'].items()}); "
                "print('LOADED step', s['step'], 'generation', c.last_load.generation)" % (REPO, job.ckpt_dir))
    log = os.path.join(job.workdir, "ckpt-load.log")
    proc = cluster.spawn("h1", [PYTHON, "-c", code], env={**os.environ, "CHAOS_HOST": "h1"}, cwd=job.workdir,
                         log_path=log)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        rc = None
    with open(log, errors="replace") as f:
        text = f.read().strip().splitlines()
    return rc == 0, (text[-1] if text else f"exit {rc}")[:200]


def manifests(job: Job) -> list:
    if job.launcher == "torchrun":
        return []
    from checkpoint import Checkpointer

    try:
        ck = Checkpointer(job.ckpt_dir, rank=0, world_size=1, memory=False)
        return [(i.step, i.generation, i.created_unix_s) for i in ck.list()]
    except Exception:  # noqa: BLE001 - no checkpoint directory: nothing published
        return []


def stop_job(job: Job, cluster) -> None:
    for host, proc in list(job.agents.items()):
        _kill_tree(proc.pid)
        for pid in cluster.pids(host) if hasattr(cluster, "pids") else []:
            try:
                if os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(job.workdir):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for entry in os.listdir("/proc"):  # orphans of this job (torchrun's workers lead sessions)
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == os.path.realpath(job.workdir):
                os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass
    for proc in job.agents.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_chaos(cluster, root: str, launcher: str, start_faults: Callable, duration_s: float, tail_s: float,
              step_s: float, backend: str, token_file: str, port: int = RDZV_PORT,
              collective_timeout_s: float = 15.0) -> tuple:
    """One chaos run of ``launcher`` on START_HOSTS: the schedule from the job's first full-size
    step, ``duration_s + tail_s`` then every process killed; (job, fault records)."""
    job = Job(launcher, cluster, os.path.join(root, f"{launcher}-chaos"), 10 ** 7, step_s, backend, token_file,
              collective_timeout_s, port, f"goodput-{launcher}-chaos-{os.getpid()}")
    os.makedirs(job.workdir, exist_ok=True)
    print(f"{launcher}: chaos run ({duration_s:.0f} s + {tail_s:.0f} s)", file=sys.stderr, flush=True)
    try:
        faults = run_job(job, START_HOSTS, duration_s + tail_s, start_faults)
    finally:
        stop_job(job, cluster)
    return job, faults


def prepare(root: str) -> str:
    """The dataset and the token file under ``root``; returns the token file's path."""
    os.makedirs(root, exist_ok=True)
    workload.write_dataset(os.path.join(root, "data"))
    token_file = os.path.join(root, "token")
    if not os.path.exists(token_file):
        with open(token_file, "w") as f:
            f.write(os.urandom(16).hex())
        os.chmod(token_file, 0o600)
    return token_file


# --------------------------------------------------------------------------------------- faults
class LocalInjector:
    """``--local``: the seeded schedule's process faults, injected on loopback."""

    def __init__(self, job: Job, records: list, schedule: list, spare: list) -> None:
        self.job, self.records, self.schedule, self.spare = job, records, schedule, list(spare)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        for t_s, kind, host, dur in self.schedule:
            if self._stop.wait(max(0.0, self.job.t_faults + t_s - time.time())):
                return
            t0 = time.time()
            target, t_end, detail = "", t0, ""
            if kind in ("kill_worker", "stop_worker", "scale_down"):  # a host still in the job
                live = [h for h in FAULT_HOSTS if h in self.job.agents and self.job.agents[h].poll() is None]
                if host not in live and live:
                    host = live[int(t_s * 10) % len(live)]
            if kind in ("kill_worker", "stop_worker"):
                pid = self.job.worker_pid(host)
                if pid is None:
                    detail = "no live worker"
                elif kind == "kill_worker":
                    os.kill(pid, signal.SIGKILL)
                    target = str(pid)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    target = str(pid)
                    self._stop.wait(dur)
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        detail = "gone before SIGCONT"
                    t_end = time.time()
            elif kind == "scale_up":
                host = self.spare.pop(0) if self.spare else host
                self.job.start_node(host)
                target = "agent"
            elif kind == "scale_down":
                proc = self.job.agents.get(host)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    self.spare.append(host)
                    target = "agent"
            self.records.append(LocalFault(kind, host, target, t0, t_end, detail))


def local_schedule(seed: int, duration_s: float, period_s: float, kinds, hosts) -> list:
    """(t_s, kind, host, duration_s): one fault per period at a seeded offset, kinds cycled in
    a seeded order; a scale-down only follows a scale-up (so the job stays >= 3 nodes)."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    out, t, i = [], period_s * 0.6, 0
    while t < duration_s - 5:
        kind = order[i % len(order)]
        out.append((round(t + rng.uniform(-3, 3), 1), kind, rng.choice(hosts), 5.0 if kind == "stop_worker" else 0.0))
        t += period_s
        i += 1
    return out


def harness_faults(cluster, kinds, seed: int, duration_s: float, period_s: float, schedule=None):
    """The netns harness's seeded schedule (``faults.Schedule.compressed`` over FAULT_HOSTS, h5
    spare) or the given one, and a starter that runs it with ``faults.Injector`` against a job,
    with the job's callbacks: the worker to kill or stop (from its step logs), a scale-up (an
    agent on the host) and a scale-down (SIGTERM to the host's agent)."""
    from benchmarks.chaos import faults

    if schedule is None:
        schedule = faults.Schedule.compressed(seed, duration_s, period_s=period_s, kinds=list(kinds),
                                              hosts=list(FAULT_HOSTS), spare_hosts=list(SPARE_HOSTS))

    def start(job: Job, records: list):
        def scale_up(host):
            if not host:  # no known spare: any host of the cluster without a live agent
                host = next((h for h in FAULT_HOSTS if h not in job.agents or job.agents[h].poll() is not None), "")
            if host:
                job.start_node(host)
            return host

        def scale_down(host):
            proc = job.agents.get(host)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            return host

        inj = faults.Injector(cluster, schedule, t0=job.t_faults, worker_pid=job.worker_pid, on_scale_up=scale_up,
                              on_scale_down=scale_down)
        inj.start()

        class Handle:
            def done(self):
                return inj.done()

            def stop(self):
                inj.stop()
                inj.join(timeout=120)
                records.extend(inj.records())
                for e in inj.errors:
                    print(f"fault injection: {e}", file=sys.stderr, flush=True)

        return Handle()

    return schedule, start


# --------------------------------------------------------------------------------------- report
def figures_of(job: Job, faults: list, ff: gp.RunFigures, ff_kept, ff_launch) -> dict:
    recs = read_dir(job.log_dir) if os.path.isdir(job.log_dir) else []
    fig = gp.analyze(recs, faults, job.t_launch, num_samples=workload.NUM_SAMPLES,
                     steps_per_epoch=workload.STEPS_PER_EPOCH, manifests=manifests(job), t_stop=job.t_stop,
                     global_batch=workload.GLOBAL_BATCH)
    kept = gp.kept_executions(gp.executions(recs))
    vs = gp.goodput_vs_fault_free(kept, job.t_launch, ff_kept, ff_launch, job.t_stop)
    ff_wall = gp.wall_to_step(ff_kept, ff_launch, fig.last_step) if kept else None
    n = max(1, len(faults))
    cost = (fig.wall_s - ff_wall) / n if ff_wall is not None else None
    steady = gp.steady_goodput(ff_kept)
    unrecovered = any(not x.recovered for x in fig.faults)
    # a fault never recovered from has no cost per fault to project from
    proj = gp.projected_goodput(max(0.0, cost), MTBF_S, steady) if cost is not None and steady and \
        not unrecovered else None
    return {"fig": fig, "vs": vs, "cost_per_fault_s": cost, "projected": proj, "ff": ff}


def print_run(label: str, f: dict) -> None:
    fig = f["fig"]
    a = fig.audit
    print(f"\n{label}: goodput {fig.goodput:.3f} (fault-free {f['ff'].goodput:.3f}), vs fault-free "
          f"{_fmt(f['vs'])}, wall {fig.wall_s:.1f} s, last step {fig.last_step}, executions {fig.executed_steps}, "
          f"re-formations {fig.reformations}; duplicated {a.duplicated_samples}, missing {a.missing_samples} "
          f"(unverified {a.unverified_samples}: incomplete steps {a.incomplete_steps}; missing steps "
          f"{a.missing_steps}); checksums "
          f"{fig.checksums_checked} checked, {fig.checksum_mismatches} disagree; checkpoints published "
          f"{fig.ckpt_published}, stale {fig.stale_publishes}, by a cut-off host {fig.partitioned_publishes}; "
          f"cost per fault {_fmt(f['cost_per_fault_s'])} s, projected at 3 h MTBF {_fmt(f['projected'])}")
    print(f"  {'t s':>6} {'fault':<12} {'host':<5} {'detect s':>9} {'recover s':>10} {'lost':>5} "
          f"{'world':>7} {'reforms':>8} {'spurious':>9}")
    for ff in fig.faults:
        print(f"  {ff.t_inject - f['t_faults']:>6.1f} {ff.kind:<12} {ff.host:<5} {_fmt(ff.detect_s):>9} "
              f"{_fmt(ff.recover_s):>10} {ff.steps_lost:>5} {str(ff.world_before) + '->' + str(ff.world_after):>7} "
              f"{ff.reformations:>8} {ff.spurious_reformations:>9}")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def fault_rows(fig: gp.RunFigures, t_launch: float) -> list:
    return [{"t_s": round(x.t_inject - t_launch, 1), "kind": x.kind, "host": x.host, "detect_s": x.detect_s,
             "recover_s": x.recover_s, "steps_lost": x.steps_lost, "world_before": x.world_before,
             "world_after": x.world_after, "reformations": x.reformations,
             "spurious_reformations": x.spurious_reformations, "recovered": x.recovered} for x in fig.faults]


def _r(v, n=4):
    return None if v is None else round(v, n)


# --------------------------------------------------------------------------------------- main
_CLUSTERS: list = []


def _cleanup() -> None:
    while _CLUSTERS:
        try:
            _CLUSTERS.pop().close()
        except Exception as exc:  # noqa: BLE001 - cleanup goes on
            print(f"cleanup: {exc}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 100 s schedule and a 30 s fault-free run")
    p.add_argument("--duration-s", type=float, default=None, help="the schedule's length (default 240; quick 100)")
    p.add_argument("--fault-free-s", type=float, default=None, help="the fault-free run (default 60; quick 30)")
    p.add_argument("--tail-s", type=float, default=20.0, help="after the schedule, for the last fault to recover")
    p.add_argument("--period-s", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--step-s", type=float, default=0.1)
    p.add_argument("--backend", choices=("embedded", "etcd"), default="embedded")
    p.add_argument("--collective-timeout-s", type=float, default=15.0,
                   help="the bound on a collective, both launchers: @elastic.run(timeout_s=) and torchrun's "
                        "init_process_group(timeout=) (default 15)")
    p.add_argument("--kinds", default=",".join(ALL_KINDS), help="fault kinds, comma-separated")
    p.add_argument("--launchers", default="elastic-run,torchrun")
    p.add_argument("--local", action="store_true", help="loopback, no namespaces: process faults only")
    p.add_argument("--workdir", default=None, help="keep logs here (default: a temporary dir, removed)")
    args = p.parse_args(argv)
    args.duration_s = args.duration_s or (100.0 if args.quick else 240.0)
    args.fault_free_s = args.fault_free_s or (30.0 if args.quick else 60.0)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if args.backend == "etcd" and "etcd_kill" not in args.kinds:
        args.kinds.append("etcd_kill")
    launchers = [x for x in args.launchers.split(",") if x]

    atexit.register(_cleanup)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: (_cleanup(), sys.exit(128 + s)))

    import torch

    if args.local:
        args.kinds = [k for k in args.kinds if k in LOCAL_KINDS]
        cluster = LocalHosts()
        sched = local_schedule(args.seed, args.duration_s, args.period_s, args.kinds, list(FAULT_HOSTS[:3]))
        schedule_text = "; ".join(f"{t:.0f}s {k} {h}" for t, k, h, _d in sched)

        def start_faults(job, records):
            return LocalInjector(job, records, sched, list(SPARE_HOSTS))
    else:
        from benchmarks.chaos import netns

        try:
            netns.require_namespaces()
        except netns.NamespacesUnavailable as exc:
            print(f"benchmarks/goodput.py: network namespaces unavailable: {exc} (use --local for loopback)",
                  file=sys.stderr)
            return 2
        cluster = netns.Cluster(etcd_host=args.backend == "etcd",
                                **({"workdir": args.workdir, "keep_workdir": True} if args.workdir else {}))
        _CLUSTERS.append(cluster)
        if args.backend == "etcd":
            cluster.start_etcd()
        sched, start_faults = harness_faults(cluster, args.kinds, args.seed, args.duration_s, args.period_s)
        schedule_text = "; ".join(f"{f.t_s:.0f}s {f.kind} {f.host}" for f in sched)
    if args.local:
        _CLUSTERS.append(cluster)
    root = args.workdir or (tempfile.mkdtemp(prefix="elastic-goodput-", dir="/var/tmp") if args.local
                            else str(cluster.workdir))
    token_file = prepare(root)

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"{'loopback (--local)' if args.local else 'network-namespace hosts'}: job on {','.join(START_HOSTS)}, "
          f"spare {','.join(SPARE_HOSTS)}, --nnodes 3:5, 1 worker a host, gloo; step {args.step_s * 1000:.0f} ms, "
          f"global batch {workload.GLOBAL_BATCH}, {workload.NUM_SAMPLES} samples an epoch, a checkpoint every 20 "
          f"steps; collective timeout {args.collective_timeout_s:.0f} s (both);\n  rendezvous: elastic-run "
          f"{args.backend} (h1{', token' if args.backend == 'embedded' else ''}), "
          f"torchrun c10d on h1; load average {os.getloadavg()[0]:.1f}")
    print(f"schedule (seed {args.seed}, {args.duration_s:.0f} s, a fault every ~{args.period_s:.0f} s): "
          f"{schedule_text}", flush=True)

    def port() -> int:
        if not args.local:
            return RDZV_PORT
        from elastic.net import free_port

        return free_port()

    results: dict = {}
    for launcher in launchers:
        ff_job = Job(launcher, cluster, os.path.join(root, f"{launcher}-fault-free"),
                     int(args.fault_free_s / args.step_s), args.step_s, args.backend, token_file,
                     args.collective_timeout_s, port(), f"goodput-{launcher}-ff-{os.getpid()}")
        os.makedirs(ff_job.workdir, exist_ok=True)
        print(f"{launcher}: fault-free run ({args.fault_free_s:.0f} s of steps)", file=sys.stderr, flush=True)
        try:
            run_job(ff_job, START_HOSTS, args.fault_free_s + 90)
        finally:
            stop_job(ff_job, cluster)
        ff_recs = read_dir(ff_job.log_dir) if os.path.isdir(ff_job.log_dir) else []
        ff = gp.analyze(ff_recs, [], ff_job.t_launch, num_samples=workload.NUM_SAMPLES,
                        steps_per_epoch=workload.STEPS_PER_EPOCH)
        ff_kept = gp.kept_executions(gp.executions(ff_recs))

        job, faults = run_chaos(cluster, root, launcher, start_faults, args.duration_s, args.tail_s, args.step_s,
                                args.backend, token_file, port(), args.collective_timeout_s)
        f = figures_of(job, faults, ff, ff_kept, ff_job.t_launch)
        f["t_launch"], f["t_faults"] = job.t_launch, job.t_faults
        f["checkpoint_loads"] = checkpoint_loads(job, cluster)
        results[launcher] = f
        print_run(launcher, f)
        print(f"  newest checkpoint in a fresh process: {'loads' if f['checkpoint_loads'][0] else 'FAILS'} "
              f"({f['checkpoint_loads'][1]})", flush=True)

    out: dict = {"seed": args.seed, "duration_s": args.duration_s, "period_s": args.period_s,
                 "backend": args.backend, "local": args.local, "kinds": args.kinds}
    for launcher, f in results.items():
        pre = "" if launcher == "elastic-run" else "torchrun_"
        fig = f["fig"]
        rows = fault_rows(fig, f["t_faults"])
        out.update({
            f"{pre}goodput": _r(fig.goodput), f"{pre}goodput_vs_fault_free": _r(f["vs"]),
            f"{pre}fault_free_goodput": _r(f["ff"].goodput),
            f"{pre}duplicated_samples": fig.audit.duplicated_samples,
            f"{pre}missing_samples": fig.audit.missing_samples,
            f"{pre}unverified_samples": fig.audit.unverified_samples,
            f"{pre}faults": rows,
            f"{pre}max_detect_s": _r(max((r["detect_s"] for r in rows if r["detect_s"] is not None), default=None), 3),
            f"{pre}max_recover_s": _r(max((r["recover_s"] for r in rows if r["recover_s"] is not None), default=None),
                                      3),
            f"{pre}unrecovered_faults": sum(1 for r in rows if not r["recovered"]),
            f"{pre}power_off_recover_s": [r["recover_s"] for r in rows if "power" in r["kind"]],
            f"{pre}spurious_reformations": sum(r["spurious_reformations"] for r in rows),
            f"{pre}steps_lost": sum(r["steps_lost"] for r in rows),
            f"{pre}cost_per_fault_s": _r(f["cost_per_fault_s"], 3),
            f"{pre}projected_goodput_3h_mtbf": _r(f["projected"]),
            f"{pre}checksum_mismatches": fig.checksum_mismatches,
            f"{pre}stale_publishes": fig.stale_publishes,
            f"{pre}partitioned_publishes": fig.partitioned_publishes,
            f"{pre}checkpoint_loads": f["checkpoint_loads"][0],
        })
    if "elastic-run" in results and "torchrun" in results:
        a, b = results["elastic-run"]["fig"].goodput, results["torchrun"]["fig"].goodput
        out["goodput_ratio_to_torchrun"] = round(a / b, 3) if b else None
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs kept under {root}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
