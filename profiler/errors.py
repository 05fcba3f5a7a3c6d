"""Errors of the profiler package.

Rooted in :class:`elastic.errors.ElasticError`; user mistakes (a bad phase name, a bad flag, a
run directory without records) derive from :class:`elastic.errors.UserError` so the command line
prints them as one line.
"""
from elastic.errors import ConfigError, ElasticError, UserError

__all__ = ["ProfilerError", "ProfilerConfigError", "ProfilerUsageError", "NoRecordsError",
           "ExchangeError"]


class ProfilerError(ElasticError):
    """Base class of profiler errors."""


class ProfilerConfigError(ProfilerError, ConfigError):
    """An invalid profiler setting (a phase name, an interval, a threshold, a port)."""


class ProfilerUsageError(ProfilerError, UserError):
    """The profiler was driven in a way it cannot measure (a step inside a step, use after close)."""


class NoRecordsError(ProfilerError, UserError):
    """``elastic-prof report`` found no profiler records where it was pointed."""


class ExchangeError(ProfilerError):
    """A cross-rank exchange of step statistics failed (a collective or a store error)."""
