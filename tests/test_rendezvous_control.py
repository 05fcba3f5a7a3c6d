"""What a scheduler's requests do to rounds: a drained node is not waited for, a desired size
closes a round at once, a changed range lets a waiting node in, and a watcher sees a drain or a
stop as a typed change. Every test runs on each store backend."""
import json
from concurrent.futures import ThreadPoolExecutor

from elastic.rendezvous.state import ChangeReason
from test_rendezvous_protocol import join_all, make as make_node, store  # noqa: F401 (store: the fixture)


def make(store, run_id, name, **settings):
    # A join that waited out the last call (600 s) or the rejoin grace would hit join_timeout_s
    # and raise: that is how these tests fail, not by timing anything.
    return make_node(store, run_id, name, nproc=1,
                     **{"lease_ttl_s": 5.0, "join_timeout_s": 12, "last_call_s": 600, **settings})


def test_a_draining_node_is_not_waited_for_and_the_first_joiner_coordinates(store, run_id):
    hs = [make(store, run_id, n, min_nodes=1, max_nodes=3) for n in "abc"]
    first = join_all(hs)
    store.put(hs[2].keys.drain("c"), json.dumps({"reason": "maintenance"}).encode())
    assert hs[2].watch(first[2], timeout_s=5).reason is ChangeReason.DRAIN_REQUESTED
    assert hs[0].watch(first[0], timeout_s=0.2) is None  # another node's drain is not our change
    assert hs[2].request_new_round(first[2], "node c drains", ChangeReason.REQUESTED, joining=False)
    # c is alive (its lease runs) and was in the last round, yet a and b re-form without it
    second = join_all(hs[:2], first[:2])
    survivors = tuple(n for n in first[0].node_ids if n != "c")  # in their old order
    assert [r.node_ids for r in second] == [survivors] * 2
    assert second[0].generation == first[0].generation + 1


def test_a_desired_size_closes_the_round_at_once(store, run_id):
    hs = [make(store, run_id, n, min_nodes=1, max_nodes=4) for n in "ab"]
    store.put(hs[0].keys.desired(), json.dumps({"nodes": 2}).encode())
    rounds = join_all(hs)
    assert rounds[0].num_nodes == 2 and rounds[0].node_ids == rounds[1].node_ids


def test_a_wider_range_admits_a_waiting_node(store, run_id):
    hs = [make(store, run_id, n, min_nodes=1, max_nodes=2) for n in "ab"]
    first = join_all(hs)
    late = make(store, run_id, "c", min_nodes=1, max_nodes=2)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(late.next_round, None)
        assert hs[0].watch(first[0], timeout_s=0.3) is None  # full: c waits
        store.put(hs[0].keys.node_range(), json.dumps({"min_nodes": 1, "max_nodes": 3}).encode())
        store.put(hs[0].keys.desired(), json.dumps({"nodes": 3}).encode())
        change = hs[0].watch(first[0], timeout_s=5)
        assert (change.reason, change.node_id) == (ChangeReason.NODE_WAITING, "c")
        second = join_all(hs, first)
        assert waiting.result(timeout=30).node_ids == second[0].node_ids == first[0].node_ids + ("c",)
    assert hs[0].limits().target == 3


def test_a_stop_is_a_typed_change_for_every_node(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=2) for n in "ab"]
    rounds = join_all(hs)
    store.put(hs[0].keys.stop(), json.dumps({"graceful": True}).encode())
    assert [h.watch(r, timeout_s=5).reason for h, r in zip(hs, rounds)] == [ChangeReason.STOP_REQUESTED] * 2
