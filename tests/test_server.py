"""serving.server over real gRPC: TF Serving's requests, answers and status codes."""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gc
import logging
import os
import shutil
import socket
import threading
import time

import grpc
import numpy as np
import pytest

import serving_testlib as lib
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving import export, protos, server

NAME = "tiny"
H = 8
STATE = np.random.default_rng(1).normal(size=[2, H]).astype(np.float32)
SESSIONS = np.array([["item0", "item4"], ["nope", ""]], dtype=object)
HISTORY = np.array([["item1"], [""]], dtype=object)
INPUTS = {
    # k one per row: the server batches (as TF Serving's batching, it needs a batch dimension)
    "next_items": {"user_state": STATE, "session_items": SESSIONS, "history_items": HISTORY,
                   "k": np.int32([5, 5])},
    "update_state": {"user_state": STATE, "session_items": SESSIONS},
    "user_embedding": {"user_state": STATE, "session_items": SESSIONS, "history_items": HISTORY},
}


@contextlib.contextmanager
def _serving(base, *extra):
    """Version 1 of the tiny model exported to `base`, served with batching (and `extra`)."""
    vocab = lib.tiny_vocabulary()
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base)
    server = lib.ServerProcess(base, NAME, "--enable-batching", "--batch-timeout-micros", "20000",
                               *extra)
    try:
        server.wait_version(1)
        channel = grpc.insecure_channel(server.target)
        yield {"server": server, "base": base, "vocab": vocab, "channel": channel,
               "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
               "models": model_service_pb2_grpc.ModelServiceStub(channel)}
        channel.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with _serving(str(tmp_path_factory.mktemp("models")), "--max-message-mb", "1") as s:
        yield s


def request(signature, inputs, name=NAME, version=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    for key, value in inputs.items():
        req.inputs[key].CopyFrom(protos.to_proto(value))
    return req


@functools.lru_cache(maxsize=None)
def _loaded(path):
    return tf.saved_model.load(path)


def in_process(base, version, signature, inputs):
    fn = _loaded(os.path.join(base, str(version))).signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def assert_outputs_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        if want[key].dtype == object:
            assert got[key].tolist() == want[key].tolist()
        else:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "signature", ["next_items", "serving_default", "update_state", "user_embedding"])
