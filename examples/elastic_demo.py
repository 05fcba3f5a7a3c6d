"""What elastic-run is for, in about a minute on one machine (``make demo``).

    python examples/elastic_demo.py            # the story below; exit 0 when it went as told
    python examples/elastic_demo.py --help     # timings, worker counts, the overall time limit

Two nodes (two ``elastic-run`` agents on loopback, one embedded rendezvous store) train a small
classifier on scikit-learn's digits with PyTorch DDP, under ``@elastic.run`` so that a change of
the world is handled inside the running workers. While it trains, this script, acting as a
cluster scheduler would:

1. kills one worker with SIGKILL (a crash): its agent starts a replacement, the other workers
   recover in place (same PIDs) and training goes on at the same world size;
2. drains the second node through the control plane (``JobController.drain``, what a preemption
   notice or a Kubernetes ``preStop`` hook does): its workers save at their next commit and leave,
   its agent exits 75 ("drained"), and the job shrinks without spending its restart budget;
3. starts a third agent: it joins the running job and it grows back.

It follows the job's event stream (``JobController.events(follow=True)``) and prints every event
as it comes, the world size, how long training paused after each change, and the final test
accuracy. Every child process is killed when it ends, however it ends (Ctrl-C included).

The same file is the training script the agents run (``--worker``): read ``worker()`` below for
what an elastic training loop looks like.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

# --------------------------------------------------------------------------------------------
# The training script (what each worker runs)
# --------------------------------------------------------------------------------------------

GLOBAL_BATCH = 48  # samples per step for the whole job, split over the ranks (any world size 1-4, 6)


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import elastic

    torch.set_num_threads(1)
    data = np.load(args.data)
    xtr, ytr = torch.from_numpy(data["xtr"]), torch.from_numpy(data["ytr"])
    xte, yte = torch.from_numpy(data["xte"]), torch.from_numpy(data["yte"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Everything that must survive a change of the world: rolled back to the last commit() and
    # sent from a surviving peer to new workers (they never read a checkpoint to catch up).
    state = elastic.TorchState(model=model, optimizer=opt, step=0)

    def save_on_drain() -> None:  # a drained node's workers save the last committed step
        if os.environ.get("LOCAL_RANK") == "0":
            path = os.path.join(args.ckpt_dir, f"drained-node{os.environ.get('GROUP_RANK')}.pt")
            torch.save({"model": state.model.state_dict(), "step": state.step}, path)
            print(f"DEMO-SAVED step={state.step} path={path}", flush=True)

    state.register_drain_callbacks([save_on_drain])

    def last_step() -> int:
        """The driver decides when the story is over: it writes the last step into a file,
        far enough ahead that every rank reads it before reaching that step."""
        try:
            with open(args.stop_file) as f:
                return min(args.max_steps, int(f.read()))
        except (FileNotFoundError, ValueError):
            return args.max_steps

    @elastic.run(timeout_s=60)
    def train(state):
        # Called again after every change of the world, with the new RANK / WORLD_SIZE.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        net = DDP(state.model) if world > 1 else state.model  # wrap inside: the group is new
        loss_fn = nn.CrossEntropyLoss()
        while state.step < last_step():
            # One global batch per step from a per-epoch permutation; each rank takes its slice,
            # so the job sees the same data at any world size.
            per_epoch = len(xtr) // GLOBAL_BATCH
            epoch, i = divmod(state.step, per_epoch)
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
            batch = order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH].tensor_split(world)[rank]
            state.optimizer.zero_grad()
            loss = loss_fn(net(xtr[batch]), ytr[batch])
            loss.backward()  # DDP averages the gradients over the ranks
            state.optimizer.step()
            state.step += 1
            if rank == 0:
                print(f"DEMO-STEP step={state.step} world={world} gen={os.environ.get('ELASTIC_GENERATION', 0)} "
                      f"t={time.time():.3f} loss={loss.item():.4f}", flush=True)
            time.sleep(args.step_s)  # a bigger model's compute time: gives the story time to unfold
            state.commit()  # a point to roll back to; news of a new round is raised here

    train(state)
    if int(os.environ.get("RANK", "0")) == 0:
        with torch.no_grad():
            acc = (state.model(xte).argmax(1) == yte).float().mean().item()
        print(f"DEMO-FINAL accuracy={acc:.4f} step={state.step} world={os.environ.get('WORLD_SIZE')}", flush=True)


# --------------------------------------------------------------------------------------------
# The driver (a scheduler's part: start agents, watch the job, change it)
# --------------------------------------------------------------------------------------------

class DemoError(Exception):
    """Something did not happen as the story says: one line, then the logs' tails."""


