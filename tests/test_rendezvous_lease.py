"""The node's lease is never revived by a node that has left (a renewal racing leave() once
logged "lease expired" at the end of a successful job and put back an alive key that kept the
hosting node waiting for a lease to run out), and a join rides out a store that misses a few
answers."""
import threading

import pytest

from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.store import MemoryStore, StoreUnavailableError


class _HeldRenewals(MemoryStore):
    """A real in-memory store whose keep-alives wait at a gate the test opens."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def keep_alive(self, lease):
        self.entered.set()
        self.gate.wait(10)
        return super().keep_alive(lease)


def handler(store, ttl):
    settings = RendezvousSettings(run_id="job", min_nodes=1, max_nodes=1, lease_ttl_s=ttl)
    return RendezvousHandler(store, settings, NodeInfo(node_id="a", host="127.0.0.1", nproc=1))


def test_a_renewal_in_flight_when_the_node_leaves_revives_nothing(caplog):
    store = _HeldRenewals()
    h = handler(store, ttl=0.3)
    assert store.entered.wait(10)  # a renewal is in flight...
    with caplog.at_level("WARNING", logger="elastic.rendezvous"):
        h.leave()  # ...when the node leaves and revokes its lease
        store.gate.set()
        h._heartbeat.join(10)
    assert not h._heartbeat.is_alive()
    assert store.get_prefix("/elastic/job/alive/")[0] == []
    assert "lease expired" not in caplog.text


class _Overloaded(MemoryStore):
    """A real in-memory store that does not answer its first ``misses`` reads."""

    def __init__(self, misses: int) -> None:
        super().__init__()
        self.misses = misses

    def get(self, key):
        if self.misses > 0:
            self.misses -= 1
            raise StoreUnavailableError("the store did not answer within 10s")
        return super().get(key)


def test_a_store_that_misses_a_few_answers_does_not_end_the_join():
    """An overloaded etcd once made every simulated node give up on one unanswered read."""
    store = _Overloaded(misses=3)
    h = handler(store, ttl=5.0)
    try:
        assert h.next_round().node_ids == ("a",) and store.misses == 0
    finally:
        h.leave()


def test_a_store_gone_for_longer_than_a_lease_is_an_error():
    store = _Overloaded(misses=10**6)
    h = handler(store, ttl=0.4)
    try:
        with pytest.raises(StoreUnavailableError):
            h.next_round()
    finally:
        h.leave()
