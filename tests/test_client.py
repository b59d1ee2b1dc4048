"""serving.client against a real server process: calls, version pinning, errors, CLI."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import serving_testlib as lib
import tensorflow as tf

from serving import client as client_lib
from serving import export, state_store
from serving.client import HierTCNClient, InvalidRequest, ModelNotFound, ServerUnavailable

NAME = "tiny"


@contextlib.contextmanager
def _serving(base):
    """Versions 1 and 2 of the tiny model exported to `base`, served by a server process."""
    vocab = lib.tiny_vocabulary()
    for version in (1, 2):
        export.export_model(lib.tiny_model(vocab, seed=version), vocab, base)
    server = lib.ServerProcess(base, NAME, "--num-versions", "2", "--enable-batching",
                               "--num-batch-threads", "2")
    try:
        server.wait_version(2)
        yield {"server": server, "base": base, "vocab": vocab}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Shared by the tests that leave the versions as they are (1 and 2)."""
    with _serving(str(tmp_path_factory.mktemp("models"))) as s:
        yield s


@pytest.fixture
def client(served):
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c:
        yield c


def in_process(base, version, signature, **inputs):
    fn = tf.saved_model.load(os.path.join(base, str(version))).signatures[signature]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def test_status_metadata_and_pinning(client, served):
    assert client.status() == [{"version": 1, "state": "AVAILABLE", "error": ""},
                               {"version": 2, "state": "AVAILABLE", "error": ""}]
    assert client.metadata().version == 2 and client.state_size() == 8
    assert client.pinned_version is None
    assert client.pin() == 2 and client.pinned_version == 2
    assert client.pin(1) == 1
    for bad in (2 ** 63, -1):  # not a version TF Serving can hold: said before any call,
        with pytest.raises(ValueError, match=f"from 0 to {2 ** 63 - 1} .* got {bad}"):
            client.pin(bad)
    assert client.pinned_version == 1  # and the pin stays
    with pytest.raises(ModelNotFound):  # a version not served: the pin stays too
        client.pin(77)
    assert client.pinned_version == 1
    assert client.predict("user_embedding", {
        "user_state": client.zero_states(1), "session_items": np.array([["item3"]], dtype=object),
        "history_items": np.array([[""]], dtype=object)})[1] == 1
    with HierTCNClient(client.target, NAME, timeout=30) as other:  # pin(): the latest
        assert other.pin(1) == 1 and other.pin() == 2 and other.pinned_version == 2
    states = client.zero_states(1)
    ids, scores = client.next_items(states, [["item3"]], k=4)
    want = in_process(served["base"], 1, "next_items", user_state=states,
                      session_items=np.array([["item3"]], dtype=object),
                      history_items=np.array([[""]], dtype=object), k=np.int32(4))
    assert ids == [[i.decode() for i in want["item_ids"][0]]]
    np.testing.assert_allclose(scores, want["scores"], rtol=1e-5)
    _, version = client.predict("user_embedding", {
        "user_state": states, "session_items": np.array([["item3"]], dtype=object),
        "history_items": np.array([[""]], dtype=object)})
    assert version == 1  # pinned: every call of this user runs on version 1


def test_an_answer_batched_with_a_larger_k_is_cut_back_to_its_own(client, monkeypatch):
    """TF Serving's batching answers each row with the batch's largest k (it cannot run
    here: the request is widened as it would be); the client returns its own k, the
    best ones."""
    states = client.zero_states(1)
    want_ids, want_scores = client.next_items(states, [["item3"]], k=3)
    real = client.predict

    def batched(signature, inputs, version=None):
        return real(signature, dict(inputs, k=np.full_like(inputs["k"], 9)), version)

    monkeypatch.setattr(client, "predict", batched)
    ids, scores = client.next_items(states, [["item3"]], k=3)
    assert ids == want_ids and len(ids[0]) == 3 and scores.shape == (1, 3)
    np.testing.assert_array_equal(scores, want_scores)