@dataclass(frozen=True)
class Step:
    t: float  # unix time it completed (rank 0's clock: this machine's)
    step: int
    world: int
    gen: int
    loss: float


STEP_RE = re.compile(r"DEMO-STEP step=(\d+) world=(\d+) gen=(\d+) t=([\d.]+) loss=([\d.]+)")
FINAL_RE = re.compile(r"DEMO-FINAL accuracy=([\d.]+) step=(\d+) world=(\d+)")
SAVED_RE = re.compile(r"DEMO-SAVED step=(\d+)")


class Agent:
    """One ``elastic-run`` process (a "node"), its output read by a thread and kept."""

    def __init__(self, name: str, cmd: List[str], cwd: str, on_line) -> None:
        self.name = name
        self.lines: List[str] = []
        self.log_path = os.path.join(cwd, f"node-{name}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                     start_new_session=True,  # its own process group: killed as one
                                     preexec_fn=_die_with_parent)
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._log.write(line + "\n")
            self._on_line(self, line)
        self._log.flush()

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    [{self.name}] {line}" for line in self.lines[-n:])

    def family(self) -> list:
        """This agent and every process under it (workers, a fork server and its children)."""
        try:
            import psutil
            me = psutil.Process(self.proc.pid)
            return [me] + me.children(recursive=True)
        except Exception:
            return []

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)  # its own session: the agent and what it started
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)
        self._log.close()


