"""Lazy imports of optional, heavy dependencies (torch, tensorflow, horovod, ...).

Importing any elastic-run package must cost milliseconds and work without the extras,
so heavy modules are imported at first use through :func:`require`, which turns a
missing module into a :class:`~elastic.errors.MissingExtraError` naming the extra.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Callable, Mapping

from .errors import MissingExtraError

__all__ = ["require", "lazy_exports", "EXTRA_FOR_MODULE"]

# Top-level module -> the setup.py extra that installs it.
EXTRA_FOR_MODULE = {
    "torch": "torch",
    "tensorflow": "tf",
    "horovod": "horovod",
    "pyetcd": "etcd",
    "s3fs": "s3",
    "pynvml": "gpu",
    "pyarrow": "parquet",
    "prometheus_client": "profiler",
    "matplotlib": "profiler",
    "tensorboard": "profiler",
}


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        # Only a missing *top-level* package is a missing extra; anything else is a real bug.
        if getattr(exc, "name", None) not in (top, module):
            raise
        raise MissingExtraError(module, EXTRA_FOR_MODULE.get(top, top), feature) from exc


def lazy_exports(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A package's ``__getattr__`` (PEP 562) that imports ``table[name]`` (a module relative to
    ``package``) the first time ``name`` is asked for, so importing the package stays cheap."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
