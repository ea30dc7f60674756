"""A JSON encoding of state trees that cannot execute code when read (no pickle anywhere).

``encode(tree, on_tensor)`` turns the non-tensor parts of a state (dicts with any simple keys,
OrderedDicts with their ``_metadata``, lists, tuples, numbers, strings, bytes, numpy arrays and
scalars, torch dtypes and devices) into JSON values; every tensor leaf is replaced by whatever
``on_tensor(tensor, path)`` returns (a ``{"__t__": "tensor", ...}`` reference). ``decode`` accepts
exactly the tags ``encode`` writes; anything else is a :class:`CodecError`. Reading a checkpoint
therefore only ever builds these plain types: a planted file can give wrong values, never run code.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

TAG = "__t__"
_NUMPY_KINDS = "biufc"   # bool, int, uint, float, complex: np.frombuffer of these never runs code


class CodecError(ValueError):
    """A value that cannot be encoded, or a JSON tree that is not a valid encoding."""


def _plain_key(k) -> bool:
    return isinstance(k, str) and k != TAG


def encode(node: Any, on_tensor: Callable[[torch.Tensor, tuple], Any], path: tuple = ()) -> Any:
    if isinstance(node, torch.Tensor):
        return on_tensor(node, path)
    if node is None or type(node) in (bool, int, float, str):
        return node
    if isinstance(node, OrderedDict) or (isinstance(node, dict) and hasattr(node, "_metadata")):
        out = {TAG: "odict", "items": [[encode(k, on_tensor, path), encode(v, on_tensor, path + (k,))]
                                       for k, v in node.items()]}
        meta = getattr(node, "_metadata", None)
        if meta is not None:
            out["meta"] = encode(meta, on_tensor, path + ("_metadata",))
        return out
    if type(node) is dict:
        if all(_plain_key(k) for k in node):
            return {k: encode(v, on_tensor, path + (k,)) for k, v in node.items()}
        return {TAG: "dict", "items": [[encode(k, on_tensor, path), encode(v, on_tensor, path + (k,))]
                                       for k, v in node.items()]}
    if type(node) is list:
        return [encode(v, on_tensor, path + (i,)) for i, v in enumerate(node)]
    if type(node) is tuple or type(node) is torch.Size:
        return {TAG: "tuple" if type(node) is tuple else "size",
                "items": [encode(v, on_tensor, path + (i,)) for i, v in enumerate(node)]}
    if isinstance(node, (bytes, bytearray)):
        return {TAG: "bytes", "b64": base64.b64encode(bytes(node)).decode()}
    if isinstance(node, np.ndarray):
        if node.dtype.kind not in _NUMPY_KINDS:
            raise CodecError(f"state {'/'.join(map(str, path))}: numpy array of dtype {node.dtype} "
                             f"cannot be checkpointed (numeric dtypes only)")
        arr = np.ascontiguousarray(node)
        return {TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape),
                "b64": base64.b64encode(arr.tobytes()).decode()}
    if isinstance(node, np.generic) and np.dtype(type(node)).kind in _NUMPY_KINDS:
        return {TAG: "npscalar", "dtype": node.dtype.str, "b64": base64.b64encode(node.tobytes()).decode()}
    if isinstance(node, torch.dtype):
        return {TAG: "dtype", "name": str(node).removeprefix("torch.")}
    if isinstance(node, torch.device):
        return {TAG: "device", "name": str(node)}
    if isinstance(node, (set, frozenset)):
        return {TAG: "set", "items": [encode(v, on_tensor, path) for v in sorted(node, key=repr)]}
    raise CodecError(f"state {'/'.join(map(str, path)) or '<root>'}: a {type(node).__module__}."
                     f"{type(node).__qualname__} cannot be checkpointed; state_dict() values must be "
                     f"tensors, numbers, strings, bytes, numpy arrays, or dicts/lists/tuples of them")


TORCH_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
    if isinstance(getattr(torch, name, None), torch.dtype)}


def torch_dtype(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in TORCH_DTYPES:
        raise CodecError(f"unknown tensor dtype {name!r}")
    return TORCH_DTYPES[name]


def _numpy_dtype(s: Any) -> np.dtype:
    if not isinstance(s, str):
        raise CodecError(f"bad numpy dtype {s!r}")
    try:
        dt = np.dtype(s)
    except TypeError as e:
        raise CodecError(f"bad numpy dtype {s!r}") from e
    if dt.kind not in _NUMPY_KINDS:
        raise CodecError(f"numpy dtype {s!r} is not numeric")
    return dt


def _b64(s: Any) -> bytes:
    if not isinstance(s, str):
        raise CodecError("bad base64 field")
    try:
        return base64.b64decode(s.encode(), validate=True)
    except ValueError as e:
        raise CodecError(f"bad base64 field ({e})") from e


def _items(node: dict) -> list:
    items = node.get("items")
    if not isinstance(items, list):
        raise CodecError(f"tag {node.get(TAG)!r} without an item list")
    return items


def decode(node: Any, on_ref: Callable[[dict, tuple], Any], path: tuple = ()) -> Any:
    """Inverse of :func:`encode`; ``on_ref(node, path)`` resolves "tensor"/"dtensor" references."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode(v, on_ref, path + (i,)) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise CodecError(f"unexpected JSON value of type {type(node).__name__}")
    tag = node.get(TAG)
    if tag is None:
        return {k: decode(v, on_ref, path + (k,)) for k, v in node.items()}
    if tag in ("tensor", "dtensor"):
        return on_ref(node, path)
    if tag in ("dict", "odict"):
        out = OrderedDict() if tag == "odict" else {}
        for pair in _items(node):
            if not isinstance(pair, list) or len(pair) != 2:
                raise CodecError("dict item is not a [key, value] pair")
            k = decode(pair[0], on_ref, path)
            if isinstance(k, (list, dict)):
                raise CodecError(f"unhashable dict key {k!r}")
            out[k] = decode(pair[1], on_ref, path + (k,))
        if "meta" in node:
            out._metadata = decode(node["meta"], on_ref, path + ("_metadata",))
        return out
    if tag == "tuple":
        return tuple(decode(v, on_ref, path + (i,)) for i, v in enumerate(_items(node)))
    if tag == "size":
        return torch.Size(decode(v, on_ref, path) for v in _items(node))
    if tag == "set":
        return {decode(v, on_ref, path) for v in _items(node)}
    if tag == "bytes":
        return _b64(node.get("b64"))
    if tag == "ndarray":
        dt, shape = _numpy_dtype(node.get("dtype")), node.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CodecError(f"bad ndarray shape {shape!r}")
        data = _b64(node.get("b64"))
        if len(data) != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CodecError(f"ndarray of {len(data)} bytes does not match shape {shape} {dt}")
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()
    if tag == "npscalar":
        dt = _numpy_dtype(node.get("dtype"))
        data = _b64(node.get("b64"))
        if len(data) != dt.itemsize:
            raise CodecError("numpy scalar of the wrong size")
        return np.frombuffer(data, dtype=dt)[0]
    if tag == "dtype":
        return torch_dtype(node.get("name"))
    if tag == "device":
        name = node.get("name")
        if not isinstance(name, str):
            raise CodecError("bad device")
        return torch.device(name)
    raise CodecError(f"unknown tag {tag!r}")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"not valid JSON ({e})") from None
