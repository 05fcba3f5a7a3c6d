"""The job's events: a bounded ring on the store that every agent appends to and any
scheduler reads (``JobController.events``, ``elastic-run ctl events --follow``)."""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any, Callable, Iterator, List, Optional

from ..errors import ConfigError
from ..rendezvous.keys import JobKeys
from ..store import Store, StoreCompactedError, StoreError
from .api import JobEvent

__all__ = ["EventLog", "EVENT_RING_SIZE"]

log = logging.getLogger("elastic.events")

#: Events kept on the store; older ones are dropped by whoever appends past the bound.
EVENT_RING_SIZE = 1000
_TRIM_EVERY = 50


class EventLog:
    """Append events of one job (as ``node``) and read them back in order."""

    def __init__(self, store: Store, keys: JobKeys, node: str = "",
                 on_event: Optional[Callable[[JobEvent], None]] = None, capacity: int = EVENT_RING_SIZE) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.on_event = on_event
        self.capacity = capacity
        self._emitted = 0
        self._lock = threading.Lock()

    def emit(self, name: str, generation: int = 0, **details: Any) -> JobEvent:
        """Record an event; a store that cannot take it costs the event, never the job."""
        now = time.time()
        with self._lock:
            self._emitted += 1
            key = f"{time.time_ns():020d}-{self._emitted:06d}-{self.node or 'ctl'}"
            trim = self._emitted % _TRIM_EVERY == 0
        event = JobEvent("", name, now, self.node, generation, details)
        log.info("event %s%s%s", name, f" (round {generation})" if generation else "",
                 "".join(f" {k}={v}" for k, v in details.items()))
        try:
            revision = self.store.put(self.keys.events(key), json.dumps(event.to_json()).encode())
            event = dataclasses.replace(event, seq=str(revision))
            if trim:
                self.trim()
        except StoreError as exc:
            log.debug("could not record event %s: %s", name, exc)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a user's hook must not take the agent down
                log.exception("on_event hook failed for %s", name)
        return event

    def trim(self) -> None:
        kvs, _ = self.store.get_prefix(self.keys.events())
        for kv in sorted(kvs, key=lambda kv: kv.mod_revision)[: max(0, len(kvs) - self.capacity)]:
            self.store.delete(kv.key)

    def read(self, since: str = "") -> List[JobEvent]:
        """Events after ``since`` (a ``seq``; "" for all kept), in the order the store took them."""
        after = _revision(since)
        kvs, _ = self.store.get_prefix(self.keys.events())
        return [_event(kv.value, kv.mod_revision)
                for kv in sorted(kvs, key=lambda kv: kv.mod_revision) if kv.mod_revision > after]

    def follow(self, since: str = "", timeout_s: Optional[float] = None) -> Iterator[JobEvent]:
        """Events after ``since`` as they come; ends after ``timeout_s`` without one (None: never).

        Events are ordered by the store's revision, the order they arrived in: two nodes' clocks
        (the time in an event) may disagree, the store's order cannot."""
        prefix = self.keys.events()
        after = _revision(since)
        kvs, rev = self.store.get_prefix(prefix)
        for kv in sorted(kvs, key=lambda kv: kv.mod_revision):
            if kv.mod_revision > after:
                after = kv.mod_revision
                yield _event(kv.value, kv.mod_revision)
        rev = max(rev, after)
        while True:
            try:
                events = self.store.wait(prefix, rev, timeout_s=5.0 if timeout_s is None else timeout_s)
            except StoreCompactedError:
                rev = self.store.get_prefix(prefix)[1]
                continue
            if not events:
                if timeout_s is not None:
                    return
                continue
            rev = events[-1].revision
            for e in events:
                if e.kind == "put" and e.revision > after:
                    after = e.revision
                    yield _event(e.value, e.revision)


def _revision(seq: str) -> int:
    """An event's ``seq`` is the store revision that recorded it ("" or "0": from the start)."""
    try:
        return int(seq or 0)
    except ValueError:
        raise ConfigError(f"not an event seq: {seq!r} (give the seq of an event, e.g. 1042)") from None


def _event(value: bytes, revision: int) -> JobEvent:
    data = json.loads(value)
    return JobEvent(str(revision), str(data["name"]), float(data["time"]), str(data.get("node", "")),
                    int(data.get("generation", 0)), dict(data.get("details") or {}))
