"""HierTCN's model API on a tiny config: state semantics, training structure, save/reload."""
import numpy as np
import pytest
import tensorflow as tf

from model import config as config_lib
from model import registry
from model.hiertcn import HierTCN
from model.keras_scorer import KerasScorer
from model.sequence_model import SequenceModel

V = 12
# The published model; the repeat head (on by default) has its own tests.
TINY = config_lib.HierTCNConfig(embedding_dim=8, gru_units=4, gru_layers=2, channels=8,
                                repeat_head=False)


@pytest.fixture(scope="module")
def model():
    tf.keras.utils.set_random_seed(0)
    return registry.build_model("hiertcn", TINY, V)


def test_shapes(model):
    state = tf.random.normal([3, model.state_size])
    items = tf.constant([[2, 3, 4, 0], [5, 0, 0, 0], [0, 0, 0, 0]], tf.int64)
    assert model.state_size == 8
    assert model.update_state(state, items).shape == (3, 8)
    u = model.user_embeddings(state, items)
    assert u.shape == (3, 5, 8)
    assert model.item_logits(u).shape == (3, 5, V)
    last = model.last_user_embedding(state, items).numpy()
    np.testing.assert_allclose(last[0], u[0, 3].numpy(), atol=1e-6)  # after item 3 of 3
    np.testing.assert_allclose(last[2], u[2, 0].numpy(), atol=1e-6)  # empty: start position


def test_update_state_keeps_all_padding_rows(model):
    state = tf.random.normal([2, 8])
    new = model.update_state(state, tf.constant([[2, 3], [0, 0]], tf.int64)).numpy()
    np.testing.assert_array_equal(new[1], state.numpy()[1])
    assert np.abs(new[0] - state.numpy()[0]).max() > 1e-6


def test_update_ignores_padding_inside_row(model):
    state = tf.random.normal([1, 8])
    a = model.update_state(state, tf.constant([[2, 3]], tf.int64))
    b = model.update_state(state, tf.constant([[2, 3, 0, 0, 0]], tf.int64))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_user_embedding_depends_on_state_and_is_causal(model):
    items = tf.constant([[2, 3, 4, 5]], tf.int64)
    s1, s2 = tf.zeros([1, 8]), tf.ones([1, 8])
    assert np.abs(model.user_embeddings(s1, items) - model.user_embeddings(s2, items)).max() > 1e-4
    other = tf.constant([[2, 3, 9, 9]], tf.int64)
    np.testing.assert_allclose(model.user_embeddings(s1, items)[:, :3].numpy(),
                               model.user_embeddings(s1, other)[:, :3].numpy(), atol=1e-6)


def _batch(items, reset, end):
    items = tf.constant(items, tf.int64)
    return {"items": items, "reset": tf.constant(reset), "session_end": tf.constant(end),
            "valid": tf.reduce_any(items > 0, axis=-1)}


def test_session_states_match_update_state_and_reset_at_user_boundaries(model):
    # Row 0: one user's session [2 3 4 5 6] split into chunks of 3, then a session [7 8];
    # row 1: user X's session [9 10], then a new user (reset) with [3 4].
    batch = _batch([[[2, 3, 4], [5, 6, 0], [7, 8, 0]], [[9, 10, 0], [3, 4, 0], [0, 0, 0]]],
                   [[True, False, False], [True, True, False]],
                   [[False, True, True], [True, True, False]])
    start = tf.random.normal([2, 8])  # stale state from a previous user
    cache = (start, tf.zeros([2, 8]), tf.zeros([2]), *model.train_cache(2)[3:])
    before, (after, acc, cnt, *_) = model.session_states(batch, cache, training=False)
    zero = np.zeros(8, np.float32)
    s1 = model.update_state(tf.zeros([1, 8]), tf.constant([[2, 3, 4, 5, 6]], tf.int64))
    s2 = model.update_state(s1, tf.constant([[7, 8]], tf.int64))
    np.testing.assert_allclose(before[0, 0], zero)            # reset before the first chunk
    np.testing.assert_allclose(before[0, 1], zero)            # second chunk: same session
    np.testing.assert_allclose(before[0, 2], s1[0], atol=1e-5)  # AGG over both chunks exactly
    np.testing.assert_allclose(after[0], s2[0], atol=1e-5)
    np.testing.assert_allclose(before[1, 1], zero)            # new user in row 1: zeroed
    t = model.update_state(tf.zeros([1, 8]), tf.constant([[3, 4]], tf.int64))
    np.testing.assert_allclose(before[1, 2], t[0], atol=1e-5)  # empty slot keeps the state
    np.testing.assert_allclose(after[1], t[0], atol=1e-5)
    np.testing.assert_allclose(cnt.numpy(), [0, 0])


