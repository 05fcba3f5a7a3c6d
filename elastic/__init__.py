"""elastic: the core of elastic-run (rendezvous, agent, in-process recovery, control API).

Importing this package is cheap: it imports no framework. Heavy pieces load on first use.
"""
from .errors import ConfigError, ElasticError, MissingExtraError, UserError
from .lazy import lazy_exports
from .world import World

__version__ = "0.1.0"

__all__ = ["ElasticError", "UserError", "ConfigError", "MissingExtraError", "World", "__version__",
           "run", "State", "ObjectState", "TorchState", "MembershipChangedError", "DrainRequested",
           "drain_requested", "report_progress", "closed_round_fence", "JobController"]

# ``elastic.run``, the State classes and the control plane load on first use.
__getattr__ = lazy_exports(__name__, {
    "run": ".recovery", "State": ".state", "ObjectState": ".state", "TorchState": ".state",
    "MembershipChangedError": "._worker", "DrainRequested": "._worker", "drain_requested": "._worker",
    "report_progress": "._worker", "closed_round_fence": "._worker", "JobController": ".control",
})
