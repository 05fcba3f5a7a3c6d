"""Records and errors of the control plane: what a scheduler reads and what it may ask.

A scheduler talks to a running job through the job's store, never to workers directly: it
reads :class:`JobStatus` and :class:`JobEvent` records that the agents publish, and writes
requests (a desired size, a node range, a drain, a stop) that the agents act on at a safe point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError, ElasticError, UserError

__all__ = ["JobState", "NodeState", "DrainReason", "Drain", "NodeStatus", "JobStatus", "JobEvent",
           "ControlError", "NoSuchJobError", "UnknownNodeError", "EXIT_DRAINED"]

#: An agent whose node was drained (its workers saved and left) exits with this code: a
#: scheduler requeues it, unlike a failure (1). 75 is ``EX_TEMPFAIL`` of sysexits.h.
EXIT_DRAINED = 75


class ControlError(ElasticError):
    """Base class of control-plane errors."""


class NoSuchJobError(ControlError, UserError):
    """No job with this run id has ever published anything on the store."""


class UnknownNodeError(ControlError, ConfigError):
    """A node id, host or node rank that no live node of the job has."""


class JobState(str, Enum):
    FORMING = "forming"  # a round is open: nodes are joining
    RUNNING = "running"  # a closed round runs
    DRAINING = "draining"  # a stop was asked: every node saves and leaves
    SUCCEEDED = "succeeded"  # every node's workers succeeded
    FAILED = "failed"  # the restart budget is spent, or a bug was raised
    STOPPED = "stopped"  # a stop was asked and every node has left


class NodeState(str, Enum):
    RENDEZVOUS = "rendezvous"  # joining a round
    RUNNING = "running"  # its workers run
    DRAINING = "draining"  # saving and leaving
    DRAINED = "drained"  # left after a drain (its agent exits with EXIT_DRAINED)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # left after a stop or a signal


class DrainReason(str, Enum):
    MAINTENANCE = "maintenance"
    PREEMPTION = "preemption"
    SCALE_DOWN = "scale_down"
    STOP = "stop"

    @classmethod
    def parse(cls, value: Any) -> "DrainReason":
        try:
            return cls(value.value if isinstance(value, DrainReason) else str(value))
        except ValueError:
            raise ConfigError(f"drain reason {value!r}: expected one of "
                              f"{', '.join(r.value for r in cls)}") from None


@dataclass(frozen=True)
class Drain:
    """A request that a node leave at its next safe point (``deadline``: unix time, or None)."""

    reason: DrainReason
    deadline: Optional[float] = None
    at: float = 0.0  # when it was asked (unix time)

    def to_json(self) -> Dict[str, Any]:
        return {"reason": self.reason.value, "deadline": self.deadline, "at": self.at}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Drain":
        deadline = data.get("deadline")
        return cls(DrainReason.parse(data.get("reason", "maintenance")),
                   None if deadline is None else float(deadline), float(data.get("at", 0.0)))


@dataclass(frozen=True)
class NodeStatus:
    """One node as its agent last published it, with what its workers reported."""

    node_id: str
    host: str
    node_rank: Optional[int]  # in the current round (None: not in it)
    nproc: int
    state: NodeState
    generation: int = 0
    drain: Optional[Drain] = None
    lease_age_s: float = 0.0  # seconds since its agent last published (a live agent: < a few s)
    worker_pids: Tuple[int, ...] = ()
    last_step: Optional[int] = None  # the highest step its workers committed
    last_checkpoint_step: Optional[int] = None  # the highest step its workers checkpointed
    straggler: Optional[Dict[str, Any]] = None  # the profiler's verdict on this node, if published

    @property
    def draining(self) -> bool:
        return self.drain is not None


@dataclass(frozen=True)
class JobStatus:
    """The whole job at one moment (``status()``); the same record ``/status`` serves as JSON."""

    run_id: str
    state: JobState
    generation: int
    world_size: int
    num_nodes: int
    min_nodes: int
    max_nodes: int
    desired_nodes: Optional[int]
    restarts: int
    max_restarts: int
    nodes: Tuple[NodeStatus, ...] = ()
    reason: str = ""  # why it failed, or why the current round was opened

    def node(self, which: str) -> NodeStatus:
        """The node with this id, host or node rank (``UnknownNodeError`` otherwise)."""
        for n in self.nodes:
            if which in (n.node_id, n.host) or (n.node_rank is not None and which == str(n.node_rank)):
                return n
        known = ", ".join(f"{n.node_id} (rank {n.node_rank})" for n in self.nodes) or "none"
        raise UnknownNodeError(f"no node {which!r} in job {self.run_id!r}; nodes: {known}")

    def to_json(self) -> Dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class JobEvent:
    """One thing that happened: a round, a join, a leave, a failure, a restart, a drain, a
    scale or a stop. ``seq`` is the store revision that recorded it: it orders events as the
    store took them (pass the last one seen as ``since``)."""

    seq: str
    name: str
    time: float
    node: str = ""
    generation: int = 0
    details: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"seq": self.seq, "name": self.name, "time": self.time, "node": self.node,
                "generation": self.generation, "details": self.details}
