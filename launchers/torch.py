"""PyTorch under ``elastic-run``: the adapter (nothing beyond torchrun's variables) and
``init_process_group()``, the one line a worker needs.

torch is imported when a helper is called, never when this module is imported.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

from elastic.lazy import require
from elastic.agent import FrameworkAdapter
from elastic.world import World

__all__ = ["TorchAdapter", "init_process_group"]


class TorchAdapter(FrameworkAdapter):
    """torchrun's environment is all DDP needs: ``MASTER_ADDR/PORT``, ``RANK``, ``WORLD_SIZE``."""

    name = "torch"
    hosts_worker_store = True


def init_process_group(backend: Optional[str] = None, timeout_s: float = 600.0) -> World:
    """Join this round's process group; returns the :class:`~elastic.World` it formed.

    ``backend`` defaults to ``nccl`` when CUDA is usable (the local rank's device is made
    current first) and ``gloo`` otherwise. Rank, world size and the store address come from
    the environment ``elastic-run`` (or torchrun) sets; a plain ``python script.py`` forms a
    world of one on a free loopback port. Calling it again while a group exists is a no-op.
    """
    torch = require("torch", "launchers.torch.init_process_group")
    import torch.distributed as dist

    world = World.detect()
    if dist.is_initialized():
        return world
    if "MASTER_ADDR" not in os.environ:  # not launched: a world of one
        from elastic.net import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    kwargs = {}
    if cuda and backend == "nccl":
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return World.from_env()