def test_session_split_over_batches_carries_the_running_sum(model):
    first = _batch([[[2, 3, 4]]], [[True]], [[False]])
    second = _batch([[[5, 6, 0]]], [[False]], [[True]])
    _, cache = model.session_states(first, model.train_cache(1), training=False)
    _, (state, *_) = model.session_states(second, cache, training=False)
    whole = model.update_state(tf.zeros([1, 8]), tf.constant([[2, 3, 4, 5, 6]], tf.int64))
    np.testing.assert_allclose(state.numpy(), whole.numpy(), atol=1e-5)


def test_train_loss_counts_only_real_targets(model):
    batch = _batch([[[2, 3, 0], [0, 0, 0]]], [[True, False]], [[True, False]])
    loss, _, n = model.train_loss(batch, model.train_cache(1), training=False)
    assert int(n) == 2
    u = model.user_embeddings(tf.zeros([1, 8]), tf.constant([[2]], tf.int64))
    logp = tf.nn.log_softmax(model.item_logits(u)[..., 2:])[0].numpy()  # (the items only)
    np.testing.assert_allclose(float(loss), -(logp[0, 0] + logp[1, 1]) / 2, rtol=1e-5)


def test_no_high_level_ignores_state():
    m = registry.build_model("hiertcn", TINY.replace({"high_level": False}), V)
    items = tf.constant([[2, 3]], tf.int64)
    s = tf.ones([1, 8])
    np.testing.assert_array_equal(m.update_state(s, items).numpy(), s.numpy())
    np.testing.assert_allclose(m.user_embeddings(s, items).numpy(),
                               m.user_embeddings(tf.zeros([1, 8]), items).numpy())


def test_sampled_loss_and_tied_output():
    counts = np.array([0, 0] + [5] * (V - 2))
    m = registry.build_model("hiertcn", TINY.replace({"loss": "sampled", "num_negatives": 4,
                                                      "tied_output": True}), V, item_counts=counts)
    batch = _batch([[[2, 3, 4]]], [[True]], [[True]])
    loss, _, n = m.train_loss(batch, m.train_cache(1), training=True)
    assert np.isfinite(float(loss)) and int(n) == 3
    with pytest.raises(ValueError, match="needs item counts"):
        registry.build_model("hiertcn", TINY.replace({"loss": "sampled"}), V)


@pytest.mark.parametrize("rows", [0, 1, 3, 4, 7, 13])
def test_the_full_softmax_in_slices_is_the_whole_ones_loss_and_gradients(rows):
    """The full softmax runs over SOFTMAX_PARTS slices of the rows (independent ops, which
    TensorFlow's inter-op threads run at once): each row's loss and every gradient are the
    whole computation's, for any number of rows (fewer rows than slices too)."""
    from model import losses

    rng = np.random.default_rng(rows)
    user = tf.constant(rng.normal(size=[rows, 5]), tf.float32)
    vectors = tf.Variable(rng.normal(size=[11, 5]).astype(np.float32))
    # (the reserved indices' biases high: they are not in the normaliser, as evaluation
    # does not rank them; they were, a share of 2/V of it untrained, numerics audit)
    reserved_high = np.float32([40.0, 40.0] + [0.0] * 9)
    bias = tf.Variable(rng.normal(size=[11]).astype(np.float32) + reserved_high)
    targets = tf.constant(rng.integers(2, 11, size=rows))
    loss_fn = losses.make_loss("softmax", 11)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(user)
        got = loss_fn(user, targets, vectors, bias, True)
        whole = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets - 2, logits=(tf.matmul(user, vectors, transpose_b=True) + bias)[:, 2:])
        got_sum, whole_sum = tf.reduce_sum(got), tf.reduce_sum(whole)
    assert losses.SOFTMAX_PARTS > 1 and got.shape == [rows]
    np.testing.assert_allclose(got.numpy(), whole.numpy(), rtol=1e-5, atol=1e-6)
    for x in (user, vectors, bias):
        np.testing.assert_allclose(tape.gradient(got_sum, x).numpy(),
                                   tape.gradient(whole_sum, x).numpy(), rtol=1e-5, atol=1e-6)


def test_the_full_softmax_of_a_large_catalogue_is_one_piece(monkeypatch):
    """Above SOFTMAX_SPLIT_MAX_ITEMS each slice's gradient of the output matrix would be a
    [V, D] temporary of its own: one matmul there, SOFTMAX_PARTS below."""
    from model import losses

    def matmuls():
        graph = tf.function(losses._softmax_loss).get_concrete_function(
            tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([11, 5], tf.float32), tf.TensorSpec([11], tf.float32), True).graph
        return sum(op.type in ("MatMul", "BatchMatMulV2") for op in graph.get_operations())

    assert matmuls() == losses.SOFTMAX_PARTS
    monkeypatch.setattr(losses, "SOFTMAX_SPLIT_MAX_ITEMS", 10)
    assert matmuls() == 1


