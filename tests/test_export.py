"""serving.export: the SavedModel loads as TF Serving loads it and equals the eager model."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import serving_testlib as lib  # noqa: F401 - sets the Keras mode before TensorFlow
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from model import registry
from pipeline import schema
from serving import export

STATE = np.random.default_rng(0).normal(size=[3, 8]).astype(np.float32)
# Row 0: two known items; row 1: an unknown id, then two known; row 2: an empty session.
SESSIONS = np.array([["item0", "item3", ""], ["nope", "item5", "item1"], ["", "", ""]],
                    dtype=object)
INDICES = np.array([[2, 5, 0], [1, 7, 3], [0, 0, 0]], dtype=np.int64)
HISTORY = np.array([["item2"], ["item4"], [""]], dtype=object)


@pytest.fixture(scope="module", params=["plain", "session_summary"])
def exported(tmp_path_factory, request):
    vocab = lib.tiny_vocabulary()
    model = lib.tiny_model(vocab, session_summary=request.param == "session_summary")
    base = str(tmp_path_factory.mktemp("export"))
    path = export.export_model(model, vocab, base)
    return model, vocab, base, path


def eager(model, vocab, k):
    """The model's own outputs on INDICES: state, top-k ids/scores (real items), embedding."""
    state = model.update_state(STATE, INDICES).numpy()
    u = model.last_user_embedding(STATE, INDICES)
    # (the output layer as trained, W [V, D]; the export scores with its copy W^T)
    vectors, bias = (x.numpy() for x in model.output_weights())
    logits = (u.numpy() @ vectors.T + bias)[:, 2:]
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    ids = np.array(vocab.ids[2:], dtype=object)[order]
    return state, ids, np.take_along_axis(logits, order, axis=1), u.numpy()


def run_tf1(path, signature, feeds, check_shapes=True):
    """Runs a signature the way tensorflow_model_server does: TF1 session, tensor names.
    `check_shapes=False` feeds through the C API's Session::Run, as TF Serving does, without
    the Python session's check of the fed shapes against the signature's."""
    with tf.Graph().as_default() as graph, tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        sig = meta.signature_def[signature]
        assert set(sig.inputs) == set(feeds)
        if check_shapes:
            return sess.run({k: v.name for k, v in sig.outputs.items()},
                            {sig.inputs[k].name: v for k, v in feeds.items()})
        names = sorted(sig.outputs)
        tensor = lambda name: graph.get_tensor_by_name(name)._as_tf_output()
        out = sess._call_tf_sessionrun(
            None, {tensor(sig.inputs[k].name): v for k, v in feeds.items()},
            [tensor(sig.outputs[k].name) for k in names], [], None)
        return dict(zip(names, out))


def test_layout_and_signature_shapes(exported):
    model, vocab, base, path = exported
    assert path == os.path.join(base, "1")
    assert os.listdir(base) == ["1"]  # no temporary folder left behind
    with open(os.path.join(path, "assets", export.VOCAB_ASSET), encoding="utf-8") as f:
        assert f.read().split("\n")[:3] == ["[PAD]", "[UNK]", "item0"]
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {
        "serving_default", "next_items", "update_state", "user_embedding", "known_items",
        "item_vectors"}
    spec = loaded.signatures["update_state"].structured_input_signature[1]["user_state"]
    assert spec.shape.as_list() == [None, model.state_size] and spec.dtype == tf.float32
    assert set(loaded.signatures["next_items"].structured_input_signature[1]) == {
        "user_state", "session_items", "history_items", "k"}


def test_the_export_holds_the_output_layer_transposed_instead_of_twice(exported):
    """The output layer's W [V, D] is saved as W^T [D, V] (read faster for a few rows of
    users), not in both layouts: the SavedModel's variables are the model's, W turned."""
    model, vocab, _, path = exported
    saved = sorted(tuple(shape) for _, shape in
                   tf.train.list_variables(os.path.join(path, "variables", "variables"))
                   if shape)  # (the save counter is a scalar)
    kernel = model.scorer.kernel
    want = sorted([tuple(v.shape) for v in model.variables if v is not kernel]
                  + [(kernel.shape[1], kernel.shape[0])])
    assert saved == want and kernel.shape[0] != kernel.shape[1]
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    turned = [name for name, shape in reader.get_variable_to_shape_map().items()
              if tuple(shape) == (kernel.shape[1], kernel.shape[0])]
    assert len(turned) == 1
    np.testing.assert_array_equal(reader.get_tensor(turned[0]), kernel.numpy().T)