def stop_agents(agents: List[Agent], grace_s: float = 3.0) -> None:
    """Every agent and everything it started: SIGTERM (an agent stops its workers and leaves),
    then SIGKILL to whatever outlived the grace, the process groups and each process found."""
    family = [p for a in agents for p in a.family()]
    running = [a for a in agents if a.proc.poll() is None]
    for a in running:
        a.signal_group(signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(a.proc.poll() is None for a in running):
        time.sleep(0.05)
    for a in agents:
        a.signal_group(signal.SIGKILL)
    for p in family:  # a worker that left its agent's process group
        try:
            p.kill()
        except Exception:
            pass
    for a in agents:
        a.close()


def _libc_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # not Linux: the driver's own cleanup is all there is
        return None


_PRCTL = _libc_prctl()  # looked up before any fork: the child only calls it


def _die_with_parent() -> None:
    """In the child: SIGKILL when the driver dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG;
    agents are started from the main thread, whose end is the driver's)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.deadline = time.monotonic() + args.timeout_s
        self.workdir = tempfile.mkdtemp(prefix="elastic-demo-")
        self.endpoint = f"127.0.0.1:{free_port()}"
        self.run_id = "demo"
        self.agents: Dict[str, Agent] = {}
        self.steps: List[Step] = []
        self.final: Optional[re.Match] = None
        self.cond = threading.Condition()
        self.print_lock = threading.Lock()
        self.ctl = None
        self.events: List = []
        self.outcomes: List[tuple] = []
        self._stop_events = threading.Event()
        self._last_progress = 0

    # -- output ----------------------------------------------------------------------------
    def say(self, message: str, at: Optional[float] = None) -> None:
        t = (at if at is not None else time.time()) - self.t0
        with self.print_lock:
            print(f"t={t:5.1f}s  {message}", flush=True)

    def on_line(self, agent: Agent, line: str) -> None:
        m = STEP_RE.search(line)
        if m:
            step = Step(float(m.group(4)), int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(5)))
            with self.cond:
                self.steps.append(step)
                self.cond.notify_all()
            if step.step >= self._last_progress + self.args.progress_every:
                self._last_progress = step.step
                self.say(f"    step {step.step:4d}  world size {step.world}  loss {step.loss:.3f}", at=step.t)
            return
        m = FINAL_RE.search(line)
        if m:
            with self.cond:
                self.final = m
                self.cond.notify_all()
        m = SAVED_RE.search(line)
        if m:
            self.say(f"    node {agent.name}: its workers saved their last committed step ({m.group(1)})")

    def follow_events(self) -> None:
        """Print the job's events as the agents publish them (what ``elastic-run ctl events
        --follow`` shows)."""
        from elastic.control import JobController

        with JobController.connect(self.endpoint, run_id=self.run_id) as ctl:
            since = ""
            while not self._stop_events.is_set():
                try:
                    for event in ctl.events(since=since, follow=True, timeout_s=0.5):
                        since = event.seq
                        self.events.append(event)
                        self.say(f"    event: {describe_event(event, self.node_names())}", at=event.time)
                        if self._stop_events.is_set():
                            break
                except Exception:  # the store goes away with node a at the job's end
                    if self.agents["a"].proc.poll() is not None:
                        return
                    time.sleep(0.2)  # a hiccup: read on from the last event seen

    def node_names(self) -> Dict[str, str]:
        """node id -> our name for its agent (the id holds the agent's pid)."""
        out = {}
        for e in self.events:
            for node in [e.node, *(e.details.get("nodes") or [])]:
                if node:
                    out[node] = self.agent_of(node)
        return out

    def agent_of(self, node_id: str) -> str:
        parts = node_id.rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
        return next((a.name for a in self.agents.values() if a.proc.pid == pid), node_id)

    # -- processes -------------------------------------------------------------------------
    def start_agent(self, name: str) -> Agent:
        a = self.args
        cmd = [os.path.join(os.path.dirname(sys.executable), "elastic-run"),
               "--nnodes", "1:2", "--nproc-per-node", str(a.nproc_per_node), "--max-restarts", "3",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id,
               "--rdzv-conf", "last_call_timeout=10",
               os.path.abspath(__file__), "--worker", "--data", self.data, "--stop-file", self.stop_file,
               "--ckpt-dir", self.workdir, "--step-s", str(a.step_s)]
        agent = Agent(name, cmd, self.workdir, self.on_line)
        self.agents[name] = agent
        return agent

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoError(f"the demo did not finish within --timeout-s {self.args.timeout_s:.0f}s")
        return left

    def check_agents(self, allowed: Dict[str, tuple] = None) -> None:
        for agent in self.agents.values():
            code = agent.proc.poll()
            if code is not None and code not in (allowed or {}).get(agent.name, ()):
                raise DemoError(f"node {agent.name}'s agent exited with code {code} unexpectedly")

    def wait_for(self, what: str, pred, timeout_s: float, allowed: Dict[str, tuple] = None):
        """Wait until ``pred()`` (called under the lock) returns something true."""
        end = time.monotonic() + min(timeout_s, self.left())
        with self.cond:
            while True:
                got = pred()
                if got:
                    return got
                if time.monotonic() >= end:
                    self.left()
                    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                self.cond.wait(0.2)
                self.check_agents(allowed)

    def first_step_after(self, gen: int, t: float, what: str, timeout_s: float, allowed=None) -> Step:
        return self.wait_for(what, lambda: next((s for s in self.steps if s.gen > gen and s.t >= t), None),
                             timeout_s, allowed)

    def train_a_while(self, seconds: float, allowed=None) -> Step:
        end = time.time() + seconds
        self.wait_for("training to go on", lambda: self.steps and self.steps[-1].t >= end, seconds + 60, allowed)
        return self.steps[-1]

    def event_after(self, t: float, names, timeout_s: float = 10.0):
        """The first event of ``names`` at or after ``t`` (None if none came)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = next((e for e in list(self.events) if e.name in names and e.time >= t - 0.05), None)
            if found:
                return found
            time.sleep(0.05)
        return None

    def worker_pids(self, status) -> set:
        return {pid for n in status.nodes if n.node_rank is not None for pid in n.worker_pids}

    def kept(self, survivors: set, world: int, gone: set = frozenset()) -> str:
        """How many of the workers that survived a change still run in the same process."""
        end = time.monotonic() + 3
        while True:  # the agents publish their new PIDs as they re-form: read until they have
            pids = self.worker_pids(self.ctl.status())
            if (len(pids) == world and not pids & gone) or time.monotonic() > end:
                break
            time.sleep(0.1)
        return f"; {len(survivors & pids)} of {len(survivors)} other workers kept their PIDs"

    def outcome(self, what: str, t_event: float, step: Step, extra: str = "") -> None:
        pause = step.t - t_event
        self.outcomes.append((what, pause, step.world))
        self.say(f"{what} -> training again in {pause:.1f}s at world size {step.world}\n"
                 f"{'':10}   (resumed at step {step.step}{extra})", at=t_event)

    # -- the story -------------------------------------------------------------------------
    def run(self) -> int:
        from elastic.control import EXIT_DRAINED, JobController

        a = self.args
        nproc = a.nproc_per_node
        with self.print_lock:
            print(HEADER.format(nproc=nproc, world=2 * nproc, endpoint=self.endpoint), flush=True)
        self.prepare_data()
        self.t0 = time.time()  # t=0: the first agent starts

        self.say(f"starting node a (it hosts the rendezvous store on {self.endpoint}) and node b")
        self.start_agent("a")
        self.wait_for("node a's rendezvous store",
                      lambda: any("listening" in line for line in self.agents["a"].lines), 60)
        self.start_agent("b")
        self.ctl = JobController.connect(self.endpoint, run_id=self.run_id)
        threading.Thread(target=self.follow_events, name="events", daemon=True).start()
        first = self.wait_for(f"training at world size {2 * nproc}",
                              lambda: next((s for s in self.steps if s.world == 2 * nproc), None), 120)
        self.say(f"training at world size {first.world} (2 nodes x {nproc} workers), step {first.step}", at=first.t)

        # 1. a worker crashes
        before = self.train_a_while(a.phase_s)
        status = self.ctl.status()
        node0 = next(n for n in status.nodes if n.node_rank == 0)
        victim_rank = min(1, nproc - 1)
        pid = node0.worker_pids[victim_rank]
        others = self.worker_pids(status) - {pid}
        self.say(f">> killing worker rank {victim_rank} (pid {pid} on node {self.agent_of(node0.node_id)}) "
                 f"with SIGKILL, as a crash would")
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        step = self.first_step_after(before.gen, t_kill, "training to resume after the kill", 60)
        self.outcome(f"worker killed (rank {victim_rank})", t_kill, step, self.kept(others, step.world, gone={pid}))

        # 2. a node is drained through the control plane
        before = self.train_a_while(a.phase_s)
        status = self.ctl.status()
        node1 = next(n for n in status.nodes if n.node_rank == 1)
        name = self.agent_of(node1.node_id)
        others = self.worker_pids(status) - set(node1.worker_pids)
        self.say(f">> draining node {name} through the control plane: "
                 f"JobController.drain(node, deadline_s=30, reason='preemption')")
        t_drain = time.time()
        self.ctl.drain(node1.node_id, deadline_s=30, reason="preemption")
        drained = {name: (EXIT_DRAINED,)}
        step = self.first_step_after(before.gen, t_drain, "training to resume after the drain", 60, drained)
        self.outcome(f"node {name} drained", t_drain, step, self.kept(others, step.world, gone=set(node1.worker_pids)))
        try:
            code = self.agents[name].proc.wait(timeout=min(30, self.left()))
        except subprocess.TimeoutExpired:
            raise DemoError(f"node {name} was drained but its agent did not exit within 30s") from None
        if code != EXIT_DRAINED:
            raise DemoError(f"node {name}'s agent exited {code} after its drain, expected {EXIT_DRAINED} (drained)")
        self.say(f"node {name}'s agent exited {code}: drained, checkpoint saved (a scheduler requeues it; "
                 f"restarts spent so far: {self.ctl.status().restarts})")

        # 3. a new node joins
        before = self.train_a_while(a.phase_s, drained)
        others = self.worker_pids(self.ctl.status())
        self.say(">> starting node c: a third elastic-run agent with the same command line")
        t_start = time.time()
        self.start_agent("c")
        step = self.first_step_after(before.gen, t_start, "training at the new size after node c joined",
                                     120, drained)
        seen = self.event_after(t_start, ("membership_changed", "round"), timeout_s=2) or None
        t_join = seen.time if seen is not None else t_start
        self.outcome("node c joined", t_join, step, self.kept(others, step.world)
                     + f";\n{'':10}    its agent had started {t_join - t_start:.1f}s before the job saw it")
        status = self.ctl.status()  # read while the store runs (node a hosts it until the end)

        # the end: every rank stops at the same step
        last = self.train_a_while(a.phase_s, drained)
        stop_at = last.step + a.final_steps
        with open(self.stop_file + ".tmp", "w") as f:
            f.write(str(stop_at))
        os.replace(self.stop_file + ".tmp", self.stop_file)
        final = self.wait_for("the final test accuracy", lambda: self.final, 60, drained)
        for n in ("a", "c"):
            try:
                code = self.agents[n].proc.wait(timeout=min(30, self.left()))
            except subprocess.TimeoutExpired:
                raise DemoError(f"node {n}'s agent did not exit within 30s after training ended") from None
            if code != 0:
                raise DemoError(f"node {n}'s agent exited {code} after training ended, expected 0")
        time.sleep(0.3)  # the last events reach the follower
        self._stop_events.set()
        self.summary(final, status)
        return 0

    def prepare_data(self) -> None:
        """Load and split digits once (workers then read a small .npz, not scikit-learn)."""
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
        self.data = os.path.join(self.workdir, "digits.npz")
        np.savez(self.data, xtr=xtr, ytr=ytr.astype(np.int64), xte=xte, yte=yte.astype(np.int64))
        self.stop_file = os.path.join(self.workdir, "last-step")

    def summary(self, final: re.Match, status) -> None:
        wall = time.time() - self.t0
        lines = ["", "what happened (pause: from the change to the next completed training step):"]
        for what, pause, world in self.outcomes:
            lines.append(f"  {what:<26} paused {pause:4.1f}s   world size after: {world}")
        lines.append(f"restarts spent from the budget: {status.restarts} of {status.max_restarts} "
                     f"({'the crash; ' if status.restarts == 1 else ''}a drain or a join spends none)")
        lines.append(f"final test accuracy {float(final.group(1)):.4f} after {final.group(2)} steps "
                     f"(world size {final.group(3)}); demo took {wall:.0f}s")
        with self.print_lock:
            print("\n".join(lines), flush=True)

    def close(self) -> None:
        self._stop_events.set()
        stop_agents(list(self.agents.values()))
        if self.ctl is not None:
            try:
                self.ctl.close()
            except Exception:
                pass
        if self.args.keep:
            print(f"(logs and data kept in {self.workdir})", flush=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


HEADER = """\
elastic-run demo: an elastic training job on this machine (loopback only)

Two nodes -- two elastic-run agents with {nproc} workers each, world size {world} -- train a small
classifier on scikit-learn's digits with PyTorch DDP, under @elastic.run (recovery happens inside
the running workers). While it trains, this script plays the cluster scheduler:
  1. it kills one worker with SIGKILL  -> its node starts a replacement, the others recover in place
  2. it drains the second node         -> (JobController.drain) it saves and leaves; the job shrinks
  3. it starts a third node            -> it joins the running job; the job grows again
