"""Records and errors of the per-node agent."""
from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError, ElasticError
from ..rendezvous.state import RoundChange

__all__ = ["WorkerSpec", "WorkerExit", "AgentError", "FrameworkAdapter", "RunOutcome", "RunResult",
           "EXIT_STORE_LOST"]

#: The exit code of an agent that gave the job's store up (``EX_UNAVAILABLE``): it did not answer
#: for ``store_timeout`` (a store that died with its host, or a partition longer than that); this
#: node's workers were stopped. Distinct from a failure (1): the job may be resumed from its
#: checkpoint once a store is back.
EXIT_STORE_LOST = 69


class AgentError(ElasticError):
    """Base class of agent errors."""


class FrameworkAdapter:
    """What a framework needs from the agent beyond torchrun's environment.

    The agent calls :meth:`on_round` once a round has closed, before it starts (or
    re-forms) its workers, and merges :meth:`worker_env` into each worker's environment.
    Every node offers ``aux_port`` .. ``aux_port + nproc - 1`` (free when it joined): node
    rank 0's first one suits a per-round service (Horovod's Gloo rendezvous server), one per
    local worker suits ``TF_CONFIG``. :meth:`close` runs when the agent exits. The base is no
    framework: it adds nothing to torchrun's variables (``launchers.torch.TorchAdapter`` is the
    PyTorch adapter, registered by name like the others).
    """

    name = "none"
    #: node rank 0's agent hosts the workers' TCPStore (torch.distributed's env:// store)
    hosts_worker_store = False

    def on_round(self, rnd, fresh_local_ranks: Optional[Sequence[int]] = None) -> None:
        """``fresh_local_ranks``: when the other local workers recover in place, the ones
        that start fresh this round (None: all of them start)."""

    def worker_env(self, rnd, local_rank: int, rank: int) -> Mapping[str, str]:
        return {}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of this node runs, and how its output is kept."""

    entrypoint: Tuple[str, ...]  # script (or module, or command) and its arguments
    nproc_per_node: int = 1
    module: bool = False  # -m: entrypoint[0] is a module
    no_python: bool = False  # --no-python: entrypoint[0] is an executable
    python: str = ""  # interpreter; "" means the agent's own
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every worker
    log_dir: Optional[str] = None
    tee: bool = True  # rank-prefixed worker output on the agent's console
    preload: Tuple[str, ...] = ()  # modules a warm standby imports ahead of time
    standby: bool = True  # keep warm standbys (not possible with no_python)
    stop_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this
    role: str = "default"
    cwd: Optional[str] = None
    console_local_ranks: Optional[Tuple[int, ...]] = None  # tee only these local ranks (None: all)
    cpu_affinity: Optional[Tuple[Tuple[int, ...], ...]] = None  # per local rank: CPUs to bind it to

    def __post_init__(self) -> None:
        if not self.entrypoint:
            raise ConfigError("no training script given")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")


@dataclass(frozen=True)
class WorkerExit:
    """How one worker ended."""

    rank: int
    local_rank: int
    pid: int
    returncode: int
    at_s: float  # time.monotonic() when the agent saw it
    error: str = ""  # exception and traceback from the error file, if the worker wrote one
    stderr_tail: str = ""

    @property
    def signal(self) -> Optional[int]:
        return -self.returncode if self.returncode < 0 else None

    def describe(self) -> str:
        if self.signal:
            try:
                how = f"was killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                how = f"was killed by signal {self.signal}"
        else:
            how = f"exited with code {self.returncode}"
        return f"rank {self.rank} (local rank {self.local_rank}, pid {self.pid}) {how}"


class RunOutcome(str, Enum):
    """How a round ended for this node's workers, as the agent's monitor saw it."""

    SUCCEEDED = "succeeded"  # every local worker exited 0
    FAILED = "failed"  # a local worker failed (a restart is charged unless a peer was lost)
    ROUND_CHANGED = "round_changed"  # the membership changed (a node joined, left or died)
    LOST_PEER = "lost_peer"  # an in-place worker reported that a collective lost a peer
    LEASE_LOST = "lease_lost"  # this node's lease may have ended: its workers were fenced (killed)


@dataclass(frozen=True)
class RunResult:
    """What :meth:`ElasticAgent._monitor` returns (torch's ``RunResult``, with the cause)."""

    outcome: RunOutcome
    failure: Optional[WorkerExit] = None  # FAILED
    change: Optional[RoundChange] = None  # ROUND_CHANGED
    lost_peer: str = ""  # LOST_PEER: the worker's report
    lease_lost: str = ""  # LEASE_LOST: why the lease can no longer be trusted

    def describe(self) -> str:
        if self.failure is not None:
            return self.failure.describe()
        return str(self.change) if self.change is not None else self.lost_peer or self.lease_lost