@pytest.mark.parametrize("name,config", [
    ("gru4rec", {"embedding_dim": 8, "units": 8}),
    ("hrnn", {"embedding_dim": 8, "session_units": 8, "user_units": 4}),
    ("tcn", {"embedding_dim": 8, "channels": (8, 8), "kernel_size": 2}),
    ("hiertcn", {"tied_output": True}),  # W is the input embedding: not transposed
])
def test_the_baselines_and_a_tied_output_export_and_score_as_the_model(name, config, tmp_path):
    vocab = lib.tiny_vocabulary()
    tf.keras.utils.set_random_seed(0)
    if name == "hiertcn":
        model = lib.tiny_model(vocab, **config)
    else:
        cls = registry.config_classes()[name]
        model = registry.build_model(name, cls().replace(config), vocab.size)
    state = np.random.default_rng(1).normal(size=[3, model.state_size]).astype(np.float32)
    u = model.last_user_embedding(state, INDICES).numpy()
    vectors, bias = (x.numpy() for x in model.output_weights())
    logits = (u @ vectors.T + bias)[:, 2:]
    order = np.argsort(-logits, axis=1, kind="stable")[:, :4]
    path = export.export_model(model, vocab, str(tmp_path))
    got = run_tf1(path, "next_items", {"user_state": state, "session_items": SESSIONS,
                                       "history_items": HISTORY, "k": np.int32(4)})
    assert (got["item_ids"].astype(str) == np.array(vocab.ids[2:])[order]).all()
    np.testing.assert_allclose(got["scores"], np.take_along_axis(logits, order, 1),
                               rtol=1e-5, atol=1e-6)
    rows = run_tf1(path, "item_vectors", {"items": np.array(vocab.ids[2:], dtype=object)})
    np.testing.assert_array_equal(rows["vectors"], vectors[2:])
    np.testing.assert_array_equal(rows["bias"], bias[2:])
    saved = {tuple(shape) for _, shape in
             tf.train.list_variables(os.path.join(path, "variables", "variables"))}
    assert (tuple(vectors.shape[::-1]) in saved) == (name != "hiertcn")
    # the model is left scoring with its own W (not with the export's copy of it)
    weights = model.output_weights()[0]
    weights.assign_add(tf.ones_like(weights))
    np.testing.assert_allclose(model.item_logits(tf.constant(u)).numpy(),
                               u @ (vectors + 1).T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,config", [
    ("gru4rec", {"embedding_dim": 8, "units": 8}),
    ("hiertcn", {"high_level": False, "repeat_head": False}),  # the session-only ablation
])
def test_a_session_only_exports_first_items_are_ranked_as_evaluated(name, config, tmp_path):
    """`model.evaluate` ranks a session-only model's first items by popularity (DESIGN §6,
    `first_item_scores`); its export returned the start vector's scores for an empty
    session (25 of 182 first items' top 1 differed): now the same scores as evaluated."""
    counts = np.array([0, 0, 5, 9, 1, 9, 0, 3, 7, 2, 8, 4, 6, 1], np.int64)
    vocab = schema.Vocabulary(ids=lib.tiny_vocabulary().ids, counts=counts)
    tf.keras.utils.set_random_seed(0)
    if name == "hiertcn":
        model = lib.tiny_model(vocab, **config)
        model = registry.build_model("hiertcn", model.config, vocab.size, item_counts=counts)
    else:
        cls = registry.config_classes()[name]
        model = registry.build_model(name, cls().replace(config), vocab.size, item_counts=counts)
    assert model.first_item_scores is not None
    path = export.export_model(model, vocab, str(tmp_path))
    got = run_tf1(path, "next_items", {"user_state": np.zeros([3, model.state_size], np.float32),
                                       "session_items": SESSIONS, "history_items": HISTORY,
                                       "k": np.int32(4)})
    # the empty session (row 2): popularity's order and scores, as `KerasScorer` ranks them
    from model.keras_scorer import KerasScorer

    evaluated = KerasScorer(model).score(KerasScorer(model).initial_state(["a"]),
                                         np.zeros([1, 1], np.int64))[0, 0, 2:]
    order = np.argsort(-evaluated, kind="stable")[:4]
    assert got["item_ids"][2].astype(str).tolist() == [vocab.ids[2 + i] for i in order]
    assert [vocab.ids[2 + i] for i in order] == ["item1", "item3", "item8", "item6"]
    np.testing.assert_allclose(got["scores"][2], evaluated[order], rtol=1e-6)
    # the other rows: the model's own scores after their items
    u = model.last_user_embedding(np.zeros([3, model.state_size], np.float32), INDICES)
    logits = model.item_logits(u).numpy()[:2, 2:]
    np.testing.assert_allclose(got["scores"][:2], -np.sort(-logits, axis=1)[:, :4],
                               rtol=1e-5, atol=1e-6)


