"""Records and errors of the rendezvous round protocol."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from ..errors import ConfigError, ElasticError, UserError

__all__ = [
    "RendezvousSettings", "NodeInfo", "NodeTable", "Round",
    "RendezvousError", "RendezvousTimeoutError", "RendezvousClosedError", "RestartBudgetExceededError",
    "StoreLostError", "STORE_TIMEOUT_LEASES",
]

#: Without ``store_timeout_s``, a node gives the store up after this many lease periods of silence.
STORE_TIMEOUT_LEASES = 6


class RendezvousError(ElasticError):
    """Base class of rendezvous errors."""


class RendezvousTimeoutError(RendezvousError, UserError):
    """No round could be formed within the join timeout (too few nodes came)."""


class RendezvousClosedError(RendezvousError):
    """The job has ended (failed or succeeded); no further rounds form."""


class RestartBudgetExceededError(RendezvousClosedError):
    """The job-wide restart budget (``--max-restarts``) is spent."""


class StoreLostError(RendezvousError):
    """The job's store has not answered for ``store_timeout_s``: this node gives it up.

    A node cut off by a partition rides out anything shorter (it rejoins once the network
    heals); past the bound it cannot tell a partition from a store that is gone for good.
    """

    def __init__(self, endpoint: str, silent_s: float, limit_s: float, cause: str = "") -> None:
        self.endpoint = endpoint
        self.silent_s = silent_s
        self.limit_s = limit_s
        super().__init__(f"the rendezvous store {endpoint} is gone: no answer for {silent_s:.0f}s "
                         f"(store_timeout {limit_s:g}s){f'; last error: {cause}' if cause else ''}")


@dataclass(frozen=True)
class RendezvousSettings:
    """How rounds of one job (``run_id``) form.

    A round closes at ``max_nodes`` at once, or at ``min_nodes`` or more once ``last_call_s``
    has passed since the minimum was reached. A node whose lease is not renewed for
    ``lease_ttl_s`` is dead.
    """

    run_id: str
    min_nodes: int = 1
    max_nodes: int = 1
    last_call_s: float = 1.0
    lease_ttl_s: float = 5.0
    join_timeout_s: float = 600.0
    max_restarts: int = 0
    store_timeout_s: float = 0.0

    @property
    def store_loss_s(self) -> float:
        """How long the store may be silent before this node gives it up."""
        return self.store_timeout_s or STORE_TIMEOUT_LEASES * self.lease_ttl_s

    def __post_init__(self) -> None:
        if not self.run_id or "/" in self.run_id:
            raise ConfigError(f"invalid run id {self.run_id!r}: non-empty, without '/'")
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ConfigError(
                f"invalid node range {self.min_nodes}:{self.max_nodes}: need 1 <= MIN <= MAX")
        for name in ("last_call_s", "join_timeout_s", "store_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.lease_ttl_s <= 0:
            raise ConfigError("lease_ttl_s must be > 0")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts must be >= 0")


@dataclass(frozen=True)
class NodeInfo:
    """One agent as the others see it. ``node_id`` is unique per agent incarnation."""

    node_id: str
    host: str
    nproc: int
    master_port: int = 0  # used when this node is node rank 0
    rank_hint: Optional[int] = None  # static --node-rank: orders nodes when given
    aux_port: int = 0  # a second port node rank 0 offers (e.g. Horovod's Gloo rendezvous)

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    def to_row(self) -> list:
        """Compact form for the closed round, which every node reads: O(N) bytes per node."""
        return [self.node_id, self.host, self.nproc, self.master_port, self.rank_hint, self.aux_port]

    @classmethod
    def from_row(cls, row: list) -> "NodeInfo":
        node_id, host, nproc, master_port, rank_hint, aux_port = row
        return cls(str(node_id), str(host), int(nproc), int(master_port),
                   None if rank_hint is None else int(rank_hint), int(aux_port))

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "NodeInfo":
        return cls(node_id=str(data["node_id"]), host=str(data["host"]), nproc=int(data["nproc"]),
                   master_port=int(data.get("master_port", 0)),
                   rank_hint=None if data.get("rank_hint") is None else int(data["rank_hint"]),
                   aux_port=int(data.get("aux_port", 0)))


class NodeTable(Sequence[NodeInfo]):
    """A closed round's nodes in rank order, built from its rows only as far as they are read.

    Every node of an N-node job reads the round when it closes; each needs its own rank and
    the world size, not N :class:`NodeInfo` records (N^2 records across a 1024-node job).
    """

    __slots__ = ("_rows", "_nodes", "_ranks")

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        self._rows = tuple(tuple(r) for r in rows)
        self._nodes: Dict[int, NodeInfo] = {}
        self._ranks: Optional[Dict[str, int]] = None

    @classmethod
    def of(cls, nodes: Sequence[NodeInfo]) -> "NodeTable":
        if isinstance(nodes, NodeTable):
            return nodes
        table = cls([n.to_row() for n in nodes])
        table._nodes = dict(enumerate(nodes))
        return table

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self._rows))))
        if index < 0:
            index += len(self._rows)
        node = self._nodes.get(index)
        if node is None:
            node = self._nodes[index] = NodeInfo.from_row(list(self._rows[index]))
        return node

    def __iter__(self) -> Iterator[NodeInfo]:
        return (self[i] for i in range(len(self._rows)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NodeTable):
            return self._rows == other._rows
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._rows)

    def __repr__(self) -> str:
        return f"NodeTable({list(self)!r})"

    @property
    def rows(self) -> Tuple[Tuple[Any, ...], ...]:
        return self._rows

    def ids(self) -> Tuple[str, ...]:
        return tuple(str(r[0]) for r in self._rows)

    def rank_of(self, node_id: str) -> Optional[int]:
        if self._ranks is None:
            self._ranks = {str(r[0]): i for i, r in enumerate(self._rows)}
        return self._ranks.get(node_id)

    def nproc_before(self, rank: int) -> int:
        return sum(int(r[2]) for r in self._rows[:rank])

    def nproc_total(self) -> int:
        return self.nproc_before(len(self._rows))


@dataclass(frozen=True)
class Round:
    """A closed round: its generation (fencing token), its nodes in rank order, and us."""

    generation: int
    nodes: "NodeTable"  # a tuple of NodeInfo is accepted and wrapped
    node_rank: int
    restart_count: int = 0
    revision: int = 0  # store revision at which the round closed; changes are watched after it
    max_nodes: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", NodeTable.of(self.nodes))

    @property
    def node(self) -> NodeInfo:
        return self.nodes[self.node_rank]

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.nodes.nproc_total()

    @property
    def rank_offset(self) -> int:
        """Global rank of this node's local rank 0."""
        return self.nodes.nproc_before(self.node_rank)

    @property
    def master_addr(self) -> str:
        return self.nodes[0].host

    @property
    def master_port(self) -> int:
        return self.nodes[0].master_port

    @property
    def node_ids(self) -> Tuple[str, ...]:
        return self.nodes.ids()