def test_ragged_batches_equal_one_user_at_a_time(client):
    client.pin(2)
    states = np.random.default_rng(0).normal(size=[3, 8]).astype(np.float32)
    sessions = [["item1", "item2", "item3"], [], ["nope", "item7"]]
    history = [["item9"], [], ["item1", "item2"]]
    ids, scores = client.next_items(states, sessions, k=3, history=history)
    updated = client.update_state(states, sessions)
    emb = client.user_embedding(states, sessions, history)
    assert emb.shape == (3, 8) and updated.shape == (3, 8) and scores.shape == (3, 3)
    np.testing.assert_array_equal(updated[1], states[1])  # empty session: state unchanged
    for i in range(3):
        one_ids, one_scores = client.next_items(states[i:i + 1], [sessions[i]], k=3,
                                                history=[history[i]])
        assert one_ids[0] == ids[i]
        np.testing.assert_allclose(one_scores[0], scores[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(client.update_state(states[i:i + 1], [sessions[i]])[0],
                                   updated[i], rtol=1e-5, atol=1e-6)


def test_pad_rows():
    assert client_lib.pad_rows([["a", "b"], []]).tolist() == [["a", "b"], ["", ""]]
    assert client_lib.pad_rows([[], []]).tolist() == [[""], [""]]
    assert client_lib.pad_rows([["a", "b", "c"]], 2).tolist() == [["a", "b", "c", ""]]
    # a string for a row would be read as its characters, an int id as an unknown item
    with pytest.raises(TypeError, match=r"row 0 is the string '190', not a list of item ids"):
        client_lib.pad_rows(["190"])
    with pytest.raises(TypeError, match=r"row 1 holds the int 190: item ids are strings"):
        client_lib.pad_rows([["a"], ["b", 190]])
    assert client_lib.pad_rows([np.array(["a", "b"])]).tolist() == [["a", "b"]]  # numpy str


def test_fixed_widths_for_tf_serving_batching_are_exact(client, served):
    """A session longer than the fixed width goes out whole, a multiple of it wide: the
    same scores."""
    client.pin(2)
    with HierTCNClient(served["server"].target, NAME, timeout=30, session_width=4,
                       history_width=3) as fixed:
        fixed.pin(2)
        state = np.random.default_rng(3).normal(size=[1, 8]).astype(np.float32)
        session = [f"item{i}" for i in (3, 1, 4, 1, 5, 9, 2, 6)]
        ids, scores = fixed.next_items(state, [session], k=5, history=[["item1"]])
        want_ids, want_scores = client.next_items(state, [session], k=5, history=[["item1"]])
        assert ids == want_ids
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fixed.update_state(state, [session]),
                                   client.update_state(state, [session]), rtol=1e-5, atol=1e-6)
        # what goes out: TF Serving's batching needs a batch dimension on k, and pads a
        # narrower update_state request with its first value, which must be the pad id
        sent = []
        real = fixed.predict
        fixed.predict = lambda sig, inputs, version=None: (sent.append((sig, inputs)),
                                                           real(sig, inputs, version))[1]
        fixed.update_state(np.repeat(state, 2, 0), [session, session[:2]])
        fixed.next_items(np.repeat(state, 2, 0), [session, []], k=5)
        (_, update), (_, scoring) = sent
        assert update["session_items"].shape == (2, 12)  # "" + 8 items: a multiple of 4
        assert update["session_items"][:, 0].tolist() == ["", ""]
        assert scoring["k"].dtype == np.int32 and scoring["k"].tolist() == [5, 5]
        assert scoring["session_items"].shape == (2, 12)
        assert scoring["session_items"][:, 0].tolist() == ["", ""]
        assert scoring["history_items"].shape == (2, 3)
        # refused before any call: a second history row was dropped by the fixed width's
        # zip (the scores of one row's call), and a float k failed after the call (API audit)
        sent.clear()
        with pytest.raises(client_lib.InvalidRequest,
                           match="1 sessions but 2 histories: one of each per user"):
            fixed.next_items(state, [session], k=5, history=[["item1"], ["item2"]])
        with pytest.raises(TypeError, match="k must be an int, got the float 2.7"):
            fixed.next_items(state, [session], k=2.7)
        with pytest.raises(client_lib.InvalidRequest, match="^k must be >= 0, got -1$"):
            fixed.next_items(state, [session], k=-1)
        assert sent == []


def _repeat_head_export(vocab, history_size, folder):
    """A tiny HierTCN with the repeat head (its history weighing in the ranking), exported
    to `folder` and loaded: (model, signatures)."""
    from model import registry

    tf.keras.utils.set_random_seed(0)
    model = registry.build_model("hiertcn", lib.TINY.replace(
        {"repeat_head": True, "history_size": history_size, "start_items": 0}), vocab.size)
    model.repeat_head.gate_bias.assign(1.0)
    model.repeat_head.set_seen_bias(-0.5)
    return model, tf.saved_model.load(export.export_model(model, vocab, str(folder))).signatures


def test_fixed_widths_are_exact_for_the_repeat_head_too(tmp_path):
    """With a repeat head, which reads history + session, the fixed-width request scores as
    the ragged one, a history with unknown ids longer than the width too (cut to its newest
    ids, they pushed known ones out; parity audit)."""
    vocab = lib.tiny_vocabulary()
    model, signatures = _repeat_head_export(vocab, 6, tmp_path)
    fn = signatures["next_items"]
    state = np.random.default_rng(3).normal(size=[3, model.state_size]).astype(np.float32)
    # (a repeat across the fixed width: collapsed, as the export collapses the ragged session)
    # (row 1: padding between the copies, which the export skips too)
    sessions = [[f"item{i}" for i in (3, 1, 4, 4, 1, 5, 9, 2, 6)],
                ["item7", "item1", "", "item1", "item2", "item6"], ["item3"]]
    # (row 2: the 6 newest known items with 3 unknown ones among them, as a store keeps them)
    history = [["item0", "item8"], ["item2"],
               ["item5", "item0", "new1", "item8", "new2", "item7", "new3", "item9", "item4"]]
    outputs = []
    for widths in ({}, {"session_width": 4, "history_width": 6}):
        with HierTCNClient("127.0.0.1:1", NAME, **widths) as c:  # no call goes out
            inputs = c._scoring_inputs(state, sessions, history)
        outputs.append(fn(**{k: tf.constant(v) for k, v in inputs.items()}, k=tf.constant(5)))
    assert inputs["session_items"].shape == (3, 12) and inputs["history_items"].shape == (3, 12)
    np.testing.assert_array_equal(outputs[1]["item_ids"], outputs[0]["item_ids"])
    np.testing.assert_allclose(outputs[1]["scores"], outputs[0]["scores"], atol=1e-5)
    # cut to its newest 6 ids, row 2's history would lose item0 from the head's 5 it reads
    with HierTCNClient("127.0.0.1:1", NAME) as c:
        cut = c._scoring_inputs(state, sessions, [*history[:2], history[2][-6:]])
    scores = fn(**{k: tf.constant(v) for k, v in cut.items()}, k=tf.constant(5))["scores"]
    assert np.abs(scores.numpy()[2] - outputs[0]["scores"].numpy()[2]).max() > 1e-3


def test_fixed_widths_refuse_a_string_row_and_pad_both_inputs_first():
    """A string for a row is refused with a fixed width too (the "" put first made it a
    list of its characters; review), and with one width alone both inputs start with the
    pad id, which TF Serving's batching pads a narrower request with."""
    state = np.zeros([1, 8], np.float32)
    for widths in ({"history_width": 3}, {"session_width": 3}):
        with HierTCNClient("127.0.0.1:1", NAME, **widths) as c:  # no call goes out
            with pytest.raises(TypeError, match="row 0 is the string '190', not a list"):
                c._scoring_inputs(state, [["a"]], ["190"])
            with pytest.raises(TypeError, match="row 0 is the string 'ab', not a list"):
                c._scoring_inputs(state, ["ab"], [["a"]])
            inputs = c._scoring_inputs(state, [["a", "b"]], [["c"]])
        assert inputs["session_items"][0, 0] == "" and inputs["history_items"][0, 0] == ""


@pytest.mark.parametrize("name,config", [
    ("gru4rec", {"embedding_dim": 8, "units": 8}),
    ("hrnn", {"embedding_dim": 8, "session_units": 8, "user_units": 4}),
    ("tcn", {"embedding_dim": 8, "channels": (8, 8), "kernel_size": 2}),
])
def test_fixed_widths_are_exact_for_the_models_that_read_the_whole_session(name, config,
                                                                           tmp_path):
    """A GRU's state and the flat TCN read every item of the session: cut to the newest
    `session_width` items, their scores were other ones (GRU4Rec on ML-100K, --session-width
    16: 5,599 of 8,824 ranks moved; parity audit)."""
    from model import registry

    vocab = lib.tiny_vocabulary()
    tf.keras.utils.set_random_seed(0)
    model = registry.build_model(name, registry.config_classes()[name]().replace(config),
                                 vocab.size)
    fn = tf.saved_model.load(export.export_model(model, vocab, str(tmp_path))).signatures[
        "next_items"]
    state = np.random.default_rng(3).normal(size=[2, model.state_size]).astype(np.float32)
    sessions = [[f"item{i}" for i in (3, 1, 4, 1, 5, 9, 2, 6, 7)], ["item7"]]
    outputs = []
    for widths in ({}, {"session_width": 4, "history_width": 2}):
        with HierTCNClient("127.0.0.1:1", NAME, **widths) as c:  # no call goes out
            inputs = c._scoring_inputs(state, sessions, None)
        outputs.append(fn(**{k: tf.constant(v) for k, v in inputs.items()}, k=tf.constant(5)))
    assert inputs["session_items"].shape == (2, 12)
    np.testing.assert_array_equal(outputs[1]["item_ids"], outputs[0]["item_ids"])
    np.testing.assert_allclose(outputs[1]["scores"], outputs[0]["scores"], atol=1e-5)


def test_known_ids_over_grpc_keep_the_stored_history_the_newest_known_items(client, tmp_path):
    """`known_items` through the server, and what it is for: items newer than the model
    (unknown ids) do not push the known ones a repeat head reads out of the store."""
    from serving import state_store

    client.pin(2)
    assert client.known_ids(["item0", "nope", "item3", "", "[UNK]", "item0"]) == {"item0",
                                                                                   "item3"}
    assert client.known_ids([]) == set()
    update = lambda state, session: client.update_state(state[None], [session])[0]  # noqa: E731
    with state_store.SQLiteStateStore(str(tmp_path / "s.sqlite"), history_items=3) as store:
        for session in (["item1", "item2"], ["item3", "new1", "new2"], ["new3", "new4"]):
            _, record = state_store.end_session(store, "u", 2, client.state_size(), update,
                                                session, known_items=client.known_ids)
    assert record.history == ["item1", "item2", "item3", "new1", "new2", "new3", "new4"]


def test_the_stored_history_scores_as_the_whole_history_where_unknown_ids_come_between(tmp_path):
    """The repeat head reads the newest `history_size` known items: the history the store
    keeps with the model's known ids scores as the user's whole history does; cut to the
    newest ids alone it would not."""
    from serving import state_store

    vocab = lib.tiny_vocabulary()
    model, signatures = _repeat_head_export(vocab, 4, tmp_path)
    sessions = [["item0", "item1", "item2"], ["item3", "new1", "new2"], ["item4", "new3"],
                ["new4", "new5"]]
    flat = [i for s in sessions for i in s]
    known = signatures["known_items"](items=tf.constant([flat]))["known"].numpy()[0]
    known = {i for i, k in zip(flat, known) if k}
    assert known == {f"item{i}" for i in range(5)}
    state = np.random.default_rng(3).normal(size=[1, model.state_size]).astype(np.float32)

    def scores(history):
        history = [i for s in history for i in s]
        return signatures["next_items"](user_state=tf.constant(state),
                                        session_items=tf.constant([["item5"]]),
                                        history_items=tf.constant([history]),
                                        k=tf.constant(len(vocab.ids) - 2))["scores"].numpy()

    whole = scores(sessions)
    np.testing.assert_allclose(scores(state_store.trim_sessions(sessions, 4, known)), whole,
                               rtol=1e-6, atol=1e-6)
    assert np.abs(scores(state_store.trim_sessions(sessions, 4)) - whole).max() > 1e-3


def test_a_model_that_is_not_a_hiertcn_export_is_said_in_one_line(tmp_path):
    """A wrong --model-name on a server with other models, or an export of something else:
    InvalidRequest naming what the model has, not a KeyError."""
    module = tf.Module()
    module.run = tf.function(lambda x: {"y": x * 2.0},
                             input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.run})
    server = lib.ServerProcess(str(tmp_path), "other")
    try:
        server.wait_version(1)
        with HierTCNClient(server.target, "other", timeout=30) as c:
            with pytest.raises(InvalidRequest, match="'other' version 1 at .* is not a HierTCN "
                                                     "export \\(signatures serving_default;"):
                c.next_items(np.zeros([1, 8], np.float32), [["item1"]], k=3)
    finally:
        server.stop()


def test_k_larger_than_catalogue_clamps(client, served):
    ids, _ = client.next_items(client.zero_states(1), [[]], k=1000)
    assert sorted(ids[0]) == sorted(served["vocab"].ids[2:])


def test_next_items_leaves_out_each_rows_excluded_ids(client, served):
    """`exclude`: each row's ids are dropped from the model's own ranking, which still
    answers k items (the server asked for k plus the longest list); ids it does not know
    drop nothing; past the catalogue every row is cut to the fewest a row keeps."""
    size = served["vocab"].size - 2
    states, sessions, history = client.zero_states(2), [["item1", "item2"], []], [[], ["item3"]]
    full, full_scores = client.next_items(states, sessions, k=size, history=history)
    exclude = [full[0][:3] + ["no-such-id"], (" " + full[1][1] + " ",)]  # (a tuple; spaces)
    ids, scores = client.next_items(states, sessions, k=4, history=history, exclude=exclude)
    for r, gone in enumerate(({*full[0][:3]}, {full[1][1]})):
        want = [j for j, i in enumerate(full[r]) if i not in gone][:4]
        assert ids[r] == [full[r][j] for j in want], (r, ids[r])
        np.testing.assert_array_equal(scores[r], full_scores[r, want])
    ids, scores = client.next_items(states, sessions, k=size, history=history, exclude=exclude)
    assert [len(row) for row in ids] == [size - 3] * 2 and scores.shape == (2, size - 3)
    assert client.next_items(states, sessions, k=3, history=history,
                             exclude=[[], []])[0] == [row[:3] for row in full]
    for bad, given in ((["item1"], "1"), ("item1", "a string")):
        with pytest.raises(InvalidRequest, match=f"^2 sessions but {given} exclude lists: "):
            client.next_items(states, sessions, k=3, history=history, exclude=bad)
    with pytest.raises(InvalidRequest, match="^exclude's row 1 is the string 'item2': "):
        client.next_items(states, sessions, k=3, history=history, exclude=[["item1"], "item2"])


