"""launchers: the ``elastic-run`` command line, its Python API and one adapter per framework.

    from launchers import LaunchConfig, launch, start
    code = launch(LaunchConfig(entrypoint=("train.py",), nproc_per_node=2))   # blocking
    handle = start(config); handle.drain(deadline_s=60); handle.wait()       # from any thread
"""
from .config import LaunchConfig
from .errors import LauncherError

__all__ = ["LauncherError", "LaunchConfig", "launch", "start", "AgentHandle"]

_LAZY = {"launch": ".launch", "start": ".launch", "AgentHandle": ".handle"}


def __getattr__(name: str):
    """The agent's machinery loads on first use (PEP 562): ``import launchers`` stays cheap."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'launchers' has no attribute {name!r}")
