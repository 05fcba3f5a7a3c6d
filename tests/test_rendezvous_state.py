"""The round record and the reasons a round ends, typed: round trips and the lazy node table."""
import pytest

from elastic.rendezvous.api import NodeInfo, NodeTable, Round
from elastic.rendezvous.state import ChangeReason, RoundState, RoundStateError, RoundStatus


def nodes(n):
    return [NodeInfo(f"n{i}", f"h{i}", i + 1, 29500 + i, None, 31000 + i) for i in range(n)]


def test_a_closed_round_round_trips_and_keeps_the_wire_form():
    state = RoundState(4, RoundStatus.CLOSED, nodes=NodeTable.of(nodes(3)), restart_count=2)
    wire = state.to_json()
    assert wire == (b'{"generation":4,"nodes":[["n0","h0",1,29500,null,31000],["n1","h1",2,29501,null,31001],'
                    b'["n2","h2",3,29502,null,31002]],"restart_count":2,"state":"closed"}')
    back = RoundState.from_json(wire)
    assert back == state and back.is_closed and back.settled_generation == 4
    assert RoundState.from_json(wire) is back  # parsed once per value


def test_the_next_round_remembers_who_to_wait_for_and_why():
    closed = RoundState(4, RoundStatus.CLOSED, nodes=NodeTable.of(nodes(2)))
    nxt = closed.opened_next("a worker lost a peer: reset", ChangeReason.LOST_PEER)
    assert (nxt.generation, nxt.status, nxt.prev_nodes) == (5, RoundStatus.OPEN, ("n0", "n1"))
    back = RoundState.from_json(nxt.to_json())
    assert back.cause is ChangeReason.LOST_PEER and back.reason.startswith("a worker lost")
    assert back.settled_generation == 4
    assert RoundState.from_json(b'{"generation":1,"prev_nodes":[],"state":"open"}').cause is None


@pytest.mark.parametrize("value", [b"not json", b'{"state":"open"}', b'{"generation":1,"state":"weird"}',
                                   b'{"generation":1,"state":"open","cause":"nonsense"}'])
def test_an_unreadable_round_is_a_typed_error(value):
    with pytest.raises(RoundStateError, match="unreadable round record"):
        RoundState.from_json(value)


def test_the_node_table_builds_only_what_is_read():
    table = NodeTable([n.to_row() for n in nodes(1024)])
    assert table.rank_of("n700") == 700 and table.rank_of("nope") is None
    assert table.nproc_total() == sum(range(1, 1025)) and table.nproc_before(2) == 3
    assert table._nodes == {}  # nothing built for the lookups above
    assert table[700] == nodes(1024)[700] and list(table._nodes) == [700]
    assert table[-1].node_id == "n1023" and table[1:3] == tuple(nodes(3)[1:3])
    rnd = Round(1, table, node_rank=3)
    assert (rnd.world_size, rnd.rank_offset, rnd.node.node_id) == (table.nproc_total(), 6, "n3")
    assert Round(1, tuple(nodes(2)), 1) == Round(1, NodeTable.of(nodes(2)), 1)
