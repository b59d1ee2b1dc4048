"""numpy ↔ `tensorflow.TensorProto` for the dtypes of the serving signatures.

Used by both ends of the gRPC link (serving.server, serving.client). Encoding follows what
TF Serving sends: numeric tensors as `tensor_content` bytes, strings as `string_val`.
Decoding also accepts the `*_val` forms other clients send.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

_NUMERIC = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
}
_FROM_DTYPE = {v: k for k, v in _NUMERIC.items()}
_VAL_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
}

DTYPE_NAMES = {
    types_pb2.DT_FLOAT: "float32", types_pb2.DT_DOUBLE: "float64", types_pb2.DT_INT32: "int32",
    types_pb2.DT_INT64: "int64", types_pb2.DT_STRING: "string",
}


def dtype_name(dtype: int) -> str:
    """Readable name of a `types_pb2` enum value (`float32`, `string`, ...)."""
    return DTYPE_NAMES.get(dtype, types_pb2.DataType.Name(dtype))


def _shape(shape: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape])


def to_proto(value: Any) -> tensor_pb2.TensorProto:
    """Encodes an array (numbers, or str/bytes for strings) as a TensorProto.

    Raises:
      TypeError: an unsupported dtype.
    """
    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel().tolist()]
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=_shape(arr.shape))
        proto.string_val.extend(flat)
        return proto
    if arr.dtype not in _NUMERIC:
        raise TypeError(f"cannot send a {arr.dtype} tensor: use float32, int32, int64 or strings")
    return tensor_pb2.TensorProto(dtype=_NUMERIC[arr.dtype], tensor_shape=_shape(arr.shape),
                                  tensor_content=np.ascontiguousarray(arr).tobytes())


def from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """Decodes a TensorProto; strings come back as an object array of bytes.

    Raises:
      ValueError: malformed (the content does not fit the shape) or unsupported dtype.
    """
    if proto.tensor_shape.unknown_rank:
        raise ValueError("tensor has unknown rank: send a fully defined shape")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    n = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == types_pb2.DT_STRING:
        values = list(proto.string_val)
        if len(values) != n:
            raise ValueError(f"{len(values)} string values do not fill shape {list(shape)}")
        arr = np.empty(n, dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    if proto.dtype not in _FROM_DTYPE:
        raise ValueError(f"unsupported dtype {dtype_name(proto.dtype)}")
    dtype = _FROM_DTYPE[proto.dtype]
    if proto.tensor_content:
        if len(proto.tensor_content) != n * dtype.itemsize:
            raise ValueError(f"{len(proto.tensor_content)} content bytes do not fill shape "
                             f"{list(shape)} of {dtype_name(proto.dtype)}")
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    values = np.asarray(getattr(proto, _VAL_FIELD[proto.dtype]), dtype=dtype)
    if values.size == n:
        return values.reshape(shape)
    if values.size == 1 or (values.size == 0 and n == 0):
        return np.full(shape, values[0] if values.size else 0, dtype=dtype)
    raise ValueError(f"{values.size} values do not fill shape {list(shape)}")
