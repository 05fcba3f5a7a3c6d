"""Unmodified ``@hvd.elastic.run`` scripts under ``elastic-run``: Horovod's own elastic loop,
driven by the agent's rounds instead of ``horovodrun``'s driver.

Under ``horovodrun --elastic`` a worker whose peer dies gets ``HorovodInternalError``, rolls
back to its last ``state.commit()``, calls ``hvd.shutdown()`` / ``hvd.init()`` and learns its
new rank from the driver; new workers take the state by ``state.sync()`` (a broadcast from
rank 0). Here the agent plays the driver: the worker registers with it (so a change re-forms
it in place instead of restarting it), waits for its place in the next round, and lets
Horovod's own reset (``shutdown`` + ``init``) read it from ``HOROVOD_*``; the round's
membership news becomes Horovod's ``HostsUpdatedInterrupt`` at the next ``commit()``, as the
driver's notification would. Everything else (``state.sync``, ``restore``, reset callbacks)
is Horovod's own code.

The worker runner calls :func:`install` before the script runs, for Horovod workers only; it
swaps ``run_fn`` in Horovod's elastic modules, those already imported by a warm standby and
those the script imports later. Outside ``elastic-run`` nothing changes.
"""
from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
import time
from typing import Any, Callable

from .errors import one_line

__all__ = ["install"]

log = logging.getLogger("elastic.recovery")
_COMMON = "horovod.common.elastic"
_WAIT_FOR_ROUND_S = float(os.environ.get("HOROVOD_ELASTIC_TIMEOUT", "600"))
_MARK = "_elastic_bridge"  # set on our run_fn: patching twice keeps the one bridge


def _bridged(original: Callable) -> Callable:
    """``run_fn(func, reset)`` whose wrapper follows the agent's rounds."""
    if getattr(original, _MARK, False):
        return original

    def run_fn(func: Callable, reset: Callable) -> Callable:
        horovod_wrapper = original(func, reset)

        @functools.wraps(func)
        def wrapper(state, *args: Any, **kwargs: Any) -> Any:
            from ._worker import WorkerLink

            link = WorkerLink.from_env()
            if link is None:  # not under elastic-run's agent: Horovod's own loop
                return horovod_wrapper(state, *args, **kwargs)
            return _run(link, state, reset, func, args, kwargs)
        return wrapper

    setattr(run_fn, _MARK, True)
    return run_fn


def _run(link, state, reset: Callable, func: Callable, args, kwargs) -> Any:
    """Horovod's ``run_fn`` loop, with the wait for the next round before each reset."""
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt
    from horovod.runner.elastic.worker import HostUpdateResult

    from .recovery import is_recoverable

    link.on_change = lambda: state.on_hosts_updated(time.time(), HostUpdateResult.mixed)
    link.register()
    skip_sync = False
    try:
        while True:
            try:
                if not skip_sync:
                    _build_optimizer(state)
                    state.sync()
                return func(state, *args, **kwargs)
            except HorovodInternalError as exc:
                if not is_recoverable(exc):
                    raise
                reason = one_line(exc)
                link.report_lost_peer(reason)
                state.restore()
                skip_sync = False
            except HostsUpdatedInterrupt as exc:
                reason = "the job's membership changed"
                skip_sync = exc.skip_sync
            t0 = time.monotonic()
            log.warning("rank %s: %s; recovering in process (pid %d)", os.environ.get("HOROVOD_RANK"),
                        reason, os.getpid())
            link.wait_for_new_place(_WAIT_FOR_ROUND_S)
            reset()  # hvd.shutdown(); hvd.init(): the new round's rank, size and rendezvous
            state.on_reset()
            log.warning("rank %s of %s: re-formed in %.2fs (generation %s)", os.environ.get("HOROVOD_RANK"),
                        os.environ.get("HOROVOD_SIZE"), time.monotonic() - t0, os.environ.get("ELASTIC_GENERATION"))
    finally:
        link.close()


def _build_optimizer(state) -> None:
    """Create a Keras optimizer's slot variables before ``state.sync()`` broadcasts them.

    Keras makes them at the first step, so a fresh replacement would broadcast fewer
    variables than the survivors and every rank would hang in ``broadcast_variables``.
    """
    optimizer, model = getattr(state, "optimizer", None), getattr(state, "model", None)
    build = getattr(optimizer, "build", None)
    if callable(build) and model is not None and hasattr(model, "trainable_variables"):
        build(model.trainable_variables)


def _patch(module) -> None:
    fn = getattr(module, "run_fn", None)
    if callable(fn) and not getattr(fn, _MARK, False):
        module.run_fn = _bridged(fn)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches Horovod's elastic modules as they are imported (``horovod.*elastic*``)."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("horovod.") or "elastic" not in fullname.rsplit(".", 1)[-1]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Route ``@hvd.elastic.run`` through the agent (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, module in list(sys.modules.items()):
        if name.startswith("horovod.") and module is not None and "elastic" in name.rsplit(".", 1)[-1]:
            _patch(module)
