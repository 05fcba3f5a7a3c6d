"""The round protocol on every store backend (memory, embedded, etcd: the ``any_store``
fixture); nodes are threads with their own handlers, each test a job (``run_id``) of its own.

Real agents run the same protocol in test_launcher*.py; here every edge of the protocol is
exercised quickly.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest

from elastic.rendezvous import (NodeInfo, RendezvousClosedError, RendezvousHandler, RendezvousSettings,
                                RendezvousTimeoutError, RestartBudgetExceededError)
from elastic.rendezvous.state import ChangeReason


_made = []


@pytest.fixture
def store(any_store):
    """Each backend's store; the nodes a test made leave it (their heartbeats end) afterwards."""
    yield any_store
    while _made:
        _made.pop().leave()


def make(store, run_id, name, nproc=2, **settings):
    s = RendezvousSettings(run_id=run_id, **{"lease_ttl_s": 1.0, "join_timeout_s": 30, **settings})
    handler = RendezvousHandler(store, s, NodeInfo(node_id=name, host="127.0.0.1", nproc=nproc,
                                                   master_port=1000 + len(name)))
    _made.append(handler)
    return handler


def join_all(handlers, prevs=None):
    prevs = prevs or [None] * len(handlers)
    with ThreadPoolExecutor(len(handlers)) as pool:
        futures = [pool.submit(h.next_round, p) for h, p in zip(handlers, prevs)]
        return [f.result(timeout=60) for f in futures]


def test_round_closes_at_max_without_waiting_for_last_call(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=3, last_call_s=600) for n in "abc"]
    rounds = join_all(hs)
    assert {r.generation for r in rounds} == {1}
    assert sorted(r.node_rank for r in rounds) == [0, 1, 2]
    assert all(r.world_size == 6 and r.num_nodes == 3 for r in rounds)
    assert len({r.node_ids for r in rounds}) == 1  # everyone agrees on the order
    r0 = next(r for r in rounds if r.node_rank == 0)
    assert all(r.master_addr == r0.node.host and r.master_port == r0.node.master_port for r in rounds)
    assert sorted(r.rank_offset for r in rounds) == [0, 2, 4]


def wait_for_join_key(store, node_id, generation=1, run_id="job"):
    """Block (on the store's watch, no sleeping) until ``node_id`` has joined the open round."""
    key = f"/elastic/{run_id}/join/{generation}/{node_id}"
    for _ in range(30):
        kvs, rev = store.get_prefix(key)
        if kvs:
            return
        store.wait(key, rev, timeout_s=2)
    raise AssertionError(f"{node_id} never joined round {generation}")


def test_round_closes_at_min_after_last_call(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=4, last_call_s=0.3) for n in "ab"]
    rounds = join_all(hs)
    assert [r.num_nodes for r in rounds] == [2, 2]


def test_last_call_keeps_a_round_at_min_open_for_a_later_node(store, run_id):
    """Reaching MIN does not close the round: it stays open through the last call, so a node
    that joins after MIN was reached is admitted. (The round then closes at MAX, so nothing
    here waits for the 600 s window or depends on how long anything takes.)"""
    hs = [make(store, run_id, n, min_nodes=1, max_nodes=3, last_call_s=600) for n in "abc"]
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(hs[0].next_round)
        wait_for_join_key(store, "a", run_id=run_id)  # MIN (1) reached: only the last call keeps it open
        second = pool.submit(hs[1].next_round)
        wait_for_join_key(store, "b", run_id=run_id)
        assert not first.done() and not second.done()  # still open at MIN and above
        third = pool.submit(hs[2].next_round)
        rounds = [f.result(timeout=60) for f in (first, second, third)]
    assert {r.generation for r in rounds} == {1}  # one round: a's did not close without b, c
    assert [r.node_ids for r in rounds] == [("a", "b", "c")] * 3
    assert [r.node_rank for r in rounds] == [0, 1, 2]  # in joining order


def test_a_re_formation_closes_once_every_live_node_joined(store, run_id):
    """After a node leaves, the survivors' next round closes as soon as both joined: no last
    call (600 s here) to wait out. A first round still waits for it (nodes may be starting)."""
    hs = [make(store, run_id, n, min_nodes=1, max_nodes=4, last_call_s=0.3) for n in "abc"]
    first = join_all(hs)
    for h in hs:
        h.settings = RendezvousSettings(**{**h.settings.__dict__, "last_call_s": 600})
    hs[2].leave()
    second = join_all(hs[:2], first[:2])
    assert [r.num_nodes for r in second] == [2, 2] and second[0].generation == first[0].generation + 1
    # a node that is alive but has not joined yet is still waited for (up to the last call)
    hs[1].request_new_round(second[1], "test", ChangeReason.REQUESTED)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(hs[0].next_round, second[0])
        with pytest.raises(TimeoutError):
            pending.result(timeout=1.0)
        third = hs[1].next_round(second[1])
        assert third.num_nodes == 2 and pending.result(timeout=30).generation == third.generation


def test_too_few_nodes_time_out_with_a_clear_error(store, run_id):
    h = make(store, run_id, "lonely", min_nodes=2, max_nodes=2, join_timeout_s=0.5)
    with pytest.raises(RendezvousTimeoutError, match="need 2 node"):
        h.next_round()


