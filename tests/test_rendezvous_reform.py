"""Re-forming a running job: a previous node still stopping its workers is waited for past the
last call (leaving it out reordered the ranks and cost another round), except when the round
was opened for a lost peer, whose dead node's lease runs on."""
import threading
from concurrent.futures import ThreadPoolExecutor

from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.rendezvous.protocol import LOST_PEER_REASON
from elastic.rendezvous.state import ChangeReason
from elastic.store import MemoryStore


def make(store, name, last_call_s):
    settings = RendezvousSettings(run_id="job", min_nodes=1, max_nodes=4, last_call_s=last_call_s,
                                  lease_ttl_s=30.0, join_timeout_s=60.0)
    return RendezvousHandler(store, settings, NodeInfo(node_id=name, host="127.0.0.1", nproc=1))


def test_a_scale_up_waits_for_a_previous_node_that_is_still_stopping():
    store = MemoryStore()
    a, b = make(store, "a", 0.2), make(store, "b", 0.2)
    with ThreadPoolExecutor(2) as pool:
        first = [f.result(30) for f in [pool.submit(a.next_round), pool.submit(b.next_round)]]
    assert first[0].num_nodes == 2
    c = make(store, "c", 0.2)
    slow = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        fc = pool.submit(c.next_round)  # the newcomer opens round 2
        fa = pool.submit(a.next_round, first[0])
        slow.wait(1.0)  # b takes five last calls to stop its workers
        fb = pool.submit(b.next_round, first[1])
        rounds = [f.result(30) for f in (fa, fb, fc)]
    assert {r.generation for r in rounds} == {first[0].generation + 1}
    assert rounds[0].node_ids == ("a", "b", "c")  # everyone, survivors first in their order
    for h in (a, b, c):
        h.leave()


def test_a_lost_peer_round_does_not_wait_for_a_silent_previous_node():
    store = MemoryStore()
    a, b = make(store, "a", 0.2), make(store, "b", 0.2)
    with ThreadPoolExecutor(2) as pool:
        first = [f.result(30) for f in [pool.submit(a.next_round), pool.submit(b.next_round)]]
    a.request_new_round(first[0], f"{LOST_PEER_REASON}: connection closed by peer", ChangeReason.LOST_PEER)
    second = a.next_round(first[0])  # b is alive (its lease runs) but never joins: dead, as far as we know
    assert second.node_ids == ("a",)
    for h in (a, b):
        h.leave()
