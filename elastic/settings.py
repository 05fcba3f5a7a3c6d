"""Parsing of settings that arrive as text (flags, ``PET_*`` variables, ``--rdzv-conf`` values).

One reading of "true", of a number of seconds and one default port for every package, so that
``elastic-run``, the stores and the launchers agree on what a setting means.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["DEFAULT_RDZV_PORT", "TRUE_WORDS", "FALSE_WORDS", "parse_bool", "is_true", "parse_seconds"]

#: torchrun's c10d default port; the embedded rendezvous server listens here unless told.
DEFAULT_RDZV_PORT = 29400

TRUE_WORDS = frozenset(("1", "true", "yes", "on"))
FALSE_WORDS = frozenset(("0", "false", "no", "off", ""))


def parse_bool(value: Any, name: str) -> bool:
    """``value`` as a bool; anything but a known true/false word is a :class:`ConfigError`."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def is_true(value: Any) -> bool:
    """Lenient form for switches read from the environment: only a true word is true."""
    return value is True or (value is not None and str(value).strip().lower() in TRUE_WORDS)


def parse_seconds(value: Any, name: str) -> float:
    """A positive, finite number of seconds, or a :class:`ConfigError` naming ``name``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds
