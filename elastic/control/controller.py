"""``JobController``: what a scheduler (or a person, through ``elastic-run ctl``) can read and
ask of a running job, from any process that reaches the job's store.

    ctl = JobController.connect("10.0.0.1:29400", run_id="job1", token=...)
    print(ctl.status().world_size)
    ctl.drain("node-3", deadline_s=120, reason="preemption")
    ctl.scale(4, wait=True)

It joins no round and holds no lease: it writes requests under the job's ``ctl/`` keys, which the
agents act on at a safe point, and reads what the agents and workers report.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterator, List, Optional

from ..errors import ConfigError
from ..rendezvous.keys import JobKeys
from ..rendezvous.ledger import JobLedger
from ..rendezvous.state import NodeLimits, RoundState
from ..store import Store, create_store
from .api import (Drain, DrainReason, JobEvent, JobState, JobStatus, NodeState, NodeStatus, ControlError,
                  NoSuchJobError)
from .events import EventLog

__all__ = ["JobController"]

_FINAL = {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED}


class JobController:
    """Reads and steers job ``run_id`` on ``store``."""

    def __init__(self, store: Store, run_id: str, *, owns_store: bool = False) -> None:
        self.store = store
        self.run_id = run_id
        self.keys = JobKeys(run_id)
        self.ledger = JobLedger(store, self.keys)
        self._events = EventLog(store, self.keys, node="ctl")  # what a scheduler asked, in the job's events
        self._owns_store = owns_store

    @classmethod
    def connect(cls, endpoint: Optional[str] = None, run_id: Optional[str] = None,
                backend: Optional[str] = None, **conf: Any) -> "JobController":
        """Connect as the job's agents do. Unset arguments come from the environment a worker, a
        pod or a Slurm step already has: ``PET_RDZV_ENDPOINT``/``PET_RDZV_ID``/``PET_RDZV_BACKEND``
        (torchrun's), then ``ELASTIC_RDZV_*`` (what elastic-run gives its workers)."""
        env = os.environ
        backend = backend or env.get("PET_RDZV_BACKEND") or env.get("ELASTIC_RDZV_BACKEND") or "embedded"
        backend = "embedded" if backend in ("c10d", "static") else backend
        endpoint = endpoint or env.get("PET_RDZV_ENDPOINT") or env.get("ELASTIC_RDZV_ENDPOINT") or ""
        if run_id is None:
            run_id = env.get("PET_RDZV_ID") or (JobKeys.from_prefix(env["ELASTIC_RUN_PREFIX"]).run_id
                                                if env.get("ELASTIC_RUN_PREFIX") else "none")
        if not conf and env.get("ELASTIC_RDZV_CONF"):
            conf = json.loads(env["ELASTIC_RDZV_CONF"])
        return cls(create_store(backend, endpoint, **conf), run_id, owns_store=True)

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "JobController":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------
    def status(self) -> JobStatus:
        k = self.keys
        job, _ = self.store.get_prefix(k.prefix)
        # the reports a status needs, not the event ring beside them (up to a thousand values)
        reports = [kv for prefix in (k.node_status(), k.progress()) for kv in self.store.get_prefix(prefix)[0]]
        reports += [kv for kv in (self.store.get(k.settings()), self.store.get(k.straggler())) if kv is not None]
        by_key = {kv.key: kv.value for kv in job + reports}
        if k.round() not in by_key and k.settings() not in by_key:
            raise NoSuchJobError(f"no job {self.run_id!r} on this store (wrong --rdzv-id or endpoint?)")
        settings = json.loads(by_key.get(k.settings(), b"{}"))
        limits = self._limits(by_key, settings)
        rnd = RoundState.from_json(by_key[k.round()]) if k.round() in by_key else None
        failure = json.loads(by_key[k.status()]).get("failed") if k.status() in by_key else None
        nodes = self._nodes(by_key, rnd)
        state = self._state(rnd, failure, by_key, nodes)
        closed = rnd if rnd is not None and rnd.is_closed else None
        return JobStatus(
            run_id=self.run_id, state=state, generation=rnd.generation if rnd else 0,
            world_size=closed.nodes.nproc_total() if closed else 0, num_nodes=len(closed.nodes) if closed else 0,
            min_nodes=limits.min_nodes, max_nodes=limits.max_nodes, desired_nodes=limits.desired,
            restarts=int(by_key.get(k.restarts(), b"0")), max_restarts=int(settings.get("max_restarts", 0)),
            nodes=tuple(nodes), reason=failure or (rnd.reason if rnd else ""))

    def events(self, since: str = "", follow: bool = False, timeout_s: Optional[float] = None) -> Iterator[JobEvent]:
        """The job's events after ``since`` (a ``seq``); with ``follow``, new ones as they come
        (until ``timeout_s`` passes without one; None: forever)."""
        log = EventLog(self.store, self.keys)
        if follow:
            return log.follow(since, timeout_s)
        return iter(log.read(since))

    def wait_for(self, *, world_size: Optional[int] = None, num_nodes: Optional[int] = None,
                 state: Optional[JobState] = None, timeout_s: float = 60.0) -> JobStatus:
        """Block until the job runs at ``world_size`` / ``num_nodes`` or reaches ``state``."""
        if world_size is None and num_nodes is None and state is None:
            raise ConfigError("wait_for needs world_size, num_nodes or state")
        deadline = time.monotonic() + timeout_s
        while True:
            _, rev = self.store.get_prefix(self.keys.round())
            status = self.status()
            ok = state is None or status.state is JobState(state)
            if world_size is not None or num_nodes is not None:
                ok = ok and status.state is JobState.RUNNING and world_size in (None, status.world_size) \
                    and num_nodes in (None, status.num_nodes)
            if ok:
                return status
            if status.state in _FINAL and state is None:
                raise ControlError(f"job {self.run_id!r} ended ({status.state.value}) before reaching "
                                   f"world size {world_size or '-'} / {num_nodes or '-'} nodes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(f"job {self.run_id!r} did not reach the asked state within {timeout_s:.0f}s "
                                   f"(now {status.state.value}, world size {status.world_size})")
            self.store.wait(self.keys.prefix, rev, timeout_s=min(left, 1.0))

    # -- asking --------------------------------------------------------------------------
    def scale(self, n: int, wait: bool = False, timeout_s: float = 120.0) -> JobStatus:
        """Run with ``n`` nodes: above the current size waiting nodes are let in at once (start
        more if none wait: ``status().desired_nodes`` says how many are wanted); below it nodes
        drain, the ones already draining first, then the highest node ranks."""
        status = self.status()
        if not status.min_nodes <= n <= status.max_nodes:
            raise ConfigError(f"cannot scale job {self.run_id!r} to {n} nodes: its range is "
                              f"{status.min_nodes}:{status.max_nodes} (change it first: set_range, or ctl set-range)")
        self._put(self.keys.desired(), {"nodes": n})
        self._events.emit("scale", status.generation, desired=n, current=status.num_nodes)
        self._drain_down_to(status, n, DrainReason.SCALE_DOWN)
        return self.wait_for(num_nodes=n, timeout_s=timeout_s) if wait else self.status()

    def set_range(self, min_nodes: int, max_nodes: int) -> JobStatus:
        """Change the node range of the running job (nodes above the new maximum drain)."""
        if not 1 <= min_nodes <= max_nodes:
            raise ConfigError(f"invalid node range {min_nodes}:{max_nodes}: need 1 <= MIN <= MAX")
        status = self.status()
        self._put(self.keys.node_range(), {"min_nodes": min_nodes, "max_nodes": max_nodes})
        self._events.emit("set_range", status.generation, min_nodes=min_nodes, max_nodes=max_nodes)
        if status.num_nodes > max_nodes:
            self._drain_down_to(status, max_nodes, DrainReason.SCALE_DOWN)
        return self.status()

    def drain(self, node: str, deadline_s: Optional[float] = None, reason: Any = DrainReason.MAINTENANCE) -> NodeStatus:
        """Ask ``node`` (id, host or node rank) to save at its next safe point and leave; by
        ``deadline_s`` from now it leaves anyway."""
        if deadline_s is not None and deadline_s < 0:
            raise ConfigError(f"deadline_s must be >= 0, got {deadline_s}")
        target = self.status().node(str(node))
        self.request_drain(target.node_id, reason, deadline_s)
        return target

    def undrain(self, node: str) -> NodeStatus:
        """Withdraw a drain request that its node has not acted on yet."""
        target = self.status().node(str(node))
        if self.store.delete(self.keys.drain(target.node_id)):
            self._events.emit("undrain", target.generation, node=target.node_id)
        return target

    def stop(self, graceful: bool = True) -> None:
        """End the job: every node saves at its next safe point and its agent exits 0
        (``graceful=False``: workers are stopped at once)."""
        status = self.status()  # the job exists
        now = time.time()
        self._put(self.keys.stop(), {"graceful": graceful, "at": now, "deadline": None if graceful else now})
        self._events.emit("stop_requested", status.generation, graceful=graceful)

    def request_drain(self, node_id: str, reason: Any, deadline_s: Optional[float] = None) -> Drain:
        """:meth:`drain` by node id, without looking the node up: for a node asking for its own
        drain (its agent on a signal, its control port, its handle), which may not have
        published its status yet."""
        now = time.time()
        drain = Drain(DrainReason.parse(reason), None if deadline_s is None else now + deadline_s, now)
        self._put(self.keys.drain(node_id), drain.to_json())
        self._events.emit("drain_requested", node=node_id, reason=drain.reason.value, deadline_s=deadline_s)
        return drain

    # -- helpers ---------------------------------------------------------------------------

    def _drain_down_to(self, status: JobStatus, n: int, reason: DrainReason) -> None:
        live = [s for s in status.nodes if s.node_rank is not None and s.state is not NodeState.DRAINED]
        draining = [s for s in live if s.draining]
        excess = len(live) - n - len(draining)
        if excess <= 0:
            return
        candidates = sorted((s for s in live if not s.draining), key=lambda s: -(s.node_rank or 0))
        for s in candidates[:excess]:
            self.request_drain(s.node_id, reason)

    def _put(self, key: str, value: Dict[str, Any]) -> None:
        self.store.put(key, json.dumps(value).encode())

    def _limits(self, by_key: Dict[str, bytes], settings: Dict[str, Any]) -> NodeLimits:
        return NodeLimits.of(int(settings.get("min_nodes", 1)), int(settings.get("max_nodes", 1)),
                             by_key.get(self.keys.node_range()), by_key.get(self.keys.desired()))

    def _nodes(self, by_key: Dict[str, bytes], rnd: Optional[RoundState]) -> List[NodeStatus]:
        k = self.keys
        now = time.time()
        straggler = json.loads(by_key[k.straggler()]) if k.straggler() in by_key else {}
        out = []
        for key, value in sorted(by_key.items()):
            if not key.startswith(k.node_status()):
                continue
            data = json.loads(value)
            node_id = data["node_id"]
            steps = [json.loads(v) for key2, v in by_key.items() if key2.startswith(k.progress(node_id))]
            drain_raw = by_key.get(k.drain(node_id))
            drain = Drain.from_json(json.loads(drain_raw)) if drain_raw else (
                Drain.from_json(data["drain"]) if data.get("drain") else None)
            rank = rnd.nodes.rank_of(node_id) if rnd is not None and rnd.is_closed else None
            out.append(NodeStatus(
                node_id=node_id, host=data["host"], node_rank=rank, nproc=int(data["nproc"]),
                state=NodeState(data["state"]), generation=int(data.get("generation", 0)), drain=drain,
                lease_age_s=max(0.0, now - float(data.get("time", now))), worker_pids=tuple(data.get("pids", ())),
                last_step=max((s["step"] for s in steps if "step" in s), default=None),
                last_checkpoint_step=max((s["checkpoint_step"] for s in steps if "checkpoint_step" in s), default=None),
                straggler=(straggler.get("nodes") or {}).get(node_id)))
        return sorted(out, key=lambda s: (s.node_rank is None, s.node_rank or 0, s.node_id))

    def _state(self, rnd: Optional[RoundState], failure: Optional[str], by_key: Dict[str, bytes],
               nodes: List[NodeStatus]) -> JobState:
        if failure or (rnd is not None and rnd.is_failed):
            return JobState.FAILED
        if self.keys.stop() in by_key:
            return JobState.DRAINING if nodes else JobState.STOPPED
        if rnd is not None and rnd.is_closed:
            done = all(self.keys.done(rnd.generation, n) in by_key for n in rnd.nodes.ids())
            if done:
                return JobState.SUCCEEDED
            return JobState.RUNNING
        return JobState.FORMING
