"""elastic: the core of elastic-run (rendezvous, agent, in-process recovery, control API).

Importing this package is cheap: it imports no framework. Heavy pieces load on first use.
"""
from .errors import ConfigError, ElasticError, MissingExtraError, UserError
from .world import World

__version__ = "0.1.0"

__all__ = ["ElasticError", "UserError", "ConfigError", "MissingExtraError", "World", "__version__"]
