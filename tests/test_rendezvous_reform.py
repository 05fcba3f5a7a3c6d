"""Re-forming a running job: a previous node still stopping its workers is waited for past the
last call (leaving it out reordered the ranks and cost another round), except when the round
was opened for a lost peer, whose dead node's lease runs on. On every store backend (the
``any_store`` fixture), each test a job of its own."""
import threading
from concurrent.futures import ThreadPoolExecutor

from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
from elastic.rendezvous.protocol import LOST_PEER_REASON
from elastic.rendezvous.state import ChangeReason


def make(store, name, last_call_s, run_id="job"):
    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=4, last_call_s=last_call_s,
                                  lease_ttl_s=30.0, join_timeout_s=60.0)
    return RendezvousHandler(store, settings, NodeInfo(node_id=name, host="127.0.0.1", nproc=1))


def test_a_scale_up_waits_for_a_previous_node_that_is_still_stopping(any_store, run_id):
    store = any_store
    a, b = make(store, "a", 0.2, run_id), make(store, "b", 0.2, run_id)
    with ThreadPoolExecutor(2) as pool:
        first = [f.result(30) for f in [pool.submit(a.next_round), pool.submit(b.next_round)]]
    assert first[0].num_nodes == 2
    c = make(store, "c", 0.2, run_id)
    slow = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        fc = pool.submit(c.next_round)  # the newcomer opens round 2
        fa = pool.submit(a.next_round, first[0])
        slow.wait(1.0)  # b takes five last calls to stop its workers
        fb = pool.submit(b.next_round, first[1])
        rounds = [f.result(30) for f in (fa, fb, fc)]
    assert {r.generation for r in rounds} == {first[0].generation + 1}
    # everyone, survivors first in their order (a and b joined round 1 at once: either order)
    assert sorted(first[0].node_ids) == ["a", "b"] and rounds[0].node_ids == first[0].node_ids + ("c",)
    for h in (a, b, c):
        h.leave()


def test_a_lost_peer_round_does_not_wait_for_a_silent_previous_node(any_store, run_id):
    store = any_store
    a, b = make(store, "a", 0.2, run_id), make(store, "b", 0.2, run_id)
    with ThreadPoolExecutor(2) as pool:
        first = [f.result(30) for f in [pool.submit(a.next_round), pool.submit(b.next_round)]]
    a.request_new_round(first[0], f"{LOST_PEER_REASON}: connection closed by peer", ChangeReason.LOST_PEER)
    second = a.next_round(first[0])  # b is alive (its lease runs) but never joins: dead, as far as we know
    assert second.node_ids == ("a",)
    for h in (a, b):
        h.leave()