Every event the job publishes is printed as it comes (JobController.events(follow=True)), and
after each change, how long training paused.
"""


def describe_event(event, names: Dict[str, str]) -> str:
    """One readable line for a JobEvent."""
    d = event.details
    who = f"node {names.get(event.node, event.node)}" if event.node else "controller"
    if event.name == "round":
        nodes = ", ".join(names.get(n, n) for n in d.get("nodes", []))
        return f"round {event.generation} formed: world size {d.get('world_size')}, nodes [{nodes}]"
    if event.name == "join":
        return f"{who} joined (node rank {d.get('node_rank')})"
    if event.name == "restart":
        return f"{who}: restart {d.get('restarts')} of {d.get('max_restarts')} spent from the job's budget"
    if event.name == "succeeded":
        return f"{who}: its workers finished; it leaves the job"
    if event.name == "lost_peer":
        error = re.sub(r"^\[[^]]*\]\s*", "", d.get("error", ""))  # gloo's source location
        return f"{who}: a worker lost a peer ({_short(error, 45)})"
    if event.name == "failure":
        return f"{who}: worker rank {d.get('rank')} failed ({_short(d.get('error', ''))})"
    if event.name == "membership_changed":
        return f"{who}: membership changed ({d.get('reason')})"
    if event.name in ("drain", "drained"):
        return f"{who}: {'draining' if event.name == 'drain' else 'drained and left'} ({d.get('reason')})"
    if event.name == "drain_requested":
        return f"controller: drain of node {names.get(d.get('node', ''), d.get('node'))} requested ({d.get('reason')})"
    extra = " ".join(f"{k}={v}" for k, v in d.items() if k not in ("nodes",))
    return f"{who}: {event.name}{' ' + extra if extra else ''}"


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=100000, help=argparse.SUPPRESS)
    p.add_argument("--nproc-per-node", type=int, default=2, choices=(1, 2), help="workers per node (default 2)")
    p.add_argument("--step-s", type=float, default=0.03, help="extra seconds per training step (default 0.03)")
    p.add_argument("--phase-s", type=float, default=3.0, help="seconds of training between changes (default 3)")
    p.add_argument("--final-steps", type=int, default=40, help="steps after the story before the end (default 40)")
    p.add_argument("--progress-every", type=int, default=100, help="a progress line every N steps (default 100)")
    p.add_argument("--timeout-s", type=float, default=170.0, help="give up after this many seconds (default 170)")
    p.add_argument("--keep", action="store_true", help="keep the agents' logs and data (their path is printed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    demo = Demo(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    timed_out = threading.Event()

    def watchdog():  # the last resort if something blocks without a timeout of its own
        timed_out.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(args.timeout_s + 20, watchdog)
    timer.daemon = True
    timer.start()
    try:
        return demo.run()
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr, flush=True)
        for agent in demo.agents.values():
            print(f"  last lines of node {agent.name} (exit {agent.proc.poll()}):\n{agent.tail()}",
                  file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if timed_out.is_set():
            print(f"\ndemo FAILED: still running {args.timeout_s + 20:.0f}s after it started; stopping every node",
                  file=sys.stderr, flush=True)
            return 1
        print("\ninterrupted: stopping every node", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # a bug or an unreachable store: one line, the logs, every node stopped
        print(f"\ndemo FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        for agent in demo.agents.values():
            print(f"  last lines of node {agent.name} (exit {agent.proc.poll()}):\n{agent.tail()}",
                  file=sys.stderr, flush=True)
        return 1
    finally:
        timer.cancel()
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