def test_tf1_session_loader_equals_eager_model(exported):
    model, vocab, _, path = exported
    state, ids, scores, emb = eager(model, vocab, k=4)
    got = run_tf1(path, "update_state", {"user_state": STATE, "session_items": SESSIONS})
    np.testing.assert_allclose(got["user_state"], state, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["user_state"][2], STATE[2])  # empty session: unchanged
    for signature in ("next_items", "serving_default"):
        got = run_tf1(path, signature, {"user_state": STATE, "session_items": SESSIONS,
                                        "history_items": HISTORY, "k": np.int32(4)})
        assert got["item_ids"].astype(str).tolist() == ids.tolist()
        np.testing.assert_allclose(got["scores"], scores, rtol=1e-5, atol=1e-6)
    got = run_tf1(path, "user_embedding", {"user_state": STATE, "session_items": SESSIONS,
                                           "history_items": HISTORY})
    np.testing.assert_allclose(got["embedding"], emb, rtol=1e-5, atol=1e-6)


def test_successive_update_state_equals_model_and_evaluation_state(exported):
    model, vocab, _, path = exported
    from model.keras_scorer import KerasScorer

    update = tf.saved_model.load(path).signatures["update_state"]
    sessions = [[["item0", "item1"], ["item2"]], [["item3", "item4", "item5"], ["item6", "item7"]]]
    served = np.zeros([2, model.state_size], np.float32)
    scorer = KerasScorer(model)
    evaluated = scorer.initial_state(["a", "b"])
    index = vocab.index_of()
    for step in range(2):
        rows = [s[step] for s in sessions]
        width = max(len(r) for r in rows)
        padded = np.array([r + [""] * (width - len(r)) for r in rows], dtype=object)
        served = update(user_state=tf.constant(served),
                        session_items=tf.constant(padded))["user_state"].numpy()
        evaluated = scorer.update(evaluated, np.array(
            [[index[i] for i in r] + [0] * (width - len(r)) for r in rows], np.int64))
    np.testing.assert_allclose(served, evaluated, rtol=1e-5, atol=1e-6)
    assert np.abs(served).sum() > 0


def test_a_non_finite_user_state_is_refused_by_every_signature(exported):
    """A NaN state (a damaged store's) answered NaN scores, and update_state kept it NaN."""
    _, _, _, path = exported
    loaded = tf.saved_model.load(path)
    state = STATE.copy()
    state[1, 0] = np.nan
    feeds = {"user_state": tf.constant(state), "session_items": tf.constant(SESSIONS),
             "history_items": tf.constant(HISTORY)}
    for name, extra in (("next_items", {"k": tf.constant(2)}), ("user_embedding", {}),
                        ("update_state", {})):
        inputs = dict(feeds, **extra)
        if name == "update_state":
            del inputs["history_items"]
        with pytest.raises(tf.errors.InvalidArgumentError, match="user_state holds NaN or inf"):
            loaded.signatures[name](**inputs)


def test_a_state_of_another_width_is_refused_as_tf_serving_runs_it(exported):
    """TF Serving does not check a request's shapes against the signature: the graph must.
    A state one column wider (another export's) was answered by update_state with that
    width, and next_items failed deep in the model (`Incompatible shapes`)."""
    _, _, _, path = exported
    wide = np.concatenate([STATE, STATE[:, :1]], axis=1)
    for signature, feeds in (("update_state", {}), ("next_items", {"history_items": HISTORY,
                                                                   "k": np.int32(2)}),
                             ("user_embedding", {"history_items": HISTORY})):
        with pytest.raises(tf.errors.InvalidArgumentError,
                               match=f"user_state must have {STATE.shape[1]} columns"):
            run_tf1(path, signature, dict(feeds, user_state=wide, session_items=SESSIONS),
                    check_shapes=False)
    ok = run_tf1(path, "update_state", {"user_state": STATE, "session_items": SESSIONS},
                 check_shapes=False)
    assert ok["user_state"].shape == STATE.shape


