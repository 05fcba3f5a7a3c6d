"""launchers: the ``elastic-run`` command line, its Python API and one adapter per framework.

    from launchers import LaunchConfig, launch, start
    code = launch(LaunchConfig(entrypoint=("train.py",), nproc_per_node=2))   # blocking
    handle = start(config); handle.drain(deadline_s=60); handle.wait()       # from any thread
"""
from elastic.lazy import lazy_exports

from .config import LaunchConfig
from .errors import LauncherError

__all__ = ["LauncherError", "LaunchConfig", "launch", "start", "AgentHandle"]

# The agent's machinery loads on first use: ``import launchers`` stays cheap.
__getattr__ = lazy_exports(__name__, {"launch": ".launch", "start": ".launch", "AgentHandle": ".handle"})