def test_errors_are_mapped(client, served):
    with pytest.raises(ModelNotFound, match="Specific"):
        client.metadata(9)
    with HierTCNClient(served["server"].target, "nope", timeout=30) as other:
        with pytest.raises(ModelNotFound, match="nope"):
            other.status()
    with pytest.raises(InvalidRequest, match="user_state"):
        client.update_state(np.zeros([1, 5], np.float32), [["item1"]])
    with socket.socket() as s:  # a port nobody listens on (held, not listening, meanwhile)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with HierTCNClient(f"127.0.0.1:{port}", NAME, timeout=2) as dead:
            with pytest.raises(ServerUnavailable, match="UNAVAILABLE|DEADLINE"):
                dead.status()


def test_a_call_the_server_cancels_is_server_unavailable():
    """A call that a stopping server cancels (CANCELLED, seen for a request that arrived
    as the server shut down) is `ServerUnavailable`, which callers retry, not a bare
    `ServingError` outside the documented three."""
    import concurrent.futures

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Stopping(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            context.abort(grpc.StatusCode.CANCELLED, "shutting down")

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Stopping(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with HierTCNClient(f"127.0.0.1:{port}", NAME, timeout=30) as client:
            with pytest.raises(ServerUnavailable, match="CANCELLED: shutting down"):
                client.update_state(np.zeros([1, 4], np.float32), [["item1"]], version=1)
    finally:
        server.stop(0)


def cli(served, db, *args):
    return ["--target", served["server"].target, "--model-name", NAME, "--state-db", str(db),
            "--json", *args]


def run_cli(capsys, served, db, *args):
    assert client_lib.main(cli(served, db, *args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_carries_state_and_rebuilds_it_for_a_new_version(capsys, tmp_path):
    with _serving(str(tmp_path / "models")) as served:  # its own: it exports a version 3
        _cli_carries_state_and_rebuilds_it(capsys, served, tmp_path / "states.sqlite")


def _cli_carries_state_and_rebuilds_it(capsys, served, db):
    first = run_cli(capsys, served, db, "recommend", "--user", "ann", "--items", "item1,item2",
                    "-k", "3")
    assert first["state"] == "new" and first["version"] == 2 and len(first["items"]) == 3
    ended = run_cli(capsys, served, db, "end-session", "--user", "ann", "--items",
                    "item1,item2,item5")
    assert ended["history"] == ["item1", "item2", "item5"]
    second = run_cli(capsys, served, db, "recommend", "--user", "ann", "-k", "3")
    assert second["state"] == "stored"
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c:
        c.pin(2)
        state = c.update_state(c.zero_states(1), [["item1", "item2", "item5"]])
        ids, _ = c.next_items(state, [[]], k=3, history=[["item1", "item2", "item5"]])
    assert [e["item"] for e in second["items"]] == ids[0]

    # a version unloaded after the CLI pinned it (v3 arrives, v1 goes: --num-versions 2)
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c, \
            state_store.SQLiteStateStore(str(db)) as store:
        c.pin(1)
        export.export_model(lib.tiny_model(served["vocab"], seed=3), served["vocab"],
                            served["base"])
        served["server"].wait_version(3)
        args = argparse.Namespace(user="eve", items="item1,item2", items_json=None)
        with pytest.raises(ModelNotFound, match=r"Specific\(tiny, 1\)"):
            client_lib._end_session(c, store, args)
        assert store.latest("eve") is None  # (nothing stored by the failed call)
        result, _ = client_lib._on_latest(c, lambda: client_lib._end_session(c, store, args))
        assert result["version"] == c.pinned_version == 3 and store.latest("eve").version == 3
    third = run_cli(capsys, served, db, "recommend", "--user", "ann", "-k", "3")
    assert third["version"] == 3 and third["state"] == "rebuilt"
    assert run_cli(capsys, served, db, "status")["versions"][-1]["version"] == 3
    # an id with a comma in it goes as one id with --items-json
    ended = run_cli(capsys, served, db, "end-session", "--user", "bob", "--items-json",
                    '["item1", "x,y"]')
    assert ended["history"] == ["item1", "x,y"]
    # and from a file, for a session longer than a command line holds (128 KB an argument)
    long_session = db.parent / "session.json"
    long_session.write_text(json.dumps([f"item{k % 12}" for k in range(30_000)]))
    ended = run_cli(capsys, served, db, "end-session", "--user", "cat", "--items-json",
                    f"@{long_session}")
    assert ended["history"][-3:] == ["item9", "item10", "item11"]
    # a file with a byte-order mark (PowerShell's utf8), and standard input
    long_session.write_text('["item3", "item4"]', encoding="utf-8-sig")
    ended = run_cli(capsys, served, db, "end-session", "--user", "dan", "--items-json",
                    f"@{long_session}")
    assert ended["history"] == ["item3", "item4"]


def test_cli_reads_ids_as_the_pipeline_does(capsys, served, tmp_path):
    """The pipeline strips ids' ends, so ' eve ' of a log is the user eve (whom
    serving.backfill stores as such): one user here too; the item a session is on is left
    out however its ends are padded (audit: two users; the item came back)."""
    db = tmp_path / "states.sqlite"
    ended = run_cli(capsys, served, db, "end-session", "--user", " eve\u00a0", "--items",
                    "item1,item2")
    assert ended["user"] == "eve"
    again = run_cli(capsys, served, db, "recommend", "--user", "eve", "-k", "3")
    assert again["state"] == "stored"
    padded = run_cli(capsys, served, db, "recommend", "--user", "eve", "--items-json",
                     '["item1", "item3 "]', "-k", "20")
    assert len(padded["items"]) == 11 and "item3" not in [e["item"] for e in padded["items"]]
    from pipeline import argtypes
    assert argtypes.shown("item3") == "item3"
    for odd in ("a\tb", "esc\x1b[31m", "rtl\u202e", "line\u2028"):
        assert argtypes.shown(odd) == repr(odd)


def test_cli_rebuilds_the_state_of_another_model_under_the_same_version(capsys, tmp_path):
    """A new export base numbers from 1 again: a user's stored state of the old model's
    version 1 is rebuilt for the new one (told apart by its fingerprint), and so is one of
    another state size; neither is served as it is nor locks the user out."""
    vocab = lib.tiny_vocabulary()
    base = str(tmp_path / "models")
    export.export_model(lib.tiny_model(vocab, seed=11), vocab, base)
    server = lib.ServerProcess(base, NAME, "--poll-seconds", "0.2")
    served, db = {"server": server}, tmp_path / "states.sqlite"

    def replace_version_1(model, wait_for):
        staging = str(tmp_path / f"staging{model.state_size}-{len(os.listdir(tmp_path))}")
        export.export_model(model, vocab, staging)
        shutil.rmtree(os.path.join(base, "1"))
        os.rename(os.path.join(staging, "1"), os.path.join(base, "1"))
        deadline = time.time() + 120
        with HierTCNClient(server.target, NAME, timeout=30) as c:
            while not wait_for(c):
                assert time.time() < deadline, "the replaced version was not loaded"
                time.sleep(0.2)

    def answer_from(sessions):
        with HierTCNClient(server.target, NAME, timeout=30) as c:
            c.pin()
            state = c.zero_states(1)
            for session in sessions:
                state = c.update_state(state, [session])
            ids, _ = c.next_items(state, [[]], k=3, history=[sum(sessions, [])])
        return ids[0]

    try:
        server.wait_version(1)
        run_cli(capsys, served, db, "end-session", "--user", "ann", "--items", "item1,item2")
        stored = run_cli(capsys, served, db, "recommend", "--user", "ann", "-k", "3")
        assert stored["state"] == "stored"
        with HierTCNClient(server.target, NAME, timeout=30) as c:
            old = c.fingerprint()
        replace_version_1(lib.tiny_model(vocab, seed=12), lambda c: not np.allclose(
            c.fingerprint(c.pin()), old))
        rebuilt = run_cli(capsys, served, db, "recommend", "--user", "ann", "-k", "3")
        assert rebuilt["version"] == 1 and rebuilt["state"] == "rebuilt"
        assert [e["item"] for e in rebuilt["items"]] == answer_from([["item1", "item2"]])
        assert run_cli(capsys, served, db, "recommend", "--user", "ann")["state"] == "stored"
        replace_version_1(lib.tiny_model(vocab, seed=13, gru_units=3),
                          lambda c: c.metadata().state_size == 6)
        assert client_lib.main(["--target", server.target, "--model-name", NAME, "--state-db",
                                str(db), "end-session", "--user", "ann", "--items",
                                "item3,item4"]) == 0  # the text answer
        out = capsys.readouterr().out
        assert "has 8 numbers, the model has 6; rebuilt from 1 recent session (" in out
        again = run_cli(capsys, served, db, "recommend", "--user", "ann", "-k", "3")
        assert again["state"] == "stored"
        assert [e["item"] for e in again["items"]] == answer_from([["item1", "item2"],
                                                                   ["item3", "item4"]])
    finally:
        server.stop()



@pytest.mark.parametrize("args, message", [
    (["recommend", "--user", "ann", "-k", "0"], "-k: must be from 1 to 2147483647, got 0"),
    (["recommend", "--user", "ann", "-k", "3000000000"],
     "-k: must be from 1 to 2147483647, got 3000000000"),
    (["--session-width", "0", "end-session", "--user", "ann", "--items", "a"],
     "--session-width: must be >= 1, got 0"),
    (["--history-width", "-1", "recommend", "--user", "ann"],
     "--history-width: must be >= 1, got -1"),
    (["--timeout", "nan", "status"], "--timeout: must be > 0.0 and <= 86400.0, got nan"),
    (["--timeout", "soon", "status"], "--timeout: 'soon' is not a number"),
    (["recommend", "--user", " "], "--user must not be empty"),
    (["--target", "", "status"], "--target must be HOST:PORT of the server, got ''"),
    (["--target", "http://localhost:8500", "recommend", "--user", "ann"],
     "--target http://localhost:8500 is a URL: pass HOST:PORT"),
    (["--target", "127.0.0.1:74036", "status"],  # gRPC would reach port 8500
     "--target 127.0.0.1:74036: the port must be from 1 to 65535"),
    (["--target", "localhost:-1", "status"], "the port must be from 1 to 65535"),
    (["--target", "[::1]:0", "status"], "the port must be from 1 to 65535"),
    (["recommend", "--user", "caf\udce9"], "--user is not UTF-8 text"),
    (["end-session", "--user", "ann", "--items", "a,\udcff"], "--items is not UTF-8 text"),
    (["--tls-ca", "ca.pem", "status"], "--tls-ca and --tls-server-name need --tls"),
    (["end-session", "--user", "ann", "--items-json", "[1]"],
     "--items-json: item ids must be JSON strings (\"1\", not 1), got '[1]'"),
    (["end-session", "--user", "ann", "--items-json", '["a", 2]'],
     "--items-json: item ids must be JSON strings (\"2\", not 2)"),
    (["end-session", "--user", "ann", "--items-json", '{"a": 1}'],
     "--items-json: must be a JSON list of item ids, got '{\"a\": 1}'"),
    (["end-session", "--user", "ann", "--items-json", "@no-such-session.json"],
     "--items-json: cannot read no-such-session.json: No such file or directory"),
    (["end-session", "--user", "ann", "--items-json", "@"],
     "--items-json: @ needs a file name: @FILE, or @- for standard input"),
    # (fuzzing audit) a blank model name; a state file that is a folder or empty (SQLite
    # opens '' as a temporary database, lost at the end)
    (["--model-name", " ", "status"], "--model-name: must be a non-empty name without spaces"),
    (["--state-db", "", "status"], "--state-db: must not be empty"),
    (["--state-db", ".", "status"], "is a folder: pass the path of a SQLite file"),
])
def test_cli_refuses_bad_numbers_in_one_line(capsys, served, tmp_path, args, message):
    with pytest.raises(SystemExit) as exit_:
        client_lib.main(cli(served, tmp_path / "states.sqlite", *args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "states.sqlite").exists()  # refused before anything was opened
    with pytest.raises(ValueError, match="session_width must be a positive integer"):
        HierTCNClient(served["server"].target, NAME, session_width=0)


@pytest.mark.parametrize("target, message", [
    ("127.0.0.1:74036", "--target 127.0.0.1:74036: the port must be from 1 to 65535"),
    ("localhost:-1", "the port must be from 1 to 65535"),
    ("[::1]:0", "the port must be from 1 to 65535"),
    ("dns:///localhost:70000", "the port must be from 1 to 65535"),
    ("", "--target must be HOST:PORT of the server, got ''"),
    ("https://h:8500", "is a URL"),
    # gRPC's own forms: a bare IPv6 address (its default port), socket paths, lists
    ("2001:db8::0", None), ("::1", None), ("[::1]:8500", None), ("unix:/tmp/s:0", None),
    ("unixbox:8500", None), ("ipv4:127.0.0.1:1,127.0.0.1:2", None), ("localhost", None),
    ("dns:///localhost:8500", None)])
def test_targets_that_grpc_would_misread_are_refused(target, message):
    from serving import cli as serving_cli

    error = serving_cli.target_error(target)
    assert (error is None) if message is None else (message in error), error


def test_backfill_checks_its_target_as_the_client_does(tmp_path, capsys):
    """(review: the port check was the client's alone; backfill reached port 8500 too; a
    fuzzing audit: an empty --model-name or --state-db, a folder as the state file, went on
    to connect, and '' would have backfilled into SQLite's temporary database)"""
    from serving import backfill

    for options, said in (
            (["--target", "127.0.0.1:74036"],
             "--target 127.0.0.1:74036: the port must be from 1 to 65535"),
            (["--model-name", ""], "--model-name: must be a non-empty name without spaces"),
            (["--state-db", ""], "--state-db: must not be empty"),
            (["--state-db", str(tmp_path)], "is a folder: pass the path of a SQLite file")):
        with pytest.raises(SystemExit) as exit_:
            backfill.main(["--data", str(tmp_path), "--target", "127.0.0.1:1", "--model-name",
                           NAME, "--state-db", str(tmp_path / "db.sqlite"), *options])
        assert exit_.value.code == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("command", ["client", "backfill"])
def test_a_timeout_past_what_grpc_holds_is_a_usage_error(tmp_path, capsys, command):
    """--timeout 1e30 overflowed gRPC's deadline into one already past: every call was
    DEADLINE_EXCEEDED at once. At most a day, in one line before anything is opened."""
    from serving import backfill

    db = str(tmp_path / "db.sqlite")
    common = ["--target", "127.0.0.1:1", "--model-name", NAME, "--timeout", "1e30"]
    with pytest.raises(SystemExit) as exit_:
        if command == "client":
            client_lib.main([*common, "--state-db", db, "status"])
        else:
            backfill.main(["--data", str(tmp_path), *common, "--state-db", db])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "argument --timeout: must be > 0.0 and <= 86400.0, got 1e30" in err
    assert not os.path.exists(db)


def _self_signed(folder, name):
    """A PEM certificate for DNS name `name` and its key (what a TLS deployment holds)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_server_and_client(served, tmp_path, capsys):
    """A server behind TLS (as TF Serving with --ssl_config_file): the client checks its
    certificate (here self-signed for a name that is not the target's host) and gets the
    same answers as over plain gRPC; a plain or unchecked client is refused."""
    cert, key = _self_signed(tmp_path, "hiertcn.test")
    server = lib.ServerProcess(served["base"], NAME, "--tls-cert", cert, "--tls-key", key)
    newest = max(int(n) for n in os.listdir(served["base"]) if n.isdigit())  # other tests add
    try:
        server.wait_version(newest)
        target = server.target
        state = np.zeros([1, 8], np.float32)
        with HierTCNClient(target, NAME, timeout=30, tls=True, tls_ca=cert,
                           tls_server_name="hiertcn.test") as secure, \
                HierTCNClient(served["server"].target, NAME, timeout=30) as plain:
            secure.pinned_version = plain.pinned_version = newest
            got = secure.next_items(state, [["item1", "item2"]], 5)
            want = plain.next_items(state, [["item1", "item2"]], 5)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        for kwargs in ({}, {"tls": True, "tls_ca": cert},  # plain; the wrong name
                       {"tls": True, "tls_server_name": "hiertcn.test"}):  # system roots
            with HierTCNClient(target, NAME, timeout=5, **kwargs) as refused:
                with pytest.raises(ServerUnavailable):
                    refused.status()
        assert client_lib.main(["--target", target, "--model-name", NAME, "--tls", "--tls-ca",
                                cert, "--tls-server-name", "hiertcn.test", "status"]) == 0
        assert f"{NAME} version {newest}: AVAILABLE" in capsys.readouterr().out
        with pytest.raises(ValueError, match="need --tls"):
            HierTCNClient(target, NAME, tls_ca=cert)
    finally:
        assert server.stop() == 0
    for args, message in ((["--tls-cert", cert], "--tls-cert and --tls-key go together"),
                          (["--tls-cert", key, "--tls-key", cert], "must hold a PEM certificate")):
        bad = lib.ServerProcess(served["base"], NAME, *args)
        assert bad.proc.wait(timeout=120) == 2
        for _ in range(100):  # the reader thread takes the last lines after the exit
            if any(message in line for line in bad.lines):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("\n".join(bad.lines))


# (a script's last line: the TensorFlow runtime modules it loaded)
_PRINT_RUNTIME = "print(sorted(m for m in sys.modules if m.startswith('tensorflow.python')))"


def _last_two_lines(script: str, quiet: bool = False) -> list[str]:
    """The last two lines a Python script prints, run from the repository root (`quiet`:
    it must write nothing to stderr)."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and (proc.stderr == "" or not quiet), proc.stderr
    return proc.stdout.strip().splitlines()[-2:]


def test_the_command_line_answers_without_tensorflows_runtime(served, tmp_path, capsys):
    """`python -m serving.client` imports TensorFlow's message modules only (0.3 s instead
    of 5-7 s per call) and answers exactly as the in-process client."""
    args = cli(served, tmp_path / "cli.sqlite", "recommend", "--user", "bo", "--items",
               "item1,item3", "-k", "4")
    script = ("import runpy, sys\n"
              f"sys.argv = ['serving.client', *{args!r}]\n"
              "try:\n"
              "    runpy.run_module('serving.client', run_name='__main__', alter_sys=True)\n"
              "except SystemExit as e:\n"
              "    assert not e.code, e.code\n"
              f"{_PRINT_RUNTIME}\n")
    answer, modules = _last_two_lines(script, quiet=True)
    assert modules == "[]"
    expected = run_cli(capsys, served, tmp_path / "in-process.sqlite", *args[6:])
    assert json.loads(answer) == expected


def test_a_library_user_can_call_the_model_without_tensorflows_runtime(served):
    """README: a process that runs no TensorFlow op (a web service that calls the model)
    calls `serving.quiet.tensorflow_protos_only()` before importing the client, which then
    loads TF Serving's messages alone and answers as the client with TensorFlow loaded."""
    script = ("import json, sys\n"
              "from serving import quiet\n"
              "assert quiet.tensorflow_protos_only()\n"
              "from serving.client import HierTCNClient\n"
              f"with HierTCNClient({served['server'].target!r}, {NAME!r}, timeout=30) as c:\n"
              "    c.pin()\n"
              "    ids, scores = c.next_items(c.zero_states(1), [['item3']], k=4)\n"
              "print(json.dumps([ids, scores.tolist()]))\n"
              f"{_PRINT_RUNTIME}\n")
    answer, modules = _last_two_lines(script)
    assert modules == "[]"
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c:
        c.pin()
        ids, scores = c.next_items(c.zero_states(1), [["item3"]], k=4)
    got_ids, got_scores = json.loads(answer)
    assert got_ids == ids
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)


def test_the_cli_drops_tensorflows_import_notes_and_keeps_the_rest(capfd):
    from serving.quiet import native_notes_dropped

    with native_notes_dropped():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\nI0000 cudart_stub.cc:31] Could not find cuda drivers on "
                    b"your machine, GPU will not be used.\nE0000 a real error\n")
    assert capfd.readouterr().err == "E0000 a real error\n"
    with socket.socket() as s:  # a port nobody listens on (held, not listening, meanwhile)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "serving.client", "--target",
                               f"127.0.0.1:{port}", "--model-name", NAME, "--timeout", "2",
                               "status"],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: UNAVAILABLE") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_an_end_session_whose_reader_is_gone_is_stored_with_status_0(capsys, served, tmp_path,
                                                                      unbuffered):
    """`end-session ... | head -1` whose reader left before the answer: the session is
    stored, so the status is 0 and no traceback (audit: exit 120 or 1, and a caller's
    retry stored the session twice)."""
    db = tmp_path / "states.sqlite"
    read_end, write_end = os.pipe()
    os.close(read_end)  # (the reader gone before the command writes)
    try:
        proc = subprocess.run([sys.executable, "-m", "serving.client",
                               *cli(served, db, "end-session", "--user", "gone", "--items",
                                    "item1,item2")],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert run_cli(capsys, served, db, "recommend", "--user", "gone")["state"] == "stored"


def test_a_stop_signal_stores_a_session_whole_or_not_at_all(capsys, served, tmp_path,
                                                            monkeypatch):
    """SIGTERM (or Ctrl-C) during recommend is one line and exit 130; during end-session
    it waits until the session is stored and said, then is dropped: exit 0 (it said
    "interrupted" of a stored session, so a caller's retry stored it twice)."""
    import signal

    from serving import state_store

    db = tmp_path / "s.sqlite"
    base = ["--target", served["server"].target, "--model-name", NAME, "--state-db", str(db)]
    real_recommend, real_end = client_lib._recommend, state_store.end_session

    def stopped(real):
        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)  # once the work is done, before it is said
            time.sleep(0.2)
            return out
        return call

    monkeypatch.setattr(client_lib, "_recommend", stopped(real_recommend))
    assert client_lib.main([*base, "recommend", "--user", "u", "--items", "item3"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    monkeypatch.setattr(state_store, "end_session", stopped(real_end))
    assert client_lib.main([*base, "--json", "end-session", "--user", "u", "--items",
                            "item3,item4"]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 1
    # the same as the connection closes, after the answer
    monkeypatch.setattr(state_store, "end_session", real_end)
    monkeypatch.setattr(HierTCNClient, "close", stopped(HierTCNClient.close))
    assert client_lib.main([*base, "--json", "end-session", "--user", "u", "--items",
                            "item5"]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 2
    with state_store.SQLiteStateStore(str(db)) as store:
        assert store.latest("u").sessions == (("item3", "item4"), ("item5",))


def test_an_unreachable_server_creates_no_state_database(capsys, tmp_path):
    """recommend and end-session against a server that is not there fail with one line and
    leave no `--state-db` behind (the default `user_states.sqlite` appeared in the folder
    the command was run from)."""
    db = tmp_path / "states.sqlite"
    with socket.socket() as s:  # a port nobody listens on (held, not listening, meanwhile)
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
        for command in (["recommend", "--user", "u", "--items", "a"],
                        ["end-session", "--user", "u", "--items", "a,b"]):
            assert client_lib.main(["--target", target, "--model-name", NAME, "--timeout", "2",
                                    "--state-db", str(db), *command]) == 1
            assert capsys.readouterr().err.startswith("error: UNAVAILABLE")
            assert not db.exists()


def test_json_goes_before_or_after_the_command(capsys, served, tmp_path):
    """`--json` is an option of the command line as a whole: written after the command (as
    the README's examples read) it is the same, and without it the answer is text."""
    db = tmp_path / "s.sqlite"
    base = ["--target", served["server"].target, "--model-name", NAME, "--state-db", str(db)]
    for argv in ([*base, "--json", "status"], [*base, "status", "--json"]):
        assert client_lib.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["versions"]
    assert client_lib.main([*base, "recommend", "--user", "u", "--items", "item2", "-k", "2",
                            "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["items"]) == 2
    assert client_lib.main([*base, "status"]) == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(capsys.readouterr().out)


def test_recommend_leaves_out_the_item_the_session_is_on(capsys, served, tmp_path):
    """The session's last item is never its next one (the pipeline collapses immediate
    repeats), yet a model may rank it high (a new user's only seen item): `recommend`
    leaves it out and still answers k items; `--keep-last` gives the model's own list."""
    db = tmp_path / "s.sqlite"
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c:
        c.pin()
        zero = c.zero_states(1)
        for item in served["vocab"].ids[2:]:  # an item the model ranks in its own top 3
            ids, _ = c.next_items(zero, [[item]], k=4, history=[[]])
            if item in ids[0][:3]:
                break
        else:
            pytest.fail("no item ranks itself in the top 3 of this model")
        far = next(i for i in served["vocab"].ids[2:]  # one outside its own top 4
                   if i not in c.next_items(zero, [[i]], k=4, history=[[]])[0][0])
    kept = run_cli(capsys, served, db, "recommend", "--user", "new1", "--items", item, "-k", "3",
                   "--keep-last")
    assert [e["item"] for e in kept["items"]] == ids[0][:3]
    left = run_cli(capsys, served, db, "recommend", "--user", "new2", "--items", item, "-k", "3")
    assert [e["item"] for e in left["items"]] == [i for i in ids[0] if i != item][:3]
    assert len(run_cli(capsys, served, db, "recommend", "--user", "new4", "--items", far,
                       "-k", "3")["items"]) == 3  # (nothing left out: still k items)
    # more than the catalogue holds: said (a 1-item catalogue answered nothing without a
    # word; extremes audit)
    assert client_lib.main([a for a in cli(served, db, "recommend", "--user", "new3",
                                           "--items", item, "-k", "50") if a != "--json"]) == 0
    size = served["vocab"].size - 2
    assert (f"note: {size - 1} of the 50 asked: version 2's catalogue holds {size} items, and "
            "the one the session is on is left out (--keep-last keeps it)"
            ) in capsys.readouterr().out
    # --exclude-seen: nor the session's other items, nor the stored history's
    run_cli(capsys, served, db, "end-session", "--user", "seen", "--items", "item4,item5")
    session = [i for i in served["vocab"].ids[2:] if i not in ("item4", "item5")][:2]
    own = run_cli(capsys, served, db, "recommend", "--user", "seen", "--items", ",".join(session),
                  "-k", "50", "--keep-last")
    seen = {"item4", "item5", *session}
    got = run_cli(capsys, served, db, "recommend", "--user", "seen", "--items",
                  ",".join(session), "-k", "3", "--exclude-seen")
    assert [e["item"] for e in got["items"]] == [e["item"] for e in own["items"]
                                                 if e["item"] not in seen][:3]
    assert client_lib.main([a for a in cli(served, db, "recommend", "--user", "seen", "--items",
                                           ",".join(session), "-k", "50", "--exclude-seen")
                            if a != "--json"]) == 0
    assert (f"note: {size - 4} of the 50 asked: version 2's catalogue holds {size} items, and "
            "the 4 seen in the session or the stored history are left out (--exclude-seen)"
            ) in capsys.readouterr().out


def test_recommend_and_end_session_name_the_items_the_version_does_not_know(capsys, served,
                                                                             tmp_path):
    """An id the catalogue does not hold (another case, a typo, an item newer than the
    export) is read as the unknown item: the answer is generic, so the CLI says which."""
    db = tmp_path / "s.sqlite"
    known = served["vocab"].ids[2]
    args = ["--target", served["server"].target, "--model-name", NAME, "--state-db", str(db)]
    assert client_lib.main([*args, "recommend", "--user", "u", "--items",
                            f"{known},{known.upper()},nope,nope", "-k", "2"]) == 0
    # (the store holds nobody: the note that names serving.backfill is left aside here)
    notes = lambda out: [line for line in out.splitlines() if "held no user before this call" not in line]  # noqa: E731
    lines = notes(capsys.readouterr().out)
    assert lines[1] == (f"note: 2 of the session's 3 distinct items are not in version 2's "
                        f"catalogue ('{known.upper()}', 'nope'): each is read as the unknown "
                        "item; ids are matched as the pipeline read them: exactly but for "
                        "spaces at their ends (case and form as in the training log)")
    assert len(lines) == 4  # the state line, the note, two items
    # (one unknown id: "1 of the session's 1 distinct items are")
    for items, said in (("nope", "the session's one item is"),
                        (f"{known},nope,{served['vocab'].ids[3]}",
                         "1 of the session's 3 distinct items is")):
        assert client_lib.main([*args, "recommend", "--user", "v", "--items", items]) == 0
        assert notes(capsys.readouterr().out)[1] == (
            f"note: {said} not in version 2's catalogue ('nope'): it is read as the unknown "
            "item; ids are matched as the pipeline read them: exactly but for spaces at their "
            "ends (case and form as in the training log)")
    # a very long unknown id is shown cut (a 2,000,000-character one made a note that long)
    assert client_lib.main([*args, "recommend", "--user", "v", "--items", "x" * 5000]) == 0
    assert (f"('{'x' * client_lib.SHOWN_ID_CHARS}...')" in notes(capsys.readouterr().out)[1])
    answer = run_cli(capsys, served, db, "recommend", "--user", "u", "--items", known, "-k", "2")
    assert answer["unknown_items"] == []
    ended = run_cli(capsys, served, db, "end-session", "--user", "u", "--items", f"{known},nope")
    assert ended["unknown_items"] == ["nope"]


def test_a_call_that_fails_after_the_pin_leaves_no_empty_store(capsys, served, tmp_path,
                                                               monkeypatch):
    """A deadline passed after the version was pinned left an empty --state-db behind
    (serving audit; the README says an unreachable server makes none); a store that held
    records before is left as it was."""
    db = tmp_path / "s.sqlite"
    args = ["--target", served["server"].target, "--model-name", NAME, "--state-db", str(db)]
    known = served["vocab"].ids[2]

    def late(*_):
        raise client_lib.ServerUnavailable("deadline exceeded")

    monkeypatch.setattr(client_lib, "_end_session", late)
    monkeypatch.setattr(client_lib, "_recommend", late)
    for command in ("recommend", "end-session"):
        assert client_lib.main([*args, command, "--user", "u", "--items", known]) == 1
        assert "error: deadline exceeded" in capsys.readouterr().err
        assert not [p for p in os.listdir(tmp_path) if p.startswith("s.sqlite")]
    monkeypatch.undo()
    assert client_lib.main([*args, "end-session", "--user", "u", "--items", known]) == 0
    monkeypatch.setattr(client_lib, "_recommend", late)
    assert client_lib.main([*args, "recommend", "--user", "u", "--items", known]) == 1
    with state_store.SQLiteStateStore(str(db)) as store:
        assert store.latest("u") is not None


def test_an_id_that_items_cut_at_its_commas_is_named(capsys, tmp_path):
    """--items 'Crosby, Stills & Nash' is two unknown ids: the note said so, not that the
    catalogue holds the whole id (--items-json passes it); end-session stored the pieces'
    state for good, and now refuses them."""
    from pipeline import schema

    ids = (schema.PAD_TOKEN, schema.UNKNOWN_TOKEN, "Crosby, Stills & Nash", "b", "c, d, e", "x",
           "Rock", "Pop", "Rock,Pop")
    vocab = schema.Vocabulary(ids=ids, counts=np.zeros(len(ids), np.int64))
    base = str(tmp_path / "models")
    export.export_model(lib.tiny_model(vocab), vocab, base)
    # (a narrow server: the joins are asked no wider than the session)
    server = lib.ServerProcess(base, NAME, "--max-sequence-width", "8")
    try:
        server.wait_version(1)
        db = tmp_path / "s.sqlite"
        args = ["--target", server.target, "--model-name", NAME, "--state-db", str(db)]
        for items, cut in (("b,Crosby, Stills & Nash", "Crosby, Stills & Nash"),
                           ("c, d, e,x", "c, d, e"), ("b,nope,x", None),
                           # Rock and Pop meant apart: known, so "Rock,Pop" was not cut
                           ("Rock,Pop,NewBand", None),
                           ("x,b,x,b,x,b,Crosby, Stills & Nash", "Crosby, Stills & Nash")):
            assert client_lib.main([*args, "recommend", "--user", "u", "--items", items]) == 0
            note = capsys.readouterr().out.splitlines()[1]
            assert note.startswith("note: ") and (
                (f"; --items cut {cut!r}, an id of the catalogue, at its commas: pass the "
                 f"session as --items-json '[..., {json.dumps(cut)}, ...]'") in note) \
                == (cut is not None), note
            assert client_lib.main([*args, "--json", "recommend", "--user", "u", "--items",
                                    items]) == 0
            assert json.loads(capsys.readouterr().out)["cut_at_commas"] == cut
        assert client_lib.main([*args, "end-session", "--user", "v", "--items",
                                "Rock,Pop,NewBand"]) == 0
        # ten pieces, five ids, none known: the joins go five at a time, as wide as the
        # ids known_items took (ten were more than this server's width)
        assert client_lib.main([*args, "end-session", "--user", "w", "--items",
                                "n1,n1,n2,n2,n3,n3,n4,n4,n5,n5"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert client_lib.main([*args, "end-session", "--user", "u", "--items",
                                "b,Crosby, Stills & Nash"]) == 1
        assert capsys.readouterr().err == (
            "error: --items cut 'Crosby, Stills & Nash', an id of version 1's catalogue, at "
            "its commas: pass the session as --items-json '[..., \"Crosby, Stills & Nash\", "
            "...]'; nothing was stored\n")
        assert client_lib.main([*args, "--json", "end-session", "--user", "u", "--items-json",
                                '["b", "Crosby, Stills & Nash"]']) == 0
        stored = json.loads(capsys.readouterr().out)
        assert stored["sessions"] == 1 and stored["unknown_items"] == []
    finally:
        server.stop()


def test_backfill_stores_what_ending_each_session_would(capsys, served, tmp_path, monkeypatch):
    """`serving.backfill` folds every user's sessions of a data folder (the last split
    holding the user: its record carries the earlier ones) in batches, and stores the
    same state and history as `end-session` after each session in turn; an item kept as
    the unknown index goes in as [UNK]. Users already stored are kept unless --replace;
    a folder of another catalogue is refused."""
    from pipeline import schema
    from serving import backfill, state_store
    from tiny_logs import write_data

    train = [[[2, 3, 4], [5, 6]], [[7, 8]], [[9, 10], [11, 2], [3, 4, 5]]]
    data = write_data(str(tmp_path / "data"), 10, train)
    own = [9, schema.UNKNOWN_INDEX, 10]  # train0's test session, after its two train ones
    sessions = train[0] + [own]
    opts = tf.io.TFRecordOptions(compression_type=schema.COMPRESSION)
    with tf.io.TFRecordWriter(os.path.join(data, "test", "part-00000" + schema.SHARD_SUFFIX),
                              opts) as w:
        w.write(schema.make_sequence_example("train0", 2, sessions,
                                             [[k] * len(s) for k, s in enumerate(sessions)]))
    with open(os.path.join(data, schema.STATS_FILE), encoding="utf-8") as f:
        stats = json.load(f)
    stats["splits"]["test"] = {"users": 1, "sessions": 1, "events": 3}
    with open(os.path.join(data, schema.STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f)
    names = lambda s: ["[UNK]" if i == 1 else f"item{i}" for i in s]  # noqa: E731
    # calls of at most 5 item slots: the longer sessions go in calls of their own
    monkeypatch.setattr(backfill, "MAX_SLOTS_PER_CALL", 5)
    db = tmp_path / "filled.sqlite"
    argv = ["--data", data, "--target", served["server"].target, "--model-name", NAME,
            "--state-db", str(db), "--batch-users", "2", "--no-progress", "--json"]
    assert backfill.main(argv) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["version"], counts["users"], counts["kept"], counts["sessions"],
            counts["events"]) == (2, 3, 0, 7, 17)
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c, \
            state_store.SQLiteStateStore(str(db)) as filled, \
            state_store.SQLiteStateStore(str(tmp_path / "live.sqlite")) as live:
        version = c.pin()
        update = lambda state, session: c.update_state(state[None], [session])[0]  # noqa: E731
        for user, user_sessions in (("train0", sessions), ("train1", train[1]),
                                    ("train2", train[2])):
            for session in user_sessions:
                state_store.end_session(live, user, version, c.state_size(), update,
                                        names(session), fingerprint=c.fingerprint(),
                                        known_items=c.known_ids)
            want, got = live.get(user, version), filled.get(user, version)
            np.testing.assert_allclose(got.state, want.state, rtol=1e-5, atol=1e-6)
            assert got.sessions == want.sessions and got.sessions_total == want.sessions_total
            np.testing.assert_array_equal(got.fingerprint, want.fingerprint)
        assert filled.get("train0", version).sessions[-1] == ("item9", "[UNK]", "item10")
    assert backfill.main(argv) == 0  # again: every user kept
    assert json.loads(capsys.readouterr().out)["kept"] == 3
    # a user whose newest record is another version's is kept even with --replace (its
    # client moved on; the log would roll it back), this version's are overwritten
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c, \
            state_store.SQLiteStateStore(str(db)) as filled:
        c.pin(1)
        state_store.end_session(filled, "train1", 1, c.state_size(),
                                lambda state, session: c.update_state(state[None], [session])[0],
                                ["item3"], fingerprint=c.fingerprint())
    assert backfill.main([*argv, "--replace"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["users"], out["kept"], out["kept_older"]) == (2, 1, 1)
    with state_store.SQLiteStateStore(str(db)) as filled:
        assert filled.latest("train1").version == 1
    assert backfill.main([a for a in argv if a != "--json"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "; 2 users already there were kept (a record of this version, which --replace "
        "overwrites, or of a newer one); 1 user whose newest record is an older version's "
        "(or another model's of this number) was kept: this version rebuilds each from its "
        "stored recent sessions on its first request (--refresh folds the log for them, then "
        "the sessions stored since)")
    # --refresh (a model refresh): the log's session, then the one the store ended since
    # (its count beyond the log's): the record of ending both in turn on this version
    assert backfill.main([*argv, "--refresh"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["users"], out["refreshed"], out["kept"], out["kept_older"]) == (1, 1, 2, 0)
    with HierTCNClient(served["server"].target, NAME, timeout=30) as c, \
            state_store.SQLiteStateStore(str(db)) as filled, \
            state_store.SQLiteStateStore(str(tmp_path / "live2.sqlite")) as live:
        version = c.pin()
        for session in (["item7", "item8"], ["item3"]):
            state_store.end_session(live, "train1", version, c.state_size(),
                                    lambda state, s: c.update_state(state[None], [s])[0],
                                    session, fingerprint=c.fingerprint(), known_items=c.known_ids)
        want, got = live.get("train1", version), filled.latest("train1")
        assert got.version == version and got.sessions == want.sessions == (
            ("item7", "item8"), ("item3",)) and got.sessions_total == 2
        np.testing.assert_allclose(got.state, want.state, rtol=1e-5, atol=1e-6)
        # an older version's record without a session count (an earlier store's): kept even
        # with --refresh, and said so (nothing aligns the log with its sessions)
        filled.put("train2", 1, np.zeros(c.state_size(), np.float32), [["item9"]])
    assert backfill.main([a for a in argv if a != "--json"] + ["--refresh"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "; 1 user whose newest record is an older version's without a session count (written "
        "before the store counted sessions) was kept: nothing says which of their stored "
        "sessions the log holds")
    # an older version's counted record, fewer sessions than the log's, whose newest the
    # log does not hold (a store that never took the log: its live sessions may all have
    # ended after the log's, and refreshing dropped them): kept, and said so
    with state_store.SQLiteStateStore(str(db)) as filled:
        filled.put("train0", 1, np.zeros(filled.latest("train0").state.size, np.float32),
                   [["item29", "item28", "item27"]], sessions_total=1)
    assert backfill.main(argv + ["--refresh"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["users"], out["kept_unaligned"]) == (0, 1), out
    with state_store.SQLiteStateStore(str(db)) as filled:
        assert filled.latest("train0").sessions == (("item29", "item28", "item27"),)
    # a record of this version's number from another model (a new export base numbers
    # from 1 again): as an older version's, not "a record of this version" kept (audit)
    assert backfill.main(argv) == 0
    before = json.loads(capsys.readouterr().out)
    with state_store.SQLiteStateStore(str(db)) as filled:
        user, mine = next((u, r) for u in ("train0", "train1", "train2")
                          for r in [filled.latest(u)] if r.version == 2 and r.sessions_total)
        filled.put(user, 2, mine.state + 1, mine.sessions, expected=mine,
                   fingerprint=np.ones_like(mine.fingerprint), sessions_total=mine.sessions_total)
    out = json.loads((backfill.main(argv), capsys.readouterr().out)[1])
    assert (out["users"], out["kept_older"]) == (0, before["kept_older"] + 1), (before, out)
    out = json.loads((backfill.main([*argv, "--refresh"]), capsys.readouterr().out)[1])
    assert out["refreshed"] >= 1, out
    with state_store.SQLiteStateStore(str(db)) as filled:
        np.testing.assert_array_equal(filled.latest(user).fingerprint, mine.fingerprint)
        np.testing.assert_allclose(filled.latest(user).state, mine.state, rtol=1e-5, atol=1e-6)
    other = write_data(str(tmp_path / "other"), 30, [[[20, 21]]])  # item2..item31: 10 known
    fresh = tmp_path / "fresh.sqlite"
    assert backfill.main(["--data", other, *argv[2:6], "--state-db", str(fresh)]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: 20 of the 30 most frequent items of {other} are unknown to version 2")
    assert not fresh.exists()  # nothing made
    # a file for the folder (its items.tsv, the raw log): said first, nothing made (the
    # items.tsv made an empty store, then failed on "no test shards in .../items.tsv/test")
    for path in (os.path.join(other, "items.tsv"), str(tmp_path / "log.csv")):
        open(path, "a").close()
        assert backfill.main(["--data", path, *argv[2:6], "--state-db", str(fresh)]) == 1
        assert capsys.readouterr().err == (f"error: data folder {path} is a file, not a "
                                           "folder: pass the --output folder of `python -m "
                                           "pipeline`\n")
        assert not fresh.exists()
    shutil.rmtree(os.path.join(other, "valid"))  # a split without shards: the same
    assert backfill.main(["--data", other, *argv[2:6], "--state-db", str(fresh)]) == 1
    assert f"no valid shards (*.tfrecord.gz) in {other}/valid" in capsys.readouterr().err
    assert not fresh.exists()
    # a damaged shard, found as the first users are read: no empty store left behind, which
    # looked like a backfill's result (audit)
    damaged = str(tmp_path / "damaged")
    shutil.copytree(data, damaged)
    shard = os.path.join(damaged, "test", "part-00000" + schema.SHARD_SUFFIX)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert backfill.main(["--data", damaged, *argv[2:6], "--state-db", str(fresh)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not fresh.exists() and not os.path.exists(str(fresh) + "-wal")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_backfill_stops_on_sigterm_as_on_ctrl_c(served, tmp_path):
    """A scheduler's SIGTERM ended a backfill without a word, status 143: it is Ctrl-C,
    the line that says how many users were stored and exit 130, and in the start-up
    (TensorFlow's import) "nothing was stored" (scheduler audit); the records stored are
    whole and the same command goes on from there."""
    import signal
    import sqlite3

    from tiny_logs import write_data

    data = write_data(str(tmp_path / "data"), 10, [[[2 + u % 9, 3 + u % 7]] for u in range(3000)])
    db = tmp_path / "s.sqlite"
    argv = [sys.executable, "-m", "serving.backfill", "--data", data, "--target",
            served["server"].target, "--model-name", NAME, "--state-db", str(db),
            "--batch-users", "1"]

    def stopped(ready) -> tuple[int, str]:
        proc = subprocess.Popen(argv, cwd=lib.REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and not ready(proc.pid):
                assert time.monotonic() < deadline, "not ready within 120 s"
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return proc.returncode, err

    def catches_sigterm(pid):
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        return bool(caught >> (signal.SIGTERM - 1) & 1)

    status, err = stopped(catches_sigterm)
    assert (status, err.splitlines()[-1]) == (130, "interrupted: nothing was stored"), err
    def storing(pid):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                return conn.execute("SELECT COUNT(*) FROM user_states").fetchone()[0] > 0
        except sqlite3.Error:  # (not made yet)
            return False

    status, err = stopped(storing)
    assert status == 130 and "Traceback" not in err, err
    said = err.splitlines()[-1]
    assert said.startswith("interrupted: ") and said.endswith(
        f"users stored in {db} (each record whole); the same command goes on from there"), err
    stored = int(said.split()[1].replace(",", ""))
    with contextlib.closing(sqlite3.connect(db)) as conn:  # (users with a record)
        assert conn.execute("SELECT COUNT(DISTINCT user_id) FROM user_states").fetchone()[0] \
            == stored < 3000


def test_backfill_says_a_record_written_meanwhile_may_be_another_backfills(capsys, served,
                                                                          tmp_path, monkeypatch):
    """A user written while the backfill ran is kept; the summary names both writers that
    can do it (it said "a live end-session" when another backfill run had written it)."""
    from serving import backfill, state_store
    from tiny_logs import write_data

    data = write_data(str(tmp_path / "data"), 10, [[[2, 3, 4]], [[5, 6]]])
    db = str(tmp_path / "states.sqlite")
    real_store = backfill._store

    def other_backfill_writes(client, store, batch, version, *args):
        # after this run read the users' records, before it writes them
        with state_store.SQLiteStateStore(db) as other:
            if other.latest("train0") is None:
                other.put("train0", version, client.zero_states(1)[0], [["item2"]],
                          fingerprint=client.fingerprint(), sessions_total=1)
        return real_store(client, store, batch, version, *args)

    monkeypatch.setattr(backfill, "_store", other_backfill_writes)
    assert backfill.main(["--data", data, "--target", served["server"].target, "--model-name",
                          NAME, "--state-db", db, "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("; 1 user's record changed while this ran (written by a live "
                        "end-session or another backfill) and was kept: the same command "
                        "again handles them"), out


def test_backfill_whose_state_file_was_removed_meanwhile_says_so(capsys, served, tmp_path,
                                                                  monkeypatch):
    """Its state file removed while it ran, a backfill said it had stored its users (they
    went to a file no one can open; failure-injection audit)."""
    from serving import backfill
    from tiny_logs import write_data

    data = write_data(str(tmp_path / "data"), 10, [[[2, 3, 4]], [[5, 6]]])
    db = tmp_path / "states.sqlite"
    real_store = backfill._store

    def store_then_remove_the_file(*args):
        real_store(*args)
        if db.exists():
            os.remove(db)

    monkeypatch.setattr(backfill, "_store", store_then_remove_the_file)
    assert backfill.main(["--data", data, "--target", served["server"].target, "--model-name",
                          NAME, "--state-db", str(db), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {db} was removed or replaced while the backfill ran: the 2 users it stored "
        "went to a file no one can open now; run it again")
    # removed after the first of two batches: the second is refused (the store no longer
    # writes into a removed file), and the run says the same
    assert backfill.main(["--data", data, "--target", served["server"].target, "--model-name",
                          NAME, "--state-db", str(db), "--no-progress",
                          "--batch-users", "1"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {db} was removed or replaced while the backfill ran: the 1 user it stored "
        "went to a file no one can open now; run it again")


def test_refresh_appends_the_sessions_stored_after_the_logs_last_one():
    """Lifecycle audit: `--refresh` re-appended the stored count beyond the log's, which
    disagrees with the contents where the two pipeline runs or a live one-item session
    count differently: the same session was folded twice."""
    import numpy as np

    from serving import backfill, state_store

    def stored(sessions, total):
        return state_store.UserState(user_id="u", state=np.zeros(1, np.float32), sessions=tuple(
            tuple(s) for s in sessions), updated=0.0, version=1, sessions_total=total)

    log = [["a", "b"], ["c", "d"], ["e", "f"]]
    # two sessions ended live since the log: the counts agree with the contents
    assert backfill.with_sessions_since(log, stored(log + [["g"], ["e", "f"]], 5)) == (
        log + [["g"], ["e", "f"]], 5)
    # a one-item session ended live that this log's pipeline run drops as too short
    assert backfill.with_sessions_since(log, stored([["a", "b"], ["c", "d"], ["x"], ["e", "f"]],
                                                    4)) == (log, 4)
    # the older run's log kept a session (its vocabulary's [UNK]) that this one drops
    assert backfill.with_sessions_since(log[1:], stored(log, 3)) == (log[1:], 3)
    # nothing aligns: the counts, as before
    assert backfill.with_sessions_since(log, stored([["y"], ["z"]], 4)) == (log + [["z"]], 4)
    # the newer run keeps an early session the store's count missed, and one ended since
    assert backfill.with_sessions_since(log, stored([["c", "d"], ["e", "f"], ["g"]], 3)) == (
        log + [["g"]], 4)
    # a repeated session is no alignment without the log's session before it: the counts
    assert backfill.with_sessions_since(log, stored([["q"], ["e", "f"], ["r"], ["s"]], 3)) == (
        log, 3)
    # a store behind the log (fewer sessions counted): nothing, even where a repeated pair
    # of sessions would line up with an older place (review)
    repeating = [["p"], ["l"], ["q"], ["p"], ["l"]]
    assert backfill.with_sessions_since(repeating, stored([["p"], ["l"], ["q"]], 3)) == (
        repeating, 5)
    # fewer sessions counted than the log's, but the newest is not the log's (a store that
    # never took the log, counting its live sessions alone: they may all have ended after
    # the log's, and refreshing over them lost them; upgrade audit): not refreshed
    assert backfill.with_sessions_since(log, stored([["g", "h"]], 1)) is None
    assert backfill.with_sessions_since(log, stored([["c", "d"], ["g"]], 2)) is None
    # its newest is the log's: behind the log, as before
    assert backfill.with_sessions_since(log, stored([["c", "d"]], 1)) == (log, 3)


def test_backfill_progress_in_a_log_is_a_line_a_while(capsys):
    """Not a terminal (a scheduler's log): a line every 30 s, not a redrawn bar."""
    from serving import backfill

    counts = backfill.BackfillCounts(users=40, kept=2)
    lines = backfill._ProgressLines(counts, disabled=False, every=30.0)
    clock = iter([10.0, 31.0, 45.0, 62.0])
    lines.clock, lines.start, lines.shown = (lambda: next(clock)), 0.0, 0.0
    for n in (10, 20, 12, 5):
        lines.update(n)
    assert capsys.readouterr().err.splitlines() == [
        "backfill: 30 users handled (40 stored, 2 kept) in 31 s",
        "backfill: 47 users handled (40 stored, 2 kept) in 62 s"]
    # with stats.json's count of the users: of how many, and the time left at this rate
    lines = backfill._ProgressLines(counts, disabled=False, every=30.0, total=94)
    clock = iter([31.0, 62.0, 95.0])
    lines.clock, lines.start, lines.shown = (lambda: next(clock)), 0.0, 0.0
    for n in (30, 17, 47):
        lines.update(n)
    assert capsys.readouterr().err.splitlines() == [
        "backfill: 30 of 94 users handled (40 stored, 2 kept) in 31 s, about 66 s left",
        "backfill: 47 of 94 users handled (40 stored, 2 kept) in 62 s, about 62 s left",
        "backfill: 94 of 94 users handled (40 stored, 2 kept) in 95 s"]


def test_backfill_takes_its_total_from_the_pipelines_count_of_users(tmp_path):
    """stats.json's users_written (capped by --max-users); none from a folder whose
    pipeline did not count them."""
    from pipeline import schema
    from serving import backfill

    (tmp_path / schema.STATS_FILE).write_text(json.dumps({schema.USERS_WRITTEN: 120}))
    assert backfill._users_to_handle(str(tmp_path), None) == 120
    assert backfill._users_to_handle(str(tmp_path), 50) == 50
    assert backfill._users_to_handle(str(tmp_path), 500) == 120
    (tmp_path / schema.STATS_FILE).write_text(json.dumps({"rows_written": 7}))
    assert backfill._users_to_handle(str(tmp_path), None) is None


def test_items_json_from_standard_input(monkeypatch):
    """`--items-json @-` reads the list from standard input; with standard input closed
    (`<&-`) it is one line, not a traceback."""
    import argparse
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('["a", "b,c"]'))
    assert client_lib._json_items("@-") == ["a", "b,c"]
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(argparse.ArgumentTypeError,
                       match="^cannot read standard input: Bad file descriptor$"):
        client_lib._json_items("@-")


def test_items_json_file_under_the_home_folder(tmp_path, monkeypatch):
    """`--items-json @~/session.json`: the shell expands no ~ after the @ (it said `cannot
    read ~/session.json`); it is the home folder, as in every path option."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "session.json").write_text('["a", "b,c"]')
    assert client_lib._json_items("@~/session.json") == ["a", "b,c"]


def test_status_exits_1_when_no_version_is_available(tmp_path, capsys):
    """`status` said END (the load's error) and exited 0, so a health check running it
    passed while nothing could serve (audit): 1 when no version is AVAILABLE, the report
    printed as before."""
    from serving import server as server_lib

    base = tmp_path / "models"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    served = server_lib.ModelServer(NAME, str(base), port=0)
    served.start()
    try:
        target = f"127.0.0.1:{served.port}"
        deadline = time.monotonic() + 60
        while True:  # the first scan's failed load
            try:
                if [s for s in served.manager.statuses(None) if s.status.error_message]:
                    break  # (not while it is LOADING)
            except server_lib.RequestError:  # (NOT_FOUND before the first scan)
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client_lib.main(["--target", target, "--model-name", NAME, "status"]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"{NAME} version 1: END (") and "DecodeError" in out, out
        assert client_lib.main(["--target", target, "--model-name", NAME, "--json",
                                "status"]) == 1
        assert json.loads(capsys.readouterr().out)["versions"][0]["state"] == "END"
    finally:
        served.stop()


def test_end_session_counts_what_it_stored_and_an_empty_store_points_to_backfill(
        capsys, served, tmp_path):
    """`end-session --items A,B,C,C` folds and stores A,B,C: it said "after 4 items" (the
    raw list; a Last.fm-shaped audit's replays). A fresh store serves every user, one of
    13,000 plays included, as new: the note names `serving.backfill`, once the store holds
    nobody, and not when it holds users (a user new to it is then new)."""
    db = tmp_path / "s.sqlite"
    text = lambda *args: (client_lib.main([a for a in cli(served, db, *args) if a != "--json"]),  # noqa: E731
                          capsys.readouterr().out)
    status, out = text("recommend", "--user", "u", "--items", "item1,item2", "-k", "2")
    assert status == 0 and "note: the state store held no user before this call" in out
    assert "serving.backfill" in out
    status, out = text("end-session", "--user", "u", "--items", "item1,item2,item3,item3")
    assert status == 0, out
    assert ("stored the state after 3 items (1 immediate repeat left out, as the pipeline "
            "does) for version 2") in out and "held no user before this call" in out
    ended = run_cli(capsys, served, db, "end-session", "--user", "u", "--items", "item4,item5")
    assert (ended["session_items"], ended["sessions"], ended["sessions_total"]) == (2, 2, 2)
    with state_store.SQLiteStateStore(str(db)) as store:
        assert store.latest("u").sessions == (("item1", "item2", "item3"), ("item4", "item5"))
    for args in (("recommend", "--user", "v", "--items", "item1", "-k", "2"),
                 ("end-session", "--user", "w", "--items", "item1,item2")):
        status, out = text(*args)
        assert status == 0 and "new user, state starts at zeros" in out
        assert "held no user before this call" not in out
    status, out = text("end-session", "--user", "u", "--items", "item2,item6")
    assert "stored the state after 2 items for version 2" in out and "left out" not in out
