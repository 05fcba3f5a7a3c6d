"""Broadcasting a state tree without pickle, over torch.distributed or Horovod.

The tree's structure and plain leaves travel as JSON bytes in a uint8 tensor; tensors travel
as themselves. Nothing a peer sends is unpickled (which is why Horovod's own
``broadcast_optimizer_state``/``broadcast_object``, built on cloudpickle, are not used).

The few collectives needed sit behind :class:`Comm`; ``@elastic.run`` picks the one of its
backend with :func:`use` (torch.distributed unless told otherwise).
"""
from __future__ import annotations

import json
from typing import Any, List

from .lazy import require

__all__ = ["Comm", "TorchComm", "HorovodComm", "use", "active", "root_with_state", "broadcast_tree"]


class Comm:
    """The collectives a state sync needs: rank facts, a MIN of one integer, broadcasts."""

    def active(self) -> bool:
        """Whether a group of more than one worker is up."""
        raise NotImplementedError

    def rank(self) -> int:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def device(self):
        return require("torch").device("cpu")

    def min_int(self, value: int) -> int:
        raise NotImplementedError

    def broadcast_(self, tensors: List[Any], root: int) -> None:
        """Overwrite every tensor of every rank with ``root``'s, in place, in list order."""
        raise NotImplementedError


class TorchComm(Comm):
    """torch.distributed's default process group (gloo on CPU, NCCL on GPU)."""

    @staticmethod
    def _dist():
        return require("torch.distributed", "in-process recovery")

    def active(self) -> bool:
        try:
            dist = self._dist()
        except ImportError:
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def rank(self) -> int:
        return self._dist().get_rank()

    def size(self) -> int:
        return self._dist().get_world_size()

    def device(self):
        torch = require("torch")
        if self._dist().get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def min_int(self, value: int) -> int:
        torch, dist = require("torch"), self._dist()
        t = torch.tensor([value], dtype=torch.int64, device=self.device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast_(self, tensors: List[Any], root: int) -> None:
        dist = self._dist()
        for t in tensors:
            dist.broadcast(t, root)


class HorovodComm(Comm):
    """Horovod's PyTorch collectives (``hvd.init()`` done). Ops carry fixed names: a worker
    that joined later has a different handle count, so Horovod's generated names would differ."""

    @staticmethod
    def _hvd():
        return require("horovod.torch", "in-process recovery with Horovod")

    def active(self) -> bool:
        try:
            hvd = self._hvd()
        except ImportError:
            return False
        return bool(hvd.is_initialized()) and hvd.size() > 1

    def rank(self) -> int:
        return self._hvd().rank()

    def size(self) -> int:
        return self._hvd().size()

    def min_int(self, value: int) -> int:
        torch, hvd = require("torch"), self._hvd()
        everyone = hvd.allgather(torch.tensor([value], dtype=torch.int64), name="elastic.sync.min")
        return int(everyone.min().item())

    def broadcast_(self, tensors: List[Any], root: int) -> None:
        hvd = self._hvd()
        # All in flight at once, as hvd.broadcast_parameters does; names are unique per call.
        handles = [hvd.broadcast_async_(t, root, name=f"elastic.sync.{i}")
                   for i, t in enumerate(tensors) if t.numel()]
        for h in handles:
            hvd.synchronize(h)


_comm: Comm = TorchComm()


def use(comm: Comm) -> None:
    """Route :func:`active`, :func:`root_with_state` and :func:`broadcast_tree` through ``comm``."""
    global _comm
    _comm = comm


def active() -> bool:
    return _comm.active()


def root_with_state(has_state: bool) -> int:
    """The lowest rank that holds committed state (rank 0 when nobody does yet)."""
    world = _comm.size()
    root = _comm.min_int(_comm.rank() if has_state else world)
    return 0 if root == world else root


def _flatten(obj: Any, tensors: List[Any]) -> Any:
    torch = require("torch")
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"t": len(tensors) - 1, "dtype": str(obj.dtype).split(".")[1], "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {"d": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_flatten(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"cannot broadcast a {type(obj).__name__} in the training state; "
                    "use tensors, numbers, strings, lists and dicts")


def _unflatten(spec: Any, tensors: List[Any]) -> Any:
    if "t" in spec:
        return tensors[spec["t"]]
    if "d" in spec:
        return {k: _unflatten(v, tensors) for k, v in spec["d"]}
    if "l" in spec:
        return [_unflatten(v, tensors) for v in spec["l"]]
    if "u" in spec:
        return tuple(_unflatten(v, tensors) for v in spec["u"])
    return spec["v"]


def _tensor_specs(spec: Any, out: List[Any]) -> List[Any]:
    if "t" in spec:
        out.append(spec)
    elif "d" in spec:
        for _, v in spec["d"]:
            _tensor_specs(v, out)
    elif "l" in spec or "u" in spec:
        for v in spec.get("l", spec.get("u")):
            _tensor_specs(v, out)
    return out


def broadcast_tree(tree: Any, root: int) -> Any:
    """Every rank gets ``root``'s ``tree`` (nested dicts/lists/tuples of tensors and JSON leaves)."""
    torch = require("torch")
    comm = _comm
    device = comm.device()
    is_root = comm.rank() == root
    tensors: List[Any] = []
    payload = json.dumps(_flatten(tree, tensors)).encode() if is_root else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    comm.broadcast_([size], root)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_root
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    comm.broadcast_([buf], root)
    spec = json.loads(bytes(buf.cpu().numpy()))
    specs = sorted(_tensor_specs(spec, []), key=lambda s: s["t"])
    if is_root:
        moved = [t.detach().to(device).contiguous() for t in tensors]
    else:
        moved = [torch.empty(s["shape"], dtype=getattr(torch, s["dtype"]), device=device) for s in specs]
    comm.broadcast_(moved, root)
    return _unflatten(spec, [t.cpu() if device.type != "cpu" else t for t in moved])
