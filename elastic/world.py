"""The :class:`World` value object: who this process is in the job right now."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError

__all__ = ["World"]

# Horovod's framework modules; an initialised one answers rank() and size() (and may have
# re-formed in place since its launcher set the environment).
_HOROVOD_MODULES = ("horovod.torch", "horovod.tensorflow", "horovod.tensorflow.keras", "horovod.keras")
# (rank, size, local rank, local size, node rank) variables of each launcher.
_HOROVOD_VARS = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "HOROVOD_CROSS_RANK")
_MPI_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
     "OMPI_COMM_WORLD_NODE_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", ""),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"),
)


@dataclass(frozen=True)
class World:
    """Rank facts of one worker process, as the agent sets them (torchrun's variables).

    ``generation`` is the rendezvous round that produced these facts; it only grows and
    fences writers from earlier rounds (a checkpoint from a stale generation cannot commit).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    generation: int = 0
    run_id: str = "local"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"invalid world: rank {self.rank} of {self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ConfigError(
                f"invalid world: local rank {self.local_rank} of {self.local_world_size}"
            )

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "World":
        """Read torchrun's variables (and ours); a plain process is a world of one."""
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            value = env.get(name)
            if value is None or value == "":
                return default
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {value!r}") from None

        world_size = num("WORLD_SIZE", 1)
        local_world_size = num("LOCAL_WORLD_SIZE", 1)
        return cls(
            rank=num("RANK", 0),
            world_size=world_size,
            local_rank=num("LOCAL_RANK", 0),
            local_world_size=local_world_size,
            node_rank=num("GROUP_RANK", 0),
            num_nodes=num("ELASTIC_NUM_NODES", max(1, world_size // max(1, local_world_size))),
            generation=num("ELASTIC_GENERATION", 0),
            run_id=env.get("TORCHELASTIC_RUN_ID", "local"),
        )

    @classmethod
    def detect(cls, env: Optional[Mapping[str, str]] = None) -> "World":
        """This process's place, from whichever launcher started it: the one source of rank
        facts for checkpoints, the data loader, the profiler and the framework helpers.

        In order: torchrun's variables (``elastic-run``, torchrun, Kubeflow); an initialised
        Horovod module, else Horovod's launcher variables (``horovodrun``); ``TF_CONFIG``'s
        worker task; Open MPI (``mpirun``); PMI (MPICH, Intel MPI); a Slurm step (``srun``).
        A plain process is a world of one. ``generation`` and ``run_id`` are always ours.
        """
        env = os.environ if env is None else env
        ours = {k: env[k] for k in ("ELASTIC_GENERATION", "TORCHELASTIC_RUN_ID", "ELASTIC_NUM_NODES") if k in env}
        if env.get("RANK") not in (None, "") or env.get("WORLD_SIZE") not in (None, ""):
            return cls.from_env(env)
        for name in _HOROVOD_MODULES:
            hvd = sys.modules.get(name)
            try:
                if hvd is not None and hvd.is_initialized():
                    return cls.from_env({**ours, "RANK": str(hvd.rank()), "WORLD_SIZE": str(hvd.size()),
                                         "LOCAL_RANK": str(hvd.local_rank()),
                                         "LOCAL_WORLD_SIZE": str(hvd.local_size()),
                                         "GROUP_RANK": str(hvd.cross_rank())})
            except (AttributeError, ValueError, RuntimeError):
                continue
        if env.get("HOROVOD_RANK") and env.get("HOROVOD_SIZE"):
            return cls._from_launcher(env, ours, *_HOROVOD_VARS)
        tf_config = env.get("TF_CONFIG")
        if tf_config:
            try:
                cfg = json.loads(tf_config)
                workers = cfg["cluster"]["worker"]
                task = cfg["task"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError("TF_CONFIG is not valid JSON with cluster.worker and task") from None
            if task.get("type") in ("worker", "chief"):
                return cls.from_env({**ours, "RANK": str(int(task.get("index", 0))),
                                     "WORLD_SIZE": str(len(workers))})
        for names in _MPI_VARS:  # a Slurm batch script (no srun step) is one process
            if env.get(names[0]) and env.get(names[1]) and (names[0] != "SLURM_PROCID" or "SLURM_STEP_ID" in env):
                return cls._from_launcher(env, ours, *names)
        return cls.from_env(ours)

    @classmethod
    def _from_launcher(cls, env, ours, rank, size, local_rank, local_size, node_rank) -> "World":
        local_size_value = env.get(local_size, "1").split("(")[0].split(",")[0]  # Slurm: "2(x3)"
        return cls.from_env({**ours, "RANK": env[rank], "WORLD_SIZE": env[size],
                             "LOCAL_RANK": env.get(local_rank, "0") or "0",
                             "LOCAL_WORLD_SIZE": local_size_value or "1",
                             "GROUP_RANK": env.get(node_rank, "0") if node_rank else "0"})
