"""World facts for the sampler: explicit, torchrun's variables, or Horovod's."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from elastic.world import World

__all__ = ["resolve_world"]


def resolve_world(world: Optional[World] = None, env: Optional[Mapping[str, str]] = None) -> World:
    """``world`` if given; else torchrun's ``RANK``/``WORLD_SIZE``; else ``horovodrun``'s."""
    if world is not None:
        return world
    env = os.environ if env is None else env
    if "RANK" not in env and "HOROVOD_RANK" in env:
        return World.from_env({
            "RANK": env["HOROVOD_RANK"], "WORLD_SIZE": env.get("HOROVOD_SIZE", "1"),
            "LOCAL_RANK": env.get("HOROVOD_LOCAL_RANK", "0"),
            "LOCAL_WORLD_SIZE": env.get("HOROVOD_LOCAL_SIZE", "1"),
            "GROUP_RANK": env.get("HOROVOD_CROSS_RANK", "0"),
        })
    return World.from_env(env)