def test_the_sampled_loss_is_its_formula_with_log_q_and_accidental_hits_removed():
    """The baselines' sampled softmax, computed by hand from the same draw: each logit less
    the log of its expected count (the log-Q correction), and a negative that is the row's
    own target left out of the denominator (an accidental hit)."""
    from model import losses

    counts = np.array([0, 0, 50, 20, 10, 5, 3, 1])
    loss_fn = losses.make_loss("sampled", len(counts), num_negatives=4, item_counts=counts)
    drawn, real = [], loss_fn.sampler.candidates
    loss_fn.sampler.candidates = lambda labels: drawn.append(real(labels)) or drawn[-1]
    rng = np.random.default_rng(0)
    user = rng.normal(size=[4, 3]).astype(np.float32)
    vectors = rng.normal(size=[len(counts), 3]).astype(np.float32)
    bias = rng.normal(size=[len(counts)]).astype(np.float32)
    targets = np.array([2, 3, 4, 7])
    got = loss_fn(user, tf.constant(targets), vectors, bias, True).numpy()
    sampled, true_expected, sampled_expected = (t.numpy() for t in drawn[0])
    assert set(targets) & set(sampled)  # (4 of the 6 items: hits are certain)
    logits = user.astype(np.float64) @ vectors.T + bias
    for r, t in enumerate(targets):
        true_logit = logits[r, t] - np.log(true_expected[r, 0])
        negatives = [logits[r, s] - np.log(e) for s, e in zip(sampled, sampled_expected) if s != t]
        assert got[r] == pytest.approx(np.logaddexp.reduce([true_logit, *negatives]) - true_logit,
                                       rel=1e-4)


def test_negatives_as_many_as_the_other_items_are_the_exact_softmax():
    """--num-negatives at or above the other items with a count: the sample was clamped to
    one item fewer and weighted by TensorFlow's approximate inclusion probabilities (Z 6-7%
    high on average; numerics audit): now every item, and the loss the full softmax's, for
    the baselines' loss and HierTCN's head alike."""
    from model import losses

    counts = np.array([0, 0, 50, 20, 10, 5, 3, 1])
    rng = np.random.default_rng(1)
    user = rng.normal(size=[4, 3]).astype(np.float32)
    vectors = rng.normal(size=[len(counts), 3]).astype(np.float32)
    bias = rng.normal(size=[len(counts)]).astype(np.float32)
    targets = tf.constant([2, 3, 4, 7])
    exact = losses.make_loss("softmax", len(counts))(user, targets, vectors, bias, True)
    for asked in (5, 6, 1000):
        loss_fn = losses.make_loss("sampled", len(counts), num_negatives=asked, item_counts=counts)
        assert loss_fn.sampler.exact and loss_fn.sampler.num_sampled == 6
        np.testing.assert_allclose(loss_fn(user, targets, vectors, bias, True).numpy(),
                                   exact.numpy(), rtol=1e-6)
        ids, log_inclusion = loss_fn.sampler(targets)
        assert sorted(ids.numpy().tolist()) == [2, 3, 4, 5, 6, 7] and not log_inclusion.numpy().any()
    assert not losses.make_loss("sampled", len(counts), num_negatives=4,
                                item_counts=counts).sampler.exact


def test_negative_exponent_flattens_the_sampling():
    counts = np.array([0, 0] + [1] + [100] * (V - 3))
    rare = {}
    for exponent in (1.0, 0.5):
        m = registry.build_model("hiertcn", TINY.replace({"loss": "sampled", "num_negatives": 2,
                                                          "negative_exponent": exponent}),
                                 V, item_counts=counts)
        tf.random.set_seed(0)
        drawn = np.concatenate([m.sampler(tf.constant([3], tf.int64))[0].numpy()
                                for _ in range(1000)])
        assert drawn.min() >= 2  # never a reserved index
        rare[exponent] = np.mean(drawn == 2)
    # item 2 (count 1) vs the others (100 each): 1 / 901 of the mass by popularity,
    # 1 / 91 by its square root (about 0.0011 and 0.011 of the drawn items)
    assert rare[1.0] < 0.004 < rare[0.5]
    with pytest.raises(config_lib.ConfigError, match=r"negative_exponent must be in \(0, 1\]"):
        TINY.replace({"negative_exponent": 0.0})


