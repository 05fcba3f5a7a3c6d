"""Training state that survives a change of world inside the running processes.

Names follow Horovod's ``hvd.elastic`` where it has one: :meth:`State.commit` keeps an
in-memory copy and checks for membership news (a flag, no collective), :meth:`State.restore`
rolls back to it, :meth:`State.sync` makes every worker equal to the surviving lowest rank by
broadcast (new workers get weights, optimizer state, step and data position from peers, not
from storage), and reset callbacks run after each re-formation (e.g. to scale the learning
rate with the world size). A data loader or sampler kept in the state (``dataload``'s
``ElasticDataLoader``/``ElasticSampler``) carries its global position through the change and
is told the new world (``set_world()``) before the callbacks, so no sample is seen twice or
skipped.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

from ._worker import DrainRequested, MembershipChangedError, WorkerLink

__all__ = ["State", "ObjectState", "TorchState"]


class State:
    """Base class: subclasses implement ``save``, ``restore`` and ``sync``."""

    def __init__(self) -> None:
        self._reset_callbacks: List[Callable[[], None]] = []
        self._drain_callbacks: List[Callable[[], None]] = []
        self._link: Optional[WorkerLink] = None  # set by @elastic.run under elastic-run
        self.commits = 0

    def register_reset_callbacks(self, callbacks: List[Callable[[], None]]) -> None:
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        for callback in self._reset_callbacks:
            callback()

    def register_drain_callbacks(self, callbacks: List[Callable[[], None]]) -> None:
        """Run when this worker's node drains or the job stops, with the state at its last
        ``commit()``: save a checkpoint here (e.g. ``lambda: ck.save(state.step, ..., blocking=True)``),
        so the step the node completed last is the one that survives it."""
        self._drain_callbacks.extend(callbacks)

    def on_drain(self) -> None:
        for callback in self._drain_callbacks:
            callback()

    def commit(self) -> None:
        """Keep a copy of the state to roll back to, then check for membership news."""
        self.save()
        self.commits += 1
        if self._link is not None:
            step = getattr(self, "step", None)
            self._link.report_progress(step=step if isinstance(step, int) else None)
        self.check_membership()

    def check_membership(self) -> None:
        """Raise :class:`DrainRequested` if this node drains (or the job stops), else
        :class:`MembershipChangedError` if the agent reported a new round."""
        if self._link is not None and self._link.drain_requested:
            raise DrainRequested("this node drains: saving and leaving")
        if self._link is not None and self._link.membership_changed:
            raise MembershipChangedError("the job's membership changed; re-forming")

    # Horovod's name for the same check.
    check_host_updates = check_membership

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class ObjectState(State):
    """Plain attributes (step, epoch, a sampler's ``state_dict``...), copied on commit."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._names = list(kwargs)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._saved: Dict[str, Any] = {}
        self.save()

    def _objects(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._names}

    def on_reset(self) -> None:
        for value in self._objects().values():
            if callable(getattr(value, "set_world", None)):
                value.set_world()  # re-reads RANK/WORLD_SIZE of the new round
        super().on_reset()

    def _snapshot_objects(self) -> Dict[str, Any]:
        out = {}
        for name, value in self._objects().items():
            out[name] = value.state_dict() if _stateful(value) else copy.deepcopy(value)
        return out

    def _load_objects(self, snapshot: Dict[str, Any]) -> None:
        for name, value in snapshot.items():
            current = getattr(self, name)
            if _stateful(current):
                current.load_state_dict(copy.deepcopy(value))
            else:
                setattr(self, name, copy.deepcopy(value))

    # What a commit copies and a sync broadcasts; subclasses add what they hold.
    def _snapshot(self) -> Dict[str, Any]:
        return self._snapshot_objects()

    def _load(self, snap: Dict[str, Any]) -> None:
        self._load_objects(snap)

    def save(self) -> None:
        self._saved = self._snapshot()

    def restore(self) -> None:
        self._load(self._saved)

    def sync(self) -> None:
        from . import _collectives

        if not _collectives.active():
            return
        root = _collectives.root_with_state(self.commits > 0)
        self._load(_collectives.broadcast_tree(self._snapshot(), root))
        self.save()


class TorchState(ObjectState):
    """``TorchState(model=..., optimizer=..., **other_objects)``: a PyTorch model and optimizer
    (unwrapped, not the DDP module) plus any other objects (plain values, or objects with
    ``state_dict``/``load_state_dict`` such as an LR scheduler or the data sampler)."""

    def __init__(self, model=None, optimizer=None, **kwargs: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        super().__init__(**kwargs)

    def _snapshot(self) -> Dict[str, Any]:
        snap: Dict[str, Any] = {"objects": self._snapshot_objects()}
        if self.model is not None:
            snap["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.optimizer is not None:
            snap["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return snap

    def _load(self, snap: Dict[str, Any]) -> None:
        if self.model is not None:
            self.model.load_state_dict(snap["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
        self._load_objects(snap["objects"])


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
