"""The per-node elastic agent: rendezvous, spawn workers, watch them and the round, repeat.

One loop, like torchelastic's ``SimpleElasticAgent``: join a round, start this node's share
of the workers with torchrun's environment, then wait for one of four things: all workers
succeeded (leave cleanly, exit 0), a worker failed (spend one restart from the job-wide
budget and start the next round), the round changed because a node joined, left or died
(stop the workers, rejoin), or the agent was told to stop (SIGTERM/SIGINT: stop workers with
a grace period, leave the round so the others rescale at once).

Workers under ``@elastic.run`` register in the store; when all live local workers have, a
change does not stop them: the agent joins the next round, publishes each worker's new
place (``assign/<node>/<local_rank>``), and starts fresh workers only for dead local ranks;
the survivors re-form their process group in place and sync state from a peer.

A node cut off from the store (a partition) fences its workers the moment its lease may have
ended: they are frozen (SIGSTOP), as the others may re-form without this node any moment, so no
worker of a round that is gone steps or saves after that. It rides the partition out; once the
store answers, the workers go on if its lease held and their round stands (an outage every node
saw), else they are killed, the node takes a new lease and joins the next round as a newcomer.
Nothing is charged to the restart budget.
A store silent for ``store_timeout`` is given up: the workers are stopped, one line names the
store and how long it was silent, and the agent exits with :data:`EXIT_STORE_LOST`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ..errors import one_line
from ..faults import looks_like_lost_peer
from ..net import free_port, free_port_range
from ..rendezvous import (NodeInfo, RendezvousClosedError, RendezvousHandler, RestartBudgetExceededError,
                          Round)
from ..rendezvous.api import StoreLostError
from ..rendezvous.protocol import LOST_PEER_REASON
from ..rendezvous.state import ChangeReason, RoundState
from ..control.api import EXIT_DRAINED, Drain, DrainReason, JobEvent, NodeState
from ..control.controller import JobController
from ..store import LeaseNotFoundError, StoreError, StoreUnavailableError
from .api import EXIT_STORE_LOST, AgentError, FrameworkAdapter, RunOutcome, RunResult, WorkerExit, WorkerSpec
from .forkserver import FORK_SAFE_PRELOADS, ForkServer
from .reporter import NodeReporter
from .watch import RoundWatcher
from .workers import StandbyPool, WorkerGroup

__all__ = ["ElasticAgent"]

log = logging.getLogger("elastic.agent")

#: How long a drain without a deadline (a SIGTERM's) may take: inside Kubernetes' 30 s grace.
DEFAULT_DRAIN_GRACE_S = 25.0


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ElasticAgent:
    """Runs ``spec`` on this node for as long as the job lasts; ``run()`` returns the exit code."""

    def __init__(self, spec: WorkerSpec, handler: RendezvousHandler, *, monitor_interval_s: float = 0.1,
                 adapter: Optional[FrameworkAdapter] = None,
                 store_env: Optional[Dict[str, str]] = None, drain_signals: Sequence[int] = (signal.SIGTERM,),
                 drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
                 on_event: Optional[Callable[[JobEvent], None]] = None) -> None:
        self.spec = spec
        self.drain_signals = tuple(drain_signals)
        self.drain_grace_s = drain_grace_s  # a drain without a deadline (SIGTERM's) ends by then
        self.reporter = NodeReporter(handler, spec.nproc_per_node, on_event)
        self._notice = 0  # a drain signal received while workers run: drained by the monitor
        self.adapter = adapter or FrameworkAdapter()
        self.handler = handler
        self.settings = handler.settings
        self.monitor_interval_s = monitor_interval_s
        # How workers reach the store (ELASTIC_RDZV_*): @elastic.run workers read their new
        # rank from it when the agent re-forms them in place.
        self.store_env = dict(store_env or {})
        self._worker_store: Any = None  # node rank 0's TCPStore for the workers of the current round
        self.round: Optional[Round] = None
        self._group: Optional[WorkerGroup] = None
        self._standbys: Optional[Union[ForkServer, StandbyPool]] = None  # StandbyPool: not fork-safe
        self._watcher: Optional[RoundWatcher] = None
        self._lease_epoch = 0  # the handler's lease epoch when this node joined the current round
        self._base_env = self._make_base_env()

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signals belong to the main thread
            previous = {s: signal.signal(s, self._on_signal)
                        for s in {signal.SIGTERM, signal.SIGINT, *self.drain_signals}}
        self.reporter.publish_settings(run_id=self.settings.run_id, min_nodes=self.settings.min_nodes,
                                       max_nodes=self.settings.max_nodes, max_restarts=self.settings.max_restarts)
        try:
            if self.spec.standby and not self.spec.no_python:
                if set(self.spec.preload) <= FORK_SAFE_PRELOADS:  # one import per node, forked on demand
                    self._standbys = ForkServer(self.spec.python or sys.executable, list(self.spec.preload),
                                                self._base_env, self.spec.cwd)
                else:
                    self._standbys = StandbyPool(self.spec, self._base_env, self.spec.nproc_per_node)
            return self._loop()
        except _Terminated as exc:
            log.warning("agent received %s: stopping workers and leaving the job", exc)
            self._stop_workers()
            self.handler.leave()
            self.reporter.emit("left", signal=str(exc))
            return 128 + exc.signum
        except RendezvousClosedError as exc:
            return self._fail(str(exc))
        except StoreLostError as exc:
            return self._store_lost(exc)
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            for s, h in previous.items():
                signal.signal(s, h)
            if self._standbys:
                self._standbys.close()
            self.adapter.close()
            self._worker_store = None

    def _loop(self) -> int:
        if self._standbys is not None and self._joining_a_running_job():
            # Joining makes every running worker pause for us: be ready to start at once.
            log.info("a job is running; warming standbys before joining it")
            self._standbys.wait_warm(timeout_s=self.settings.join_timeout_s)
        rnd = self._next_round(None)
        self._start_workers(rnd)
        while True:
            try:
                after = self._run_round(rnd)
            except (StoreUnavailableError, LeaseNotFoundError) as exc:
                # The store failed a step of this node's reaction to the round's end (a
                # partition, a store that is gone): this node's place in the job is in doubt.
                # (self.round: the round joined last, which may be the next one already.)
                after = self._rejoin(self.round or rnd, f"the rendezvous store failed us: {one_line(exc)}",
                                     resumable=False)
            if isinstance(after, int):
                return after
            rnd = after

    def _run_round(self, rnd: Round) -> Union[int, Round]:
        """Watch ``rnd`` until it ends for this node; returns the exit code, or the next round
        (its workers started or re-formed)."""
        result = self._monitor(rnd)
        if result.outcome is RunOutcome.LEASE_LOST:
            return self._rejoin(rnd, result.lease_lost, resumable=True)
        if result.outcome is RunOutcome.SUCCEEDED:
            log.info("all %d local workers succeeded", self.spec.nproc_per_node)
            try:
                self.handler.mark_done(rnd)
            except StoreError as exc:  # the others see this node's lease end instead: they go on
                log.warning("could not record that this node's workers succeeded: %s", exc)
            self._stop_workers()
            self.handler.leave()
            self.reporter.update(NodeState.SUCCEEDED)
            self.reporter.emit("succeeded")
            return 0
        failure = result.failure
        in_place = self._workers_recover_in_place(exclude=[failure.local_rank] if failure else [])
        if result.outcome is RunOutcome.LOST_PEER or (failure and self._lost_a_peer(rnd, failure)):
            return self._on_lost_peer(rnd, result.describe(), failure, in_place)
        if result.change and result.change.reason in (ChangeReason.DRAIN_REQUESTED, ChangeReason.STOP_REQUESTED):
            return self._drain(rnd, result.change.reason is ChangeReason.STOP_REQUESTED,
                               self._workers_recover_in_place(exclude=[]))
        if failure:
            log.error("%s", failure.describe())
            self.reporter.emit("failure", rank=failure.rank, error=failure.describe())
            self._report_failure(rnd, failure)
            if not in_place:
                self._stop_workers()
            try:
                self.handler.request_new_round(rnd, failure.describe(), ChangeReason.WORKER_FAILED)
            except RestartBudgetExceededError as exc:
                return self._fail(str(exc))
            self.reporter.emit("restart", restarts=self.handler.ledger.restart_count(),
                               max_restarts=self.settings.max_restarts)
        else:  # the round changed
            change = result.change
            assert change is not None  # a RunResult of ROUND_CHANGED carries its change
            if change.reason is ChangeReason.JOB_FAILED:
                return self._fail(str(change))
            log.warning("membership changed: %s", change)
            self.reporter.emit("membership_changed", reason=change.reason.value,
                               node=change.node_id or "", message=str(change))
            if not in_place:
                self._stop_workers()
        nxt = self._next_round(rnd)
        self._resume(nxt, in_place)
        return nxt

    def _on_lost_peer(self, rnd: Round, why: str, failure: Optional[WorkerExit], in_place: bool) -> Union[int, Round]:
        """A collective lost a peer: a node may be gone, its lease alive for seconds yet.

        Open the next round at once: a live node joins it, a dead one is left out. A node's
        death is a membership change and costs no restart; a round that comes back with every
        node (nobody was lost: a bug or a network blip broke the collective) is charged once,
        by the node that opened it, unless a worker's failure was already charged for it.
        """
        log.warning("a worker lost a peer (%s); opening the next round", why)
        self.reporter.emit("lost_peer", error=why)
        if not in_place:
            self._stop_workers()
        opened = self.handler.request_new_round(rnd, f"{LOST_PEER_REASON}: {why}", ChangeReason.LOST_PEER)
        nxt = self._next_round(rnd)
        if opened and set(rnd.node_ids) <= set(nxt.node_ids) and not self.handler.ledger.failures_of(rnd.generation):
            if failure:
                self._report_failure(rnd, failure)
            try:
                self.handler.charge_restart(f"{why}, and no node was lost")
            except RestartBudgetExceededError as exc:
                return self._fail(str(exc))
        self._resume(nxt, in_place)
        return nxt

    def _rejoin(self, rnd: Round, why: str, resumable: bool) -> Round:
        """This node's lease may have ended (or the store failed it) while its workers ran in
        ``rnd``: the others may re-form without it. The workers are fenced: frozen (SIGSTOP, by
        the watcher already when the lease ran out), so none steps or saves. Once the store
        answers again (up to ``store_timeout``): if the lease held and ``rnd`` still stands (a
        store outage that every node saw, an etcd restart), they go on where they were;
        otherwise they are killed (no final save: a save of a round that is gone must not
        publish), and the node takes a new lease if its old one is gone and joins the next round
        as a newcomer. Nothing is charged: the node was cut off, no worker failed. Only workers
        that were running in ``rnd`` when the lease ran out are ``resumable``; a store that failed
        a step of the agent's reaction to a change leaves them in no known state: killed."""
        log.warning("fenced round %d: %s; this node's workers are frozen until the store answers", rnd.generation, why)
        if self._watcher is not None:
            self._watcher.stop()
        group = self._group
        if group is not None:
            group.pause()
            if resumable:
                self.handler.await_store()  # a StoreLostError past store_timeout: run() stops the workers
            if resumable and group.all_alive() and self._still_in(rnd):
                group.resume()
                log.warning("the rendezvous store answers again and round %d stands: workers resumed (pids %s)",
                            rnd.generation, group.pids)
                self._restart_watch(rnd)
                self.reporter.emit("resumed", reason=why)
                return rnd
            group.kill()
        log.warning("round %d is gone for this node: its workers are stopped and it rejoins the job", rnd.generation)
        self._stop_workers(grace_s=0.0)
        nxt = self._next_round(rnd)
        self.reporter.emit("fenced", fenced_generation=rnd.generation, reason=why)
        self._start_workers(nxt)
        return nxt

    def _still_in(self, rnd: Round) -> bool:
        """Whether this node's lease never lapsed (a renewal proves it now: nobody re-formed
        without it) and ``rnd`` is still the job's round. Any other change (a node gone meanwhile,
        one waiting to join, a drain) is the resumed watcher's to see, as in any round."""
        try:
            if not self.handler.confirm_lease(self._lease_epoch):
                return False
            kv = self.handler.store.get(self.handler.keys.round())
        except (StoreUnavailableError, LeaseNotFoundError):
            return False
        state = RoundState.from_json(kv.value) if kv is not None else None
        return state is not None and state.generation == rnd.generation and state.is_closed

    def _store_lost(self, exc: StoreLostError) -> int:
        """The store has been silent for ``store_timeout``: stop the workers, say so in one line
        and exit with :data:`EXIT_STORE_LOST` (nothing to write to a store that is gone)."""
        if self._group is not None:
            self._group.kill()
        self._stop_workers(grace_s=0.0)
        print(f"elastic-run: error: {exc}; this node's workers were stopped (exit {EXIT_STORE_LOST})",
              file=sys.stderr, flush=True)
        return EXIT_STORE_LOST

    def _resume(self, rnd: Round, in_place: bool) -> None:
        watcher = self._watcher
        if in_place and watcher is not None and watcher.lease_lost and self._group is not None:
            # The lease ran out while this node re-formed (its in-place workers kept their
            # watcher): the fence froze them, and the node joined as a newcomer: start afresh.
            log.warning("the workers were fenced during the rendezvous (%s): starting them afresh", watcher.lease_lost)
            self._group.kill()
            self._stop_workers(grace_s=0.0)
            in_place = False
        if in_place:
            self._reform_in_place(rnd)
        else:
            self._start_workers(rnd)

    def _fail(self, reason: str) -> int:
        self._stop_workers()
        print(self.handler.ledger.failure_summary(reason), file=sys.stderr, flush=True)
        self.reporter.update(NodeState.FAILED)
        self.reporter.emit("failed", reason=reason)
        self.handler.leave()
        return 1

    def _drain(self, rnd: Round, stop: bool, in_place: bool) -> int:
        """Leave at a safe point: in-place workers save at their next ``commit()`` and exit 0 (the
        others re-form in place at the same commit: the round this node opens, without it);
        other workers get SIGTERM (their save-on-SIGTERM path) and SIGKILL at the deadline."""
        keys, me = self.handler.keys, self.handler.node.node_id
        kv = self.handler.store.get(keys.stop() if stop else keys.drain(me))
        drain = Drain.from_json(json.loads(kv.value)) if kv else Drain(DrainReason.PREEMPTION)
        if stop:
            drain = Drain(DrainReason.STOP, drain.deadline, drain.at)
        deadline = drain.deadline or time.time() + self.drain_grace_s
        log.warning("%s: workers save and leave (deadline in %.1fs)",
                    "job stop" if stop else f"drain ({drain.reason.value})",
                    deadline - time.time())
        self._notice = -1  # a drain signal from now on (a kubelet's SIGTERM after preStop) changes nothing
        self.reporter.update(NodeState.DRAINING, drain=drain)
        self.reporter.emit("stop" if stop else "drain", reason=drain.reason.value, deadline=drain.deadline)
        if in_place:
            if not stop:
                self.handler.request_new_round(rnd, f"node {me} drains ({drain.reason.value})",
                                               ChangeReason.REQUESTED, joining=False)
            while time.time() < deadline and not all(w.proc.poll() is not None for w in self._workers.workers):
                time.sleep(self.monitor_interval_s)
            self._stop_workers()  # what outlived the deadline
        else:
            self._stop_workers(grace_s=max(0.0, deadline - time.time()))
        if stop:
            self.handler.mark_done(rnd)
        self.handler.leave()
        if not stop:
            self.handler.store.delete(keys.drain(me))  # it has left: the request is done
        self.reporter.update(NodeState.STOPPED if stop else NodeState.DRAINED)
        self.reporter.emit("stopped" if stop else "drained", reason=drain.reason.value)
        return 0 if stop else EXIT_DRAINED

    @staticmethod
    def _lost_a_peer(rnd: Round, failure: WorkerExit) -> bool:
        """Whether a worker died of a connection to another node breaking (not of a bug)."""
        if rnd.num_nodes < 2 or failure.signal:
            return False
        return looks_like_lost_peer(failure.error + failure.stderr_tail)

    def _joining_a_running_job(self) -> bool:
        kv = self.handler.store.get(self.handler.keys.round())
        return kv is not None and RoundState.from_json(kv.value).is_closed

    # -- in-process recovery (@elastic.run workers) -------------------------------------
    def _workers_recover_in_place(self, exclude: List[int]) -> bool:
        """Whether every other live local worker runs under @elastic.run (it registered)."""
        group = self._group
        if group is None:
            return False
        others = [w for w in group.workers if w.local_rank not in exclude]
        for w in others:
            if w.proc.poll() not in (None, 0):  # it died too: say why, as it cannot re-form
                error = w.read_error().strip().splitlines()
                log.warning("rank %d (pid %d) exited too, with code %s%s", w.rank, w.proc.pid, w.proc.returncode,
                            f": {error[-1]}" if error else "")
        live = [w for w in others if w.proc.poll() is None]
        return bool(live) and all(self._registered(w) for w in live)

    def _registered(self, worker) -> bool:
        kv = self.handler.store.get(self.handler.keys.inproc(self.handler.node.node_id, worker.local_rank))
        return kv is not None and kv.value.decode() == str(worker.proc.pid)

    def _reform_in_place(self, rnd: Round) -> None:
        """Tell live workers their place in ``rnd``; start new ones for dead local ranks."""
        group = self._workers
        dead = [w.local_rank for w in group.workers if w.proc.poll() not in (None, 0)]
        self._host_worker_store(rnd)
        self.adapter.on_round(rnd, fresh_local_ranks=dead)
        self._restart_watch(rnd)
        for w in group.workers:
            if w.local_rank in dead:
                continue
            env = self.worker_env(rnd, w.local_rank)
            news = {k: v for k, v in env.items() if self._base_env.get(k) != v}
            self.handler.store.put(self.handler.keys.assign(self.handler.node.node_id, w.local_rank),
                                   json.dumps({"generation": rnd.generation, "env": news}).encode())
        if dead:
            group.replace({i: self.worker_env(rnd, i) for i in dead}, self._attempt_dir(rnd))
        log.info("round %d: workers re-formed in place (pids %s; new: local ranks %s)",
                 rnd.generation, group.pids, dead or "none")
        self.reporter.update(NodeState.RUNNING, rnd=rnd, pids=group.pids)

    def _next_round(self, prev: Optional[Round]) -> Round:
        node = self.handler.node
        node = NodeInfo(node.node_id, node.host, node.nproc, master_port=free_port(), rank_hint=node.rank_hint,
                        aux_port=free_port_range(node.nproc))
        t0 = time.monotonic()
        self.reporter.update(NodeState.RENDEZVOUS)
        rnd = self.handler.next_round(prev, node)
        self._lease_epoch = self.handler.lease_epoch
        self.round = rnd
        log.info("round %d: node rank %d of %d, world size %d (%.2fs)", rnd.generation, rnd.node_rank,
                 rnd.num_nodes, rnd.world_size, time.monotonic() - t0)
        self.reporter.round = rnd
        if prev is None:
            self.reporter.emit("join", node_rank=rnd.node_rank, host=rnd.node.host)
        if rnd.node_rank == 0:  # one event per round, from its node rank 0
            self.reporter.emit("round", world_size=rnd.world_size, nodes=list(rnd.node_ids),
                               rendezvous_s=round(time.monotonic() - t0, 3))
        return rnd

    # -- workers ---------------------------------------------------------------------------
    def _make_base_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.env)
        if self.spec.nproc_per_node > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = "1"  # as torchrun does: N workers must not oversubscribe cores
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def worker_env(self, rnd: Round, local_rank: int) -> Dict[str, str]:
        """torchrun's variables for one local worker, plus the round's generation."""
        rank = rnd.rank_offset + local_rank
        env = dict(self._base_env)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(rnd.world_size), "LOCAL_WORLD_SIZE": str(rnd.node.nproc),
            "GROUP_RANK": str(rnd.node_rank), "GROUP_WORLD_SIZE": str(rnd.num_nodes),
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(rnd.world_size), "ROLE_NAME": self.spec.role,
            "MASTER_ADDR": rnd.master_addr, "MASTER_PORT": str(rnd.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(rnd.restart_count),
            "TORCHELASTIC_MAX_RESTARTS": str(self.settings.max_restarts),
            "TORCHELASTIC_RUN_ID": self.settings.run_id,
            "TORCHELASTIC_USE_AGENT_STORE": str(self._hosts_worker_store),
            "ELASTIC_GENERATION": str(rnd.generation), "ELASTIC_NUM_NODES": str(rnd.num_nodes),
            "ELASTIC_NODE_ID": self.handler.node.node_id, "ELASTIC_RUN_PREFIX": self.handler.prefix,
            **self.store_env,
        })
        env.update(self.adapter.worker_env(rnd, local_rank, rank))
        return env

    def _attempt_dir(self, rnd: Round) -> str:
        path = os.path.join(self.spec.log_dir or self._scratch_dir(), self.settings.run_id,
                            f"attempt_{rnd.generation}")
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def _hosts_worker_store(self) -> bool:
        """PyTorch jobs: node rank 0's agent hosts the workers' TCPStore, as torchrun's does.

        It is up before any worker connects, so no worker waits out a connect-retry backoff
        (rank 0 of a re-formed group may be a replacement that starts after its peers).
        """
        return self.adapter.hosts_worker_store and not self.spec.no_python

    def _host_worker_store(self, rnd: Round) -> None:
        if not self._hosts_worker_store:
            return
        self._worker_store = None  # the previous round's server stops with it
        if rnd.node_rank != 0:
            return
        from datetime import timedelta

        from torch.distributed import TCPStore

        self._worker_store = TCPStore(rnd.master_addr, rnd.master_port, is_master=True,
                                      wait_for_workers=False, timeout=timedelta(seconds=300))

    def _start_workers(self, rnd: Round) -> None:
        self._host_worker_store(rnd)
        self.adapter.on_round(rnd)
        group = WorkerGroup(self.spec, self._standbys)
        group.start([self.worker_env(rnd, i) for i in range(rnd.node.nproc)], self._attempt_dir(rnd))
        self._group = group
        log.info("started %d worker(s), pids %s", len(group.pids), group.pids)
        self._restart_watch(rnd)
        self.reporter.update(NodeState.RUNNING, rnd=rnd, pids=group.pids)

    def _restart_watch(self, rnd: Round) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._watcher = RoundWatcher(self.handler, rnd, lease_epoch=self._lease_epoch, fence=self._fence)

    def _fence(self, why: str) -> None:
        """From the watcher's lease thread: freeze this node's workers now (the loop decides)."""
        group = self._group
        if group is not None:
            log.warning("fencing this node's workers (pids %s): %s", group.pids, why)
            group.pause()

    def _scratch_dir(self) -> str:
        path = os.path.join(tempfile.gettempdir(), f"elastic-run-{os.getuid()}")
        os.makedirs(path, exist_ok=True)
        return path

    def _stop_workers(self, grace_s: Optional[float] = None) -> None:
        """SIGTERM this node's workers, SIGKILL them after ``grace_s`` (the spec's by default)."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._group is not None:
            self._group.stop(grace_s=grace_s)
            self._group = None

    @property
    def _workers(self) -> WorkerGroup:
        if self._group is None:
            raise AgentError("no workers are running on this node")
        return self._group

    def _monitor(self, rnd: Round) -> RunResult:
        group, watcher = self._workers, self._watcher
        assert watcher is not None  # started with the workers
        while True:
            if watcher.lease_lost:  # first: a fenced (frozen) worker is no failure of its own
                return RunResult(RunOutcome.LEASE_LOST, lease_lost=watcher.lease_lost)
            self.reporter.alive()
            if self._notice > 0:
                self._notice_to_drain()
            if not watcher.lease_lost:  # the fence freezes them: that is no hang
                group.kill_stopped()  # a SIGSTOPped worker hangs its peers: treat it as dead
            exits = group.poll()
            failed = [e for e in exits if e.returncode != 0]
            if failed:
                if watcher.lease_lost:  # set before the fence: a frozen worker killed as stopped is its
                    return RunResult(RunOutcome.LEASE_LOST, lease_lost=watcher.lease_lost)
                return RunResult(RunOutcome.FAILED, failure=failed[0])
            if exits and len(exits) == len(group.workers) and all(e.returncode == 0 for e in exits):
                return RunResult(RunOutcome.SUCCEEDED)
            if watcher.event.wait(self.monitor_interval_s):
                if watcher.lease_lost:
                    return RunResult(RunOutcome.LEASE_LOST, lease_lost=watcher.lease_lost)
                if watcher.change is not None or not watcher.lost_peer:
                    return RunResult(RunOutcome.ROUND_CHANGED, change=watcher.change)
                # A local worker's death also breaks its peers' connections: a failure seen
                # within a monitor interval is that (charged), not another node's loss.
                deadline = time.monotonic() + self.monitor_interval_s
                while time.monotonic() < deadline and not any(e.returncode for e in group.poll()):
                    time.sleep(self.monitor_interval_s / 4)
                failed = [e for e in group.poll() if e.returncode != 0]
                if failed:
                    return RunResult(RunOutcome.FAILED, failure=failed[0])
                return RunResult(RunOutcome.LOST_PEER, lost_peer=watcher.lost_peer)

    # -- failures --------------------------------------------------------------------------
    def _report_failure(self, rnd: Round, failure: WorkerExit) -> None:
        self.handler.ledger.report_failure(rnd.generation, {
            "rank": failure.rank, "local_rank": failure.local_rank, "pid": failure.pid,
            "returncode": failure.returncode, "host": rnd.node.host, "node_rank": rnd.node_rank,
            "time": time.time(), "describe": failure.describe(),
            "error": failure.error or failure.stderr_tail,
        })

    def _on_signal(self, signum, frame) -> None:
        if signum in self.drain_signals and self._notice < 0:
            return  # this node drains already
        if signum in self.drain_signals and self._group is not None and not self._notice:
            self._notice = signum  # workers run: the monitor drains this node (no store I/O in a handler)
            return
        raise _Terminated(signum)

    def _notice_to_drain(self) -> None:
        """A drain signal: ask for this node's drain on the store, as a scheduler would."""
        log.warning("agent received %s: draining this node", signal.Signals(self._notice).name)
        JobController(self.handler.store, self.settings.run_id).request_drain(
            self.handler.node.node_id, DrainReason.PREEMPTION, self.drain_grace_s)
        self._notice = -1
