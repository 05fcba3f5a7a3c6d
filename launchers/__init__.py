"""launchers: the ``elastic-run`` command line and one adapter per framework."""
from .errors import LauncherError

__all__ = ["LauncherError"]
