"""What a test needs from the install, checked in one place.

Locally a test whose module or tool is missing is skipped (a partial install is fine for a
developer). Under CI (``CI=true``, as ``.ci/run`` is invoked) the same test fails and names
what is missing: everything here is installed by ``make setup`` / the ``test`` extra, so a
missing piece is a broken install, not a reason to pass quietly.

    pytestmark = needs("pyetcd", tools=["etcd"], why="the etcd backend")   # a whole module
    @needs("horovod.torch")                                                 # one test
    torch = require("torch")                                                 # inside a test

Hardware (a GPU, two CPUs, a non-loopback address) is not part of an install: those skips
stay plain ``pytest.skip`` / the ``gpu`` marker.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
from typing import Iterable, Optional

import pytest

__all__ = ["CI", "needs", "require", "require_tool", "missing", "tool_path", "check"]

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
from paths import BIN  # noqa: E402


def missing(what: str, why: str = "") -> None:
    """Skip the running test (locally) or fail it (under CI), naming ``what`` is missing."""
    reason = f" ({why})" if why else ""
    if CI:
        pytest.fail(f"missing under CI: {what}{reason}; installed by make setup / the test extra",
                    pytrace=False)
    pytest.skip(f"{what} not installed{reason}; run make setup")


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a half-built extension raises more than ImportError
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def tool_path(name: str) -> Optional[str]:
    """The venv's console script first (horovodrun, moto_server), then PATH, then /usr/bin."""
    for candidate in (os.path.join(BIN, name), shutil.which(name), os.path.join("/usr/bin", name)):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def check(modules: Iterable[str] = (), tools: Iterable[str] = (), why: str = "") -> None:
    for module in modules:
        err = _import_error(module)
        if err is not None:
            missing(f"{module} (import failed: {err})", why)
    for tool in tools:
        if tool_path(tool) is None:
            missing(f"{tool} (not on PATH nor in {BIN})", why)


def require(module: str, why: str = ""):
    """``pytest.importorskip`` that fails under CI; returns the module."""
    check([module], why=why)
    return importlib.import_module(module)


def require_tool(name: str, why: str = "") -> str:
    """The tool's path; skips (locally) or fails (under CI) when it is not installed."""
    check(tools=[name], why=why)
    return tool_path(name)  # type: ignore[return-value]


def needs(*modules: str, tools: Iterable[str] = (), why: str = ""):
    """A marker: the test (or module, as ``pytestmark``) needs these modules and tools.
    Checked at set-up by tests/conftest.py (``pytest_runtest_setup``)."""
    return pytest.mark.needs(modules=tuple(modules), tools=tuple(tools), why=why)
