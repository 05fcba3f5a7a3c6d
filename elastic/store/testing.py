"""The contract every rendezvous store backend passes, shipped in the package so that a
third-party backend runs it too (as fsspec ships ``fsspec.tests.abstract``).

In the backend's test module, subclass :class:`StoreContract` and give it a ``store`` fixture
(a connected store; pytest collects the inherited tests)::

    import pytest
    from elastic.store import create_store
    from elastic.store.testing import StoreContract

    class TestRedisStore(StoreContract):
        @pytest.fixture
        def store(self, redis_server):
            store = create_store("redis", redis_server.endpoint)
            yield store
            store.close()

Each test keeps to a fresh key ``prefix``, so the tests of one backend may share one server.
A lease test waits up to 15 s for a 1 s lease to end (etcd rounds TTLs up to whole seconds
and expires leases late). Only tests import this module: it needs pytest.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

import pytest

from .api import LeaseNotFoundError, StoreArgumentError, StoreError

__all__ = ["StoreContract", "prefix", "wait_until"]


def _new_prefix() -> str:
    return f"/contract-{uuid.uuid4().hex[:10]}/"


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix (for a module's own tests beside the contract)."""
    return _new_prefix()


def wait_until(predicate: Callable[[], object], timeout_s: float = 15.0, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


class StoreContract:
    """The tests; a subclass provides the ``store`` fixture (a connected :class:`Store`)."""

    @pytest.fixture
    def prefix(self) -> str:
        return _new_prefix()

    def test_put_get(self, store, prefix):
        assert store.get(prefix + "missing") is None
        rev = store.put(prefix + "k", b"v1")
        kv = store.get(prefix + "k")
        assert kv.value == b"v1" and kv.mod_revision == rev and kv.key == prefix + "k"
        rev2 = store.put(prefix + "k", b"\x00\xffbinary")
        assert rev2 > rev
        assert store.get(prefix + "k").value == b"\x00\xffbinary"

    def test_get_prefix_is_sorted_and_isolated(self, store, prefix):
        for name in ["b", "a", "c/d"]:
            store.put(prefix + name, name.encode())
        store.put(prefix[:-1] + "x-other", b"no")
        kvs, rev = store.get_prefix(prefix)
        assert [kv.key for kv in kvs] == [prefix + "a", prefix + "b", prefix + "c/d"]
        assert rev >= max(kv.mod_revision for kv in kvs)

    def test_compare_and_set(self, store, prefix):
        key = prefix + "cas"
        ok, kv = store.compare_and_set(key, None, b"first")
        assert ok and kv.value == b"first"
        ok, current = store.compare_and_set(key, None, b"again")
        assert not ok and current.value == b"first"
        ok, current = store.compare_and_set(key, kv.mod_revision + 1000, b"stale")
        assert not ok and current.value == b"first"
        ok, kv2 = store.compare_and_set(key, kv.mod_revision, b"second")
        assert ok and kv2.value == b"second" and kv2.mod_revision > kv.mod_revision
        ok, current = store.compare_and_set(prefix + "absent", 5, b"x")
        assert not ok and current is None

    def test_concurrent_compare_and_set_loses_no_update(self, store, prefix):
        key = prefix + "counter"
        store.put(key, b"0")

        def add(times):
            for _ in range(times):
                while True:
                    kv = store.get(key)
                    ok, _ = store.compare_and_set(key, kv.mod_revision, str(int(kv.value) + 1).encode())
                    if ok:
                        break

        threads = [threading.Thread(target=add, args=(20,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert store.get(key).value == b"80"

    def test_delete(self, store, prefix):
        store.put(prefix + "d", b"x")
        assert store.delete(prefix + "d") is True
        assert store.get(prefix + "d") is None
        assert store.delete(prefix + "d") is False

    def test_lease_expiry_deletes_keys(self, store, prefix):
        lease = store.grant_lease(1.0)
        store.put(prefix + "leased", b"x", lease=lease)
        store.put(prefix + "plain", b"y")
        assert store.get(prefix + "leased").lease == lease
        assert wait_until(lambda: store.get(prefix + "leased") is None), "leased key outlived its TTL"
        assert store.get(prefix + "plain").value == b"y"
        with pytest.raises(LeaseNotFoundError):
            store.keep_alive(lease)

    def test_keep_alive_extends_lease(self, store, prefix):
        lease = store.grant_lease(2.0)
        store.put(prefix + "kept", b"x", lease=lease)
        end = time.monotonic() + 4.0  # twice the TTL
        while time.monotonic() < end:
            store.keep_alive(lease)
            time.sleep(0.3)
        assert store.get(prefix + "kept") is not None
        store.revoke_lease(lease)

    def test_revoke_deletes_at_once(self, store, prefix):
        lease = store.grant_lease(60)
        store.put(prefix + "a", b"1", lease=lease)
        store.put(prefix + "b", b"2", lease=lease)
        store.revoke_lease(lease)
        assert store.get_prefix(prefix)[0] == []
        with pytest.raises(LeaseNotFoundError):
            store.put(prefix + "c", b"3", lease=lease)
        store.revoke_lease(lease)  # revoking twice is harmless

    def test_wait_returns_events_after_revision(self, store, prefix):
        _, rev = store.get_prefix(prefix)
        store.put(prefix + "x", b"1")
        store.put(prefix[:-1] + "elsewhere", b"no")
        store.delete(prefix + "x")
        events = store.wait(prefix, rev, timeout_s=10)
        assert [(e.kind, e.key) for e in events] == [("put", prefix + "x"), ("delete", prefix + "x")]
        assert events[0].value == b"1" and events[0].revision < events[1].revision
        assert store.wait(prefix, events[-1].revision, timeout_s=0.2) == []

    def test_wait_blocks_until_a_change(self, store, prefix):
        _, rev = store.get_prefix(prefix)
        got = []
        waiter = threading.Thread(target=lambda: got.extend(store.wait(prefix, rev, timeout_s=30)))
        waiter.start()
        time.sleep(0.2)  # give the waiter time to block; correctness does not depend on it
        assert waiter.is_alive()
        store.put(prefix + "wake", b"up")
        waiter.join(30)
        assert not waiter.is_alive()
        assert [(e.kind, e.key, e.value) for e in got] == [("put", prefix + "wake", b"up")]

    def test_wait_sees_lease_expiry_as_delete(self, store, prefix):
        lease = store.grant_lease(1.0)
        store.put(prefix + "node", b"alive", lease=lease)
        _, rev = store.get_prefix(prefix)
        deadline = time.monotonic() + 15
        events = []
        while not events and time.monotonic() < deadline:
            events = store.wait(prefix, rev, timeout_s=1)
        assert [(e.kind, e.key) for e in events] == [("delete", prefix + "node")]

    def test_bad_arguments_are_store_errors(self, store, prefix):
        for call in (lambda: store.grant_lease(0), lambda: store.grant_lease(-1),
                     lambda: store.grant_lease("soon"), lambda: store.put(prefix + "k", "text"),
                     lambda: store.put(7, b"v"), lambda: store.compare_and_set(7, None, b"v")):
            with pytest.raises(StoreArgumentError) as info:
                call()
            assert isinstance(info.value, StoreError) and "\n" not in str(info.value)
        assert store.get_prefix(prefix)[0] == []
