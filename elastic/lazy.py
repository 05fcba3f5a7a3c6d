"""Lazy imports of optional, heavy dependencies (torch, tensorflow, horovod, ...).

Importing any elastic-run package must cost milliseconds and work without the extras,
so heavy modules are imported at first use through :func:`require`, which turns a
missing module into a :class:`~elastic.errors.MissingExtraError` naming the extra.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

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
