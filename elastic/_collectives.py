"""Broadcasting a state tree through torch.distributed without pickle.

The tree's structure and plain leaves travel as JSON bytes in a uint8 tensor; tensors travel
as themselves. Nothing a peer sends is unpickled.
"""
from __future__ import annotations

import json
from typing import Any, List

from ._lazy import require

__all__ = ["active", "root_with_state", "broadcast_tree"]


def _dist():
    return require("torch.distributed", "in-process recovery")


def active() -> bool:
    try:
        dist = _dist()
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device():
    torch = require("torch")
    dist = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def root_with_state(has_state: bool) -> int:
    """The lowest rank that holds committed state (rank 0 when nobody does yet)."""
    torch = require("torch")
    dist = _dist()
    world = dist.get_world_size()
    mine = torch.tensor([dist.get_rank() if has_state else world], dtype=torch.int64, device=_device())
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    root = int(mine.item())
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
    dist = _dist()
    device = _device()
    is_root = dist.get_rank() == root
    tensors: List[Any] = []
    payload = json.dumps(_flatten(tree, tensors)).encode() if is_root else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, root)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_root
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, root)
    spec = json.loads(bytes(buf.cpu().numpy()))
    specs = sorted(_tensor_specs(spec, []), key=lambda s: s["t"])
    if is_root:
        moved = [t.detach().to(device).contiguous() for t in tensors]
    else:
        moved = [torch.empty(s["shape"], dtype=getattr(torch, s["dtype"]), device=device) for s in specs]
    for t in moved:
        dist.broadcast(t, root)
    return _unflatten(spec, [t.cpu() if device.type != "cpu" else t for t in moved])
