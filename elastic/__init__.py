"""elastic: the core of elastic-run (rendezvous, agent, in-process recovery, control API).

Importing this package is cheap: it imports no framework. Heavy pieces load on first use.
"""
from .errors import ConfigError, ElasticError, MissingExtraError, UserError
from .world import World

__version__ = "0.1.0"

__all__ = ["ElasticError", "UserError", "ConfigError", "MissingExtraError", "World", "__version__",
           "run", "State", "ObjectState", "TorchState", "MembershipChangedError", "DrainRequested",
           "drain_requested", "report_progress", "closed_round_fence", "JobController"]

_LAZY = {"run": ".recovery", "State": ".state", "ObjectState": ".state", "TorchState": ".state",
         "MembershipChangedError": "._worker", "DrainRequested": "._worker", "drain_requested": "._worker", "report_progress": "._worker", "closed_round_fence": "._worker",
         "JobController": ".control"}


def __getattr__(name: str):
    """``elastic.run``, the State classes and the control plane load on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'elastic' has no attribute {name!r}")
