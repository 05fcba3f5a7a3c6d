"""What one agent tells schedulers: its node's status, the job's settings, its events, and
whether its own loop is alive (the ``/healthz`` of its control port).

The status is put with the rendezvous lease, so a dead agent's status disappears with it; it is
rewritten on every change and every few seconds, which is what ``lease_age_s`` measures.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence, Tuple

from ..control.api import Drain, JobEvent, NodeState
from ..control.events import EventLog
from ..rendezvous import RendezvousHandler, Round
from ..store import StoreError

__all__ = ["NodeReporter"]

log = logging.getLogger("elastic.agent")

#: An unchanged status is published again after this long (a live agent's lease age stays below it).
REPUBLISH_S = 5.0

#: Events whose ``reason`` detail is a cause word (a ChangeReason's or a DrainReason's value).
_CAUSED = frozenset({"membership_changed", "drain", "drained", "stop", "stopped"})


class NodeReporter:
    def __init__(self, handler: RendezvousHandler, nproc: int,
                 on_event: Optional[Callable[[JobEvent], None]] = None) -> None:
        self.handler = handler
        self.nproc = nproc
        self.events = EventLog(handler.store, handler.keys, handler.node.node_id, on_event)
        self.state = NodeState.RENDEZVOUS
        self.round: Optional[Round] = None
        self.pids: Sequence[int] = ()
        self.drain: Optional[Drain] = None
        self.tick = time.monotonic()  # the agent loop's last sign of life
        self._published_at = 0.0
        # For the control port's /metrics: events this agent emitted, by (name, reason) where
        # the reason is a cause word (a membership change's, a drain's), and time in rendezvous.
        self.counts: "Counter[Tuple[str, str]]" = Counter()
        self.rendezvous_s = 0.0  # completed rendezvous, summed
        self.rendezvous_count = 0
        self._rendezvous_since: Optional[float] = None

    def publish_settings(self, **settings: Any) -> None:
        """The job's settings as launched (every agent writes the same values)."""
        self._put(self.handler.keys.settings(), settings, lease=False)

    def update(self, state: Optional[NodeState] = None, *, rnd: Optional[Round] = None,
               pids: Optional[Sequence[int]] = None, drain: Optional[Drain] = None) -> None:
        state = state or self.state
        now = time.monotonic()
        if state is NodeState.RENDEZVOUS and self._rendezvous_since is None:
            self._rendezvous_since = now
        elif state is not NodeState.RENDEZVOUS and self._rendezvous_since is not None:
            self.rendezvous_s += now - self._rendezvous_since
            self.rendezvous_count += 1
            self._rendezvous_since = None
        self.state = state
        self.round = rnd or self.round
        self.pids = self.pids if pids is None else tuple(pids)
        self.drain = drain or self.drain
        self.publish()

    def alive(self) -> None:
        """Called by the agent loop on every pass: marks it alive and republishes when due."""
        self.tick = time.monotonic()
        if self.tick - self._published_at >= REPUBLISH_S:
            self.publish()

    def healthy(self, stall_s: float) -> bool:
        """The loop passed within ``stall_s``; or it blocks in a rendezvous (bounded by its own timeout)."""
        return self.state is NodeState.RENDEZVOUS or time.monotonic() - self.tick < stall_s

    def rendezvous_seconds(self) -> float:
        """Seconds spent in rendezvous so far, the one under way included."""
        since = self._rendezvous_since
        return self.rendezvous_s + (time.monotonic() - since if since is not None else 0.0)

    def emit(self, name: str, **details: Any) -> JobEvent:
        reason = details.get("reason")
        self.counts[(name, reason if name in _CAUSED and isinstance(reason, str) else "")] += 1
        return self.events.emit(name, self.round.generation if self.round else 0, **details)

    def publish(self) -> None:
        rnd = self.round
        node_rank = rnd.nodes.rank_of(self.handler.node.node_id) if rnd is not None else None
        self._put(self.handler.keys.node_status(self.handler.node.node_id), {
            "node_id": self.handler.node.node_id, "host": self.handler.node.host, "nproc": self.nproc,
            "state": self.state.value, "generation": rnd.generation if rnd else 0,
            "node_rank": node_rank, "pids": list(self.pids),
            "drain": self.drain.to_json() if self.drain else None, "time": time.time()})
        self._published_at = time.monotonic()

    def _put(self, key: str, value: dict, lease: bool = True) -> None:
        if self.handler.store_silent_s() > self.handler.settings.lease_ttl_s / 2:
            return  # the store misses this node's heartbeats (a partition): do not block the loop on it
        try:
            self.handler.store.put(key, json.dumps(value).encode(), lease=self.handler.lease if lease else 0)
        except StoreError as exc:  # reports are for schedulers' eyes; the job goes on without them
            log.debug("could not publish %s: %s", key, exc)
