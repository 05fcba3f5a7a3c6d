"""The argument checks every store client applies before a call leaves the process.

One place, so each backend refuses a bad call with the same :class:`StoreArgumentError`
(and the same words) instead of whatever its transport would make of it.
"""
from __future__ import annotations

import math
from typing import Any

from .api import StoreArgumentError

__all__ = []


def key(value: Any) -> str:
    if not isinstance(value, str):
        raise StoreArgumentError(f"keys are str, not {type(value).__name__}")
    return value


def value(data: Any) -> bytes:
    """Bytes of a bytes-like ``data``; a str or an int (``bytes(5)`` is five zeros) is refused."""
    if isinstance(data, bytes):
        return data
    if not isinstance(data, (str, int)):
        try:
            return bytes(data)
        except (TypeError, ValueError):
            pass
    raise StoreArgumentError(f"values are bytes, not {type(data).__name__}")


def count(value: Any) -> int:
    """A revision or a lease id: a non-negative int (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreArgumentError(f"expected a non-negative integer, not {value!r}")
    return value


def ttl(value: Any) -> float:
    seconds = _number(value, "lease TTL")
    if not 0 < seconds < math.inf:
        raise StoreArgumentError("lease TTL must be positive and finite")
    return seconds


def timeout(value: Any) -> float:
    """A wait's timeout in seconds; negative means do not block."""
    return max(0.0, _number(value, "timeout"))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise StoreArgumentError(f"{what} must be a number of seconds, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StoreArgumentError(f"{what} must be a number of seconds, not {value!r}") from None
