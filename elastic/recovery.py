"""``@elastic.run``: recover inside the running processes when the world changes.

    @elastic.run
    def train(state):
        model = DDP(state.model)              # wrap inside: the group is rebuilt on a change
        for state.step in range(state.step, steps):
            ...
            state.commit()                    # copy to roll back to; membership news raises here

    train(elastic.TorchState(model=net, optimizer=opt, step=0))

When a peer dies (a collective raises because its connection dropped) or the agent reports a
new round (scale-up or scale-down), every surviving worker tears its process group down,
rolls back to its last ``commit()``, waits for its place in the new round from its agent,
builds a new group with its new rank and world size, takes the state of the surviving lowest
rank by broadcast, runs the reset callbacks and calls ``train(state)`` again. Its PID does not
change. Outside ``elastic-run`` (one plain process) ``train`` simply runs.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Optional

from . import _collectives
from .lazy import require
from ._worker import DrainRequested, MembershipChangedError, WorkerLink, process_link
from .errors import one_line
from .faults import looks_like_bug, looks_like_lost_peer
from .state import State

__all__ = ["run", "is_recoverable"]

log = logging.getLogger("elastic.recovery")


def is_recoverable(exc: BaseException) -> bool:
    """Whether ``exc`` means the world changed under us (rather than a bug in the script).

    By type first: the agent's news (``MembershipChangedError``, Horovod's
    ``HostsUpdatedInterrupt``) and torch's ``DistNetworkError`` are faults. A collective's
    ``RuntimeError`` (torch's ``DistError`` family included) is a fault only when its message
    is a lost peer's, Horovod's ``HorovodInternalError`` unless its message is a bug's
    (:mod:`elastic.faults`); any other exception is a bug in ``train()``, raised at once.
    """
    if isinstance(exc, MembershipChangedError):
        return True
    hvd_exc = sys.modules.get("horovod.common.exceptions")  # only if the script uses Horovod
    if hvd_exc is not None:
        if isinstance(exc, hvd_exc.HostsUpdatedInterrupt):
            return True
        if isinstance(exc, hvd_exc.HorovodInternalError):
            # A lost peer shuts Horovod down ("Horovod has been shut down ..."; the reset
            # connection is only logged); a mismatch fails the one collective, and says so.
            return not looks_like_bug(f"{exc} {exc.__cause__ or ''}")
    dist = sys.modules.get("torch.distributed")
    network_error = getattr(dist, "DistNetworkError", None) if dist is not None else None
    if network_error is not None and isinstance(exc, network_error):
        return True
    return isinstance(exc, RuntimeError) and looks_like_lost_peer(str(exc))


def _is_membership_news(exc: BaseException) -> bool:
    """The agent told us of a new round (rather than a collective losing a peer)."""
    hvd_exc = sys.modules.get("horovod.common.exceptions")
    return isinstance(exc, MembershipChangedError) or (
        hvd_exc is not None and isinstance(exc, hvd_exc.HostsUpdatedInterrupt))


class _Backend:
    """How the workers' communicator is built and torn down for each round."""

    comm: _collectives.Comm

    def init(self, distributed: bool, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Join the current round (``os.environ`` holds its place); no-op if already in one.
        ``cancelled()`` turning true (a newer round opened) may end a wait for peers early."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Leave the round; must not hang or raise when peers died."""
        raise NotImplementedError

    def close(self) -> None:
        """At the end of ``train``: tear down what this session built."""


class _TorchGroup(_Backend):
    """torch.distributed's default process group (``backend``: gloo, nccl; default by device)."""

    def __init__(self, backend: Optional[str], timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.comm = _collectives.TorchComm()
        self.owns_group = False

    def init(self, distributed: bool, cancelled: Callable[[], bool] = lambda: False) -> None:
        if not distributed:
            return
        torch = require("torch", "@elastic.run")
        dist = require("torch.distributed", "@elastic.run")
        if dist.is_initialized():
            return
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            self._await_peers(cancelled)
        dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout_s))
        self.owns_group = True

    def _await_peers(self, cancelled: Callable[[], bool]) -> None:
        """Wait in one-second slices until every rank of the round has reached its init, on the
        agent's TCPStore. A round that breaks while it forms (a peer dies or drains before it
        connects) would otherwise hold init_process_group for the whole ``timeout_s``; here a
        newer round ends the wait at the next slice."""
        from torch.distributed import TCPStore

        env = os.environ
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        prefix = f"elastic/arrived/{env.get('ELASTIC_GENERATION', '0')}/"
        slice_s = timedelta(seconds=1)
        deadline = time.monotonic() + self.timeout_s
        store = None
        while not cancelled():
            try:
                if store is None:
                    client = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                      timeout=slice_s, wait_for_workers=False)
                    client.set(prefix + str(rank), "1")
                    store = client
                store.wait([prefix + str(r) for r in range(world)], slice_s)
                return
            except RuntimeError:  # DistNetworkError, DistStoreError: not there yet
                if time.monotonic() > deadline:
                    raise
        raise MembershipChangedError("the round changed while it formed")

    def teardown(self) -> None:
        try:
            dist = require("torch.distributed")
        except ImportError:
            return
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # a group whose peers died may not close cleanly
                log.debug("destroying the old process group: %s", exc)

    def close(self) -> None:
        if self.owns_group:
            self.teardown()