def test_pretrained_item_vectors_are_frozen(tmp_path):
    vectors = np.random.default_rng(0).normal(size=[V, 8]).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    m = registry.build_model("hiertcn", TINY.replace({"pretrained_item_vectors": str(tmp_path / "v.npy")}), V)
    np.testing.assert_array_equal(m.item_embedding.embeddings.numpy(), vectors)
    assert m.item_embedding.embeddings.ref() not in {v.ref() for v in m.trainable_variables}
    np.save(tmp_path / "bad.npy", vectors[:5])
    with pytest.raises(ValueError, match=r"shape \(5, 8\), expected \[12, 8\]"):
        registry.build_model("hiertcn", TINY.replace({"pretrained_item_vectors": str(tmp_path / "bad.npy")}), V)


def test_get_config_round_trip(model):
    again = HierTCN.from_config(model.get_config())
    assert again.get_config() == model.get_config()


def test_checkpoint_reload_and_scorer(model, tmp_path):
    state = tf.random.normal([2, 8])
    items = np.array([[2, 3, 4], [5, 6, 0]], np.int64)
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    again = registry.build_model("hiertcn", TINY, V)
    tf.train.Checkpoint(model=again).read(str(tmp_path / "ckpt")).assert_existing_objects_matched()
    scorer = KerasScorer(again)
    expected = model.item_logits(model.user_embeddings(state, items[:, :-1])).numpy()
    np.testing.assert_allclose(scorer.score(state.numpy(), items), expected, atol=1e-5)
    np.testing.assert_allclose(scorer.update(state.numpy(), items),
                               model.update_state(state, items).numpy(), atol=1e-5)
    assert scorer.initial_state(["a", "b", "c"]).shape == (3, 8)


def test_start_items_in_training_equal_update_state_across_chunks_and_batches():
    tf.keras.utils.set_random_seed(1)
    config = TINY.replace({"repeat_head": True, "history_size": 4, "start_items": 3})
    m = registry.build_model("hiertcn", config, V)
    assert (m.state_size, m.gru_size, m.num_start_items) == (11, 8, 3)
    assert registry.build_model("hiertcn", config.replace({"repeat_head": False}), V).num_start_items == 0
    # Row 0 (one user): [2 3 4 5 6] over two chunks, [7 8] ending with the batch, then in the
    # next batch [9 10 11 3] (starting at slot 0 without a reset) and [4 5].
    # Row 1: [9 10], a new user with [3 4], an empty slot; next batch: [2] left unfinished.
    b1 = _batch([[[2, 3, 4], [5, 6, 0], [7, 8, 0]], [[9, 10, 0], [3, 4, 0], [0, 0, 0]]],
                [[True, False, False], [True, True, False]],
                [[False, True, True], [True, True, False]])
    b2 = _batch([[[9, 10, 11], [3, 0, 0], [4, 5, 0]], [[2, 0, 0], [0, 0, 0], [0, 0, 0]]],
                [[False, False, False], [False, False, False]],
                [[False, True, True], [False, False, False]])
    before1, cache = m.session_states(b1, m.train_cache(2), training=False)
    before2, cache = m.session_states(b2, cache, training=False)

    def after(state, items):
        return m.update_state(state, tf.constant([items], tf.int64))[0]

    s1 = after(tf.zeros([1, 11]), [2, 3, 4, 5, 6])
    s2 = after(s1[None], [7, 8])
    s3 = after(s2[None], [9, 10, 11, 3])
    s4 = after(s3[None], [4, 5])
    for got, want in [(before1[0, 2], s1), (before2[0, 0], s2), (before2[0, 1], s2),
                      (before2[0, 2], s3), (cache[0][0], s4)]:
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(before1[1, 2].numpy(), after(tf.zeros([1, 11]), [3, 4]).numpy(),
                               atol=1e-5)
    # the first items of the last 3 sessions, oldest first (0: none yet)
    assert [s.numpy()[8:].tolist() for s in (s1, s2, s4)] == [[0, 0, 2], [0, 2, 7], [7, 9, 4]]
    # the unfinished session's first item waits in the cache (with "under way"); none in row 0
    np.testing.assert_array_equal(cache[3].numpy(), [[0, 0], [2, 1]])
    # the packed training encoder equals the padded one
    u_packed, _ = m.encode_events(b2, cache, False)
    u_padded, _ = SequenceModel.encode_events(m, b2, cache, False)
    np.testing.assert_allclose(u_packed.numpy(), u_padded.numpy(), atol=1e-5)
    with pytest.raises(config_lib.ConfigError, match="start_items must be >= 0"):
        TINY.replace({"start_items": -1})
