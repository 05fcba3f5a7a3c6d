"""What the job's ``round`` key holds and why a round ends, as typed records.

Every reader of the round (agents, workers that recover in place, the TensorFlow fence, a
scheduler's controller) goes through :class:`RoundState`; nobody parses the JSON or matches
human-readable reasons. Its wire form (compact, sorted JSON) is what the protocol has always
written: ``{"generation", "state": "open"|"closed"|"failed", "nodes": [row...], "prev_nodes",
"reason", "cause", "restart_count"}``.
"""
from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from ..errors import ElasticError
from .api import NodeTable

__all__ = ["RoundStatus", "ChangeReason", "RoundChange", "RoundState", "RoundStateError", "NodeLimits", "dumps"]


class RoundStatus(str, Enum):
    OPEN = "open"  # nodes are joining
    CLOSED = "closed"  # the round runs with its nodes
    FAILED = "failed"  # the job failed for good; no round forms again


class ChangeReason(str, Enum):
    """Why a round ended (what a watcher sees) or why the next one was opened (its cause)."""

    ROUND_ENDED = "round_ended"  # another node opened the next round
    NODE_LEFT = "node_left"  # a node of the round left or died (its lease is gone)
    NODE_WAITING = "node_waiting"  # a node waits for a place and the round has room
    JOB_FAILED = "job_failed"  # the job failed for good
    REQUESTED = "requested"  # cause: a node asked for a new round (a scale change, a drain)
    DRAIN_REQUESTED = "drain_requested"  # a scheduler asked this node to leave at a safe point
    STOP_REQUESTED = "stop_requested"  # a scheduler asked the whole job to end with a final save
    WORKER_FAILED = "worker_failed"  # cause: a worker failed (a restart was charged)
    LOST_PEER = "lost_peer"  # cause: a worker's collective lost a peer (a node may be gone)


@dataclass(frozen=True)
class RoundChange:
    """Why a running round is over. ``str()`` is the line the agent logs."""

    reason: ChangeReason
    message: str
    node_id: Optional[str] = None
    cause: Optional[ChangeReason] = None  # ROUND_ENDED: why the next round was opened

    def __str__(self) -> str:
        return self.message


class RoundStateError(ElasticError):
    """The round key holds something this version cannot read."""


@dataclass(frozen=True)
class RoundState:
    """The value of the job's ``round`` key."""

    generation: int
    status: RoundStatus
    nodes: NodeTable = NodeTable(())  # CLOSED: the round's nodes in rank order
    prev_nodes: Tuple[str, ...] = ()  # OPEN: node ids of the round before (the ones to wait for)
    reason: str = ""  # OPEN: why it was opened; FAILED: why the job failed
    cause: Optional[ChangeReason] = None  # OPEN: why it was opened, typed
    restart_count: int = 0  # CLOSED: restarts spent when it closed
    opener: str = ""  # OPEN: the node that coordinates it ("": the first joiner takes it at once)

    @property
    def is_open(self) -> bool:
        return self.status is RoundStatus.OPEN

    @property
    def is_closed(self) -> bool:
        return self.status is RoundStatus.CLOSED

    @property
    def is_failed(self) -> bool:
        return self.status is RoundStatus.FAILED

    @property
    def settled_generation(self) -> int:
        """The last generation that closed: this one when closed, else the one before."""
        return self.generation if self.is_closed else self.generation - 1

    def opened_next(self, reason: str = "", cause: Optional[ChangeReason] = None, opener: str = "") -> "RoundState":
        """The open round that follows this one (a closed round's nodes are the ones to wait for)."""
        prev = self.nodes.ids() if self.is_closed else ()
        return RoundState(self.generation + 1, RoundStatus.OPEN, prev_nodes=prev, reason=reason, cause=cause,
                          opener=opener)

    def to_json(self) -> bytes:
        out: Dict[str, Any] = {"generation": self.generation, "state": self.status.value}
        if self.is_closed:
            out["nodes"] = [list(r) for r in self.nodes.rows]
            out["restart_count"] = self.restart_count
        elif self.is_open:
            out["prev_nodes"] = list(self.prev_nodes)
            if self.opener:
                out["opener"] = self.opener
        if self.reason:
            out["reason"] = self.reason
        if self.cause is not None:
            out["cause"] = self.cause.value
        return dumps(out)

    @staticmethod
    def from_json(value: bytes) -> "RoundState":
        """Parse ``value``; the records are shared between callers (immutable), parsed once."""
        return _parse_round(value)


@dataclass(frozen=True)
class NodeLimits:
    """How many nodes the job runs with now: the launch range, unless a scheduler changed it
    (``ctl/range``), and the size it asked for (``ctl/desired``), which a round closes at
    without waiting out the last call."""

    min_nodes: int
    max_nodes: int
    desired: Optional[int] = None

    @property
    def target(self) -> int:
        """The size at which a forming round closes at once, and up to which waiting nodes are let in."""
        return self.max_nodes if self.desired is None else max(self.min_nodes, min(self.max_nodes, self.desired))

    @classmethod
    def of(cls, min_nodes: int, max_nodes: int, range_value: Optional[bytes],
           desired_value: Optional[bytes]) -> "NodeLimits":
        if range_value:
            data = json.loads(range_value)
            min_nodes, max_nodes = int(data["min_nodes"]), int(data["max_nodes"])
        desired = int(json.loads(desired_value)["nodes"]) if desired_value else None
        return cls(min_nodes, max_nodes, desired)


def dumps(obj: Any) -> bytes:
    """The protocol's JSON: compact and sorted, so equal values are equal bytes."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _memoized(func):
    """``lru_cache`` that computes each value once even when many threads ask at one moment
    (as every joiner of a process does when the round closes); ``lru_cache`` alone lets them
    all miss."""
    cached = functools.lru_cache(maxsize=8)(func)
    lock = threading.Lock()

    @functools.wraps(func)
    def wrapper(value: bytes):
        with lock:
            return cached(value)
    return wrapper


@_memoized
def _parse_round(value: bytes) -> RoundState:
    try:
        data = json.loads(value)
        cause = data.get("cause")
        return RoundState(
            generation=int(data["generation"]), status=RoundStatus(data["state"]),
            nodes=NodeTable(data.get("nodes") or ()), prev_nodes=tuple(data.get("prev_nodes") or ()),
            reason=str(data.get("reason") or ""), cause=None if cause is None else ChangeReason(cause),
            restart_count=int(data.get("restart_count", 0)), opener=str(data.get("opener") or ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise RoundStateError(f"unreadable round record ({exc}): {value[:120]!r}") from None
