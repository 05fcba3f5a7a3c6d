"""A worker's link to its agent, for in-process recovery.

Under ``elastic-run`` a worker can reach the job's rendezvous store (``ELASTIC_RDZV_*``). The
decorator registers the worker there (so the agent re-forms it in place instead of restarting
it), a daemon thread watches the round key so membership news is a flag read at ``commit()``,
not a collective on every step, and after a change the worker reads its new place (rank,
world size, master address, generation) from ``assign/<node>/<local_rank>``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable, Dict, Optional

from .errors import ElasticError
from .rendezvous.keys import JobKeys
from .rendezvous.state import RoundState

__all__ = ["WorkerLink", "MembershipChangedError", "NoNewRoundError", "DrainRequested", "drain_requested"]

log = logging.getLogger("elastic.worker")


class MembershipChangedError(ElasticError):
    """The job's membership changed: the workers must re-form (raised at ``commit()``)."""


class DrainRequested(ElasticError):
    """This worker's node was asked to drain, or the job to stop: save and leave (raised at
    ``commit()``; ``@elastic.run`` runs the state's drain callbacks and ends the worker)."""


class NoNewRoundError(ElasticError, TimeoutError):
    """The agent published no place for this worker in a newer round in time."""


class WorkerLink:
    """This worker's view of its agent; ``None`` from :meth:`from_env` outside ``elastic-run``."""

    def __init__(self, store, prefix: str, node_id: str, local_rank: int, generation: int) -> None:
        self.store = store
        self.keys = JobKeys.from_prefix(prefix)
        self.node_id = node_id
        self.local_rank = local_rank
        self.generation = generation
        self._changed = threading.Event()
        self._drain = threading.Event()  # our node drains, or the job stops: set once, for good
        self._closed = threading.Event()
        self._control_watcher: Optional[threading.Thread] = None
        self._progress: Dict[str, float] = {}  # step, checkpoint_step, checkpoint_time
        self._progress_at = 0.0
        self.on_change: Optional[Callable[[], None]] = None  # called once per change, from the watch
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    @classmethod
    def from_env(cls) -> Optional["WorkerLink"]:
        env = os.environ
        if not env.get("ELASTIC_RDZV_BACKEND") or not env.get("ELASTIC_NODE_ID"):
            return None
        from .store import create_store

        conf = json.loads(env.get("ELASTIC_RDZV_CONF") or "{}")
        store = create_store(env["ELASTIC_RDZV_BACKEND"], env["ELASTIC_RDZV_ENDPOINT"], **conf)
        return cls(store, env["ELASTIC_RUN_PREFIX"], env["ELASTIC_NODE_ID"], int(env["LOCAL_RANK"]),
                   int(env.get("ELASTIC_GENERATION", "0")))

    def register(self) -> None:
        """Tell the agent this worker recovers in place (it then never restarts us for a change)."""
        self.store.put(self.keys.inproc(self.node_id, self.local_rank), str(os.getpid()).encode())
        self._start_watch()

    def report_lost_peer(self, reason: str) -> None:
        """Tell the agent at once that a collective lost a peer: it opens the next round
        without waiting for a dead node's lease to expire (a live node simply joins it)."""
        try:
            self.store.put(self.keys.lostpeer(self.node_id, self.local_rank),
                           json.dumps({"generation": self.generation, "reason": reason}).encode())
        except Exception as exc:  # the agent still learns of a dead node from its lease
            log.debug("reporting a lost peer: %s", exc)

    @property
    def membership_changed(self) -> bool:
        return self._changed.is_set()

    @property
    def drain_requested(self) -> bool:
        return self._drain.is_set()

    def report_progress(self, step: Optional[int] = None, checkpoint_step: Optional[int] = None,
                        min_interval_s: float = 1.0) -> None:
        """Publish this worker's last committed / checkpointed step for ``JobController.status()``
        (at most once per ``min_interval_s`` unless a checkpoint step is new)."""
        news = {k: int(v) for k, v in (("step", step), ("checkpoint_step", checkpoint_step)) if v is not None}
        fresh_checkpoint = ("checkpoint_step" in news
                            and news["checkpoint_step"] != self._progress.get("checkpoint_step"))
        self._progress.update(news)
        if fresh_checkpoint:
            self._progress["checkpoint_time"] = time.time()
        now = time.monotonic()
        if not fresh_checkpoint and now - self._progress_at < min_interval_s:
            return
        self._progress_at = now
        try:
            self.store.put(self.keys.progress(self.node_id, self.local_rank),
                           json.dumps({**self._progress, "time": time.time(), "pid": os.getpid()}).encode())
        except Exception as exc:  # progress is for schedulers' eyes; training goes on without it
            log.debug("reporting progress: %s", exc)

    def wait_for_new_place(self, timeout_s: float) -> Dict[str, str]:
        """Block until the agent publishes this worker's place in a newer round; apply it."""
        key = self.keys.assign(self.node_id, self.local_rank)
        deadline = time.monotonic() + timeout_s
        while True:
            kv = self.store.get(key)
            if kv is not None:
                news = json.loads(kv.value)
                if news["generation"] > self.generation:
                    os.environ.update(news["env"])
                    self.generation = news["generation"]
                    self._start_watch()
                    return news["env"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoNewRoundError(f"no new round for this worker within {timeout_s:.0f}s")
            self.store.wait(key, kv.mod_revision if kv else self._revision(), timeout_s=min(remaining, 5.0))

    def _revision(self) -> int:
        return self.store.get_prefix(self.keys.assign(self.node_id, self.local_rank))[1]

    def _start_watch(self) -> None:
        self._stop.set()
        self._changed.clear()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self.generation, self._stop),
                                         name="elastic-membership", daemon=True)
        self._watcher.start()
        if self._control_watcher is None:  # one for the link's life: a drain outlasts rounds
            self._control_watcher = threading.Thread(target=self._watch_control, name="elastic-drain",
                                                     daemon=True)
            self._control_watcher.start()

    def _watch(self, generation: int, stop: threading.Event) -> None:
        """Set the flag once the round moves past ``generation`` (reopened or replaced)."""
        key = self.keys.round()
        while not stop.is_set():
            try:
                kv = self.store.get(key)
                state = RoundState.from_json(kv.value) if kv else None
                if state is None or state.generation != generation or not state.is_closed:
                    if stop.is_set():  # replaced by a newer round's watcher: its news, not ours
                        return
                    self._changed.set()
                    if self.on_change is not None:
                        self.on_change()
                    return
                self.store.wait(key, kv.mod_revision, timeout_s=5.0)
            except Exception as exc:  # the store going away ends the job anyway
                if stop.wait(0.5):
                    return
                log.debug("membership watch: %s", exc)

    def _watch_control(self) -> None:
        """Set the drain flag once this node is asked to drain or the job to stop. Only the
        scheduler's rare ``ctl/`` keys wake it, not every join of a large job."""
        k = self.keys
        mine = (k.drain(self.node_id), k.stop())
        while not self._closed.is_set():
            try:
                kvs, rev = self.store.get_prefix(k.control())
                if any(kv.key in mine for kv in kvs):
                    self._drain.set()
                    return
                self.store.wait(k.control(), rev, timeout_s=5.0)
            except Exception as exc:  # the store going away ends the job anyway
                if self._closed.wait(0.5):
                    return
                log.debug("drain watch: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._closed.set()
        try:
            self.store.delete(self.keys.inproc(self.node_id, self.local_rank))
        except Exception:
            pass
        self.store.close()


_process_link: Dict[str, Optional[WorkerLink]] = {}


def process_link(link: Optional[WorkerLink] = None) -> Optional[WorkerLink]:
    """This process's link to its agent (``link``: the one ``@elastic.run`` made; else one
    from the environment, watching; None outside ``elastic-run``)."""
    if link is not None:
        _process_link["link"] = link
    if "link" not in _process_link:
        made = WorkerLink.from_env()
        if made is not None:
            made._start_watch()
        _process_link["link"] = made
    return _process_link["link"]


def drain_requested() -> bool:
    """Whether this worker's node was asked to drain (or the job to stop): a plain training
    script polls it between steps, saves and exits. False outside ``elastic-run``; the agent
    also sends SIGTERM after publishing the drain, so a script that handles SIGTERM needs no poll."""
    link = process_link()
    return link is not None and link.drain_requested


def report_progress(step: Optional[int] = None, checkpoint_step: Optional[int] = None) -> None:
    """Tell schedulers (``JobController.status()``, ``/metrics``) this worker's last completed
    step and last checkpointed step. ``State.commit()`` and the checkpointers call it; a
    no-op outside ``elastic-run``."""
    if not os.environ.get("ELASTIC_RDZV_BACKEND"):
        return
    link = process_link()
    if link is not None:
        link.report_progress(step, checkpoint_step)


def closed_round_fence(generation: int) -> Optional[Callable[[], int]]:
    """``current_generation`` for a Checkpointer of a worker of round ``generation``: the
    newest *closed* round of the job, read from its store (``ELASTIC_RDZV_*``).

    A round that is still open does not fence: the final save on SIGTERM happens exactly then.
    Once a newer round has closed, its workers may be restoring, and a writer of an older one
    must not publish. None outside ``elastic-run``.
    """
    env = os.environ
    backend, endpoint, prefix = (env.get("ELASTIC_RDZV_BACKEND"), env.get("ELASTIC_RDZV_ENDPOINT"),
                                 env.get("ELASTIC_RUN_PREFIX"))
    if not (backend and endpoint and prefix) or backend == "memory":
        return None
    holder: Dict[str, object] = {}

    def current() -> int:
        try:
            if "store" not in holder:
                from .store import create_store

                holder["store"] = create_store(backend, endpoint, **json.loads(env.get("ELASTIC_RDZV_CONF") or "{}"))
            kv = holder["store"].get(JobKeys.from_prefix(prefix).round())  # type: ignore[attr-defined]
        except Exception as exc:  # the store is gone: the agent decides our fate
            log.warning("cannot read the current round (%s); fencing on published checkpoints only", exc)
            return generation
        return generation if kv is None else RoundState.from_json(kv.value).settled_generation

    return current
