"""State trees: tell tensors from plain data, encode the structure as JSON, rebuild it.

Nothing here pickles. A tree's structure (dicts with int or str keys, lists, tuples) and its
plain leaves are encoded as JSON; tensors become references to named entries of the tensor
table, whose bytes live in safetensors files. torch, TensorFlow and ml_dtypes are only touched
when a leaf of theirs is seen (``sys.modules`` tells) or when a tensor of theirs is rebuilt.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .api import PerRank, Shard
from .errors import CheckpointStateError

# safetensors dtype name -> (itemsize, NumPy dtype name; ml_dtypes for the exotic ones)
ST_DTYPES: Dict[str, Tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "U16": (2, "uint16"),
    "I16": (2, "int16"), "U32": (4, "uint32"), "I32": (4, "int32"), "U64": (8, "uint64"),
    "I64": (8, "int64"), "F16": (2, "float16"), "F32": (4, "float32"), "F64": (8, "float64"),
    "BF16": (2, "bfloat16"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
_NP_TO_ST = {v[1]: k for k, v in ST_DTYPES.items()}
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TORCH_TO_ST = {
    "torch.bool": "BOOL", "torch.uint8": "U8", "torch.int8": "I8", "torch.uint16": "U16",
    "torch.int16": "I16", "torch.uint32": "U32", "torch.int32": "I32", "torch.uint64": "U64",
    "torch.int64": "I64", "torch.float16": "F16", "torch.float32": "F32",
    "torch.float64": "F64", "torch.bfloat16": "BF16", "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
}
_ST_TO_TORCH = {v: k.split(".")[1] for k, v in _TORCH_TO_ST.items()}


def raw_dtype(st_dtype: str) -> np.dtype:
    """An unsigned integer dtype of the same item size: bytes are moved with it, never cast."""
    return np.dtype(_RAW[ST_DTYPES[st_dtype][0]])


def numpy_dtype(st_dtype: str) -> np.dtype:
    name = ST_DTYPES[st_dtype][1]
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with NumPy)

        return np.dtype(getattr(ml_dtypes, name))


def _torch():
    return sys.modules.get("torch")


def _tf():
    return sys.modules.get("tensorflow")


def is_torch(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def is_tf(x: Any) -> bool:
    """A TensorFlow tensor or variable, or a Keras 3 variable (which wraps one)."""
    tf = _tf()
    if tf is not None and isinstance(x, (tf.Tensor, tf.Variable)):
        return True
    keras = sys.modules.get("keras")
    variable = getattr(keras, "Variable", None) if keras is not None else None
    return variable is not None and isinstance(x, variable)


def is_tensor(x: Any) -> bool:
    return isinstance(x, np.ndarray) or is_torch(x) or is_tf(x)


@dataclass
class TensorLeaf:
    """A tensor of the state as it is staged: its framework, dtype, shape and a host view."""

    key: str
    kind: str  # "replicated" | "sharded" | "per_rank"
    fw: str  # "torch" | "numpy" | "tf"
    dtype: str  # safetensors name
    shape: Tuple[int, ...]  # local shape
    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    value: Any  # torch tensor (any device) or a NumPy array (TF is converted at save)

    @property
    def itemsize(self) -> int:
        return ST_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.itemsize if self.shape else self.nbytes

    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def copy_rows_into(self, dst: memoryview, r0: int, r1: int) -> None:
        """Copy rows ``r0:r1`` (all of it for a 0-d tensor) into ``dst`` (exactly sized)."""
        if len(dst) == 0:
            return
        shape = (r1 - r0,) + self.shape[1:] if self.shape else ()
        if self.fw == "torch":
            torch = _torch()
            src = self.value.detach()
            if self.shape:
                src = src[r0:r1]
            out = torch.frombuffer(dst, dtype=torch.uint8).view(src.dtype).view(shape)
            out.copy_(src)
        else:
            src = self.value if not self.shape else self.value[r0:r1]
            out = np.frombuffer(dst, dtype=raw_dtype(self.dtype)).reshape(shape)
            np.copyto(out, np.asarray(src).view(raw_dtype(self.dtype)))

    def host_rows(self, r0: int, r1: int) -> memoryview:
        """Rows ``r0:r1`` as contiguous host bytes (a view when possible; for direct writes)."""
        if self.fw == "torch":
            torch = _torch()
            src = self.value.detach()
            if self.shape:
                src = src[r0:r1]
            src = src.to("cpu").contiguous()
            raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[self.itemsize]
            arr = src.view(raw).numpy() if src.numel() else np.empty(0, np.uint8)
        else:
            src = self.value if not self.shape else self.value[r0:r1]
            arr = np.ascontiguousarray(src)
        return arr.reshape(-1).view(np.uint8).data if arr.size else memoryview(b"")


def _leaf_of(x: Any, key: str, kind: str, offsets=None, global_shape=None) -> TensorLeaf:
    if is_torch(x):
        fw = "torch"
        st = _TORCH_TO_ST.get(str(x.dtype))
        value = x
        dtype_name = str(x.dtype)
    elif isinstance(x, np.ndarray) or is_tf(x):
        fw = "numpy" if isinstance(x, np.ndarray) else "tf"
        value = np.asarray(x) if fw == "numpy" else np.asarray(x.numpy())
        dtype_name = value.dtype.name
        st = _NP_TO_ST.get(dtype_name)
    else:  # pragma: no cover - guarded by is_tensor
        raise CheckpointStateError(f"not a tensor: {type(x).__name__}")
    if st is None:
        raise CheckpointStateError(
            f"cannot checkpoint tensor {key!r} of dtype {dtype_name}: safetensors has no such "
            f"dtype (supported: {', '.join(sorted(ST_DTYPES))})")
    shape = tuple(int(s) for s in value.shape)
    return TensorLeaf(key=key, kind=kind, fw=fw, dtype=st, shape=shape,
                      global_shape=tuple(global_shape) if global_shape is not None else shape,
                      offsets=tuple(offsets) if offsets is not None else (0,) * len(shape),
                      value=value)


def _path_str(path: Tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path) or "_"


def _json_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def encode(state: Any, rank: int) -> Tuple[Any, List[TensorLeaf]]:
    """Encode ``state`` as a JSON-able tree and collect its tensors (in tree order)."""
    leaves: List[TensorLeaf] = []
    tree = _encode(state, (), False, rank, leaves, {})
    return tree, leaves


# The recursions below are module functions, not closures: a recursive closure refers to
# itself through its cell, a cycle that would keep every tensor it saw (and, on load, every
# file map) alive until the cyclic GC runs.
def _encode(x: Any, path: Tuple[Any, ...], per_rank: bool, rank: int, leaves: List[TensorLeaf],
            used: Dict[str, int]) -> Any:
    if isinstance(x, PerRank):
        return {"t": "per_rank", "v": _encode(x.value, path, True, rank, leaves, used)}
    if isinstance(x, Shard):
        if per_rank:
            raise CheckpointStateError(f"{_path_str(path)}: a Shard inside PerRank makes no sense")
        if not is_tensor(x.tensor):
            raise CheckpointStateError(f"{_path_str(path)}: Shard of a non-tensor")
        leaf = _leaf_of(x.tensor, _unique(used, _path_str(path)), "sharded", x.offsets, x.global_shape)
        leaves.append(leaf)
        return {"t": "tensor", "key": leaf.key, "fw": leaf.fw, "shard": True}
    if is_tensor(x):
        key = f"rank{rank}/{_path_str(path)}" if per_rank else _path_str(path)
        leaf = _leaf_of(x, _unique(used, key), "per_rank" if per_rank else "replicated")
        leaves.append(leaf)
        return {"t": "tensor", "key": leaf.key, "fw": leaf.fw}
    if isinstance(x, dict):
        items = []
        for k, v in x.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise CheckpointStateError(
                    f"{_path_str(path)}: dict key {k!r} of type {type(k).__name__}; only str "
                    f"and int keys can be stored")
            items.append([k, _encode(v, path + (k,), per_rank, rank, leaves, used)])
        return {"t": "dict", "items": items}
    if isinstance(x, (list, tuple)):
        t = "list" if isinstance(x, list) else "tuple"
        return {"t": t, "items": [_encode(v, path + (i,), per_rank, rank, leaves, used)
                                  for i, v in enumerate(x)]}
    if isinstance(x, np.generic):
        return {"t": "np", "dtype": x.dtype.str, "v": x.item()}
    if _json_scalar(x):
        return x if not isinstance(x, float) or math.isfinite(x) else {"t": "float", "v": repr(x)}
    if isinstance(x, (bytes, bytearray)):
        return {"t": "bytes", "hex": bytes(x).hex()}
    raise CheckpointStateError(
        f"cannot checkpoint {_path_str(path)!r}: a {type(x).__module__}.{type(x).__qualname__} "
        f"is neither a tensor, an array nor plain data (dict, list, tuple, str, int, float, "
        f"bool, None, bytes); convert it (e.g. to its state_dict()) first")


def _unique(used: Dict[str, int], key: str) -> str:
    """``key``, or ``key~N`` for its N-th repeat (two paths that print alike)."""
    n = used.get(key, 0)
    used[key] = n + 1
    return key if n == 0 else f"{key}~{n}"


def tensor_keys(tree: Any) -> List[Tuple[Tuple[Any, ...], dict]]:
    """``(path, tensor node)`` for every tensor reference in an encoded tree."""
    out: List[Tuple[Tuple[Any, ...], dict]] = []
    _tensor_refs(tree, (), out)
    return out


def _tensor_refs(node: Any, path: Tuple[Any, ...], out: List[Tuple[Tuple[Any, ...], dict]]) -> None:
    if not isinstance(node, dict):
        return
    t = node.get("t")
    if t == "tensor":
        out.append((path, node))
    elif t == "per_rank":
        _tensor_refs(node["v"], path, out)
    elif t == "dict":
        for k, v in node["items"]:
            _tensor_refs(v, path + (k,), out)
    elif t in ("list", "tuple"):
        for i, v in enumerate(node["items"]):
            _tensor_refs(v, path + (i,), out)


def decode(tree: Any, tensor: Callable[[Tuple[Any, ...], dict], Any]) -> Any:
    """Rebuild the state; ``tensor(path, node)`` returns the object for a tensor reference."""
    return _decode(tree, (), tensor)


def _decode(node: Any, path: Tuple[Any, ...], tensor: Callable[[Tuple[Any, ...], dict], Any]) -> Any:
    if not isinstance(node, dict):
        return node
    t = node["t"]
    if t == "tensor":
        return tensor(path, node)
    if t == "per_rank":
        return _decode(node["v"], path, tensor)
    if t == "dict":
        return {k: _decode(v, path + (k,), tensor) for k, v in node["items"]}
    if t == "list":
        return [_decode(v, path + (i,), tensor) for i, v in enumerate(node["items"])]
    if t == "tuple":
        return tuple(_decode(v, path + (i,), tensor) for i, v in enumerate(node["items"]))
    if t == "np":
        return np.dtype(node["dtype"]).type(node["v"])
    if t == "float":
        return float(node["v"])
    if t == "bytes":
        return bytes.fromhex(node["hex"])
    raise CheckpointStateError(f"unknown node type {t!r} in a checkpoint tree")


def flatten_target(target: Any) -> Dict[Tuple[Any, ...], Any]:
    """Leaves of a ``load(target=...)`` tree by path: tensors, arrays, variables, Shards."""
    out: Dict[Tuple[Any, ...], Any] = {}
    _target_leaves(target, (), out)
    return out


def _target_leaves(x: Any, path: Tuple[Any, ...], out: Dict[Tuple[Any, ...], Any]) -> None:
    if isinstance(x, PerRank):
        _target_leaves(x.value, path, out)
    elif isinstance(x, Shard) or is_tensor(x):
        out[path] = x
    elif isinstance(x, dict):
        for k, v in x.items():
            _target_leaves(v, path + (k,), out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _target_leaves(v, path + (i,), out)


def to_framework(raw: np.ndarray, st_dtype: str, fw: str) -> Any:
    """Turn a raw (unsigned-int view) array into the framework's tensor, without a copy if possible."""
    if fw == "torch":
        from elastic.lazy import require

        torch = require("torch", "loading torch tensors from a checkpoint")
        dtype = getattr(torch, _ST_TO_TORCH[st_dtype])
        if raw.ndim == 0:
            raw = raw.reshape(1)
            return torch.from_numpy(raw).view(dtype).reshape(())
        if raw.size == 0:
            return torch.empty(raw.shape, dtype=dtype)
        try:
            return torch.from_numpy(raw).view(dtype)
        except RuntimeError:  # unaligned view
            return torch.from_numpy(raw.copy()).view(dtype)
    arr = raw.view(numpy_dtype(st_dtype))
    if fw == "tf":
        from elastic.lazy import require

        tf = require("tensorflow", "loading TensorFlow tensors from a checkpoint")
        return tf.convert_to_tensor(arr)
    return arr


def fill_target(target: Any, raw: np.ndarray, st_dtype: str) -> Any:
    """Copy a loaded region into a target tensor/array/variable in place; return the target."""
    dst = target.tensor if isinstance(target, Shard) else target
    shape = tuple(int(s) for s in dst.shape)
    if shape != tuple(raw.shape):
        raise CheckpointStateError(f"target shape {shape} != stored region {tuple(raw.shape)}")
    if is_torch(dst):
        src = to_framework(raw, st_dtype, "torch")
        with _torch().no_grad():
            dst.copy_(src)
    elif isinstance(dst, np.ndarray):
        np.copyto(dst, raw.view(numpy_dtype(st_dtype)), casting="same_kind")
    elif is_tf(dst):
        value = raw.view(numpy_dtype(st_dtype))
        if hasattr(dst, "assign"):  # tf.Variable or Keras variable
            dst.assign(value)
        else:  # an immutable tf.Tensor cannot be filled: hand back a new one
            return to_framework(raw, st_dtype, "tf")
    return target
