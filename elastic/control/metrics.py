"""The agent's ``/metrics`` in the Prometheus text format (0.0.4), written by hand: no
``prometheus_client`` dependency for a dozen gauges and counters.

Every family has its ``# HELP`` and ``# TYPE`` lines and a name prefixed ``elastic_``; a value
not known (no status on the store yet, no checkpoint reported) is left out, never made up.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Iterable, List, Optional, Tuple

from .api import JobState, JobStatus, NodeState, NodeStatus

__all__ = ["Metrics", "CheckpointClock", "render"]

#: Round changes by cause, from the events this agent emits: a worker's failure, a collective
#: that lost a peer, a membership change (cause: its reason), this node's drain or a stop.
_ROUND_CAUSES = {"failure": "worker_failed", "lost_peer": "lost_peer", "drain": "drain", "stop": "stop"}

_ENDED = {NodeState.SUCCEEDED, NodeState.FAILED, NodeState.DRAINED, NodeState.STOPPED}

Labels = Tuple[Tuple[str, str], ...]


class Metrics:
    """Families in the order they were first declared; samples under them."""

    def __init__(self) -> None:
        self._families: Dict[str, Tuple[str, str, List[Tuple[Labels, float]]]] = {}

    def declare(self, name: str, kind: str, help_text: str) -> None:
        assert name.startswith("elastic_") and kind in ("gauge", "counter"), name
        self._families.setdefault(name, (kind, help_text, []))

    def add(self, name: str, value: Optional[float], **labels: str) -> None:
        """A sample of family ``name`` (declared first); ``None`` is left out."""
        if value is not None:
            self._families[name][2].append((tuple(sorted(labels.items())), float(value)))

    def text(self) -> str:
        lines = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{name}{{{label_text}}} {_number(value)}" if labels else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def render(agent, status: Optional[JobStatus], healthy: bool, checkpoint_time: Optional[float]) -> str:
    """The metrics of ``agent`` (an ``ElasticAgent``) and of its job (``status``; None when the
    store could not give it: only this agent's own figures are written, and ``elastic_status_up``
    says 0)."""
    reporter = agent.reporter
    me = agent.handler.node.node_id
    m = Metrics()

    m.declare("elastic_status_up", "gauge", "1 if the job's status could be read from the store, else 0.")
    m.add("elastic_status_up", 1 if status is not None else 0)
    m.declare("elastic_world_size", "gauge", "Workers in the job's current closed round (0 while a round forms).")
    m.declare("elastic_generation", "gauge", "The job's current round number.")
    m.declare("elastic_nodes", "gauge", "Nodes in the job's current closed round.")
    m.declare("elastic_nodes_desired", "gauge", "The number of nodes a scheduler asked for (absent: none asked).")
    m.declare("elastic_nodes_min", "gauge", "The job's minimum number of nodes.")
    m.declare("elastic_nodes_max", "gauge", "The job's maximum number of nodes.")
    m.declare("elastic_nodes_draining", "gauge", "Nodes of the job asked to drain that have not left yet.")
    m.declare("elastic_restarts_total", "counter", "Restarts of the job's budget spent on failures (job-wide).")
    m.declare("elastic_restarts_budget", "gauge", "The job's restart budget (--max-restarts).")
    m.declare("elastic_job_state", "gauge", "1 for the job's current state, 0 for the others.")
    node: Optional[NodeStatus] = None
    if status is not None:
        m.add("elastic_world_size", status.world_size)
        m.add("elastic_generation", status.generation)
        m.add("elastic_nodes", status.num_nodes)
        m.add("elastic_nodes_desired", status.desired_nodes)
        m.add("elastic_nodes_min", status.min_nodes)
        m.add("elastic_nodes_max", status.max_nodes)
        m.add("elastic_nodes_draining", sum(1 for n in status.nodes if n.draining and n.state is not NodeState.DRAINED))
        m.add("elastic_restarts_total", status.restarts)
        m.add("elastic_restarts_budget", status.max_restarts)
        for state in JobState:
            m.add("elastic_job_state", 1 if status.state is state else 0, state=state.value)
        node = next((n for n in status.nodes if n.node_id == me), None)

    m.declare("elastic_node_state", "gauge", "1 for this node's current state, 0 for the others.")
    for node_state in NodeState:
        m.add("elastic_node_state", 1 if reporter.state is node_state else 0, state=node_state.value)
    m.declare("elastic_node_rank", "gauge", "This node's rank in the current round (absent: not in one).")
    m.add("elastic_node_rank", node.node_rank if node is not None else None)
    m.declare("elastic_node_workers", "gauge", "Worker processes this agent runs (alive).")
    m.add("elastic_node_workers", 0 if reporter.state in _ENDED else sum(1 for pid in reporter.pids if _alive(pid)))
    m.declare("elastic_agent_healthy", "gauge", "1 if this agent's loop is alive (what /healthz says), else 0.")
    m.add("elastic_agent_healthy", 1 if healthy else 0)
    m.declare("elastic_agent_loop_age_seconds", "gauge", "Seconds since this agent's loop last passed.")
    m.add("elastic_agent_loop_age_seconds", max(0.0, time.monotonic() - reporter.tick))

    counts = dict(reporter.counts)
    m.declare("elastic_round_changes_total", "counter",
              "Round changes this agent took part in, by cause (worker_failed, lost_peer, a membership "
              "change's reason, drain, stop).")
    by_cause: Dict[str, int] = {}
    for (name, reason), n in counts.items():
        cause = reason if name == "membership_changed" else _ROUND_CAUSES.get(name)
        if cause:
            by_cause[cause] = by_cause.get(cause, 0) + n
    for cause in sorted(by_cause):
        m.add("elastic_round_changes_total", by_cause[cause], cause=cause)
    m.declare("elastic_events_total", "counter", "Events this agent emitted, by name.")
    by_name: Dict[str, int] = {}
    for (name, _), n in counts.items():
        by_name[name] = by_name.get(name, 0) + n
    for name in sorted(by_name):
        m.add("elastic_events_total", by_name[name], event=name)
    m.declare("elastic_drains_total", "counter",
              "Drains of this node, by reason (preemption, maintenance, scale_down).")
    for (name, reason), n in sorted(counts.items()):
        if name == "drain":
            m.add("elastic_drains_total", n, reason=reason or "unknown")

    m.declare("elastic_rendezvous_seconds_total", "counter", "Seconds this agent spent in rendezvous, summed.")
    m.add("elastic_rendezvous_seconds_total", reporter.rendezvous_seconds())
    m.declare("elastic_rendezvous_total", "counter", "Rendezvous this agent completed.")
    m.add("elastic_rendezvous_total", reporter.rendezvous_count)

    m.declare("elastic_last_step", "gauge", "The highest step this node's workers committed.")
    m.declare("elastic_last_checkpoint_step", "gauge", "The highest step this node's workers checkpointed.")
    m.declare("elastic_checkpoint_age_steps", "gauge", "Steps committed since this node's last checkpoint.")
    m.declare("elastic_checkpoint_age_seconds", "gauge", "Seconds since this node's last checkpoint.")
    if node is not None:
        m.add("elastic_last_step", node.last_step)
        m.add("elastic_last_checkpoint_step", node.last_checkpoint_step)
        if node.last_step is not None and node.last_checkpoint_step is not None:
            m.add("elastic_checkpoint_age_steps", max(0, node.last_step - node.last_checkpoint_step))
        if node.last_checkpoint_step is not None and checkpoint_time is not None:
            m.add("elastic_checkpoint_age_seconds", max(0.0, time.time() - checkpoint_time))
    return m.text()


class CheckpointClock:
    """When this node's last checkpoint was taken: the workers' ``checkpoint_time`` when they
    report one, else the time this agent first saw its step (exact to a scrape interval)."""

    def __init__(self) -> None:
        self._step: Optional[int] = None
        self._time: Optional[float] = None

    def update(self, records: Iterable[bytes]) -> Optional[float]:
        best: Optional[Tuple[int, Optional[float]]] = None
        for raw in records:
            try:
                data = json.loads(raw)
                step = int(data["checkpoint_step"])
            except (ValueError, KeyError, TypeError):
                continue
            at = data.get("checkpoint_time")
            at = float(at) if isinstance(at, (int, float)) else None
            if best is None or step > best[0] or (step == best[0] and at is not None and (best[1] or 0) < at):
                best = (step, at)
        if best is None:
            return None
        step, at = best
        if at is not None:
            self._step, self._time = step, at
        elif step != self._step:
            self._step, self._time = step, time.time()
        return self._time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: it exists
        return True
    return True


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
