"""The node's lease is never revived by a node that has left (a renewal racing leave() once
logged "lease expired" at the end of a successful job and put back an alive key that kept the
hosting node waiting for a lease to run out), and a join rides out a store that misses a few
answers. On every store backend (the ``any_store`` fixture), each test a job of its own."""
import threading

import pytest

from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.rendezvous.api import StoreLostError
from elastic.store import Store, StoreUnavailableError


class _Proxy(Store):
    """A real store of any backend, behind methods a test may override."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def get(self, key):
        return self.inner.get(key)

    def get_prefix(self, prefix):
        return self.inner.get_prefix(prefix)

    def put(self, key, value, lease=0):
        return self.inner.put(key, value, lease)

    def compare_and_set(self, key, expected_revision, value, lease=0):
        return self.inner.compare_and_set(key, expected_revision, value, lease)

    def delete(self, key):
        return self.inner.delete(key)

    def grant_lease(self, ttl_s):
        return self.inner.grant_lease(ttl_s)

    def keep_alive(self, lease):
        return self.inner.keep_alive(lease)

    def revoke_lease(self, lease):
        return self.inner.revoke_lease(lease)

    def wait(self, prefix, after_revision, timeout_s):
        return self.inner.wait(prefix, after_revision, timeout_s)


class _HeldRenewals(_Proxy):
    """A real store whose keep-alives wait at a gate the test opens."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def keep_alive(self, lease):
        self.entered.set()
        self.gate.wait(10)
        return super().keep_alive(lease)


def handler(store, ttl, run_id):
    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=1, lease_ttl_s=ttl)
    return RendezvousHandler(store, settings, NodeInfo(node_id="a", host="127.0.0.1", nproc=1))


def test_a_renewal_in_flight_when_the_node_leaves_revives_nothing(any_store, run_id, caplog):
    store = _HeldRenewals(any_store)
    h = handler(store, ttl=0.3, run_id=run_id)
    assert store.entered.wait(10)  # a renewal is in flight...
    with caplog.at_level("WARNING", logger="elastic.rendezvous"):
        h.leave()  # ...when the node leaves and revokes its lease
        store.gate.set()
        h._heartbeat.join(10)
    assert not h._heartbeat.is_alive()
    assert store.get_prefix(f"/elastic/{run_id}/alive/")[0] == []
    assert "lease expired" not in caplog.text


class _Overloaded(_Proxy):
    """A real store that does not answer its first ``misses`` reads."""

    def __init__(self, inner: Store, misses: int) -> None:
        super().__init__(inner)
        self.misses = misses

    def get(self, key):
        if self.misses > 0:
            self.misses -= 1
            raise StoreUnavailableError("the store did not answer within 10s")
        return super().get(key)


def test_a_store_that_misses_a_few_answers_does_not_end_the_join(any_store, run_id):
    """An overloaded etcd once made every simulated node give up on one unanswered read."""
    store = _Overloaded(any_store, misses=3)
    h = handler(store, ttl=5.0, run_id=run_id)
    try:
        assert h.next_round().node_ids == ("a",) and store.misses == 0
    finally:
        h.leave()


class _Gone(_Proxy):
    """A real store that stops answering anything once ``gone`` is set (its host died)."""

    gone = False

    def _check(self):
        if self.gone:
            raise StoreUnavailableError("the store did not answer within 10s")

    def get(self, key):
        self._check()
        return super().get(key)

    def keep_alive(self, lease):
        self._check()
        return super().keep_alive(lease)

    def revoke_lease(self, lease):
        self._check()
        return super().revoke_lease(lease)


def test_a_store_silent_for_store_timeout_is_given_up(any_store, run_id):
    """Shorter silences (a partition) are ridden out; past ``store_timeout_s`` the join ends in
    one error that names the store and how long it was silent, and leaving waits on nothing."""
    store = _Gone(any_store)
    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=1, lease_ttl_s=0.4, store_timeout_s=1.0)
    h = RendezvousHandler(store, settings, NodeInfo(node_id="a", host="127.0.0.1", nproc=1))
    store.gone = True
    try:
        with pytest.raises(StoreLostError, match=r"is gone: no answer for \ds \(store_timeout 1s\)") as err:
            h.next_round()
        assert err.value.silent_s > 1.0 and err.value.limit_s == 1.0
    finally:
        h.leave()