def test_survivors_keep_their_order_and_newcomers_are_appended(store, run_id):
    hs = {n: make(store, run_id, n, min_nodes=1, max_nodes=4, last_call_s=0.3) for n in "abc"}
    first = dict(zip("abc", join_all(list(hs.values()))))
    order = list(first["a"].node_ids)
    leaver = order[1]
    hs[leaver].leave()  # clean leave: revokes the lease at once
    survivors = [n for n in order if n != leaver]
    reason = hs[survivors[0]].watch(first[survivors[0]], timeout_s=10)
    assert (reason.reason, reason.node_id) == (ChangeReason.NODE_LEFT, leaver)
    second = dict(zip(survivors, join_all([hs[n] for n in survivors], [first[n] for n in survivors])))
    assert all(r.generation > first["a"].generation for r in second.values())
    assert list(second[survivors[0]].node_ids) == survivors  # same relative order
    # scale-up: a newcomer opens a new round (the old one is below MAX) and is appended
    hs["d"] = make(store, run_id, "d", min_nodes=1, max_nodes=4, last_call_s=0.3)
    with ThreadPoolExecutor(1) as pool:
        newcomer = pool.submit(hs["d"].next_round, None)
        assert hs[survivors[0]].watch(second[survivors[0]], timeout_s=10)
        third = join_all([hs[n] for n in survivors], [second[n] for n in survivors])
        assert newcomer.result(timeout=30).node_ids == tuple(survivors) + ("d",)
    assert third[0].node_ids == tuple(survivors) + ("d",)


def test_a_node_that_stops_renewing_its_lease_is_dead(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=2) for n in "ab"]
    rounds = join_all(hs)
    hs[1]._closed.set()  # stop the heartbeat without leaving: a frozen or dead process
    reason = hs[0].watch(rounds[0], timeout_s=15)
    assert (reason.reason, reason.node_id, str(reason)) == (
        ChangeReason.NODE_LEFT, hs[1].node.node_id, f"node {hs[1].node.node_id} left or died")


def test_a_node_that_finished_is_not_a_scale_down(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=2) for n in "ab"]
    rounds = join_all(hs)
    hs[1].mark_done(rounds[1])
    hs[1].leave()
    assert hs[0].watch(rounds[0], timeout_s=0.5) is None


def test_a_full_round_keeps_a_newcomer_waiting_until_a_place_frees(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=2) for n in "ab"]
    rounds = join_all(hs)
    late = make(store, run_id, "late", min_nodes=2, max_nodes=2)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(late.next_round, None)
        # the full round is not disturbed by the waiting node
        assert hs[0].watch(rounds[0], timeout_s=0.5) is None
        assert not waiting.done()
        hs[1].leave()
        assert hs[0].watch(rounds[0], timeout_s=10)
        again = hs[0].next_round(rounds[0])
        assert waiting.result(timeout=30).generation == again.generation
    assert again.node_ids == (hs[0].node.node_id, "late")


def test_restart_budget_is_job_wide(store, run_id):
    hs = [make(store, run_id, n, min_nodes=2, max_nodes=2, max_restarts=1) for n in "ab"]
    rounds = join_all(hs)
    hs[0].request_new_round(rounds[0], "worker crashed", ChangeReason.WORKER_FAILED)
    assert hs[1].watch(rounds[1], timeout_s=5)
    rounds = join_all(hs, rounds)
    assert rounds[0].restart_count == 1 and rounds[0].generation == 2
    # the second failure, on the other node, exhausts the shared budget of 1
    with pytest.raises(RestartBudgetExceededError, match="restart budget exhausted"):
        hs[1].request_new_round(rounds[1], "worker crashed again", ChangeReason.WORKER_FAILED)
    change = hs[0].watch(rounds[0], timeout_s=5)
    assert change.reason is ChangeReason.JOB_FAILED and "restart budget exhausted" in str(change)
    with pytest.raises(RendezvousClosedError):
        hs[0].next_round(rounds[0])


def test_generations_only_grow(store, run_id):
    h = make(store, run_id, "solo", min_nodes=1, max_nodes=1)
    gens = []
    rnd = None
    for _ in range(5):
        rnd = h.next_round(rnd)
        gens.append(rnd.generation)
    assert gens == sorted(set(gens)) and len(gens) == 5


def test_bad_settings_are_rejected():
    from elastic.errors import ConfigError
    with pytest.raises(ConfigError, match="need 1 <= MIN <= MAX"):
        RendezvousSettings(run_id="x", min_nodes=3, max_nodes=1)
    with pytest.raises(ConfigError, match="invalid run id"):
        RendezvousSettings(run_id="a/b")


def test_a_round_nobody_coordinates_is_taken_over_after_a_wait(store, run_id):
    # The node that opens a round coordinates it; here the round was opened by a node that
    # never joined (it died), so a joiner whose wait times out takes the coordinator key.
    store.compare_and_set(f"/elastic/{run_id}/round", None, b'{"generation":1,"state":"open","prev_nodes":[]}')
    rounds = join_all([make(store, run_id, n, min_nodes=2, max_nodes=2) for n in "ab"])
    assert [r.num_nodes for r in rounds] == [2, 2] and {r.generation for r in rounds} == {1}


def test_a_failed_job_wakes_waiting_joiners_at_once(store, run_id):
    # A long lease means a long poll: only the round key's "failed" mark can end this wait
    # before the join timeout, which would raise RendezvousTimeoutError instead.
    waiting = make(store, run_id, "a", min_nodes=2, max_nodes=2, lease_ttl_s=120, join_timeout_s=20)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(waiting.next_round)
        wait_for_join_key(store, "a", run_id=run_id)
        make(store, run_id, "b").fail("worker 3 ran out of memory")
        with pytest.raises(RendezvousClosedError, match="worker 3 ran out of memory"):
            future.result(timeout=15)
    late = make(store, run_id, "c")
    with pytest.raises(RendezvousClosedError, match="worker 3 ran out of memory"):
        late.next_round()
    assert late.ledger.job_failure() == "worker 3 ran out of memory"