def test_k_clamps_and_reserved_ids_never_returned(exported):
    model, vocab, _, path = exported
    fn = tf.saved_model.load(path).signatures["next_items"]
    inputs = dict(user_state=tf.constant(STATE), session_items=tf.constant(SESSIONS),
                  history_items=tf.constant(HISTORY))
    everything = fn(k=tf.constant(1000), **inputs)
    ids = everything["item_ids"].numpy().astype(str)
    assert ids.shape == (3, vocab.num_items)
    for row in ids:
        assert sorted(row) == sorted(vocab.ids[2:])  # every real item once, never "", [PAD], [UNK]
    assert np.all(np.diff(everything["scores"].numpy(), axis=1) <= 0)
    assert fn(k=tf.constant(0), **inputs)["item_ids"].shape == (3, 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 0"):
        fn(k=tf.constant(-1), **inputs)


def test_k_per_row_for_tf_servings_batching(exported):
    """`k` may come as one value per row ([B]: TF Serving's batching needs a batch
    dimension on every input and concatenates the requests'); every row then gets the
    largest k, in the order a scalar k gives. Any other shape is refused."""
    model, vocab, _, path = exported
    _, ids, scores, _ = eager(model, vocab, k=4)
    feeds = {"user_state": STATE, "session_items": SESSIONS, "history_items": HISTORY}
    got = run_tf1(path, "next_items", dict(feeds, k=np.int32([2, 4, 3])))
    assert got["item_ids"].astype(str).tolist() == ids.tolist()
    np.testing.assert_allclose(got["scores"], scores, rtol=1e-5, atol=1e-6)
    assert run_tf1(path, "next_items", dict(feeds, k=np.int32([4])))["item_ids"].shape == (3, 4)
    for bad in (np.int32([4, 4]), np.int32([[4, 4, 4]])):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="k must be a scalar or one value per row"):
            run_tf1(path, "next_items", dict(feeds, k=bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 0"):
        run_tf1(path, "next_items", dict(feeds, k=np.int32([4, -1, 4])))


def test_warmup_records_cover_every_signature(exported):
    """One request per signature, each input with the batch dimension (TF Serving runs
    warm-up through its batching session, which refuses a scalar: the load would fail)."""
    _, _, _, path = exported
    records = tf.data.TFRecordDataset(
        os.path.join(path, export.ASSETS_EXTRA, export.WARMUP_FILE)).as_numpy_iterator()
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    assert sorted(l.predict_log.request.model_spec.signature_name for l in logs) == [
        "item_vectors", "known_items", "next_items", "update_state", "user_embedding"]
    for log in logs:
        for name, proto in log.predict_log.request.inputs.items():
            assert [d.size for d in proto.tensor_shape.dim][:1] == [1], name


def test_saved_model_cli_show_and_run(exported):
    _, _, _, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    show = subprocess.run([cli, "show", "--all", "--dir", path], capture_output=True, text=True,
                          env=env, check=True).stdout
    assert "signature_def['next_items']" in show and "shape: (-1, 8)" in show
    run = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "next_items",
         "--input_exprs", f"user_state=[{[0.0] * 8}];session_items=[['item0','']];"
         "history_items=[['']];k=3"],
        capture_output=True, text=True, env=env, check=True).stdout
    assert "item_ids" in run and "scores" in run and "[PAD]" not in run
    # the README's --inputs form: .npy files of the state width `show` prints
    tmp = tempfile.mkdtemp()  # (not beside the export: the fixture's base holds versions)
    for name, value in (("us", np.zeros((1, 8), np.float32)), ("si", np.array([["item0", ""]])),
                        ("hi", np.array([[""]])), ("k", np.array(3))):
        np.save(os.path.join(tmp, f"{name}.npy"), value)
    files = ";".join(f"{key}={os.path.join(tmp, name)}.npy" for key, name in (
        ("user_state", "us"), ("session_items", "si"), ("history_items", "hi"), ("k", "k")))
    run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                          "next_items", "--inputs", files],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "item_ids" in run and "scores" in run and "[PAD]" not in run


