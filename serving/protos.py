"""numpy ↔ `tensorflow.TensorProto` for the dtypes of the serving signatures.

Used by both ends of the gRPC link (serving.server, serving.client). Encoding writes
numeric tensors as `tensor_content` bytes (as `tf.make_tensor_proto` does: a client's
requests), or, for a reply, in the `*_val` lists (`float_val` and the like, as TF Serving's
Predict answers by default: its `kAsProtoField`, what a generic client reads); strings as
`string_val`. Decoding accepts both forms.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from pipeline import schema

# TF Serving reads a version folder's name as an int64: a larger number is no version there
# (its poller skips the folder) and does not fit the replies' `model_spec.version`.
MAX_VERSION = 2**63 - 1

_NUMERIC = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.bool_): types_pb2.DT_BOOL,  # one byte per value, as TensorFlow's
}
_FROM_DTYPE = {v: k for k, v in _NUMERIC.items()}
_VAL_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
}

# The `*_val` fields whose packed wire form is the values' little-endian bytes (float,
# double; bool: a varint 0 or 1 a value, numpy's bytes): a reply's numbers go in as one
# parse of those bytes, 13 times faster than a list's `extend` for a [64, 128] state.
_PACKED_RAW_FIELD = {types_pb2.DT_FLOAT: 5, types_pb2.DT_DOUBLE: 6, types_pb2.DT_BOOL: 11}

DTYPE_NAMES = {
    types_pb2.DT_FLOAT: "float32", types_pb2.DT_DOUBLE: "float64", types_pb2.DT_INT32: "int32",
    types_pb2.DT_INT64: "int64", types_pb2.DT_STRING: "string", types_pb2.DT_BOOL: "bool",
}


def dtype_name(dtype: int) -> str:
    """Readable name of a `types_pb2` enum value (`float32`, `string`, ...; `dtype 999`
    for a number no type has)."""
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"dtype {dtype}"


def to_proto(value: Any) -> tensor_pb2.TensorProto:
    """Encodes an array (numbers, or str/bytes for strings) as a TensorProto.

    Raises:
      TypeError: an unsupported dtype.
    """
    proto = tensor_pb2.TensorProto()
    fill_proto(proto, value)
    return proto


def fill_proto(proto: tensor_pb2.TensorProto, value: Any, as_fields: bool = False) -> None:
    """Encodes an array into a TensorProto in place (e.g. a response's output entry).

    Args:
      proto: the message to fill (cleared first).
      value: the array.
      as_fields: numbers in the dtype's `*_val` list, as TF Serving's replies (a client
        reading `outputs["scores"].float_val` found it empty here); else `tensor_content`.

    Raises:
      TypeError: an unsupported dtype.
    """
    arr = np.asarray(value)
    proto.Clear()
    if arr.dtype.kind in "USO":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(
            [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel().tolist()])
    elif arr.dtype in _NUMERIC:
        proto.dtype = _NUMERIC[arr.dtype]
        field = _PACKED_RAW_FIELD.get(proto.dtype)
        if as_fields and field is not None and arr.size:
            raw = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
            proto.MergeFromString(schema.proto_field(field, raw))
        elif as_fields:
            getattr(proto, _VAL_FIELD[proto.dtype]).extend(arr.ravel().tolist())
        else:
            proto.tensor_content = np.ascontiguousarray(arr).tobytes()
    else:
        raise TypeError(f"cannot send a {arr.dtype} tensor: use float32, int32, int64, bool or "
                        "strings")
    dims = proto.tensor_shape.dim
    for d in arr.shape:
        dims.add().size = d


class TensorTooLarge(ValueError):
    """A tensor whose shape holds more elements than the caller allows."""


def from_proto(proto: tensor_pb2.TensorProto, max_elements: int | None = None) -> np.ndarray:
    """Decodes a TensorProto; strings come back as an object array of bytes.

    As TensorFlow's `Tensor::FromProto` (what TF Serving runs): `tensor_content` must fill
    the shape exactly (strings: their lengths as varints, then their bytes); a `*_val` / `string_val` list gives the first values of the shape
    (extra values are ignored), the last value repeated to fill the rest, or zeros / empty
    strings when the list is empty.

    Args:
      proto: the tensor.
      max_elements: refuse shapes with more elements than this (None: no limit), before
        anything is allocated.

    Raises:
      TensorTooLarge: more than `max_elements` elements.
      ValueError: malformed (the content does not fit the shape) or unsupported dtype.
    """
    if proto.tensor_shape.unknown_rank:
        raise ValueError("tensor has unknown rank: send a fully defined shape")
    shape = tuple([d.size for d in proto.tensor_shape.dim])
    if shape and min(shape) < 0:
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise TensorTooLarge(f"tensor shape {list(shape)} has {n} elements, more than the "
                             f"{max_elements} this server accepts in one tensor")
    if proto.dtype == types_pb2.DT_STRING:
        if proto.tensor_content:
            return _strings_from_content(proto.tensor_content, n).reshape(shape)
        return _fill(list(proto.string_val), n, np.dtype(object), b"").reshape(shape)
    if proto.dtype not in _FROM_DTYPE:
        raise ValueError(f"unsupported dtype {dtype_name(proto.dtype)}")
    dtype = _FROM_DTYPE[proto.dtype]
    content = proto.tensor_content
    if content:
        if len(content) != n * dtype.itemsize:
            raise ValueError(f"{len(content)} content bytes do not fill shape "
                             f"{list(shape)} of {dtype_name(proto.dtype)}")
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    values = getattr(proto, _VAL_FIELD[proto.dtype])
    return _fill(np.asarray(values[:n], dtype=dtype), n, dtype, 0).reshape(shape)


def _strings_from_content(content: bytes, n: int) -> np.ndarray:
    """`n` strings from a string tensor's `tensor_content` as TensorFlow encodes it: the
    `n` lengths as varints, then the bytes one after the other."""
    lengths, at = [], 0
    for _ in range(n):
        value = shift = 0
        while True:
            if at >= len(content) or shift > 28:
                raise ValueError(f"string tensor_content does not hold {n} lengths")
            byte = content[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        lengths.append(value)
    if at + sum(lengths) != len(content):
        raise ValueError(f"string tensor_content holds {len(content) - at} bytes after its "
                         f"lengths, the lengths say {sum(lengths)}")
    out = np.empty(n, dtype=object)
    for i, length in enumerate(lengths):
        out[i] = content[at:at + length]
        at += length
    return out


def _fill(values, n: int, dtype: np.dtype, default) -> np.ndarray:
    """The first `n` of `values`, then its last value (or `default`) up to `n`."""
    arr = np.empty(n, dtype=dtype)
    m = min(len(values), n)
    arr[:m] = values[:m]
    arr[m:] = values[m - 1] if m else default
    return arr
