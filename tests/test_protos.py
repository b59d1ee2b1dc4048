"""serving.protos: numpy ↔ TensorProto on hand-made values, as TF Serving encodes them."""
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from serving import protos


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([[1.5], [-2.0]], dtype=np.float64),
    np.int32(7),
    np.arange(4, dtype=np.int64),
    np.zeros([0, 3], np.float32),
    np.array([[True, False, True]]),
])
def test_numbers_round_trip_through_tensor_content(value):
    proto = protos.to_proto(value)
    assert proto.tensor_content == np.ascontiguousarray(value).tobytes()
    assert [d.size for d in proto.tensor_shape.dim] == list(np.shape(value))
    back = protos.from_proto(proto)
    assert back.dtype == np.asarray(value).dtype and back.shape == np.shape(value)
    np.testing.assert_array_equal(back, value)
    assert back.flags.writeable  # the caller's own copy, not a view of the message


def test_strings_go_to_string_val_and_come_back_as_bytes():
    proto = protos.to_proto(np.array([["a", "bé"], ["", "c"]], dtype=object))
    assert proto.dtype == types_pb2.DT_STRING
    assert list(proto.string_val) == [b"a", "bé".encode(), b"", b"c"]
    back = protos.from_proto(proto)
    assert back.dtype == object and back.tolist() == [[b"a", "bé".encode()], [b"", b"c"]]


def test_fill_proto_writes_a_response_entry_in_place():
    response = predict_pb2.PredictResponse()
    protos.fill_proto(response.outputs["item_ids"], np.array([[b"x", b"y"]], dtype=object))
    protos.fill_proto(response.outputs["scores"], np.array([[0.5, 0.25]], np.float32))
    protos.fill_proto(response.outputs["scores"], np.array([[0.5, 0.25]], np.float32))  # again
    again = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    assert protos.from_proto(again.outputs["item_ids"]).tolist() == [[b"x", b"y"]]
    assert protos.from_proto(again.outputs["scores"]).tolist() == [[0.5, 0.25]]
    # a reply's numbers in the *_val lists, as TF Serving answers (a generic client reads
    # `float_val`; it found none in tensor_content): the same values back
    for value, field in ((np.array([[0.5, 0.25]], np.float32), "float_val"),
                         (np.array([[True, False]]), "bool_val"),
                         (np.array([[3, -1]], np.int32), "int_val"),
                         (np.array([[2**40, 7]], np.int64), "int64_val"),
                         (np.array([[1.5, 2.0]], np.float64), "double_val"),
                         # (a packed field of 4,000 bytes: its length a two-byte varint)
                         (np.arange(1000, dtype=np.float32).reshape(10, 100) / 7, "float_val"),
                         (np.zeros([0, 3], np.float32), "float_val")):
        protos.fill_proto(response.outputs["x"], value, as_fields=True)
        entry = response.outputs["x"]
        assert list(getattr(entry, field)) == value.ravel().tolist() and not entry.tensor_content
        back = protos.from_proto(entry)
        assert back.dtype == value.dtype and back.tolist() == value.tolist()
        assert [d.size for d in entry.tensor_shape.dim] == list(value.shape)


def test_val_fields_from_other_clients_including_one_value_broadcast():
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, int_val=[1, 2, 3, 4])
    proto.tensor_shape.dim.add().size = 2
    proto.tensor_shape.dim.add().size = 2
    assert protos.from_proto(proto).tolist() == [[1, 2], [3, 4]]
    fill = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.5])
    fill.tensor_shape.dim.add().size = 3
    assert protos.from_proto(fill).tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("proto, expected", [
    # as TensorFlow's Tensor::FromProto: the last value fills the rest, an empty list zeros
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, int64_val=[1, 2]), [[1, 2, 2], [2, 2, 2]]),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT), [[0.0] * 3] * 2),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, int_val=list(range(9))),
     [[0, 1, 2], [3, 4, 5]]),  # extra values ignored
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a"]), [[b"a"] * 3] * 2),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING), [[b""] * 3] * 2),
])
def test_short_and_long_val_lists_decode_as_tensorflow_does(proto, expected):
    proto.tensor_shape.dim.add().size = 2
    proto.tensor_shape.dim.add().size = 3
    assert protos.from_proto(proto).tolist() == expected
    # the reference: TensorFlow's own C++ decoding (ParseTensor runs Tensor::FromProto)
    dtype = {types_pb2.DT_INT64: tf.int64, types_pb2.DT_FLOAT: tf.float32,
             types_pb2.DT_INT32: tf.int32, types_pb2.DT_STRING: tf.string}[proto.dtype]
    assert tf.io.parse_tensor(proto.SerializeToString(), dtype).numpy().tolist() == expected


def test_string_tensor_content_decodes_as_tensorflow_does():
    strings = np.array([[b"item0", b""], ["\u00e9t\u00e9".encode(), b"x" * 300]], dtype=object)
    encoded = tf.make_tensor_proto(tf.constant(strings))  # TensorFlow's own encoding ...
    packed = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,  # ... and the packed one:
                                    tensor_shape=encoded.tensor_shape)
    packed.tensor_content = bytes([5, 0, 5, 0xAC, 0x02]) + b"item0" + strings[1, 0] + b"x" * 300
    assert tf.io.parse_tensor(packed.SerializeToString(), tf.string).numpy().tolist() == \
        strings.tolist()
    for proto in (encoded, packed):
        assert protos.from_proto(proto).tolist() == strings.tolist()
    bad = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=b"\x05ab")
    bad.tensor_shape.dim.add().size = 1
    with pytest.raises(ValueError, match="holds 2 bytes after its lengths, the lengths say 5"):
        protos.from_proto(bad)


def test_a_shape_past_the_element_limit_is_refused_before_allocating():
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[0.0])
    huge.tensor_shape.dim.add().size = 2 ** 31
    huge.tensor_shape.dim.add().size = 276
    with pytest.raises(protos.TensorTooLarge, match="more than the 1000"):
        protos.from_proto(huge, max_elements=1000)


def _with_shape(proto, *dims):
    for d in dims:
        proto.tensor_shape.dim.add().size = d
    return proto


@pytest.mark.parametrize("proto, message", [
    (_with_shape(tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 6), 2),
     "6 content bytes do not fill shape [2] of float32"),
    (_with_shape(tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT), -1), "negative dimension"),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                            tensor_shape={"unknown_rank": True}), "unknown rank"),
    (_with_shape(tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF), 1), "unsupported dtype"),
])
def test_malformed_tensors_are_named(proto, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        protos.from_proto(proto)


def test_bools_decode_as_tensorflow_encodes_them():
    """`known_items`' output: TensorFlow's own encodings (tensor_content one byte per
    value, or bool_val) read back as numpy bools."""
    value = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(protos.from_proto(tf.make_tensor_proto(value)), value)
    proto = _with_shape(tensor_pb2.TensorProto(dtype=types_pb2.DT_BOOL, bool_val=[True, False]), 3)
    assert protos.from_proto(proto).tolist() == [True, False, False]
    assert tf.make_ndarray(protos.to_proto(value)).tolist() == value.tolist()


def test_unsupported_dtype_is_refused_when_sending():
    with pytest.raises(TypeError, match="complex128"):
        protos.to_proto(np.array([1 + 2j]))
