"""The job's key space on the store: every reader and writer builds its keys here.

Keys of a job live under ``/elastic/<run_id>/``:

``round``                        the current round (:class:`~elastic.rendezvous.state.RoundState`)
``join/<gen>/<node>``            a node joining round ``gen`` (leased: a dead joiner disappears)
``coordinator/<gen>``            the node that closes round ``gen`` (leased: taken over if it dies)
``alive/<node>``                 a node's liveness (leased, kept alive by a heartbeat thread)
``waiting/<node>``               a node that wants in while a full round runs (leased)
``done/<gen>/<node>``            a node whose workers all succeeded in round ``gen``
``restarts``                     the job-wide count of restarts after failures
``failures/<gen>/<rank>``        a worker failure (exit code or signal, traceback) for the summary
``status``                       ``{"failed": reason}`` once the job has failed for good
``inproc/<node>/<local_rank>``   a worker that recovers in place (its pid), so its agent keeps it
``assign/<node>/<local_rank>``   that worker's place in the next round (``{"generation", "env"}``)
``lostpeer/<node>/<local_rank>`` that worker's report that a collective lost a peer (``{"generation", "reason"}``)
``ctl/desired``                  a scheduler's desired number of nodes (``{"nodes"}``)
``ctl/range``                    a scheduler's node range for the running job (``{"min_nodes", "max_nodes"}``)
``ctl/drain/<node>``             a request that a node leave at a safe point (``{"reason", "deadline", "at"}``)
``ctl/stop``                     a request that the whole job end with a final save (``{"graceful", "at"}``)

What agents and workers report for schedulers lives apart, under ``/elastic-report/<run_id>/``,
so that its steady writes never wake the agents that watch the job's prefix:

``settings``                     the job's settings as launched (every agent writes the same)
``node/<node>``                  an agent's status (leased: it disappears with the agent)
``progress/<node>/<local_rank>`` a worker's last committed step and last checkpointed step
``events/<seq>``                 the bounded ring of the job's events (``seq``: time-ordered)
``straggler``                    the profiler's latest straggler verdict
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import ConfigError

__all__ = ["JobKeys"]


@dataclass(frozen=True)
class JobKeys:
    """The keys of job ``run_id``; a method per key family. Without its last part a method
    gives the family's prefix (ending in ``/``), for ``get_prefix`` and ``wait``."""

    run_id: str

    @classmethod
    def from_prefix(cls, prefix: str) -> "JobKeys":
        """The keys of the job whose prefix is ``prefix`` (``ELASTIC_RUN_PREFIX`` of a worker)."""
        head, _, rest = prefix.strip("/").partition("/")
        if head != "elastic" or not rest:
            raise ConfigError(f"not a job's key prefix: {prefix!r}")
        return cls(rest)

    @property
    def prefix(self) -> str:
        return f"/elastic/{self.run_id}/"

    def _key(self, *parts: Union[str, int, None]) -> str:
        if parts[-1] is None:  # the family's prefix
            return self.prefix + "/".join(str(p) for p in parts[:-1]) + "/"
        return self.prefix + "/".join(str(p) for p in parts)

    def relative(self, key: str) -> str:
        """``key`` without the job's prefix (``alive/n1``)."""
        return key[len(self.prefix):]

    # -- rounds ------------------------------------------------------------------------
    def round(self) -> str:
        return self.prefix + "round"

    def status(self) -> str:
        return self.prefix + "status"

    def restarts(self) -> str:
        return self.prefix + "restarts"

    def join(self, generation: int, node_id: Optional[str] = None) -> str:
        return self._key("join", generation, node_id)

    def coordinator(self, generation: int) -> str:
        return self._key("coordinator", generation)

    def alive(self, node_id: Optional[str] = None) -> str:
        return self._key("alive", node_id)

    def waiting(self, node_id: Optional[str] = None) -> str:
        return self._key("waiting", node_id)

    def done(self, generation: int, node_id: str) -> str:
        return self._key("done", generation, node_id)

    def failures(self, generation: Optional[int] = None, rank: Optional[int] = None) -> str:
        if generation is None:
            return self._key("failures", None)
        return self._key("failures", f"{generation:012d}", None if rank is None else str(rank))

    # -- workers that recover in place ---------------------------------------------------
    def inproc(self, node_id: str, local_rank: int) -> str:
        return self._key("inproc", node_id, local_rank)

    def assign(self, node_id: str, local_rank: int) -> str:
        return self._key("assign", node_id, local_rank)

    def lostpeer(self, node_id: str, local_rank: Optional[int] = None) -> str:
        return self._key("lostpeer", node_id, local_rank)

    # -- what schedulers ask for (the control plane) ----------------------------------------
    def control(self) -> str:
        return self.prefix + "ctl/"

    def desired(self) -> str:
        return self.prefix + "ctl/desired"

    def node_range(self) -> str:
        return self.prefix + "ctl/range"

    def drain(self, node_id: Optional[str] = None) -> str:
        return self._key("ctl", "drain", node_id)

    def stop(self) -> str:
        return self.prefix + "ctl/stop"

    # -- what agents and workers report -------------------------------------------------------
    @property
    def report_prefix(self) -> str:
        return f"/elastic-report/{self.run_id}/"

    def settings(self) -> str:
        return self.report_prefix + "settings"

    def node_status(self, node_id: Optional[str] = None) -> str:
        return self.report_prefix + ("node/" if node_id is None else f"node/{node_id}")

    def progress(self, node_id: Optional[str] = None, local_rank: Optional[int] = None) -> str:
        if node_id is None:
            return self.report_prefix + "progress/"
        return self.report_prefix + f"progress/{node_id}/" + ("" if local_rank is None else str(local_rank))

    def events(self, seq: Optional[str] = None) -> str:
        return self.report_prefix + "events/" + (seq or "")

    def straggler(self) -> str:
        return self.report_prefix + "straggler"