def test_predict_equals_in_process_savedmodel(served, signature):
    inputs = INPUTS["next_items" if signature == "serving_default" else signature]
    response = served["predict"].Predict(request(signature, inputs), timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == (NAME, 1, signature)
    got = {k: protos.from_proto(v) for k, v in response.outputs.items()}
    assert_outputs_equal(got, in_process(served["base"], 1, signature, inputs))
    # numbers in the *_val lists, as TF Serving's replies carry them (by default)
    for value in response.outputs.values():
        assert not value.tensor_content, value
        assert len(value.float_val) + len(value.string_val) == np.prod(
            [d.size for d in value.tensor_shape.dim]), value


def test_default_signature_and_output_filter(served):
    req = request("", INPUTS["next_items"])
    req.output_filter.append("item_ids")
    response = served["predict"].Predict(req, timeout=30)
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs) == ["item_ids"]
    assert protos.from_proto(response.outputs["item_ids"]).shape == (2, 5)
    req.output_filter.append("item_ids")  # refused, as TF Serving refuses it
    with pytest.raises(grpc.RpcError) as e:
        served["predict"].Predict(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "duplicate output tensor alias: item_ids"


def test_metadata_and_status(served):
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = NAME
    response = served["predict"].GetModelMetadata(req, timeout=30)
    assert response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    assert {"serving_default", "next_items", "update_state", "user_embedding"} <= set(
        sig_map.signature_def)
    dims = sig_map.signature_def["update_state"].inputs["user_state"].tensor_shape.dim
    assert [d.size for d in dims] == [-1, H]
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = NAME
    versions = served["models"].GetModelStatus(status, timeout=30).model_version_status
    state = get_model_status_pb2.ModelVersionStatus.State
    assert [(v.version, state.Name(v.state)) for v in versions] == [(1, "AVAILABLE")]


def _without(key):
    return {k: v for k, v in INPUTS["next_items"].items() if k != key}


def _with(**changes):
    return {**INPUTS["next_items"], **changes}


def _huge_shape_request(signature="update_state", key="user_state", dims=(1000, 2 ** 26)):
    """A few bytes that ask for a huge tensor (a float_val or int_val list repeats its last
    value; strings left out are "")."""
    inputs = dict(INPUTS.get(signature, {}))
    inputs.setdefault(key, np.array([[""]], dtype=object))
    req = request(signature, inputs)
    tensor = req.inputs[key]
    dtype = tensor.dtype
    tensor.Clear()
    tensor.dtype = dtype
    if dtype == tf.float32.as_datatype_enum:
        tensor.float_val.append(0.0)
    elif dtype == tf.int32.as_datatype_enum:
        tensor.int_val.append(5)
    for d in dims:
        tensor.tensor_shape.dim.add().size = d
    return req


def _empty_ids_request(signature, shape):
    """A request whose session_items names `shape` and holds no string_val (all "")."""
    inputs = {**INPUTS[signature], "user_state": np.zeros([shape[0], H], np.float32)}
    if "k" in inputs:
        inputs["k"] = np.int32([2] * shape[0])
    if "history_items" in inputs:
        inputs["history_items"] = np.full([shape[0], 1], "", dtype=object)
    req = request(signature, inputs)
    items = req.inputs["session_items"]
    items.Clear()
    items.dtype = tf.string.as_datatype_enum
    for d in shape:
        items.tensor_shape.dim.add().size = d
    return req


def _unknown_dtype_request():
    """A user_state of a dtype number no type has (it answered INTERNAL, with a traceback
    in the server's log)."""
    req = request("next_items", INPUTS["next_items"])
    req.inputs["user_state"].dtype = 999
    return req


BAD_REQUESTS = {
    "unknown dtype": (_unknown_dtype_request(), grpc.StatusCode.INVALID_ARGUMENT,
                      "'user_state' of signature 'next_items' expects float32 but dtype 999 "
                      "is provided"),
    # a long name echoed whole went past the trailer's size limit: the client got an
    # unrelated transport error instead of the server's answer
    "a signature name of 100k characters": (
        request("x" * 100_000, INPUTS["next_items"]), grpc.StatusCode.FAILED_PRECONDITION,
        "xxxxxxxxxx ... (cut)"),
    "unknown model": (request("next_items", INPUTS["next_items"], name="nope"),
                      grpc.StatusCode.NOT_FOUND, "Latest(nope)"),
    "unknown version": (request("next_items", INPUTS["next_items"], version=7),
                        grpc.StatusCode.NOT_FOUND, "Specific(tiny, 7)"),
    "unknown signature": (request("bogus", INPUTS["next_items"]),
                          grpc.StatusCode.FAILED_PRECONDITION, '"bogus" not found'),
    "missing input": (request("next_items", _without("history_items")),
                      grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {history_items}"),
    "extra input": (request("next_items", _with(foo=np.int32(1))),
                    grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {foo}"),
    # as many inputs as the signature's, one misspelt: TF Serving's own wording (the count's
    # read "4!=4")
    "renamed input": (request("next_items", dict(_without("history_items"),
                                                  history_item=np.array([["item0"]] * 2))),
                      grpc.StatusCode.INVALID_ARGUMENT,
                      "input tensor alias not found in signature 'next_items': history_item. "
                      "Inputs expected to be in the set {"),
    "wrong dtype": (request("next_items", _with(user_state=STATE.astype(np.int32))),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "'user_state' of signature 'next_items' expects float32"),
    "wrong width": (request("next_items", _with(user_state=STATE[:, :5])),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "'user_state' of signature 'next_items' has shape [2, 5]"),
    "wrong rank": (request("next_items", _with(session_items=SESSIONS[0])),
                   grpc.StatusCode.INVALID_ARGUMENT, "'session_items'"),
    "batch mismatch": (request("next_items", _with(session_items=SESSIONS[:1])),
                       grpc.StatusCode.INVALID_ARGUMENT, "different batch sizes"),
    "negative k": (request("next_items", _with(k=np.int32([3, -1]))),
                   grpc.StatusCode.INVALID_ARGUMENT, "k must be >= 0"),
    # TF Serving's batching session refuses these (warm-up included: such a version would
    # not load there); without batching a scalar k is the contract's
    "scalar k with batching": (request("next_items", _with(k=np.int32(5))),
                               grpc.StatusCode.INVALID_ARGUMENT,
                               "input tensors must have at least one dimension (input 'k'"),
    "k rows differ from the batch": (request("next_items", _with(k=np.int32([5, 5, 5]))),
                                     grpc.StatusCode.INVALID_ARGUMENT,
                                     "must have equal 0th-dimension size (input 'k' has 3 rows"),
    # TF Serving's batch scheduler refuses a request of more rows than --max-batch-size (64)
    "more rows than the max batch size": (
        request("update_state", {"user_state": np.zeros([65, H], np.float32),
                                 "session_items": np.full([65, 1], "item0", dtype=object)}),
        grpc.StatusCode.INVALID_ARGUMENT, "Task size 65 is larger than maximum input batch size 64"),
    # (`k` has no fixed rank: its shape is read only as it is decoded)
    "huge shape in a small message": (_huge_shape_request("next_items", "k", [2 ** 33]),
                                      grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      "'k': tensor shape [8589934592] has"),
    # refused from the shape the request states, before it is decoded (a 52-byte request
    # of [1, 1, 16777216] "" ids made 128 MB of them before its rank was looked at)
    # (refused from its shape: decoded, it reached the graph's check, 0.3 s and 200 MB)
    "k of rank 2": (_huge_shape_request("next_items", "k", [4096, 4096]),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "k must be a scalar or one value per row of user_state ([B]), got shape "
                    "[4096, 4096]"),
    "huge shape of another width": (
        _huge_shape_request(), grpc.StatusCode.INVALID_ARGUMENT,
        "'user_state' of signature 'update_state' has shape [1000, 67108864] but the "
        "signature expects [?, 8]"),
    "huge shape of another rank": (
        _huge_shape_request("known_items", "items", [1, 1, 2 ** 24]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'items' of signature 'known_items' has shape [1, 1, 16777216] but the signature "
        "expects [?, ?]"),
    # a few bytes name a session of 200,001 "" (TF fills a short string_val): each one a
    # position the model would run over (16.7M of them took 15 GB and 45 s of CPU)
    "wider than --max-sequence-width": (
        _empty_ids_request("next_items", [1, 200_001]), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "input 'session_items' of signature 'next_items' is 200001 items wide, more than this "
        "server's --max-sequence-width 100000"),
    "more item slots than --max-sequence-items": (
        _empty_ids_request("update_state", [11, 95_000]), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "input 'session_items' of signature 'update_state' holds 11 x 95000 item slots, more "
        "than this server's --max-sequence-items 1000000"),
    # a few bytes naming 60,000 rows held 6 GB (next_items scores each over the catalogue)
    "more rows than --max-request-rows": (
        _empty_ids_request("next_items", [2000, 1]), grpc.StatusCode.RESOURCE_EXHAUSTED,
        "has 2000 rows, more than this server's --max-request-rows 1024: send fewer users "
        "per request"),
    "too large": (request("update_state", {"user_state": np.zeros([40000, H], np.float32),
                                           "session_items": np.full([40000, 1], "", dtype=object)}),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_tf_serving_codes_and_server_keeps_serving(served, case):
    req, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        served["predict"].Predict(req, timeout=30)
    assert err.value.code() == code
    assert message in err.value.details()
    ok = served["predict"].Predict(request("next_items", INPUTS["next_items"]), timeout=30)
    assert ok.model_spec.version.value == 1


def test_undecodable_bodies_are_one_log_line_and_long_names_keep_their_status(served):
    """Random bytes for a request: INTERNAL, as gRPC answers, and one warning line a minute
    in the log instead of a traceback per request; an error message that echoes a long
    name of 4-byte characters is cut by its bytes, so the status code arrives (cut by
    characters, its percent-encoded trailer passed the client's 8 KB limit and the client
    got RESOURCE_EXHAUSTED instead); a name with a line break is shown as a literal."""
    raw = served["channel"].unary_unary("/tensorflow.serving.PredictionService/Predict")
    before = len(served["server"].lines)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff" * 10, timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
    served["predict"].Predict(request("next_items", INPUTS["next_items"]), timeout=30)
    time.sleep(0.2)
    logged = served["server"].lines[before:]
    assert not any("Traceback" in line for line in logged), logged
    said = [line for line in logged if "not a valid protobuf message" in line]
    assert len(said) == 1 and " WARNING 1 request that is not" in said[0], logged
    for _ in range(10):  # (the trailer's limit is enforced at random: 10 tries)
        with pytest.raises(grpc.RpcError) as err:
            served["predict"].Predict(request("\U0001F642" * 2000, INPUTS["next_items"]),
                                      timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().endswith(" ... (cut)")
    with pytest.raises(grpc.RpcError) as err:
        served["predict"].Predict(request("next_items", INPUTS["next_items"], name="a\nb"),
                                  timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "Servable not found for request: Latest('a\\nb')"


def test_metadata_needs_signature_def_field(served):
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = NAME
    with pytest.raises(grpc.RpcError) as err:
        served["predict"].GetModelMetadata(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_request_without_model_spec_is_invalid_argument_as_in_tf_serving(served):
    # TF Serving checks `has_model_spec()` first in Predict, GetModelMetadata and
    # GetModelStatus: INVALID_ARGUMENT "Missing ModelSpec" (not NOT_FOUND for a model "")
    calls = [(served["predict"].Predict, predict_pb2.PredictRequest()),
             (served["predict"].GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest(
                 metadata_field=["signature_def"])),
             (served["predict"].GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest()),
             (served["models"].GetModelStatus, get_model_status_pb2.GetModelStatusRequest())]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as err:
            method(req, timeout=30)
        assert (err.value.code(), err.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"), type(req).__name__
    # a ModelSpec without a name: INVALID_ARGUMENT (TF Serving's ServableRequestFromModelSpec;
    # NOT_FOUND "Latest()" here read as a model not served), a label before the name
    empty = request("next_items", INPUTS["next_items"], name="")
    labelled = request("next_items", INPUTS["next_items"], name="nope")
    labelled.model_spec.version_label = "stable"
    for req, message in ((empty, "ModelSpec has no name specified."),
                         (labelled, "Unrecognized servable version label: stable")):
        with pytest.raises(grpc.RpcError) as err:
            served["predict"].Predict(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(message), err.value.details()


def test_status_with_a_version_label_lists_every_version_as_in_tf_serving(served):
    # TF Serving's GetModelStatus reads only `model_spec.version`: a label asks for them all
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = NAME
    every = served["models"].GetModelStatus(req, timeout=30)
    req.model_spec.version_label = "stable"
    assert served["models"].GetModelStatus(req, timeout=30) == every


def test_concurrent_requests_are_batched_and_split_correctly(served):
    """Sessions of different lengths share batches (padded with ""); each answer is its own."""
    rng = np.random.default_rng(2)
    rows = [{"user_state": rng.normal(size=[1, H]).astype(np.float32),
             "session_items": np.array([[f"item{(i * j) % 12}" for j in range(1 + i % 4)]],
                                       dtype=object),
             "history_items": np.array([[""] * (1 + i % 2)], dtype=object),
             "k": np.int32([1 + i % 5])}  # batched together whatever k: each gets its own
            for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda r: served["predict"].Predict(request("next_items", r), timeout=30), rows))
    for r, response in zip(rows, responses):
        got = {k: protos.from_proto(v) for k, v in response.outputs.items()}
        want = in_process(served["base"], 1, "next_items", r)
        # a merged batch answers every row with its largest k: our k first, in order
        assert got["item_ids"].shape[1] >= r["k"][0]
        assert_outputs_equal({k: v[:, :r["k"][0]] for k, v in got.items()}, want)


@pytest.fixture
def lifecycle(tmp_path):
    """A server of its own for the tests that add versions or stop it (the module's
    `served` must stay on version 1 whatever order the tests run in)."""
    with _serving(str(tmp_path / "models")) as s:
        yield s


def test_versions_come_and_go_without_dropping_requests_then_sigterm(lifecycle):
    """A new version is picked up while requests keep coming (none fails, none goes back
    to the old version once the new one answered); a broken version folder is reported and
    the old version keeps serving until the folder is complete; SIGTERM exits 0."""
    base, vocab, stub = lifecycle["base"], lifecycle["vocab"], lifecycle["predict"]
    good = request("next_items", INPUTS["next_items"])
    answered, errors, stop = ([], []), [], threading.Event()  # versions, per thread

    def traffic(mine):
        while not stop.is_set():
            try:
                mine.append(stub.Predict(good, timeout=60).model_spec.version.value)
            except grpc.RpcError as e:
                errors.append(e)
                return

    def count():
        return sum(len(a) for a in answered)

    threads = [threading.Thread(target=traffic, args=(mine,)) for mine in answered]
    for t in threads:
        t.start()
    try:
        while count() < 4 and not errors:
            time.sleep(0.01)
        export.export_model(lib.tiny_model(vocab, seed=2), vocab, base, version=2)
        lifecycle["server"].wait_version(2)
        seen = count()
        while count() < seen + 4 and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    for mine in answered:  # each client's requests: version 1, then 2, never back
        assert mine == sorted(mine)
    assert set(answered[0] + answered[1]) == {1, 2}
    response = stub.Predict(good, timeout=30)
    got = {k: protos.from_proto(v) for k, v in response.outputs.items()}
    assert_outputs_equal(got, in_process(base, 2, "next_items", INPUTS["next_items"]))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request("next_items", INPUTS["next_items"], version=1), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # a broken version 3: reported, and version 2 keeps serving
    broken = os.path.join(base, "3")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"not a saved model")
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = NAME
    state = get_model_status_pb2.ModelVersionStatus.State
    # (ascending here; the server lists them newest first, as TF Serving does)
    listed = lambda vs: [(v.version, state.Name(v.state), bool(v.status.error_message))  # noqa: E731
                         for v in sorted(vs, key=lambda v: v.version)]
    # (version 1, unloaded when 2 loaded, stays END with no error, as TF Serving lists it;
    # version 3 is LOADING for a moment first)
    failed = [(1, "END", False), (2, "AVAILABLE", False), (3, "END", True)]
    for _ in range(200):
        versions = lifecycle["models"].GetModelStatus(status, timeout=30).model_version_status
        if listed(versions) == failed:
            break
        assert listed(versions)[:2] == failed[:2] and listed(versions)[2:] in (
            [], [(3, "LOADING", False)]), listed(versions)
        time.sleep(0.1)
    assert listed(versions) == failed
    assert stub.Predict(good, timeout=30).model_spec.version.value == 2
    # the folder is then completed (a copy that was still under way): loaded on a later poll
    shutil.copytree(os.path.join(base, "2"), broken, dirs_exist_ok=True)
    for _ in range(300):  # (3 AVAILABLE a moment before 2 is unloaded)
        versions = lifecycle["models"].GetModelStatus(status, timeout=30).model_version_status
        if listed(versions) == [(1, "END", False), (2, "END", False), (3, "AVAILABLE", False)]:
            break
        time.sleep(0.1)
    assert listed(versions) == [(1, "END", False), (2, "END", False), (3, "AVAILABLE", False)]
    assert [v.version for v in versions] == [3, 2, 1]  # (TF Serving's order: newest first)
    status.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as e:
        lifecycle["models"].GetModelStatus(status, timeout=30)
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.NOT_FOUND, f"Could not find version 7 of model {NAME}")
    assert stub.Predict(good, timeout=30).model_spec.version.value == 3
    assert lifecycle["server"].stop() == 0


class _OddNames(tf.Module):
    """Input names that tf.function rewrites ("b-x" → b_x, "9lives" → arg_9lives), so the
    function's flat (parameter-name) order differs from the names' own sorted order."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="userState"),
                                  tf.TensorSpec([None], tf.float32, name="b-x"),
                                  tf.TensorSpec([None], tf.float32, name="9lives"),
                                  tf.TensorSpec([], tf.int32, name="Bonus")])
    def run(self, user_state, b_x, lives, bonus):
        return {"out": user_state * 10.0 + b_x + lives * 1000.0
                + tf.cast(bonus, tf.float32) * 100.0}


def test_servable_calls_signatures_with_any_input_names_in_process(tmp_path):
    module = _OddNames()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    servable = server.Servable("odd", 1, str(tmp_path / "1"))
    sig = servable.signature("")
    inputs = {"userState": np.float32([1, 2]), "b-x": np.float32([3, 4]),
              "9lives": np.float32([0, 1]), "Bonus": np.int32(5)}
    req = request("serving_default", inputs)
    out = sig.run(sig.parse_inputs(req.inputs))
    # 10 * userState + b-x + 1000 * 9lives + 100 * Bonus
    np.testing.assert_array_equal(out["out"], [513, 1524])
    assert sig.batched_inputs == {"userState", "b-x", "9lives"}
    assert sig.batched_outputs == {"out"}


def test_a_warm_up_request_batching_refuses_says_to_export_again(tmp_path):
    """An export made before 2026-12-02 warms up with a scalar k, which TF Serving's
    batching session refuses, so the version fails to load: the reason says that the
    export, not the caller, must change (it read as advice to send one value per row)."""
    from tensorflow_serving.apis import prediction_log_pb2

    module = _OddNames()
    path = tmp_path / "1"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.run})
    (path / export.ASSETS_EXTRA).mkdir()
    inputs = {"userState": np.float32([1, 2]), "b-x": np.float32([3, 4]),
              "9lives": np.float32([0, 1]), "Bonus": np.int32(5)}
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(
        request=request("serving_default", inputs)))
    with tf.io.TFRecordWriter(str(path / export.ASSETS_EXTRA / export.WARMUP_FILE)) as writer:
        writer.write(log.SerializeToString())
    servable = server.Servable("odd", 1, str(path))
    assert servable.warm_up(batching=False) == 1
    with pytest.raises(server.RequestError) as err:
        servable.warm_up(batching=True)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value).endswith(
        "(input 'Bonus': with batching, send one value per row) in the export's warm-up "
        "requests: an export made before 2026-12-02 takes a scalar k, which batching "
        "refuses; export the run again"), str(err.value)


def test_a_runtime_error_of_the_graph_answers_its_own_code_as_tf_serving_does(tmp_path):
    """Not INTERNAL: TF Serving passes the runtime's status on (an out-of-memory
    RESOURCE_EXHAUSTED, here a NOT_FOUND of a file the graph reads)."""
    module = tf.Module()
    module.run = tf.function(lambda path: {"out": tf.strings.length(tf.io.read_file(path[0]))},
                             input_signature=[tf.TensorSpec([None], tf.string, name="path")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    sig = server.Servable("files", 1, str(tmp_path / "1")).signature("")
    missing = np.array([str(tmp_path / "missing.txt")], dtype=object)
    with pytest.raises(server.RequestError) as err:
        sig.run(sig.parse_inputs(request("serving_default", {"path": missing}).inputs))
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "missing.txt" in err.value.message
    (tmp_path / "there.txt").write_text("four")
    there = np.array([str(tmp_path / "there.txt")], dtype=object)
    assert sig.run(sig.parse_inputs(request("serving_default", {"path": there}).inputs))[
        "out"] == 4


def test_the_sequence_limits_are_inclusive():
    """--max-sequence-width 5 serves 5 items and refuses 6; --max-sequence-items 10 serves
    2 x 5 slots and refuses 2 x 6 (the limits were only tested far beyond them)."""
    def check(shape, max_width, max_items):
        proto = _empty_ids_request("next_items", shape).inputs["session_items"]
        server._check_sequence("session_items", "next_items", proto, max_width, max_items)

    check([1, 5], 5, None)
    check([2, 5], None, 10)
    # --max-request-rows 5 serves 5 rows and refuses 6
    proto = _empty_ids_request("next_items", [5, 1]).inputs["user_state"]
    server._check_rows("user_state", "next_items", proto, 5)
    with pytest.raises(server.RequestError, match="has 5 rows, more than this server's "
                                                  "--max-request-rows 4"):
        server._check_rows("user_state", "next_items", proto, 4)
    for shape, max_width, max_items, said in (([1, 6], 5, None, "6 items wide"),
                                              ([2, 6], None, 10, "holds 2 x 6 item slots")):
        with pytest.raises(server.RequestError, match=said) as caught:
            check(shape, max_width, max_items)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batcher_forgets_an_unloaded_version(tmp_path):
    """The batcher's per-signature bookkeeping goes with the signature: nothing accumulates
    over version reloads and a new signature never inherits an old one's batch size."""
    module = tf.Module()
    module.run = tf.function(lambda x: {"out": x * 10.0},
                             input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    batcher = server.Batcher(max_batch_size=8, timeout_s=0.0)
    servable = server.Servable("rows", 1, str(tmp_path / "1"))
    sig = servable.signature("")
    inputs = {"x": np.float32([1, 2])}
    out = batcher.submit(sig, sig.parse_inputs(request("serving_default", inputs).inputs))
    np.testing.assert_array_equal(out["out"], [10, 20])
    assert len(batcher._peak) == 1 and not batcher._in_server
    del sig, servable
    gc.collect()
    assert len(batcher._peak) == 0


def _hold_first_call(sig, size):
    """Makes `sig.run` record `size(arrays)` of each call and hold the first one until
    released; returns (the recorded sizes, the first call's running event, its release)."""
    calls, first_running, release = [], threading.Event(), threading.Event()
    real_run = sig.run

    def spy(arrays):
        calls.append(size(arrays))
        if len(calls) == 1:  # hold the first call until every other request is queued
            first_running.set()
            release.wait(30)
        return real_run(arrays)

    sig.run = spy
    return calls, first_running, release


def _queued_behind_the_first(batcher, sig, held, requests):
    """Submits the first request, and once its call runs (held by `_hold_first_call`)
    the others, which queue up; releases the first once they all wait, so that they go
    in the batches the batcher forms from its queue. Returns the futures, done."""
    calls, first_running, release = held
    calls.clear()
    first_running.clear()
    release.clear()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(batcher.submit, sig, requests[0])]
        assert first_running.wait(30)
        futures += [pool.submit(batcher.submit, sig, r) for r in requests[1:]]
        deadline = time.monotonic() + 30
        while len(batcher._queue) < len(requests) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
    return futures


@pytest.mark.parametrize("max_batch_size, sizes, expected", [
    (16, [1, 2] * 4, [1, 11]),  # two calls for eight requests
    (16, [1, 1, 2, 2, 1, 2, 2, 2], [1, 12]),  # (sizes in no symmetric order: rows go back
                                              # to their own request)
    (4, [1] * 8, [1, 4, 3]),    # never more rows in one call than --max_batch_size
])
def test_concurrent_requests_are_merged_into_fewer_model_calls(tmp_path, max_batch_size,
                                                               sizes, expected):
    """The Batcher runs concurrent requests as one model call: while a first call runs,
    the requests that arrive queue up and go together in the next (each gets its rows),
    as many rows at a time as the batch size allows."""
    module = tf.Module()
    module.run = tf.function(lambda x: {"out": x * 10.0},
                             input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    sig = server.Servable("rows", 1, str(tmp_path / "1")).signature("")
    held = _hold_first_call(sig, lambda arrays: len(arrays["x"]))
    batcher = server.Batcher(max_batch_size=max_batch_size, timeout_s=0.0)
    rows = [np.float32([i, i + 0.5][:n]) for i, n in enumerate(sizes)]
    futures = _queued_behind_the_first(batcher, sig, held, [{"x": r} for r in rows])
    outs = [f.result()["out"] for f in futures]
    assert held[0] == expected
    for r, out in zip(rows, outs):
        np.testing.assert_array_equal(out, r * 10.0)


def test_a_failing_batch_is_rerun_request_by_request(tmp_path):
    """A merged call that fails (one request's bad input) is run again request by request:
    the good requests of the batch are answered, only the bad one fails; and a request of
    exactly --max-batch-size rows is served (one more is refused)."""
    module = tf.Module()

    def run(x):
        with tf.control_dependencies([tf.debugging.assert_non_negative(x, message="negative")]):
            return {"out": x * 10.0}

    module.run = tf.function(run, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    sig = server.Servable("rows", 1, str(tmp_path / "1")).signature("")
    held = _hold_first_call(sig, lambda arrays: len(arrays["x"]))
    batcher = server.Batcher(max_batch_size=4, timeout_s=0.0)
    first, good, bad = _queued_behind_the_first(
        batcher, sig, held, [{"x": np.float32(x)} for x in ([1], [2, 3], [-1])])
    np.testing.assert_array_equal(first.result()["out"], [10])
    np.testing.assert_array_equal(good.result()["out"], [20, 30])
    with pytest.raises(Exception, match="negative"):
        bad.result()
    calls = held[0]
    assert calls[:2] == [1, 3] and sorted(calls[2:]) == [1, 2]  # merged, then one by one
    np.testing.assert_array_equal(batcher.submit(sig, {"x": np.float32([1, 2, 3, 4])})["out"],
                                  [10, 20, 30, 40])
    with pytest.raises(server.RequestError, match="Task size 5 is larger than maximum"):
        batcher.submit(sig, {"x": np.float32([1, 2, 3, 4, 5])})


def _top_k_signature(tmp_path):
    """A next_items-like signature: `k` int32 [B] and [B, k] outputs at the largest k."""
    module = tf.Module()

    def run(x, k):
        top = tf.math.top_k(x, k=tf.minimum(tf.reduce_max(tf.concat([k, [0]], 0)),
                                            tf.shape(x)[1]))
        return {"item_ids": top.indices, "scores": top.values}

    module.run = tf.function(run, input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x"),
                                                   tf.TensorSpec([None], tf.int32, name="k")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    return server.Servable("top", 1, str(tmp_path / "1")).signature("")


def test_each_request_of_a_merged_batch_gets_its_own_k(tmp_path):
    """A merged batch is scored at its largest k: each request gets the columns it would
    get alone (a request of k=5 merged with one of k=2**31-1 got the whole catalogue, and
    a reply over the message cap failed it, though it succeeds alone)."""
    sig = _top_k_signature(tmp_path)
    assert sig.k_input == "k" and sig.k_outputs == {"item_ids", "scores"}
    held = _hold_first_call(sig, lambda arrays: len(arrays["x"]))
    batcher = server.Batcher(max_batch_size=16, timeout_s=0.0)
    rng = np.random.default_rng(0)
    requests = [{"x": rng.normal(size=[n, 6]).astype(np.float32), "k": np.int32([k] * n)}
                for n, k in ((1, 1), (2, 2), (1, 5), (2, 2**31 - 1), (1, 0))]
    requests[2]["k"] = np.int32([5])
    requests[3]["k"] = np.int32([3, 2**31 - 1])
    futures = _queued_behind_the_first(batcher, sig, held, requests)
    assert held[0] == [1, 6]  # merged
    for r, f in zip(requests, futures):
        alone, merged = sig.run(r), f.result()
        width = min(int(r["k"].max()), 6)
        for key in ("item_ids", "scores"):
            assert merged[key].shape == alone[key].shape == (len(r["x"]), width)
            np.testing.assert_array_equal(merged[key], alone[key])


def test_a_queued_request_whose_caller_has_gone_is_not_run(tmp_path):
    """A request whose deadline passed (or that was cancelled) while it waited in the
    batching queue is dropped with CANCELLED, not run: abandoned heavy requests held the
    model for the live ones behind them."""
    sig = _top_k_signature(tmp_path)
    calls, first_running, release = _hold_first_call(sig, lambda arrays: len(arrays["x"]))
    batcher = server.Batcher(max_batch_size=16, timeout_s=0.0)
    x = np.ones([2, 6], np.float32)
    arrays = {"x": x, "k": np.int32([2, 2])}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher.submit, sig, arrays)
        assert first_running.wait(30)
        gone = pool.submit(batcher.submit, sig, arrays, lambda: False)
        live = pool.submit(batcher.submit, sig, arrays, lambda: True)
        deadline = time.monotonic() + 30
        while len(batcher._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
    assert first.result()["scores"].shape == live.result()["scores"].shape == (2, 2)
    with pytest.raises(server.RequestError, match="deadline passed or it was cancelled") as e:
        gone.result()
    assert e.value.code == grpc.StatusCode.CANCELLED
    assert calls == [2, 2]  # the live one ran alone: the gone one never did


def test_a_request_far_wider_than_the_others_is_not_padded_into_their_batch(tmp_path):
    """Merged item-id inputs are padded to the widest: a 50,000-item session among 3-item
    ones made each of them 50,000 wide (a 300,000-item one: 2.4 GB, the small ones 0.8 s
    late). It runs apart; the narrow ones still go together, and no merged batch holds more
    item slots than --max-sequence-items allows one request."""
    module = tf.Module()
    module.run = tf.function(
        lambda items: {"n": tf.reduce_sum(tf.cast(tf.not_equal(items, ""), tf.int32), axis=1)},
        input_signature=[tf.TensorSpec([None, None], tf.string, name="items")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    sig = server.Servable("ids", 1, str(tmp_path / "1")).signature("")
    held = _hold_first_call(sig, lambda arrays: arrays["items"].shape)
    calls = held[0]

    def ids(width, n):
        return {"items": np.array([[f"i{j}" for j in range(n)] + [""] * (width - n)],
                                  dtype=object)}

    def run(batcher, first, rest):
        futures = _queued_behind_the_first(batcher, sig, held, [first] + rest)
        return [int(f.result()["n"][0]) for f in futures]

    narrow = [ids(3, 1 + i % 3) for i in range(6)]
    outs = run(server.Batcher(max_batch_size=16, timeout_s=0.0, max_items=10**6),
               ids(3, 2), [ids(50_000, 7)] + narrow)
    assert outs == [2, 7] + [1 + i % 3 for i in range(6)]
    assert calls == [(1, 3), (1, 50_000), (6, 3)]
    # equal widths, but together more item slots than one request may hold: apart
    outs = run(server.Batcher(max_batch_size=16, timeout_s=0.0, max_items=100),
               ids(60, 1), [ids(60, 2), ids(60, 3)])
    assert outs == [1, 2, 3] and calls == [(1, 60)] * 3


def test_a_version_loaded_after_a_stop_signal_is_not_announced(tmp_path, capsys):
    """A SIGTERM during the first load: the log said "shutting down", then stdout said
    "serving m version 1 on ...", which a script waiting for that line believed."""
    s = server.ModelServer(NAME, str(tmp_path), port=0)
    try:
        s.stopping()
        s._on_ready(1)
        assert not s.ready.is_set() and capsys.readouterr().out == ""
    finally:
        s.stop(0)
    s = server.ModelServer(NAME, str(tmp_path), port=0)
    try:
        s._on_ready(1)
        assert s.ready.is_set() and capsys.readouterr().out.startswith(f"serving {NAME} version 1")
    finally:
        s.stop(0)


def test_undecodable_count_not_yet_said_is_said_at_shutdown(caplog):
    """The count of undecodable requests since the last (once a minute) line was lost when
    the server stopped; stop() says it."""
    quiet = server._UndecodableRequests()

    def record():
        return logging.LogRecord("grpc._common", logging.ERROR, __file__, 1,
                                 quiet.MESSAGE, (), None)

    assert quiet.filter(record())  # the first is said, the next two counted
    assert not quiet.filter(record()) and not quiet.filter(record())
    with caplog.at_level(logging.WARNING, logger="serving.server"):
        quiet.flush()
        quiet.flush()  # nothing more to say
    said = [r.getMessage() for r in caplog.records]
    assert said == ["2 more requests that are not a valid protobuf message of the method "
                    "called since the last such line"], said


@pytest.mark.parametrize("threads", [2, 4])
def test_grpc_max_threads_bounds_the_model_calls_running_at_once(tmp_path, monkeypatch,
                                                                 threads):
    """Without batching each call ran its model at once in one of 32 gRPC threads (32
    largest requests held 6 GB); --grpc-max-threads N (TF Serving's --grpc_max_threads)
    runs N at a time, and the others wait their turn and are answered."""
    vocab = lib.tiny_vocabulary()
    base = str(tmp_path / "models")
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base)
    running, most, lock = [0], [0], threading.Lock()
    real_run = server.Signature.run

    def slow_run(self, arrays):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.4)
            return real_run(self, arrays)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(server.Signature, "run", slow_run)
    s = server.ModelServer(NAME, base, port=0, grpc_max_threads=threads)
    try:
        s.start()
        assert s.ready.wait(60)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = request("next_items", INPUTS["next_items"])
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: stub.Predict(req, timeout=60), range(8)))
        channel.close()
    finally:
        s.stop(0)
    assert [a.model_spec.version.value for a in answers] == [1] * 8
    assert most[0] == threads
    with pytest.raises(SystemExit) as bad:
        server.cli.server_args(["--model-base-path", base, "--model-name", NAME,
                                "--grpc-max-threads", "0"])
    assert bad.value.code == 2


def test_ipv6_literal_hosts_are_bracketed(tmp_path, capsys):
    """`--host ::1` bound "::1:8500", which gRPC cannot parse, and the error blamed the
    port; an IPv6 literal goes in brackets (a bracketed one stays as it is), and a port in
    use on it is said as such."""
    assert server.host_port("::1", 8500) == "[::1]:8500"
    assert server.host_port("fe80::1", 0) == "[fe80::1]:0"
    assert server.host_port("[::1]", 8500) == "[::1]:8500"
    assert server.host_port("localhost", 8500) == "localhost:8500"
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    for host in ("::1", "[::1]"):
        s = server.ModelServer(NAME, str(tmp_path), host=host, port=0)
        try:
            assert s.port > 0
            s.start()
            channel = grpc.insecure_channel(f"[::1]:{s.port}")
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name = NAME
            with pytest.raises(grpc.RpcError) as err:  # no version yet: the server answers
                model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            channel.close()
        finally:
            s.stop(0)
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server.main(["--model-base-path", str(tmp_path), "--model-name", NAME,
                            "--host", "::1", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot bind [::1]:{port}") and err[-1].endswith(
        f"port {port} is in use: pick a free --port (0: any free one)"), err


def test_bad_base_paths_are_one_line_errors(tmp_path, capsys):
    version = tmp_path / "exports" / "1"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    saved = tmp_path / "saved"  # a SavedModel itself, not under a version number
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    run = tmp_path / "run"  # a model.train run folder
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    data = tmp_path / "data"  # the pipeline's output (it waited for a version forever)
    (data / "train").mkdir(parents=True)
    (data / "stats.json").write_text("{}")
    (data / "items.tsv").write_text("index\titem_id\tcount\n")
    for path, message in ((tmp_path / "missing", "is not a folder"),
                          (data, "is a pipeline output (session records): train a model on "
                                 "it (python -m model.train --data"),
                          (version, "is one version's folder: pass the folder that holds"),
                          (saved, "is a SavedModel itself: a base path holds numbered versions"),
                          (run, "is a model.train run folder: export it first")):
        assert server.main(["--model-base-path", str(path), "--model-name", NAME]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_port_taken_or_a_host_not_of_this_machine_names_the_option_to_change(tmp_path, capsys):
    """gRPC cannot bind either way; the one-line error says which option to change (it said
    'pick a free --port' for an address that is not this machine's)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, message in (("127.0.0.1", "pick a free --port"),
                              ("203.0.113.7", "--host 203.0.113.7 is not an address of this "
                                              "machine"),
                              ("no-such-host.invalid", "--host no-such-host.invalid does not "
                                                       "resolve")):
            assert server.main(["--model-base-path", str(tmp_path), "--model-name", NAME,
                                "--host", host, "--port", str(port)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("error: cannot bind") and message in err[-1], err


def test_the_command_says_a_port_in_use_in_its_one_line_only(tmp_path):
    """gRPC's core logged its own failure to bind (a line of C++ log) above the command's
    one-line error; the port is probed first now."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "serving.server", "--model-base-path",
                               str(tmp_path), "--model-name", NAME, "--host", "127.0.0.1",
                               "--port", str(port)], cwd=root, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2
    assert done.stderr == (f"error: cannot bind 127.0.0.1:{port}: port {port} is in use: pick "
                           "a free --port (0: any free one)\n"), done.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--port", "99999", "--port: must be from 0 to 65535, got 99999"),
    ("--max-message-mb", "2048", "--max-message-mb: must be from 1 to 2047, got 2048"),
    ("--port", "-5", "--port: must be from 0 to 65535, got -5"),
    ("--max-batch-size", "0", "--max-batch-size: must be >= 1, got 0"),
    ("--poll-seconds", "0", "--poll-seconds: must be from 0.01 to 86400.0, got 0"),
    ("--batch-timeout-micros", "x", "--batch-timeout-micros: 'x' is not an integer"),
    # (fuzzing audit: 1e30 was a traceback in the poller thread, which was gone for good;
    # 1e-300 a poll loop that spun; 10**30 rows, threads or micros started the server)
    ("--poll-seconds", "1e30", "--poll-seconds: must be from 0.01 to 86400.0, got 1e30"),
    ("--poll-seconds", "1e-300", "--poll-seconds: must be from 0.01 to 86400.0, got 1e-300"),
    ("--max-batch-size", str(10**30), f"--max-batch-size: must be <= 2147483647, got {10**30}"),
    ("--num-versions", str(2**31), f"--num-versions: must be <= 2147483647, got {2**31}"),
    ("--batch-timeout-micros", str(10**30), "--batch-timeout-micros: must be <= 3600000000"),
    # an empty name served a model no client could name
    ("--model-name", "", "--model-name: must be a non-empty name without spaces, got ''"),
    ("--model-name", "a b", "--model-name: must be a non-empty name without spaces")])
def test_bad_numbers_are_one_line_usage_errors(tmp_path, capsys, option, value, message):
    """gRPC takes a port number modulo 65536 or binds any free port for one it cannot use
    (-5 served on 65531): a bad number is refused before anything is loaded."""
    with pytest.raises(SystemExit) as exit_:
        server.main(["--model-base-path", str(tmp_path), "--model-name", NAME, option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [
    (["--max-batch-size", "8"], "--max-batch-size sets"),
    (["--batch-timeout-micros", "0", "--num-batch-threads", "2"],
     "--batch-timeout-micros and --num-batch-threads set")])
def test_batching_options_without_batching_are_refused(tmp_path, capsys, options, named):
    """They were taken and did nothing: a server started with --max-batch-size alone merged
    no requests, without a word."""
    with pytest.raises(SystemExit) as exit_:
        server.main(["--model-base-path", str(tmp_path), "--model-name", NAME, *options])
    assert exit_.value.code == 2
    assert f"{named} how requests are merged, which only --enable-batching does" \
        in capsys.readouterr().err
    from serving import cli
    args = cli.server_args(["--model-base-path", str(tmp_path), "--model-name", NAME,
                            "--enable-batching", "--max-batch-size", "8"])
    assert (args.max_batch_size, args.batch_timeout_micros, args.num_batch_threads) == (8, 0, 1)
    args = cli.server_args(["--model-base-path", str(tmp_path), "--model-name", NAME])
    assert (args.max_batch_size, args.batch_timeout_micros, args.num_batch_threads) == (64, 0, 1)


def _manager_outputs(manager, version=None):
    sig = manager.get(version).signature("next_items")
    return sig.run(sig.parse_inputs(request("next_items", INPUTS["next_items"]).inputs))


def _statuses(manager):
    state = get_model_status_pb2.ModelVersionStatus.State
    return [(s.version, state.Name(s.state), s.status.error_message)
            for s in reversed(manager.statuses(None))]  # (ascending: listed newest first)


def test_a_version_being_loaded_is_loading_in_the_status(tmp_path):
    """While a version loads, GetModelStatus lists it LOADING, as TF Serving does (it was
    NOT_FOUND 'Could not find any versions', which reads as a wrong model name to a
    readiness check); a newer version loading beside a served one is listed too."""
    vocab = lib.tiny_vocabulary()
    base = str(tmp_path / "base")
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base)
    manager = server.ModelManager(NAME, base, num_versions=2)
    seen, looked, done = [], threading.Event(), threading.Event()

    def watch():
        while True:
            last = done.is_set()  # (one more look once the polls are done)
            try:
                entries = tuple(s[:2] for s in _statuses(manager))
            except server.RequestError as e:
                entries = (e.code.name,)
            if not seen or seen[-1] != entries:
                seen.append(entries)
            looked.set()
            if last:
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    looked.wait(timeout=60)  # (the first look before the first poll, however busy the CPUs)
    try:
        manager.poll()
        export.export_model(lib.tiny_model(vocab, seed=2), vocab, base)
        manager.poll()
    finally:
        done.set()
        watcher.join()
    assert seen == [("NOT_FOUND",), ((1, "LOADING"),), ((1, "AVAILABLE"),),
                    ((1, "AVAILABLE"), (2, "LOADING")), ((1, "AVAILABLE"), (2, "AVAILABLE"))]


def test_requests_before_the_first_version_loads_are_unavailable(tmp_path):
    """Until its first version has loaded, the server answers a request UNAVAILABLE (which
    a client retries: TF Serving's port is not open yet then), not NOT_FOUND, which reads
    as a wrong model name; a broken only version says where to look. Once one serves, a
    version that is not loaded is NOT_FOUND, as before."""
    vocab = lib.tiny_vocabulary()
    base = tmp_path / "base"
    base.mkdir()
    manager = server.ModelManager(NAME, str(base), num_versions=1)
    for version in (None, 1):
        with pytest.raises(server.RequestError) as err:
            manager.get(version)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert str(err.value.message) == (f"model {NAME}: no version is loaded yet (waiting "
                                          f"for one under {base}); try again")
    (base / "1").mkdir()
    (base / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    manager.poll()
    with pytest.raises(server.RequestError, match=r"no version is loaded yet \(version 1 "
                       r"failed to load: GetModelStatus says why\)") as err:
        manager.get(None)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, str(base), version=2)
    manager.poll()
    assert manager.get(None) is manager.get(2)
    with pytest.raises(server.RequestError, match=r"Specific\(tiny, 1\)") as err:
        manager.get(1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_served_version_whose_folder_is_gone_is_logged_once(tmp_path, caplog):
    """The only served version's folder removed: it is still served from memory, as TF
    Serving does until another loads, and the log now says so once (serving audit: status
    stayed AVAILABLE without a word)."""
    vocab = lib.tiny_vocabulary()
    base = str(tmp_path / "base")
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base)
    manager = server.ModelManager(NAME, base)
    manager.poll()
    served = manager.get(1)
    shutil.rmtree(os.path.join(base, "1"))
    with caplog.at_level(logging.WARNING):
        manager.poll()
        manager.poll()
    said = [r.getMessage() for r in caplog.records if "folder gone" in r.getMessage()]
    assert said == [f"{NAME} version(s) 1: folder gone from {base}; still served from memory "
                    "until a version there loads"], caplog.records
    assert manager.get(None) is served


def test_a_version_changed_on_disk_is_loaded_again(tmp_path):
    """A version folder replaced (a new export base numbering from 1 again, a copy over the
    old files) is loaded again: the server never keeps answering with the files it first
    read. The vocabulary cut mid-line (a copy still under way) loads, as TF Serving would
    load it, and is replaced once the copy completes."""
    vocab = lib.tiny_vocabulary()
    base, other = str(tmp_path / "base"), str(tmp_path / "other")
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base)
    export.export_model(lib.tiny_model(vocab, seed=2), vocab, other)
    manager = server.ModelManager(NAME, base)
    manager.poll()
    assert_outputs_equal(_manager_outputs(manager), in_process(base, 1, "next_items",
                                                               INPUTS["next_items"]))
    manager.poll()  # unchanged: the same servable, nothing loaded again
    first = manager.get(1)
    manager.poll()
    assert manager.get(1) is first
    shutil.rmtree(os.path.join(base, "1"))
    shutil.copytree(os.path.join(other, "1"), os.path.join(base, "1"))
    manager.poll()
    assert manager.get(1) is not first
    assert_outputs_equal(_manager_outputs(manager), in_process(other, 1, "next_items",
                                                               INPUTS["next_items"]))
    # version 5: every file complete but the vocabulary, cut inside its last id
    shutil.copytree(os.path.join(other, "1"), os.path.join(base, "5"))
    ids_file = os.path.join(base, "5", "assets", "item_ids.txt")
    with open(ids_file) as f:
        whole = f.read()
    assert whole.rstrip("\n").endswith("item11")
    with open(ids_file, "w") as f:
        f.write(whole.rstrip("\n")[:-1])  # "item1" duplicates an id: fails to load
    manager.poll()
    (version, status, error), = [s for s in _statuses(manager) if s[0] == 5]
    assert status == "END" and "Graph execution error" not in error and len(error) > 20
    assert manager.get(None).version == 1
    inputs = dict(INPUTS["next_items"], k=np.int32(len(vocab.ids)))

    def served_ids():
        sig = manager.get(5).signature("next_items")
        got = sig.run(sig.parse_inputs(request("next_items", inputs).inputs))
        return {i.decode() for i in got["item_ids"].ravel()}

    with open(ids_file, "w") as f:  # cut to "item": a unique id, so it loads
        f.write(whole.rstrip("\n")[:-2])
    manager.poll()  # version 1, unloaded, stays listed as END (as TF Serving lists it)
    assert [s for s in _statuses(manager)] == [(1, "END", ""), (5, "AVAILABLE", "")]
    assert "item" in served_ids() and "item11" not in served_ids()
    with open(ids_file, "w") as f:  # the copy completes
        f.write(whole)
    manager.poll()
    assert [s[:2] for s in _statuses(manager)] == [(1, "END"), (5, "AVAILABLE")]
    assert "item11" in served_ids() and "item" not in served_ids()
    # a failed version's folder removed: no longer reported
    broken = os.path.join(base, "6")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"not a saved model")
    manager.poll()
    assert [s[:2] for s in _statuses(manager)] == [(1, "END"), (5, "AVAILABLE"), (6, "END")]
    shutil.rmtree(broken)
    manager.poll()
    assert [s[:2] for s in _statuses(manager)] == [(1, "END"), (5, "AVAILABLE")]


def test_version_folders_with_leading_zeros(tmp_path):
    """`007` is version 7, as TF Serving reads folder names; it loads from its own folder."""
    vocab = lib.tiny_vocabulary()
    base = str(tmp_path / "base")
    export.export_model(lib.tiny_model(vocab, seed=1), vocab, base, version=7)
    os.rename(os.path.join(base, "7"), os.path.join(base, "007"))
    assert server.list_versions(base) == [7]
    both = tmp_path / "both"  # `7` wins over `007`, whichever is listed first
    for name in ("007", "7", "0007"):
        (both / name).mkdir(parents=True)
        (both / name / "saved_model.pb").write_bytes(b"")
    assert server.version_folders(str(both)) == {7: "7"}
    manager = server.ModelManager(NAME, base)
    manager.poll()
    assert [s[:2] for s in _statuses(manager)] == [(7, "AVAILABLE")]
    assert_outputs_equal(_manager_outputs(manager, 7),
                         in_process(base, "007", "next_items", INPUTS["next_items"]))


def test_a_version_folder_this_process_may_not_read_is_a_version_that_fails_to_load(tmp_path):
    """Another user's export made with umask 077 was ignored without a word (the old
    version served on, "AVAILABLE"): it is a version whose load fails, its status END with
    the error, as TF Serving reports it (unprivileged-user audit)."""
    import shutil
    import tempfile

    vocab = lib.tiny_vocabulary()
    base = tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp")
    try:
        os.chmod(base, 0o755)
        export.export_model(lib.tiny_model(vocab, seed=1), vocab, base, version=1)
        export.export_model(lib.tiny_model(vocab, seed=2), vocab, base, version=2)
        os.chmod(os.path.join(base, "2"), 0o700 if os.geteuid() == 0 else 0o000)
        if os.geteuid() == 0:  # root may read anything: be someone else for the check
            os.seteuid(65534)
        try:
            assert server.list_versions(base) == [1, 2]
            manager = server.ModelManager(NAME, base, num_versions=2)
            manager.poll()
            statuses = {s[0]: s for s in _statuses(manager)}
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert statuses[1][1] == "AVAILABLE" and statuses[2][1] == "END", statuses
        assert "Permission denied" in str(statuses[2]), statuses
    finally:
        os.chmod(os.path.join(base, "2"), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_version_that_failed_to_load_is_tried_again_on_a_timer(tmp_path):
    """TF Serving tries a failed load again (--max_num_load_retries, 5 by default, a minute
    apart); a version failed here stayed failed until its files changed, so a permission
    fixed with chmod (no file's size or mtime changes) was never loaded. Its status carries
    the error's own code, PERMISSION_DENIED, where it said UNKNOWN."""
    import contextlib
    import shutil
    import tempfile

    vocab = lib.tiny_vocabulary()
    base = tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp")
    folder = os.path.join(base, "1")

    @contextlib.contextmanager
    def unprivileged():  # root may read anything: be someone else while polling
        if os.getuid() == 0:
            os.seteuid(65534)
        try:
            yield
        finally:
            if os.getuid() == 0:
                os.seteuid(0)

    def lock(locked):  # the file, not the folder: a folder that cannot be listed changes
        # its listed files when it opens again, which loads it at once
        os.chmod(os.path.join(folder, "saved_model.pb"),
                 (0o600 if os.geteuid() == 0 else 0o000) if locked else 0o644)

    def poll_at(manager, when):
        now[0] = when
        with unprivileged():
            manager.poll()
        (status,) = manager.statuses(None)
        return get_model_status_pb2.ModelVersionStatus.State.Name(status.state), status.status

    try:
        os.chmod(base, 0o755)
        export.export_model(lib.tiny_model(vocab, seed=1), vocab, base, version=1)
        lock(True)
        now = [0.0]
        manager = server.ModelManager(NAME, base, max_load_retries=2, load_retry_interval_s=60,
                                      clock=lambda: now[0])
        state, status = poll_at(manager, 0)
        assert state == "END" and status.error_code == 7, status  # PERMISSION_DENIED
        assert "Permission denied" in status.error_message
        assert poll_at(manager, 59)[0] == "END"
        assert poll_at(manager, 60)[0] == "END"  # retry 1 of 2 fails: still locked
        lock(False)
        assert poll_at(manager, 119)[0] == "END"  # not before the interval
        state, status = poll_at(manager, 120)  # retry 2 of 2: loads
        assert state == "AVAILABLE" and status.error_code == 0, status
        assert_outputs_equal(_manager_outputs(manager),
                             in_process(base, 1, "next_items", INPUTS["next_items"]))

        # the retries spent: left until its files change
        shutil.rmtree(folder)
        export.export_model(lib.tiny_model(vocab, seed=2), vocab, base, version=2)
        folder = os.path.join(base, "2")
        lock(True)
        manager = server.ModelManager(NAME, base, max_load_retries=1, load_retry_interval_s=60,
                                      clock=lambda: now[0])
        assert poll_at(manager, 0)[0] == "END"
        assert poll_at(manager, 60)[0] == "END"  # the one retry fails
        lock(False)
        state, status = poll_at(manager, 10_000)
        assert state == "END" and "Permission denied" in status.error_message
        os.utime(os.path.join(folder, "saved_model.pb"))  # its files change: loaded at once
        assert poll_at(manager, 10_001)[0] == "AVAILABLE"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_waiting_line_says_why_a_base_path_shows_no_version(tmp_path):
    """A base path this process may not list (another user's, umask 077) showed "no version
    yet" and waited without a word on why; a missing one says it does not exist yet
    (unprivileged-user audit, left alone before)."""
    import tempfile

    assert server._unlisted(str(tmp_path)) == ""
    assert "does not exist yet" in server._unlisted(str(tmp_path / "missing"))
    base = tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp")
    try:
        os.chmod(base, 0o700 if os.geteuid() == 0 else 0o000)
        if os.geteuid() == 0:  # root may list anything: be someone else for the check
            os.seteuid(65534)
        try:
            reason = server._unlisted(base)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert "cannot list it: Permission denied" in reason, reason
    finally:
        os.chmod(base, 0o755)
        os.rmdir(base)


def test_a_version_number_beyond_int64_is_no_version(tmp_path):
    """TF Serving reads version folder names as int64 and skips a larger number; served,
    it answered INTERNAL to every call (it does not fit the replies' model_spec.version),
    and the export wrote it."""
    vocab = lib.tiny_vocabulary()
    model = lib.tiny_model(vocab, seed=1)
    base = str(tmp_path / "base")
    export.export_model(model, vocab, base, version=7)
    huge = str(2 ** 64)
    shutil.copytree(os.path.join(base, "7"), os.path.join(base, huge))
    assert server.list_versions(base) == [7]
    assert export.next_version(base) == 8
    manager = server.ModelManager(NAME, base)
    manager.poll()
    assert [s[:2] for s in _statuses(manager)] == [(7, "AVAILABLE")]
    for version in (2 ** 63, 2 ** 64):
        with pytest.raises(export.ExportError, match="int64"):
            export.export_model(model, vocab, base, version=version)
    assert sorted(os.listdir(base)) == sorted(["7", huge])  # nothing written


def test_a_server_waiting_for_its_first_version_says_where_it_listens(tmp_path):
    """With `--port 0` and no version yet, the waiting line names the bound port (it only
    appeared once a version loaded), and that port answers: NOT_FOUND until a version."""
    import re

    base = tmp_path / "models"
    base.mkdir()
    proc = lib.ServerProcess(str(base), NAME)
    try:
        deadline, match = time.monotonic() + 120, None
        while match is None and time.monotonic() < deadline and proc.proc.poll() is None:
            match = next((m for m in map(re.compile(
                r"no version under .* yet; waiting for one \(listening on ([\d.]+:\d+)\)$").search,
                list(proc.lines)) if m), None)
            time.sleep(0.05)
        assert match, proc.lines
        with grpc.insecure_channel(match.group(1)) as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name = NAME
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelStatus(req, timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert proc.stop() == 0



def test_classify_regress_and_multi_inference_answer_as_tf_serving_does(served):
    """TF Serving answers these APIs on Predict signatures after the ModelSpec's checks:
    INVALID_ARGUMENT (its default check wants one input tensor of Examples), NOT_FOUND
    for another model, INVALID_ARGUMENT for a missing spec or signature, UNIMPLEMENTED for
    a MultiInference task of another method; none logs a traceback."""
    from tensorflow_serving.apis import classification_pb2, inference_pb2, regression_pb2

    stub = served["predict"]

    def code_of(method, message):
        with pytest.raises(grpc.RpcError) as err:
            method(message, timeout=30)
        return err.value.code(), err.value.details()

    def task(method_name, name=NAME, signature=""):
        t = inference_pb2.InferenceTask(method_name=method_name)
        t.model_spec.name, t.model_spec.signature_name = name, signature
        return t

    for method, kind in ((stub.Classify, classification_pb2.ClassificationRequest),
                         (stub.Regress, regression_pb2.RegressionRequest)):
        assert code_of(method, kind()) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        req = kind()
        req.model_spec.name = "other"
        assert code_of(method, req) == (grpc.StatusCode.NOT_FOUND,
                                        "Servable not found for request: Latest(other)")
        req.model_spec.name, req.model_spec.signature_name = NAME, "nope"
        assert code_of(method, req) == (grpc.StatusCode.INVALID_ARGUMENT,
                                        "No signature was found with the name: nope")
        req.model_spec.signature_name = ""  # serving_default: next_items, four inputs
        code, details = code_of(method, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("Expected one input Tensor.") and "4 inputs" in details
        req.model_spec.signature_name = "update_state"
        assert "'update_state' is a Predict signature (tensorflow/serving/predict) with 2 " \
            "inputs" in code_of(method, req)[1]
    multi = inference_pb2.MultiInferenceRequest
    assert code_of(stub.MultiInference, multi()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                     "Expected at least one task")
    assert code_of(stub.MultiInference, multi(tasks=[task(server.CLASSIFY_METHOD, "other")]))[0] \
        == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.MultiInference, multi(tasks=[task(server.REGRESS_METHOD,
                                                          signature="nope")])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "Requested signature not found in model graph: nope")
    assert code_of(stub.MultiInference, multi(tasks=[task("tensorflow/serving/predict")])) == (
        grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: "
        "tensorflow/serving/predict")
    code, details = code_of(stub.MultiInference, multi(tasks=[task(server.CLASSIFY_METHOD)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a classification one" in details
    time.sleep(0.5)  # (the server's log lines arrive through a pipe)
    assert not [line for line in served["server"].lines
                if "Traceback" in line or "Exception calling application" in line]


def test_log_lines_are_stamped_in_utc_with_a_z():
    """They were the machine's local time without a zone (time audit)."""
    import io
    import logging

    handler = server._utc_log_handler()
    handler.stream = io.StringIO()
    record = logging.LogRecord("serving.server", logging.INFO, __file__, 1, "ready", None, None)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    handler.emit(record)
    assert handler.stream.getvalue() == "2023-11-14T22:13:20.250Z serving.server INFO ready\n"
