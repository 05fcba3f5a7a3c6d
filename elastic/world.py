"""The :class:`World` value object: who this process is in the job right now."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError

__all__ = ["World"]


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
