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
from .rendezvous.state import RoundState

__all__ = ["WorkerLink", "MembershipChangedError", "NoNewRoundError"]

log = logging.getLogger("elastic.worker")


class MembershipChangedError(ElasticError):
    """The job's membership changed: the workers must re-form (raised at ``commit()``)."""


class NoNewRoundError(ElasticError, TimeoutError):
    """The agent published no place for this worker in a newer round in time."""


class WorkerLink:
    """This worker's view of its agent; ``None`` from :meth:`from_env` outside ``elastic-run``."""

    def __init__(self, store, prefix: str, node_id: str, local_rank: int, generation: int) -> None:
        from .rendezvous.keys import JobKeys

        self.store = store
        self.keys = JobKeys.from_prefix(prefix)
        self.node_id = node_id
        self.local_rank = local_rank
        self.generation = generation
        self._changed = threading.Event()
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

    def close(self) -> None:
        self._stop.set()
        try:
            self.store.delete(self.keys.inproc(self.node_id, self.local_rank))
        except Exception:
            pass
        self.store.close()
