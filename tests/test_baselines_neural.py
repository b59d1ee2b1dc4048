"""The neural baselines GRU4Rec, HRNN and the flat TCN: training and evaluation through the
real commands on a tiny log, their state semantics, and training = evaluation exactness."""
import json

import numpy as np
import pytest
import tensorflow as tf

from model import evaluate as evaluate_lib
from model import registry
from model import train as train_lib
from model.gru4rec import GRU4Rec, GRU4RecConfig
from model.hrnn import HRNN, HRNNConfig
from model.keras_scorer import KerasScorer
from model.tcn import FlatTCN, TCNConfig, last_tokens
from tiny_logs import planted_users, write_data

V = 14
CONFIGS = {
    "gru4rec": GRU4RecConfig(embedding_dim=8, units=8),
    "hrnn": HRNNConfig(embedding_dim=8, session_units=8, user_units=4, user_layers=2),
    # receptive field 1 + 1 * (1 + 2 + 4) = 8 > N + 1: truncation is visible
    "tcn": TCNConfig(embedding_dim=8, channels=(8, 8, 16), kernel_size=2, history_length=6),
}
TRAIN = {"batch_size": 4, "sessions_per_batch": 3, "max_session_length": 4,
         "learning_rate": 0.01, "lr_schedule": "constant", "checkpoint_every": 100, "shuffle_buffer": 16}
TINY_MODELS = {"gru4rec": {"embedding_dim": 16, "units": 16},
               "hrnn": {"embedding_dim": 16, "session_units": 16, "user_units": 16},
               "tcn": {"embedding_dim": 16, "channels": [16, 16, 16], "kernel_size": 3,
                       "history_length": 16}}


def _model(name, **overrides):
    tf.keras.utils.set_random_seed(0)
    return registry.build_model(name, CONFIGS[name].replace(overrides), V)


