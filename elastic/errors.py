"""The root of every error elastic-run raises.

Each package (``checkpoint``, ``dataload``, ``profiler``, ``launchers``) derives its own
errors from :class:`ElasticError`, so ``except ElasticError`` catches anything of ours.
:class:`UserError` marks mistakes a user can fix (bad flags, bad URLs, a wrong token):
command-line entry points print those as one line and exit non-zero, never a traceback.
"""
from __future__ import annotations

__all__ = ["ElasticError", "UserError", "MissingExtraError", "ConfigError", "one_line"]


class ElasticError(Exception):
    """Base class of every error raised by elastic-run."""


class UserError(ElasticError):
    """A mistake the user can fix; reported as one line, without a traceback."""


class ConfigError(UserError, ValueError):
    """An invalid setting: a flag, an argument, an environment variable."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, feature: str = "") -> None:
        self.module = module
        self.extra = extra
        what = f" for {feature}" if feature else ""
        super().__init__(
            f"'{module}' is needed{what} but is not installed: "
            f"pip install 'elastic-run[{extra}]'"
        )


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type's name when empty), at most ``limit`` chars."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
