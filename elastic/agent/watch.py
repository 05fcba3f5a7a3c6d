"""What ends the round this node runs, watched from three threads so the agent's monitor only
waits on one event: a change on the store (a node joined, left or died; a drain or a stop was
asked), a local in-place worker's report that a collective lost a peer, or this node's own lease
ending (a partition, a store that is gone): then the workers are fenced at once, from the
watching thread, whatever the agent's loop is blocked on."""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Optional

from ..rendezvous import RendezvousHandler, Round
from ..rendezvous.state import RoundChange

__all__ = ["RoundWatcher"]

log = logging.getLogger("elastic.agent")


class RoundWatcher:
    """Watches one round; :attr:`event` is set once :attr:`change`, :attr:`lost_peer` or
    :attr:`lease_lost` is.

    ``fence`` (with ``lease_epoch``, the handler's when the round was joined): called, from the
    lease thread, the moment this node's lease can no longer be trusted (no renewal got through
    for nearly a TTL, or the lease was replaced): the others may re-form without this node any
    moment, so its workers must stop before they do (the generation fences what they write).
    """

    def __init__(self, handler: RendezvousHandler, rnd: Round, *, lease_epoch: Optional[int] = None,
                 fence: Optional[Callable[[str], None]] = None) -> None:
        self.handler = handler
        self.round = rnd
        self.event = threading.Event()
        self.change: Optional[RoundChange] = None
        self.lost_peer = ""  # an in-place worker's report that a collective lost a peer
        self.lease_lost = ""  # why this node's lease can no longer be trusted (set before the fence)
        self._stop = threading.Event()
        threads = [(self._watch_round, "rdzv-watch"), (self._watch_lost_peers, "lost-peer-watch")]
        if fence is not None:
            self._fence = fence
            self._epoch = handler.lease_epoch if lease_epoch is None else lease_epoch
            threads.append((self._watch_lease, "lease-fence"))
        for target, name in threads:
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch_round(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                change = self.handler.watch(self.round, timeout_s=1.0)
                failing = False
            except Exception as exc:  # a store hiccup: keep watching, the lease decides liveness
                if self._stop.is_set():
                    return
                # once per spell of failures: the heartbeat tells how long the store is silent
                (log.debug if failing else log.warning)("watching the round failed: %s", exc)
                failing = True
                self._stop.wait(0.5)
                continue
            if change and not self._stop.is_set():
                self.change = change
                self.event.set()
                return

    def _watch_lease(self) -> None:
        """Fence the workers once the lease may have ended on the store. The margin covers this
        thread's wake-up and the kill; the survivors still need to see the expiry, stop their
        own workers and close a round before any worker of theirs steps."""
        h = self.handler
        ttl = h.settings.lease_ttl_s
        margin = min(0.25, ttl / 8)
        while not self._stop.is_set():
            if h.lease_epoch != self._epoch:
                why = f"the rendezvous lease of round {self.round.generation} was lost and replaced"
            else:
                left = h.lease_expires_at() - margin - time.monotonic()
                if left > 0:
                    self._stop.wait(min(left, 0.5))
                    continue
                why = (f"no lease renewal reached the rendezvous store {h.endpoint} "
                       f"for {ttl - margin:.2f}s (lease_ttl {ttl:g}s)")
            if self._stop.is_set():
                return
            self.lease_lost = why
            try:
                self._fence(why)
            finally:
                self.event.set()
            return

    def _watch_lost_peers(self) -> None:
        """Wake the monitor when an in-place worker of this node reports a lost peer in the round."""
        prefix = self.handler.keys.lostpeer(self.handler.node.node_id)
        store = self.handler.store
        while not self._stop.is_set():
            try:
                kvs, rev = store.get_prefix(prefix)
                for kv in kvs:
                    record = json.loads(kv.value)
                    if record.get("generation") == self.round.generation and not self._stop.is_set():
                        self.lost_peer = str(record.get("reason") or "connection lost")
                        self.event.set()
                        return
                store.wait(prefix, rev, timeout_s=1.0)
            except Exception as exc:  # a store hiccup: the leases still decide liveness
                if self._stop.wait(0.5):
                    return
                log.debug("watching for lost peers: %s", exc)
