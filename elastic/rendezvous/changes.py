"""Why a running round is over, decided from one read of the job's keys (no I/O here).

The agent's watch reads the job's prefix and asks :func:`why_over`; the answer is typed
(:class:`~elastic.rendezvous.state.RoundChange`), so nobody matches reason strings.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from ..store import KeyValue
from .api import RendezvousSettings, Round
from .keys import JobKeys
from .state import ChangeReason, NodeLimits, RoundChange, RoundState

__all__ = ["why_over"]


def why_over(k: JobKeys, settings: RendezvousSettings, me: str, rnd: Round,
             kvs: List[KeyValue]) -> Optional[RoundChange]:
    """Why ``rnd`` is over for node ``me``, given the job's keys ``kvs``; None while it holds."""
    by_key: Dict[str, KeyValue] = {kv.key: kv for kv in kvs}
    status_kv = by_key.get(k.status())
    status = json.loads(status_kv.value) if status_kv is not None else None
    if status and status.get("failed"):
        return RoundChange(ChangeReason.JOB_FAILED, f"job failed: {status['failed']}")
    round_kv = by_key.get(k.round())
    state = None if round_kv is None else RoundState.from_json(round_kv.value)
    if state is None or state.generation != rnd.generation:
        if state is not None and state.is_failed:
            return RoundChange(ChangeReason.JOB_FAILED, f"job failed: {state.reason or 'unknown'}")
        return RoundChange(ChangeReason.ROUND_ENDED, f"round {rnd.generation} ended" + (
            f" ({state.reason})" if state and state.reason else ""), cause=state.cause if state else None)
    if k.stop() in by_key:
        return RoundChange(ChangeReason.STOP_REQUESTED, "a stop of the job was requested")
    if k.drain(me) in by_key:
        return RoundChange(ChangeReason.DRAIN_REQUESTED, f"node {me} was asked to drain", me)
    for node_id in rnd.node_ids:
        if k.alive(node_id) not in by_key and k.done(rnd.generation, node_id) not in by_key:
            return RoundChange(ChangeReason.NODE_LEFT, f"node {node_id} left or died", node_id)
    limits = NodeLimits.of(settings.min_nodes, settings.max_nodes,
                           *(by_key[key].value if key in by_key else None
                             for key in (k.node_range(), k.desired())))
    if rnd.num_nodes < limits.target:
        waiting = [key[len(k.waiting()):] for key in by_key if key.startswith(k.waiting())]
        waiting = [node_id for node_id in waiting if node_id not in rnd.node_ids]
        if waiting:
            return RoundChange(ChangeReason.NODE_WAITING, f"node {waiting[0]} is waiting to join", waiting[0])
    return None
