"""What ends the round this node runs, watched from two threads so the agent's monitor only
waits on one event: a change on the store (a node joined, left or died; a drain or a stop was
asked), or a local in-place worker's report that a collective lost a peer."""
from __future__ import annotations

import json
import logging
import threading
from typing import Optional

from ..rendezvous import RendezvousHandler, Round
from ..rendezvous.state import RoundChange

__all__ = ["RoundWatcher"]

log = logging.getLogger("elastic.agent")


class RoundWatcher:
    """Watches one round; :attr:`event` is set once :attr:`change` or :attr:`lost_peer` is."""

    def __init__(self, handler: RendezvousHandler, rnd: Round) -> None:
        self.handler = handler
        self.round = rnd
        self.event = threading.Event()
        self.change: Optional[RoundChange] = None
        self.lost_peer = ""  # an in-place worker's report that a collective lost a peer
        self._stop = threading.Event()
        for target, name in ((self._watch_round, "rdzv-watch"), (self._watch_lost_peers, "lost-peer-watch")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch_round(self) -> None:
        while not self._stop.is_set():
            try:
                change = self.handler.watch(self.round, timeout_s=1.0)
            except Exception as exc:  # a store hiccup: keep watching, the lease decides liveness
                if self._stop.is_set():
                    return
                log.warning("watching the round failed: %s", exc)
                self._stop.wait(0.5)
                continue
            if change and not self._stop.is_set():
                self.change = change
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
