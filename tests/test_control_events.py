"""The job's event ring: ordered as the store took the events, whatever the nodes' clocks say."""
import json

from elastic.control.events import EventLog
from elastic.rendezvous.keys import JobKeys
from elastic.store import MemoryStore


def test_a_late_event_with_an_earlier_clock_is_neither_lost_nor_misordered():
    store, keys = MemoryStore(), JobKeys("job")
    a = EventLog(store, keys, node="a")
    first = a.emit("round", 1, world_size=2)
    seen = list(a.follow(timeout_s=0.01))
    assert [e.name for e in seen] == ["round"] and seen[0].seq == first.seq
    # node b's clock is behind: its event's key sorts before a's, but it arrives after it
    store.put(keys.events("00000000000000000001-000001-b"),
              json.dumps({"name": "drained", "time": 1.0, "node": "b", "generation": 1}).encode())
    late = list(a.follow(since=first.seq, timeout_s=0.01))
    assert [(e.name, e.node) for e in late] == [("drained", "b")]
    assert int(late[0].seq) > int(first.seq)
    assert [e.name for e in a.read()] == ["round", "drained"]  # store order, not key order
    assert [e.name for e in a.read(since=first.seq)] == ["drained"]


def test_the_ring_keeps_the_newest_and_the_hook_sees_each_event():
    store, keys, got = MemoryStore(), JobKeys("job"), []
    log = EventLog(store, keys, node="n", on_event=got.append, capacity=5)
    for i in range(60):
        log.emit("tick", i=i)
    log.trim()
    kept = log.read()
    assert [e.details["i"] for e in kept] == [55, 56, 57, 58, 59]
    assert [e.details["i"] for e in got] == list(range(60)) and all(e.seq for e in got)