class _HorovodGroup(_Backend):
    """Horovod (PyTorch): ``hvd.shutdown()`` and ``hvd.init()`` again, as ``hvd.elastic.run``
    resets. Horovod's Gloo context reads ``HOROVOD_*`` (rank, size, the round's rendezvous
    server) at ``hvd.init()``, and the worker's new place updated them in ``os.environ``."""

    def __init__(self) -> None:
        self.comm = _collectives.HorovodComm()
        self.hvd = require("horovod.torch", "@elastic.run with Horovod")
        self.owns_init = not self.hvd.is_initialized()

    def init(self, distributed: bool, cancelled: Callable[[], bool] = lambda: False) -> None:
        if not self.hvd.is_initialized():
            self.hvd.init()

    def teardown(self) -> None:
        try:
            self.hvd.shutdown()
        except Exception as exc:
            log.debug("shutting Horovod down: %s", exc)

    def close(self) -> None:
        # A script that called hvd.init() itself may use hvd after train(): leave it up.
        if self.owns_init:
            self.teardown()


def _pick_backend(backend: Optional[str], timeout_s: float) -> _Backend:
    """``horovod`` when asked, or when the launcher gave Horovod's environment (``elastic-run
    --framework horovod``, ``horovodrun``); otherwise torch.distributed with ``backend``."""
    if backend is None and "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ:
        backend = "horovod"
    if backend == "horovod":
        return _HorovodGroup()
    return _TorchGroup(backend, timeout_s)


class _Session:
    def __init__(self, state: State, link: Optional[WorkerLink], timeout_s: float, backend: _Backend):
        self.state = state
        self.link = link
        self.timeout_s = timeout_s
        self.backend = backend
        self.recoveries = 0

    def _init(self) -> None:
        link = self.link
        self.backend.init(int(os.environ.get("WORLD_SIZE", "1")) > 1 or link is not None,
                          cancelled=lambda: link is not None and link.membership_changed)

    @property
    def _agent(self) -> WorkerLink:
        """The link to our agent; recovering is only ever tried under one."""
        if self.link is None:
            raise RuntimeError("no agent to recover with (not under elastic-run)")
        return self.link

    def _form(self) -> None:
        """Join the current round and sync the state; if the round breaks meanwhile (a peer
        dies during the re-formation, its store goes away), wait for the next one and retry."""
        while True:
            try:
                self._init()
                self.state.sync()
                return
            except Exception as exc:
                if self.link is None or not is_recoverable(exc):
                    raise
                log.warning("rank %s: the round broke while forming (%s); waiting for the next one",
                            os.environ.get("RANK"), one_line(exc))
            self.backend.teardown()
            self.state.restore()
            self._agent.wait_for_new_place(self.timeout_s)

    def run(self, func: Callable[..., Any], args, kwargs) -> Any:
        self.state._link = self.link
        if self.link is not None:
            process_link(self.link)  # drain_requested()/report_progress() share it
            self.link.register()
        _collectives.use(self.backend.comm)
        try:
            self._form()
            while True:
                try:
                    return func(self.state, *args, **kwargs)
                except DrainRequested:
                    lost_peer = None
                except Exception as exc:
                    if self.link is not None and self.link.drain_requested and is_recoverable(exc):
                        lost_peer = None  # a peer that drained first: this node drains too
                    elif self.link is None or not is_recoverable(exc):
                        raise
                    else:
                        reason = one_line(exc)
                        lost_peer = not _is_membership_news(exc)
                if lost_peer is None:
                    self._drain()
                # Out of the except block the failed call's frames (and the DDP module, whose
                # reducer holds the old group) are freed before the group is torn down.
                if lost_peer:
                    self._agent.report_lost_peer(reason)
                self._recover(reason)
        finally:
            if self.link is not None:
                self.link.close()
            self.backend.close()

    def _drain(self) -> None:
        """Leave at the last commit: roll back to it, run the drain callbacks (the save), end the
        worker with exit 0. The agent then leaves the job; the others re-form without us."""
        self.state.restore()
        log.warning("rank %s: draining at the last commit; running the drain callbacks", os.environ.get("RANK"))
        self.state.on_drain()
        raise SystemExit(0)

    def _recover(self, reason: str) -> None:
        t0 = time.monotonic()
        self.recoveries += 1
        log.warning("rank %s: %s; recovering in process (pid %d)", os.environ.get("RANK"), reason, os.getpid())
        self.backend.teardown()
        self.state.restore()
        self._agent.wait_for_new_place(self.timeout_s)
        self._form()
        self.state.on_reset()
        log.warning("rank %s of %s: re-formed in %.2fs (generation %s)", os.environ.get("RANK"),
                    os.environ.get("WORLD_SIZE"), time.monotonic() - t0, os.environ.get("ELASTIC_GENERATION"))


def run(func: Optional[Callable[..., Any]] = None, *, timeout_s: float = 300.0, backend: Optional[str] = None):
    """Decorate ``train(state, *args)`` so it survives world changes in process.

    ``timeout_s`` bounds every collective and the wait for a new round (so a peer that stops
    without its connection closing cannot hang the others forever). ``backend``: ``"gloo"``
    or ``"nccl"`` (torch.distributed), or ``"horovod"`` (Horovod with PyTorch: ``hvd.shutdown()``
    and ``hvd.init()`` per round). Default: Horovod when the launcher gave Horovod's
    environment (``elastic-run --framework horovod``), else nccl with CUDA, else gloo.
    """
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(state, State):
                raise TypeError("@elastic.run: the first argument must be an elastic.State")
            return _Session(state, WorkerLink.from_env(), timeout_s,
                            _pick_backend(backend, timeout_s)).run(f, args, kwargs)
        return wrapper

    return decorate(func) if func is not None else decorate