def test_export_is_atomic_and_refuses_to_overwrite(exported, monkeypatch):
    model, vocab, base, _ = exported
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_model(model, vocab, base, version=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed during the export")

    monkeypatch.setattr(export, "warmup_requests", crash)  # after the SavedModel is written
    with pytest.raises(KeyboardInterrupt):
        export.export_model(model, vocab, base)
    assert os.listdir(base) == ["1"]
    assert export.next_version(base) == 2


def test_an_export_missing_a_file_is_never_published(exported, tmp_path, monkeypatch):
    """Its temporary folder removed while TensorFlow saved into it (which recreates the
    folders it writes), an export published a version without its vocabulary, which
    TensorFlow could not load (failure-injection audit): a version is published whole."""
    model, vocab, _, _ = exported
    save = export.ServingModule.save

    def save_then_lose_the_vocabulary(self, path):
        save(self, path)
        os.remove(os.path.join(path, "assets", export.VOCAB_ASSET))

    monkeypatch.setattr(export.ServingModule, "save", save_then_lose_the_vocabulary)
    base = tmp_path / "base"
    with pytest.raises(export.ExportError, match=r"the export is not whole \(assets/item_ids.txt "
                       r"missing: was its temporary folder removed meanwhile\?\); no version "
                       r"was published"):
        export.export_model(model, vocab, str(base))
    assert os.listdir(base) == []


def test_every_file_is_on_disk_before_the_version_is_published(exported, tmp_path, monkeypatch):
    """A power cut after the rename must not leave a version whose files never reached the
    disk (an empty saved_model.pb in a folder TF Serving loads): each file and folder of the
    export is fsync'ed before the rename, and the export base after it. os.fsync is the
    real one, watched (a power cut cannot be made here)."""
    model, vocab, _, _ = exported
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    base = tmp_path / "base"
    path = export.export_model(model, vocab, str(base))
    publish = events.index(("rename", path))
    synced = {p for kind, p in events[:publish] if kind == "fsync"}
    tmp_model = os.path.dirname(next(p for p in synced if p.endswith("saved_model.pb")))
    written = {os.path.join(tmp_model, os.path.relpath(os.path.join(r, n), path))
               for r, ds, fs in os.walk(path) for n in fs + ds}
    assert len(written) > 5 and written <= synced and tmp_model in synced
    assert ("fsync", str(base)) in events[publish:]


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(exported, tmp_path):
    """A SIGKILL leaves the hidden folder with a whole model's copy: the next export on the
    host removes it once nobody holds its lock, never a live export's (whatever its process
    id: another PID namespace may share the host name), a fresh one's or another host's."""
    model, vocab, _, _ = exported
    base = str(tmp_path / "base")
    host, old = export._HOST, time.time() - 2 * export.ABANDONED_AFTER_S
    left = {f".tmp-1-{host}-1-abc_12": "gone", f".tmp-1-{host}-1-live": "live",
            f".tmp-1-{host}-1-fresh": "fresh", ".tmp-1-otherhost-1-abc": "other host",
            ".tmp-1-oldname": "no lock file"}
    held = None
    for name, why in left.items():
        folder = os.path.join(base, name)
        os.makedirs(os.path.join(folder, "model"))
        if why == "live":
            held = export._hold_lock(folder)  # as the live export holds it
        elif why != "no lock file":
            open(os.path.join(folder, export.LOCK_FILE), "w").close()
        if why != "fresh":
            os.utime(folder, (old, old))
    try:
        export.export_model(model, vocab, base)
    finally:
        os.close(held)
    assert sorted(os.listdir(base)) == sorted(["1"] + [n for n, why in left.items() if why != "gone"])


def test_bad_vocabulary_id_is_rejected(tmp_path):
    vocab = lib.tiny_vocabulary(3)
    bad = vocab.__class__(ids=vocab.ids[:-1] + ("two\nlines",), counts=vocab.counts)
    with pytest.raises(export.ExportError, match="line break"):
        export.export_model(lib.tiny_model(vocab), bad, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_repeat_head_model_gets_history_then_session(tmp_path):
    """With a repeat head, next_items equals the eager model scoring history + session."""
    vocab = lib.tiny_vocabulary()
    tf.keras.utils.set_random_seed(0)
    config = lib.TINY.replace({"repeat_head": True, "history_size": 4, "start_items": 0})
    model = registry.build_model("hiertcn", config, vocab.size)
    assert model.history_size == 4
    path = export.export_model(model, vocab, str(tmp_path))
    fn = tf.saved_model.load(path).signatures["next_items"]
    history = np.array([["item6", "item9"], ["item2", ""], ["", ""]], dtype=object)
    history_idx = np.array([[8, 11], [4, 0], [0, 0]], np.int64)
    out = fn(user_state=tf.constant(STATE), session_items=tf.constant(SESSIONS),
             history_items=tf.constant(history), k=tf.constant(3))
    u = model.last_user_embedding(STATE, INDICES)
    last = np.array([5, 3, 0], np.int64)  # each session's last item (none for row 2)
    scores = model.item_scores_with_history(u, np.concatenate([history_idx, INDICES], 1),
                                            current=last).numpy()
    # the item the session is on is ranked last (the pipeline collapses immediate repeats)
    assert scores[0, 5] == scores[0].min() and scores[1, 3] == scores[1].min()
    everything = fn(user_state=tf.constant(STATE), session_items=tf.constant(SESSIONS),
                    history_items=tf.constant(history), k=tf.constant(vocab.size))
    assert everything["item_ids"].numpy().astype(str)[:2, -1].tolist() == ["item3", "item1"]
    order = np.argsort(-scores[:, 2:], axis=1, kind="stable")[:, :3]
    assert out["item_ids"].numpy().astype(str).tolist() == np.array(
        vocab.ids[2:], dtype=object)[order].tolist()
    np.testing.assert_allclose(out["scores"], np.take_along_axis(scores[:, 2:], order, 1),
                               rtol=1e-5, atol=1e-5)
    plain = fn(user_state=tf.constant(STATE), session_items=tf.constant(SESSIONS),
               history_items=tf.constant([[""], [""], [""]]), k=tf.constant(3))
    assert plain["scores"].numpy().tolist() != out["scores"].numpy().tolist()
    # an empty batch: empty answers (the packed session layers once failed on it)
    none = fn(user_state=tf.constant(STATE[:0]), session_items=tf.zeros([0, 2], tf.string),
              history_items=tf.zeros([0, 2], tf.string), k=tf.constant(3))
    assert none["item_ids"].shape == none["scores"].shape == (0, 3)


def test_an_empty_batch_gets_empty_answers(exported):
    """B = 0 (a client's empty request): [0, H], [0, k] and [0, D], not INVALID_ARGUMENT
    "Incompatible shapes: [0,2,128] vs. [0,6,128]" from inside the session layers."""
    _, _, _, path = exported
    state, ids, scores, embedding = _outputs(path, np.zeros([0, 3], dtype=object),
                                             state=STATE[:0])
    assert state.shape == (0, STATE.shape[1]) and ids.shape == scores.shape == (0, 5)
    assert embedding.shape[0] == 0 and embedding.shape[1] > 0


def _outputs(path, sessions, state=STATE):
    sig = tf.saved_model.load(path).signatures
    history = tf.constant(np.array([[""]] * len(state), dtype=object))
    items = tf.constant(sessions, dtype=tf.string)
    out = sig["next_items"](user_state=tf.constant(state), session_items=items,
                            history_items=history, k=tf.constant(5))
    return (sig["update_state"](user_state=tf.constant(state), session_items=items)["user_state"],
            out["item_ids"], out["scores"],
            sig["user_embedding"](user_state=tf.constant(state), session_items=items,
                                  history_items=history)["embedding"])


def test_padding_anywhere_in_a_session_reads_as_padding_at_the_end(exported):
    _, _, _, path = exported
    moved = np.array([["", "item0", "", "item3"], ["nope", "", "item5", "item1"],
                      ["", "", "", ""]], dtype=object)
    for got, want in zip(_outputs(path, moved), _outputs(path, SESSIONS)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_immediate_repeats_read_as_the_pipeline_writes_sessions(exported, tmp_path):
    """A reload or a double click in a served session: read as the pipeline would have
    written it (padding between the copies too). A model
    trained on records that keep repeats (`--keep-current`) is exported without it."""
    model, vocab, _, path = exported
    repeated = np.array([["item0", "item0", "", "item0", "item3", "item3"],
                         ["nope", "nope", "item5", "", "item5", "item1"],
                         ["", "", "", "", "", ""]], dtype=object)
    for got, want in zip(_outputs(path, repeated), _outputs(path, SESSIONS)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    with open(os.path.join(path, export.ASSETS_EXTRA, export.CONFIG_FILE)) as f:
        assert json.load(f)["collapses_repeats"] is True
    # "[UNK]" twice (how serving.backfill stores a data folder's unknown items, whose raw
    # ids the folder lost): two unknown items, as the folder's records and so the
    # evaluator hold them; an unknown raw id twice is one item repeated
    unknowns = np.array([["[UNK]", "[UNK]", "item5"], ["nope", "nope", "item5"],
                         ["item0", "[UNK]", "[UNK]"]], dtype=object)
    want = model.update_state(STATE, np.array([[1, 1, 7], [1, 7, 0], [2, 1, 1]])).numpy()
    np.testing.assert_allclose(_outputs(path, unknowns)[0].numpy(), want, rtol=1e-5, atol=1e-6)
    keep = lib.tiny_model(vocab, session_summary=model.config.session_summary,
                          exclude_current=False)
    keep.set_weights(model.get_weights())
    kept = export.export_model(keep, vocab, str(tmp_path))
    with open(os.path.join(kept, export.ASSETS_EXTRA, export.CONFIG_FILE)) as f:
        assert json.load(f)["collapses_repeats"] is False
    assert np.abs(_outputs(kept, repeated)[0].numpy()
                  - _outputs(kept, SESSIONS)[0].numpy())[:2].max() > 1e-6


def test_a_zero_width_session_is_an_empty_session(exported):
    _, _, _, path = exported
    empty = np.zeros([3, 0], dtype=object)
    got, want = _outputs(path, empty), _outputs(path, np.full([3, 1], "", dtype=object))
    np.testing.assert_array_equal(got[0].numpy(), STATE)  # no session: state unchanged
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_reserved_tokens_sent_as_item_ids_are_unknown_items(exported):
    _, _, _, path = exported
    unknown = SESSIONS.copy()
    tokens = unknown.copy()
    tokens[1, 0] = "[PAD]"  # row 1 starts with the unknown id "nope"
    for got, want in zip(_outputs(path, tokens), _outputs(path, unknown)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    tokens[1, 0] = "[UNK]"
    np.testing.assert_array_equal(_outputs(path, tokens)[0].numpy(),
                                  _outputs(path, unknown)[0].numpy())


def test_item_vectors_and_the_user_embedding_give_next_items_scores(tmp_path):
    """What an external nearest-neighbour index needs (DESIGN §7's `user_embedding`): the
    output layer's rows, as TF Serving runs the signatures; embedding . vector + bias is
    `next_items`' score of each item (a model without the repeat head), the bias counted;
    an id not in the catalogue gets zeros. The same with a tied output layer."""
    vocab = lib.tiny_vocabulary()
    for config in ({}, {"tied_output": True}):
        model = lib.tiny_model(vocab, **config)
        model.scorer.bias.assign(np.random.default_rng(2).normal(size=vocab.size))
        path = export.export_model(model, vocab, str(tmp_path / str(len(config))))
        feeds = {"user_state": STATE, "session_items": SESSIONS, "history_items": HISTORY}
        embedding = run_tf1(path, "user_embedding", feeds)["embedding"]
        top = run_tf1(path, "next_items", {**feeds, "k": np.int32(vocab.num_items)})
        for row in range(len(STATE)):
            got = run_tf1(path, "item_vectors", {"items": top["item_ids"][row]})
            assert got["vectors"].shape == (vocab.num_items, embedding.shape[1])
            np.testing.assert_allclose(got["vectors"] @ embedding[row] + got["bias"],
                                       top["scores"][row], rtol=1e-5, atol=1e-5)
        odd = run_tf1(path, "item_vectors", {"items": np.array(["nope", "", "[UNK]", " item2"],
                                                               dtype=object)})
        assert not odd["vectors"][:3].any() and not odd["bias"][:3].any()
        vectors, bias = (x.numpy() for x in model.output_weights())
        np.testing.assert_array_equal(odd["vectors"][3], vectors[vocab.ids.index("item2")])
        assert odd["bias"][3] == np.float32(bias[vocab.ids.index("item2")])


def test_the_readmes_nearest_neighbour_snippet_reads_the_catalogues_rows(exported, tmp_path,
                                                                      monkeypatch):
    """README § 3's Python block that builds an index's matrix from an export runs as
    written (in a folder with exports/hiertcn/1) and gives one row per catalogue item."""
    model, vocab, _, path = exported
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"),
                  encoding="utf-8").read()
    code = re.search(r"```python\n(import tensorflow as tf\nversion = .*?)```", readme,
                     re.S).group(1)
    shutil.copytree(path, tmp_path / "exports" / "hiertcn" / "1")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)  # noqa: S102 - the README's own snippet
    assert scope["ids"] == list(vocab.ids[2:])
    vectors, bias = (x.numpy() for x in model.output_weights())
    np.testing.assert_array_equal(scope["vectors"], np.concatenate([vectors, bias[:, None]],
                                                                   axis=1)[2:])


def test_known_items_says_which_ids_are_in_the_catalogue(exported):
    """As TF Serving runs it: padding, ids outside the catalogue and the reserved rows'
    tokens are not known; every catalogue id is."""
    _, vocab, _, path = exported
    items = np.array([["item0", "", "nope", "item11"], ["[PAD]", "[UNK]", "item5", ""]],
                     dtype=object)
    got = run_tf1(path, "known_items", {"items": items})["known"]
    assert got.dtype == bool and got.tolist() == [[True, False, False, True],
                                                  [False, False, True, False]]
    everything = np.array([list(vocab.ids[2:])], dtype=object)
    assert run_tf1(path, "known_items", {"items": everything})["known"].all()


def test_ids_are_looked_up_as_the_pipeline_strips_them(exported):
    """The pipeline writes a log's " item0" as item0 (Python's str.strip()): every signature
    reads an id so, with str.strip()'s whitespace (Unicode's spaces and separators, NEL,
    \\x1c-\\x1f); an id of whitespace only stays an unknown item, not padding. As TF Serving
    runs it (TF1 session) and in TF2."""
    _, _, _, path = exported
    ends = [" ", "\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x85", "\xa0",
            "\u1680", "\u2003", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
    assert all(c.isspace() and ("a" + c).strip() == "a" for c in ends)
    padded = [e + "item0" + e for e in ends] + ["item0 \u3000\t", "\x1e\x1dnope "]
    known = run_tf1(path, "known_items", {"items": np.array([padded + [" ", "\u3000\n", "item 0",
                                                                      "\u200bitem0"]],
                                                            dtype=object)})["known"]
    assert known.tolist() == [[True] * len(ends) + [True, False, False, False, False, False]]
    spaced = np.array([[" item0", "item3\u3000", ""], ["\tnope ", "item5\xa0", "\nitem1"],
                       ["", "", ""]], dtype=object)
    for got, want in zip(_outputs(path, spaced), _outputs(path, SESSIONS)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # stripped ids are compared for the pipeline's repeat collapse; whitespace only is an
    # unknown item (here, after item0, as after a typo), never padding
    repeated = np.array([["item0", " item0 ", "item3"], ["nope", "item5", "item1"],
                         ["", "", ""]], dtype=object)
    for got, want in zip(_outputs(path, repeated), _outputs(path, SESSIONS)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    blank = np.array([["item0", " ", "item3"]] * 3, dtype=object)
    unknown = np.array([["item0", "nope", "item3"]] * 3, dtype=object)
    np.testing.assert_array_equal(_outputs(path, blank)[0].numpy(),
                                  _outputs(path, unknown)[0].numpy())
    assert np.abs(_outputs(path, blank)[0].numpy() - _outputs(
        path, np.array([["item0", "", "item3"]] * 3, dtype=object))[0].numpy()).max() > 1e-6


def test_a_killed_exports_leftover_folder_is_named_never_removed(exported, tmp_path):
    """A kill -9 leaves a whole model's copy in a hidden folder; one whose process is gone
    (however fresh) or, of another host or without a lock, older than LEFTOVER_AFTER_S is
    named in one line with its size, never deleted; a live export's is not named."""
    base = tmp_path / "base"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old = time.time() - 2 * export.LEFTOVER_AFTER_S
    host = export._HOST
    names = {f".tmp-2-{host}-{gone.pid}-abc": "dead", f".tmp-3-{host}-{os.getpid()}-live": "live",
             f".tmp-4-{host}-{os.getpid()}-held": "held", ".tmp-5-otherhost-1-x": "other",
             ".tmp-6-otherhost-1-y": "other old", ".tmp-7-oldname": "old, no lock"}
    held = None
    for name, why in names.items():
        folder = base / name
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "saved_model.pb").write_bytes(b"x" * 2_000_000)
        if why in ("dead", "live", "held"):
            (folder / export.LOCK_FILE).touch()
        if why == "held":
            held = export._hold_lock(str(folder))
        if "old" in why:
            os.utime(folder, (old, old))
    try:
        note = export.leftovers_note(str(base))
    finally:
        os.close(held)
    assert note == (f"note: {base} holds 3 temporary folders of exports that did not finish "
                    f"(killed?): .tmp-2-{host}-{gone.pid}-abc (2.0 MB), .tmp-6-otherhost-1-y "
                    "(2.0 MB), .tmp-7-oldname (2.0 MB); delete them unless another export is "
                    "writing there now")
    assert sorted(os.listdir(base)) == sorted(names)  # nothing removed
    assert export.leftovers_note(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("item", ["[UNK]", "[PAD]", "item0"])
def test_a_vocabulary_with_a_repeated_or_reserved_id_is_rejected(tmp_path, item):
    vocab = lib.tiny_vocabulary(3)
    bad = vocab.__class__(ids=vocab.ids[:-1] + (item,), counts=vocab.counts)
    with pytest.raises(export.ExportError, match=f"same item id '{re.escape(item)}'"):
        export.export_model(lib.tiny_model(vocab), bad, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_version_taken_by_another_export_meanwhile(exported, tmp_path, monkeypatch):
    model, vocab, _, _ = exported
    real = export.warmup_requests
    base, taken = str(tmp_path), []

    def another_export_finishes_first(*args, **kwargs):
        # while this export writes its version, another one renames the same version
        # into place
        os.makedirs(os.path.join(base, taken[-1], "variables"))
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "warmup_requests", another_export_finishes_first)
    taken.append("1")
    path = export.export_model(model, vocab, base)  # the next free version instead
    assert path == os.path.join(base, "2") and sorted(os.listdir(base)) == ["1", "2"]
    with open(os.path.join(path, export.ASSETS_EXTRA, export.CONFIG_FILE)) as f:
        assert json.load(f)["version"] == 2
    assert sorted(os.listdir(os.path.join(path, export.ASSETS_EXTRA))) == sorted(
        [export.CONFIG_FILE, export.WARMUP_FILE])  # rewritten through a synced new file
    taken.append("5")
    with pytest.raises(export.ExportError, match="5 was written by another export meanwhile"):
        export.export_model(model, vocab, base, version=5)  # asked for: not moved
    assert sorted(os.listdir(base)) == ["1", "2", "5"]
    assert os.listdir(os.path.join(base, "5")) == ["variables"]  # the other export's, untouched


def test_a_stop_signal_during_the_publishing_rename_is_handled_after_it():
    """The rename that publishes a version and its record in PUBLISHED are one step for a
    stop signal, whichever thread takes it (a signal mask held it for the main thread
    only: a thread started before, as TensorFlow's are, took it, and the handler ran
    inside the block)."""
    import signal
    import threading

    from pipeline import argtypes

    go = threading.Event()

    def other():  # started before the block
        go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    thread = threading.Thread(target=other)
    thread.start()
    done = []
    with argtypes.sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            with argtypes.stop_signals_held():
                go.set()
                thread.join()
                time.sleep(0.2)  # (a handler would run here, in the main thread)
                done.append("another thread's")
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                time.sleep(0.2)
                done.append("this thread's")
    assert done == ["another thread's", "this thread's"]