def _batch(items, reset, end):
    items = tf.constant(items, tf.int64)
    return {"items": items, "reset": tf.constant(reset), "session_end": tf.constant(end),
            "valid": tf.reduce_any(items > 0, axis=-1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "data")
    return write_data(path, 20, planted_users(40),
                      valid=[(3, u[:4]) for u in planted_users(6, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(6, seed=2)])


def test_mixed_precision_trains_every_model_with_either_loss(data, tmp_path, capsys):
    """--mixed-precision (bfloat16 on a CPU) trains each model with either loss (with the sampled one
    the output bias was once added in bfloat16 to float32 logits), and the caller's float32
    policy is back afterwards."""
    for name in ("hiertcn", "gru4rec", "hrnn", "tcn"):
        config = str(tmp_path / f"{name}.json")
        with open(config, "w") as f:
            json.dump({"model": TINY_MODELS.get(name, {"embedding_dim": 16, "gru_units": 8,
                                                       "channels": 16}), "train": TRAIN}, f)
        for loss in ("softmax", "sampled"):
            run = str(tmp_path / f"{name}-{loss}")
            assert train_lib.main(["--data", data, "--model", name, "--model-dir", run,
                                   "--config", config, "--steps", "3", "--eval-every", "0",
                                   "--loss", loss, "--mixed-precision", "--no-progress",
                                   *(["--num-negatives", "8"] if loss == "sampled" else [])]
                                  ) == 0, (name, loss)
            assert tf.keras.mixed_precision.global_policy().name == "float32"
            summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert np.isfinite(summary["final_loss"])


@pytest.mark.parametrize("name", ["hiertcn", "gru4rec", "hrnn", "tcn"])
def test_the_catalogue_scores_are_float32_under_mixed_precision(name):
    """Under --mixed-precision the baselines scored the catalogue in bfloat16 (about half
    of an untrained row's scores tied, each tie counted against the target), so the valid
    evaluations in training, and best.json, disagreed with model.evaluate's float32 model
    (numerics audit); HierTCN's scorer was float32 already."""
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _model(name) if name != "hiertcn" else registry.build_model(
            "hiertcn", registry.config_classes()["hiertcn"]().replace(
                {"embedding_dim": 16, "gru_units": 8, "channels": 16}), V)
        user = tf.random.stateless_normal([3, model.output_weights()[0].shape[-1]], seed=[1, 2])
        logits = model.item_logits(user)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    vectors, bias = (x.numpy() for x in model.output_weights())
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), user.numpy() @ vectors.T + bias, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", ["gru4rec", "hrnn", "tcn"])
def test_trains_and_evaluates_with_the_commands(name, data, tmp_path, capsys):
    config = str(tmp_path / "c.json")
    with open(config, "w") as f:
        json.dump({"model": TINY_MODELS[name], "train": TRAIN}, f)
    run = str(tmp_path / "run")
    assert train_lib.main(["--data", data, "--model", name, "--model-dir", run, "--config", config,
                           "--steps", "60", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == name and summary["steps"] == 60 and summary["events_per_s"] > 0
    assert summary["final_loss"] < np.log(20) - 0.5  # well below uniform over 20 items
    out = str(tmp_path / "metrics.json")
    assert evaluate_lib.main(["--data", data, "--split", "test", "--model-dir", run,
                              "--output", out, "--no-progress"]) == 0
    with open(out) as f:
        metrics = json.load(f)
    keys = [f"{m}@{k}" for m in ("recall", "mrr") for k in (1, 5, 10, 20)] + ["events", "unknown_targets"]
    for group in (metrics, metrics["first_item"], metrics["repeat"], metrics["new"]):
        assert all(k in group for k in keys)
    assert metrics["model"] == name and metrics["events"] == 6 * 4  # 6 users, 1 session of 5
    assert 0.0 < metrics["recall@5"] <= metrics["recall@20"] <= 1.0
    if name == "gru4rec":  # session-only: first items are scored by popularity (DESIGN §6)
        assert evaluate_lib.main(["--data", data, "--split", "test", "--model", "popularity",
                                  "--output", out, "--no-progress"]) == 0
        with open(out) as f:
            assert metrics["first_item"] == json.load(f)["first_item"]


@pytest.mark.parametrize("name", ["gru4rec", "hrnn", "tcn"])
def test_config_round_trips_and_is_strict(name):
    model = _model(name)
    again = type(model).from_config(model.get_config())
    assert again.get_config() == model.get_config()
    config = CONFIGS[name]
    assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=f"unknown {type(config).__name__} key 'nope'"):
        config.replace({"nope": 1})
    with pytest.raises(ValueError, match="model.dropout must be in"):
        config.replace({"dropout": 1.5})


def test_gru4rec_ignores_earlier_sessions():
    model = _model("gru4rec")
    scorer = KerasScorer(model, name="gru4rec")
    session = np.array([[2, 3, 4], [5, 6, 0]], np.int64)
    fresh = scorer.score(scorer.initial_state(["a", "b"]), session)
    state = scorer.update(scorer.update(scorer.initial_state(["a", "b"]), np.array([[7, 8], [9, 0]])),
                          np.array([[10, 11], [0, 0]]))
    np.testing.assert_array_equal(scorer.score(state, session), fresh)
    # in training too: a slot's user vectors do not depend on the row's earlier slots
    alone = model.encode(_batch([[[2, 3, 4]]], [[True]], [[True]]), model.train_cache(1), False)[0]
    after = model.encode(_batch([[[7, 8, 9], [2, 3, 4]]], [[True, False]], [[True, True]]),
                         model.train_cache(1), False)[0]
    np.testing.assert_allclose(after[1].numpy(), alone[0].numpy(), atol=1e-6)


def test_hrnn_user_state_changes_only_at_session_ends():
    model = _model("hrnn")
    scorer = KerasScorer(model, name="hrnn")
    state = scorer.update(scorer.initial_state(["a"]), np.array([[2, 3, 4]]))
    before = state.copy()
    scorer.score(state, np.array([[5, 6, 7]]))  # a session prefix being scored ...
    np.testing.assert_array_equal(state, before)  # ... is no session end
    np.testing.assert_array_equal(scorer.update(state, np.array([[0, 0]])), before)
    assert np.abs(scorer.update(state, np.array([[5, 6]])) - before).max() > 1e-4
    # in training: the cache's user state moves at `session_end` only
    first = _batch([[[2, 3, 4]]], [[True]], [[False]])       # chunk 1 of [2 3 4 5 6]
    second = _batch([[[5, 6, 0]]], [[False]], [[True]])      # its last chunk
    _, cache = model.encode(first, model.train_cache(1), False)
    np.testing.assert_array_equal(cache[0].numpy(), np.zeros([1, 8]))
    _, cache = model.encode(second, cache, False)
    whole = model.update_state(tf.zeros([1, 8]), tf.constant([[2, 3, 4, 5, 6]], tf.int64))
    np.testing.assert_allclose(cache[0].numpy(), whole.numpy(), atol=1e-5)


def _expected_user_vectors(model, users_per_row):
    """Evaluation-path user vectors of each slot: state from `update_state` over the user's
    earlier sessions, then `user_embeddings` over the whole session, cut into chunks of 3."""
    rows = []
    for users in users_per_row:
        slots = []
        for sessions in users:
            state = model.initial_state(1)
            for session in sessions:
                u = model.user_embeddings(state, tf.constant([session[:-1]], tf.int64))[0]
                for k in range(0, len(session), 3):
                    chunk = np.zeros([3, u.shape[-1]], np.float32)
                    chunk[:len(session[k:k + 3])] = u[k:k + 3]
                    slots.append(chunk)
                state = model.update_state(state, tf.constant([session], tf.int64))
        rows.append(slots)
    return rows


@pytest.mark.parametrize("name,overrides", [("gru4rec", {}), ("hrnn", {}), ("tcn", {"history_length": 8})])
def test_training_matches_evaluation_over_chunks_batches_and_user_switches(name, overrides):
    model = _model(name, **overrides)  # TCN: N >= receptive field, so truncation is exact
    # row 0: user A [2 3 4 5 6] (chunks [2 3 4], [5 6]), [7 8], [9 10 11 12] (two chunks);
    # row 1: user B [3 4], then user C [5 6 7] [8 9] [10 2 3 4] — a switch inside a batch.
    batches = [
        _batch([[[2, 3, 4], [5, 6, 0]], [[3, 4, 0], [5, 6, 7]]],
               [[True, False], [True, True]], [[False, True], [True, True]]),
        _batch([[[7, 8, 0], [9, 10, 11]], [[8, 9, 0], [10, 2, 3]]],
               [[False, False], [False, False]], [[True, False], [True, False]]),
        _batch([[[12, 0, 0], [0, 0, 0]], [[4, 0, 0], [0, 0, 0]]],
               [[False, False], [False, False]], [[True, False], [True, False]]),
    ]
    expected = _expected_user_vectors(model, [
        [[[2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]],
        [[[3, 4]], [[5, 6, 7], [8, 9], [10, 2, 3, 4]]]])
    cache = model.train_cache(2)
    got = [[], []]
    for batch in batches:
        u, cache = model.encode(batch, cache, False)
        u = u.numpy().reshape(2, 2, 3, -1)
        for r in range(2):
            got[r] += [u[r, k] * (batch["items"].numpy()[r, k, :, None] > 0)
                       for k in range(2) if batch["valid"].numpy()[r, k]]
    for r in range(2):
        assert len(got[r]) == len(expected[r])
        for g, e in zip(got[r], expected[r]):
            np.testing.assert_allclose(g, e, atol=1e-5)


def test_tcn_chunk_continued_at_a_batch_start_matches_evaluation_with_n_at_the_receptive_field():
    """A session the generator cut into two chunks, the second at the next batch's first
    slot: its first item is predicted from the cache's last token, computed from the N
    cached tokens alone. With N = receptive field (the least model.train accepts) every
    training vector is evaluation's (with N = receptive field - 1 the fifth differed)."""
    from model import batching
    tf.keras.utils.set_random_seed(0)
    model = registry.build_model("tcn", TCNConfig(embedding_dim=8, channels=(8, 8), kernel_size=2,
                                                  history_length=4), 20)  # receptive field 4
    assert model.config.receptive_field == 4
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # weights large enough that no path hides
        v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
    session = np.arange(2, 10, dtype=np.int64)  # 8 items, L = 4: two chunks in two batches
    cache, trained = model.train_cache(1), []
    for batch in batching.QueueBatcher(lambda: [[session]], 1, 1, 4, epochs=1):
        u, cache = model.encode_events({k: tf.constant(v) for k, v in batch.items()}, cache, False)
        trained.append(u.numpy())
    trained = np.concatenate(trained)
    evaluated = model.user_embeddings(model.initial_state(1), session[None, :-1])[0].numpy()
    assert trained.shape == evaluated.shape == (8, 8)
    np.testing.assert_allclose(trained, evaluated, atol=1e-4)


def test_tcn_state_is_the_last_n_tokens_and_outputs_are_causal():
    model = _model("tcn")
    sep = V
    state = model.update_state(model.initial_state(2), tf.constant([[2, 3, 4, 5], [6, 0, 0, 0]], tf.int64))
    np.testing.assert_array_equal(state.numpy(), [[0, sep, 2, 3, 4, 5], [0, 0, 0, 0, sep, 6]])
    state = model.update_state(state, tf.constant([[7, 8], [0, 0]], tf.int64))
    np.testing.assert_array_equal(state.numpy(), [[3, 4, 5, sep, 7, 8], [0, 0, 0, 0, sep, 6]])
    np.testing.assert_array_equal(
        last_tokens(tf.constant([[1, 2, 3, 4, 5]], tf.int64), tf.constant([[True, False, True, True, False]]), 2),
        [[3, 4]])
    # causal: position t depends only on the prefix before it
    a = model.user_embeddings(state[:1], tf.constant([[2, 3, 4, 5]], tf.int64)).numpy()
    b = model.user_embeddings(state[:1], tf.constant([[2, 3, 9, 9]], tf.int64)).numpy()
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.abs(a[:, 3] - b[:, 3]).max() > 1e-6
    # truncated to N: history older than the last N tokens is forgotten
    other = model.update_state(model.initial_state(1), tf.constant([[9, 9, 9, 3, 4, 5]], tf.int64))
    other = model.update_state(other, tf.constant([[7, 8]], tf.int64))
    np.testing.assert_array_equal(other.numpy(), state.numpy()[:1])
    # the receptive field (8) reaches past N + SEP: the buffer's oldest token matters
    older = state.numpy()[:1].copy()
    older[0, 0] = 10
    assert np.abs(model.user_embeddings(older, tf.constant([[2]], tf.int64)).numpy() - a[:, :2]).max() > 1e-6


def test_tcn_rejects_a_vocabulary_too_large_for_float32_indices():
    with pytest.raises(ValueError, match="must be below"):
        FlatTCN(CONFIGS["tcn"].replace({"loss": "softmax"}), 2 ** 24)


def test_models_are_registered():
    assert {"gru4rec": GRU4Rec, "hrnn": HRNN, "tcn": FlatTCN}.items() <= registry.MODELS.items()
    assert TCNConfig().receptive_field == 253 and TCNConfig().history_length >= 253


def test_session_only_hiertcn_scores_first_items_by_popularity(data):
    """The ablation without the high level (and without the repeat head, which reads the
    history) is session-only: DESIGN §6 scores its first items by popularity, as for
    GRU4Rec; with either part the model's own first-item scores stay."""
    from model import baselines, evaluate
    from model.hiertcn import HierTCNConfig
    from pipeline import schema

    vocab = schema.read_vocabulary(data)
    tiny = {"embedding_dim": 16, "gru_units": 8, "channels": 16}
    popular = evaluate.evaluate(baselines.fit("popularity", data), data, "test", progress=False)
    for overrides, session_only in (({"high_level": False, "repeat_head": False}, True),
                                    ({"repeat_head": False}, False),
                                    ({"high_level": False}, False)):
        config = HierTCNConfig().replace({**tiny, **overrides})
        model = registry.build_model("hiertcn", config, vocab.size, vocab.counts)
        assert (model.first_item_scores is not None) == session_only, overrides
        first = evaluate.evaluate(KerasScorer(model), data, "test", progress=False)["first_item"]
        assert (first == popular["first_item"]) == session_only, overrides


def test_gru4rec_without_first_item_targets_takes_no_loss_on_a_sessions_first_item():
    """`first_item_targets=False`: as Hidasi et al.'s session-parallel batches, a session's
    first item (scored by popularity when evaluated) is no target; a later chunk's
    position 0 continues its session and is. By default it is a target."""
    model = _model("gru4rec", first_item_targets=False)
    # one-item sessions: no targets at all (their events still count); by default, two
    batch = _batch([[[2, 0, 0], [3, 0, 0]]], [[True, False]], [[True, True]])
    loss, _, n = model.train_loss(batch, model.train_cache(1), training=False)
    assert float(loss) == 0.0 and int(n) == 2
    default = _model("gru4rec")
    assert float(default.train_loss(batch, default.train_cache(1), training=False)[0]) > 0
    # [2 3 4 5 6] cut into [2 3 4] and [5 6], the second chunk at the next batch's slot 0,
    # after an earlier session [7 8] of the row
    u = model.user_embeddings(model.initial_state(1), tf.constant([[2, 3, 4, 5]], tf.int64))[0]
    item_vectors, bias = model.output_weights()

    def mean_loss(positions, targets):
        return float(tf.reduce_mean(model.loss_fn(tf.gather(u, positions), tf.constant(
            targets, tf.int64), item_vectors, bias, False)))

    cache = model.train_cache(1)
    first = _batch([[[7, 8, 0], [2, 3, 4]]], [[True, False]], [[True, False]])
    loss, cache, n = model.train_loss(first, cache, training=False)
    assert int(n) == 5
    got = model.user_embeddings(model.initial_state(1), tf.constant([[7]], tf.int64))[0]
    expected = (float(model.loss_fn(got[1:], tf.constant([8], tf.int64), item_vectors, bias,
                                    False)[0]) + 2 * mean_loss([1, 2], [3, 4])) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    loss, _, n = model.train_loss(_batch([[[5, 6, 0]]], [[False]], [[True]]), cache,
                                  training=False)
    assert int(n) == 2
    np.testing.assert_allclose(float(loss), mean_loss([3, 4], [5, 6]), rtol=1e-5)


@pytest.mark.parametrize("name", ["hiertcn", "gru4rec", "hrnn", "tcn"])
def test_the_state_api_refuses_what_it_would_misread(name):
    """Called as a library: another row count than the state's scored the second user with
    the first one's state, a state of another width was taken (HierTCN), float ids were cut
    to integers (API audit); each is a one-line error, and a right call is unchanged."""
    from model.config import HierTCNConfig

    if name == "hiertcn":
        tf.keras.utils.set_random_seed(0)
        model = registry.build_model("hiertcn", HierTCNConfig(
            embedding_dim=8, gru_units=4, gru_layers=1, channels=8, kernel_size=2,
            num_blocks=2), V)
    else:
        model = _model(name)
    items = np.array([[2, 3, 0], [4, 5, 6]], np.int64)
    state = model.update_state(model.initial_state(2), items)
    h = model.state_size
    for call in (model.update_state, model.user_embeddings, model.last_user_embedding):
        with pytest.raises(ValueError, match="the state has 1 rows but .* has 2: one row per user"):
            call(state[:1], items)
        with pytest.raises(ValueError, match=rf"the state must be \[batch, {h}\]"):
            call(tf.ones([2, h + 3]), items)
        with pytest.raises(TypeError, match="must be integer item indices, got float64"):
            call(state, items.astype(float) + 0.9)
    # lists, int32 and an empty session are still taken as they were
    np.testing.assert_allclose(model.update_state(state.numpy().tolist(), items.tolist()),
                               model.update_state(state, tf.constant(items, tf.int32)))
    np.testing.assert_allclose(model.update_state(state[:1], [[]]), state[:1])
