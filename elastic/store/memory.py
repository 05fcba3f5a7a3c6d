"""An in-process :class:`Store`: the state machine behind the embedded rendezvous server.

Also usable directly (backend ``memory``) when every participant lives in one process, as in
unit tests and simulations. Leases expire lazily: every call and every waiter checks deadlines,
so no background thread is needed.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from . import _args as args
from .api import BackendSpec, Event, KeyValue, LeaseNotFoundError, Store, StoreCompactedError

__all__ = ["MemoryStore", "create_memory_store"]

_NEVER = float("inf")


@dataclass
class _Lease:
    ttl_s: float
    deadline: float
    keys: Set[str] = field(default_factory=set)


class MemoryStore(Store):
    """Keys in a sorted dict, a bounded event history for waits, leases with deadlines."""

    def __init__(self, history: int = 1 << 16, clock=time.monotonic,
                 first_lease_id: int = 1) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._data: Dict[str, KeyValue] = {}
        self._sorted_keys: List[str] = []
        self._revision = 0
        self._history: Deque[Event] = collections.deque(maxlen=history)
        self._leases: Dict[int, _Lease] = {}
        self._lease_ids = itertools.count(first_lease_id)
        self._listeners: List[Callable[[Event], None]] = []
        self._next_deadline = _NEVER

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> Optional[KeyValue]:
        with self._cond:
            self._expire_locked()
            return self._data.get(key)

    def get_prefix(self, prefix: str) -> Tuple[List[KeyValue], int]:
        with self._cond:
            self._expire_locked()
            lo = bisect.bisect_left(self._sorted_keys, prefix)
            out = []
            for key in itertools.islice(self._sorted_keys, lo, None):
                if not key.startswith(prefix):
                    break
                out.append(self._data[key])
            return out, self._revision

    @property
    def revision(self) -> int:
        with self._cond:
            return self._revision

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        args.key(key)  # a non-str key would corrupt the sorted key list
        with self._cond:
            self._expire_locked()
            self._put_locked(key, args.value(value), lease)
            return self._revision

    def compare_and_set(self, key: str, expected_revision: Optional[int], value: bytes,
                        lease: int = 0) -> Tuple[bool, Optional[KeyValue]]:
        args.key(key)
        with self._cond:
            self._expire_locked()
            current = self._data.get(key)
            matches = current is None if expected_revision is None else (
                current is not None and current.mod_revision == expected_revision)
            if not matches:
                return False, current
            self._put_locked(key, args.value(value), lease)
            return True, self._data[key]

    def delete(self, key: str) -> bool:
        with self._cond:
            self._expire_locked()
            return self._delete_locked(key)

    # -- leases --------------------------------------------------------------------------
    def grant_lease(self, ttl_s: float) -> int:
        ttl_s = args.ttl(ttl_s)
        with self._cond:
            self._expire_locked()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _Lease(ttl_s, self._clock() + ttl_s)
            self._next_deadline = min(self._next_deadline, self._leases[lease_id].deadline)
            return lease_id

    def keep_alive(self, lease: int) -> None:
        with self._cond:
            self._expire_locked()
            entry = self._leases.get(lease)
            if entry is None:
                raise LeaseNotFoundError(f"lease {lease} expired or was revoked")
            entry.deadline = self._clock() + entry.ttl_s

    def revoke_lease(self, lease: int) -> None:
        with self._cond:
            self._expire_locked()
            self._drop_lease_locked(lease)

    # -- waits ---------------------------------------------------------------------------
    def wait(self, prefix: str, after_revision: int, timeout_s: float) -> List[Event]:
        deadline = self._clock() + max(0.0, timeout_s)
        with self._cond:
            while True:
                self._expire_locked()
                events = self._events_after_locked(prefix, after_revision)
                now = self._clock()
                if events or now >= deadline:
                    return events
                wake = deadline
                if self._leases:
                    wake = min(wake, self._next_deadline)
                self._cond.wait(max(0.001, wake - now))

    def events_after(self, prefix: str, after_revision: int) -> List[Event]:
        """Events under ``prefix`` newer than ``after_revision``, without blocking."""
        with self._cond:
            self._expire_locked()
            return self._events_after_locked(prefix, after_revision)

    # -- hooks for servers built on this store ------------------------------------------
    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` after every change, under the store's lock.

        Lets a server wake only the waiters whose prefix matches (instead of waking every
        waiting thread); the listener must be quick and must not call back into the store
        from another thread.
        """
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def expire(self) -> None:
        """Drop leases past their deadline now (a server calls this periodically)."""
        with self._cond:
            self._expire_locked()

    # -- internals -----------------------------------------------------------------------
    def _emit_locked(self, event: Event) -> None:
        self._history.append(event)
        self._cond.notify_all()
        for listener in self._listeners:
            listener(event)

    def _events_after_locked(self, prefix: str, after_revision: int) -> List[Event]:
        if after_revision >= self._revision:
            return []
        if self._history and after_revision + 1 < self._history[0].revision:
            raise StoreCompactedError(
                f"revision {after_revision} is older than the kept history "
                f"(oldest {self._history[0].revision})")
        out = []
        for event in reversed(self._history):
            if event.revision <= after_revision:
                break
            if event.key.startswith(prefix):
                out.append(event)
        out.reverse()
        return out

    def _put_locked(self, key: str, value: bytes, lease: int) -> None:
        if lease and lease not in self._leases:
            raise LeaseNotFoundError(f"lease {lease} expired or was revoked")
        old = self._data.get(key)
        if old is None:
            bisect.insort(self._sorted_keys, key)
        elif old.lease and old.lease != lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._revision += 1
        self._data[key] = KeyValue(key, value, self._revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._emit_locked(Event("put", key, value, self._revision))

    def _delete_locked(self, key: str) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        self._sorted_keys.pop(bisect.bisect_left(self._sorted_keys, key))
        if old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._revision += 1
        self._emit_locked(Event("delete", key, b"", self._revision))
        return True

    def _drop_lease_locked(self, lease: int) -> None:
        entry = self._leases.pop(lease, None)
        if entry is not None:
            for key in sorted(entry.keys):
                self._delete_locked(key)

    def _expire_locked(self) -> None:
        # ``_next_deadline`` is a lower bound of every lease's deadline (keep-alives only
        # move deadlines later), so most calls skip the scan over all leases.
        if not self._leases:
            return
        now = self._clock()
        if now < self._next_deadline:
            return
        for lease in [i for i, held in self._leases.items() if held.deadline <= now]:
            self._drop_lease_locked(lease)
        self._next_deadline = min((held.deadline for held in self._leases.values()), default=_NEVER)



def create_memory_store(endpoint: str = "", **conf: object) -> MemoryStore:
    """Backend factory: a fresh in-process store (no endpoint, nothing to configure)."""
    return MemoryStore()


create_memory_store.spec = BackendSpec(ignores_unknown=True, in_process=True)  # type: ignore[attr-defined]
