"""The repeat-aware HierTCN head: a proper mixture distribution, history buffers that reset at
user boundaries (generator and online scorer alike), training and evaluation end to end."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from model import batching
from model import config as config_lib
from model import metrics
from model import registry
from model import train as train_lib
from model.hrnn import HRNNConfig
from pipeline import schema
from model.base import push_history
from model.hiertcn import _last_columns, _right_aligned
from model import keras_scorer
from model import layers
from model.keras_scorer import KerasScorer
from tiny_logs import planted_users, write_data

V = 12
# The head over the user's last items only (the start items have their own tests).
HEAD = config_lib.HierTCNConfig(embedding_dim=8, gru_units=4, gru_layers=2, channels=8,
                                repeat_head=True, history_size=4, start_items=0, dropout=0.0)


def _model(config=HEAD, seed=0):
    tf.keras.utils.set_random_seed(seed)
    return registry.build_model("hiertcn", config, V)


def _set_head(model, gate_bias=0.0, recency=None):
    """Query and gate kernels zero: p_rep depends on the recency bias only, w = sigmoid(gate_bias)."""
    head = model.repeat_head
    head.query.assign(tf.zeros_like(head.query))
    head.gate.assign(tf.zeros_like(head.gate))
    head.gate_bias.assign(gate_bias)
    head.recency.assign(np.zeros(head.max_age, np.float32) if recency is None else recency)


def test_config_checks_the_history_size():
    with pytest.raises(config_lib.ConfigError, match="history_size must be >= 1"):
        HEAD.replace({"history_size": 0})


def test_head_is_on_by_default_with_either_loss_and_flags_override_it():
    default = config_lib.HierTCNConfig()
    assert default.repeat_head is True and default.loss == "auto"
    assert default.uses_repeat_head and default.replace({"loss": "sampled"}).uses_repeat_head
    assert not default.replace({"repeat_head": False}).uses_repeat_head
    # null, in the run folders of older versions: on with the full softmax only
    legacy = default.replace({"repeat_head": None})
    assert legacy.uses_repeat_head and legacy.replace({"loss": "softmax"}).uses_repeat_head
    assert not legacy.replace({"loss": "sampled"}).uses_repeat_head
    assert config_lib.HierTCNConfig.from_dict(legacy.to_dict()) == legacy  # null round-trips
    with pytest.raises(config_lib.ConfigError, match="'repeat_head' must be bool, got 'yes'"):
        default.replace({"repeat_head": "yes"})
    assert _model(default.replace({"embedding_dim": 8, "gru_units": 4, "channels": 8})).repeat_head
    assert _model(HEAD.replace({"repeat_head": False})).repeat_head is None

    def resolved(*flags):
        return train_lib.resolve_config(train_lib.parse_args(
            ["--data", "d", "--model-dir", "r", *flags])).model.uses_repeat_head

    assert resolved() and resolved("--repeat-head") and resolved("--loss", "sampled")
    assert not resolved("--no-repeat-head")
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        resolved("--repeat-head", "--no-repeat-head")
    assert e.value.code == 2
    starts = lambda *flags: train_lib.resolve_config(train_lib.parse_args(
        ["--data", "d", "--model-dir", "r", *flags])).model.start_items
    assert (starts(), starts("--start-items", "0"), starts("--start-items", "5")) == (20, 0, 5)
    seen = lambda *flags: train_lib.resolve_config(train_lib.parse_args(
        ["--data", "d", "--model-dir", "r", *flags])).model.seen_bias
    assert seen() and not seen("--no-seen-bias")
    transition = lambda *flags: train_lib.resolve_config(train_lib.parse_args(
        ["--data", "d", "--model-dir", "r", *flags])).model.transition_bias
    assert transition("--transition-bias") and not transition("--no-transition-bias")
    assert transition() == config_lib.HierTCNConfig().transition_bias
    with pytest.raises(SystemExit):
        transition("--transition-bias", "--no-transition-bias")
    current = lambda *flags: train_lib.resolve_config(train_lib.parse_args(
        ["--data", "d", "--model-dir", "r", *flags])).model.exclude_current
    assert current() and not current("--keep-current")
    # an option that another one given with it switches off is refused (the run trained as
    # without it while config.json recorded it)
    for flags, message in ((("--no-repeat-head", "--start-items", "5"),
                            "--start-items has no effect with --no-repeat-head"),
                           (("--no-high-level", "--start-items", "5"),
                            "--start-items has no effect with --no-high-level"),
                           (("--no-repeat-head", "--transition-bias"),
                            "--transition-bias has no effect with --no-repeat-head"),
                           (("--no-repeat-head", "--no-seen-bias"),
                            "--no-seen-bias has no effect with --no-repeat-head"),
                           (("--loss", "softmax", "--num-negatives", "10"),
                            "--num-negatives has no effect with --loss softmax"),
                           (("--loss", "softmax", "--negative-exponent", "1"),
                            "--negative-exponent has no effect with --loss softmax")):
        with pytest.raises(config_lib.ConfigError, match=message):
            starts(*flags)
    assert starts("--no-high-level", "--start-items", "0") == 0  # (0 is "off": consistent)
    assert starts("--no-repeat-head", "--loss", "sampled", "--num-negatives", "10") == 20


def test_mixture_is_a_distribution_and_respects_padding():
    model = _model()
    state = tf.random.normal([3, model.state_size])
    history = tf.constant([[0, 7, 1, 7], [9, 0, 0, 10], [0, 0, 0, 0]], tf.int64)
    prefix = tf.constant([[2, 3, 4, 0], [5, 1, 0, 0], [0, 0, 0, 0]], tf.int64)
    p = np.exp(model.item_log_probs(model.user_embeddings(state, prefix), history, prefix).numpy())
    assert p.shape == (3, 5, V)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert p[..., :2].max() == 0.0  # padding and unknown get exactly zero


# The mixture itself, before it is conditioned on the next item not being the current one
# (`test_current_item_is_excluded_and_the_rest_renormalised`).
MIXTURE = HEAD.replace({"exclude_current": False})


def test_mixture_by_hand():
    # w = sigmoid(0) = 1/2. history [pad 7 unk 7], prefix [2 3]; known items newest last:
    # position 0: 7 7 -> p_rep(7) = 1; position 1: 7 7 2 -> 7: 2/3, 2: 1/3;
    # position 2: 7 7 2 3 -> 7: 1/2, 2: 1/4, 3: 1/4.
    model = _model(MIXTURE)
    _set_head(model)
    state = tf.random.normal([1, model.state_size])
    history = tf.constant([[0, 7, 1, 7]], tf.int64)
    prefix = tf.constant([[2, 3]], tf.int64)
    u = model.user_embeddings(state, prefix)
    logits = model.item_logits(u).numpy()[0]
    cat = np.exp(logits[:, 2:] - logits[:, 2:].max(-1, keepdims=True))
    cat = np.concatenate([np.zeros([3, 2]), cat / cat.sum(-1, keepdims=True)], axis=1)
    rep = np.zeros([3, V])
    rep[0, 7] = 1
    rep[1, [7, 2]] = [2 / 3, 1 / 3]
    rep[2, [7, 2, 3]] = [1 / 2, 1 / 4, 1 / 4]
    got = np.exp(model.item_log_probs(u, history, prefix).numpy()[0])
    np.testing.assert_allclose(got, 0.5 * cat + 0.5 * rep, atol=1e-6)
    # Recency bias log 2 on the newest item (age 0): position 1 weighs 2 twice -> 7: 1/2, 2: 1/2.
    # history_size 4 keeps only the newest four known items: at position 2 the oldest 7 drops.
    _set_head(model, recency=[np.log(2.0), 0, 0, 0])
    got = np.exp(model.item_log_probs(u, history, prefix).numpy()[0])
    np.testing.assert_allclose(got[1, [7, 2]] - 0.5 * cat[1, [7, 2]], [0.25, 0.25], atol=1e-6)
    longer = tf.constant([[2, 3, 4]], tf.int64)
    u3 = model.user_embeddings(state, longer)
    got = np.exp(model.item_log_probs(u3, history, longer).numpy()[0, 3])
    cat3 = np.exp(model.item_log_probs(u3, tf.zeros([1, 0], tf.int64), tf.zeros([1, 0], tf.int64)
                                       ).numpy()[0, 3])  # nothing to point at: catalogue only
    # known items newest first: 4 (age 0, weight 2), 3, 2, 7 -> 4: 2/5, 3, 2, 7: 1/5 each.
    np.testing.assert_allclose(got[[4, 3, 2, 7]] - 0.5 * cat3[[4, 3, 2, 7]],
                               [0.2, 0.1, 0.1, 0.1], atol=1e-6)


def test_seen_bias_by_hand():
    # The seen bias beta = log 1/4 weighs the catalogue probability of every item seen
    # (the newest history_size = 4 known items of history + session so far, each counted
    # once) by 1/4 before normalising; the attention sees only the newest repeat_window = 2.
    model = _model(MIXTURE.replace({"repeat_window": 2}))
    _set_head(model, gate_bias=-40.0)  # w = 0: the biased catalogue alone
    model.repeat_head.set_seen_bias(np.log(0.25))
    state = tf.random.normal([1, model.state_size])
    history = tf.constant([[0, 7, 1, 7]], tf.int64)
    prefix = tf.constant([[2, 3]], tf.int64)
    u = model.user_embeddings(state, prefix)
    logits = model.item_logits(u).numpy()[0]
    weight = np.exp(logits - logits.max(-1, keepdims=True))
    weight[:, :2] = 0
    seen = [[7], [7, 2], [7, 2, 3]]
    for p, items in enumerate(seen):
        weight[p, items] *= 0.25
    cat = weight / weight.sum(-1, keepdims=True)
    got = np.exp(model.item_log_probs(u, history, prefix).numpy()[0])
    np.testing.assert_allclose(got, cat, rtol=1e-5, atol=1e-7)
    # w = 1/2; the attention over the newest two known items: 7 7 | 7 2 | 2 3.
    model.repeat_head.gate_bias.assign(0.0)
    rep = np.zeros([3, V])
    rep[0, 7] = 1
    rep[1, [7, 2]] = [1 / 2, 1 / 2]
    rep[2, [2, 3]] = [1 / 2, 1 / 2]
    got = np.exp(model.item_log_probs(u, history, prefix).numpy()[0])
    np.testing.assert_allclose(got, 0.5 * cat + 0.5 * rep, rtol=1e-5, atol=1e-7)
    # Only the newest history_size known items count as seen: with N = 2 the 7 in the
    # history is no longer seen at position 2 (2 and 3 are newer).
    small = _model(MIXTURE.replace({"history_size": 2}))
    small.set_weights(model.get_weights())
    u2 = small.user_embeddings(state, prefix)
    _set_head(small, gate_bias=-40.0)
    small.repeat_head.set_seen_bias(np.log(0.25))
    got = np.exp(small.item_log_probs(u2, history, prefix).numpy()[0, 2])
    weight = np.exp(small.item_logits(u2).numpy()[0, 2])
    weight[:2] = 0
    weight[[2, 3]] *= 0.25
    np.testing.assert_allclose(got, weight / weight.sum(), rtol=1e-5, atol=1e-7)


def test_transition_bias_by_hand():
    # tau = log 3 weighs by 3 the attention on each context entry that came right after an
    # earlier occurrence of the item the position is on (position 0: the history's newest
    # known item; position p: prefix[p - 1]). History [9 pad 7 9] -> known 9 7 9, prefix
    # [5 7 5]; the attention sees the newest 4 known items.
    model = _model(MIXTURE.replace({"transition_bias": True, "seen_bias": False}))
    _set_head(model)  # w = 1/2, query and recency zero
    state = tf.random.normal([1, model.state_size])
    history = tf.constant([[9, 0, 7, 9]], tf.int64)
    prefix = tf.constant([[5, 7, 5]], tf.int64)
    u = model.user_embeddings(state, prefix)
    logits = model.item_logits(u).numpy()[0]
    cat = np.exp(logits[:, 2:] - logits[:, 2:].max(-1, keepdims=True))
    cat = np.concatenate([np.zeros([4, 2]), cat / cat.sum(-1, keepdims=True)], axis=1)
    # p0 on 9: 9 7 9 visible, 7 followed 9 -> 9: 2/5, 7: 3/5
    # p1 on 5, seen nowhere before: 9 7 9 5 uniform -> 9: 1/2, 7: 1/4, 5: 1/4
    # p2 on 7: window 7 9 5 7; the 9 followed the history's 7 (the prefix's 7 is the
    # current entry, its follower not yet seen) -> 9: 3/6, 7: 2/6, 5: 1/6
    # p3 on 5: window 9 5 7 5; 7 followed the prefix's first 5 -> 7: 3/6, 9, 5: 1/6 + 2/6
    # With tau = 0 (its initial value) each is uniform over the visible entries.
    expected = {np.log(3.0): [{9: 2 / 5, 7: 3 / 5}, {9: 1 / 2, 7: 1 / 4, 5: 1 / 4},
                              {9: 3 / 6, 7: 2 / 6, 5: 1 / 6}, {9: 1 / 6, 5: 2 / 6, 7: 3 / 6}],
                0.0: [{9: 2 / 3, 7: 1 / 3}, {9: 1 / 2, 7: 1 / 4, 5: 1 / 4},
                      {9: 1 / 4, 7: 2 / 4, 5: 1 / 4}, {9: 1 / 4, 5: 2 / 4, 7: 1 / 4}]}
    for tau, positions in expected.items():
        model.repeat_head.set_transition_bias(tau)
        rep = np.zeros([4, V])
        for p, weights in enumerate(positions):
            rep[p, list(weights)] = list(weights.values())
        got = np.exp(model.item_log_probs(u, history, prefix).numpy()[0])
        np.testing.assert_allclose(got, 0.5 * cat + 0.5 * rep, atol=1e-6)


def test_seen_items_are_the_newest_known_items_once_each():
    # Brute force against `_repeat_parts`' seen entries: at position p, the distinct items
    # among the newest history_size known items of history + prefix[:p], each counted once
    # (pads and unknown items anywhere, duplicates in both, a session longer than N).
    rng = np.random.default_rng(0)
    for n, width, t in [(4, 6, 3), (4, 3, 9), (6, 8, 5)]:
        model = _model(HEAD.replace({"history_size": n, "repeat_window": 2}))
        history = rng.integers(0, 7, size=[5, width])
        prefix = rng.integers(1, 7, size=[5, t])
        prefix[0, t - 1:] = 0  # padding at the end
        user = tf.zeros([5, t + 1, 8])
        *_, (items, once) = model._repeat_parts(user, tf.constant(history), tf.constant(prefix))
        items, once = items.numpy(), once.numpy()
        for row in range(5):
            for pos in range(t + 1):
                seq = [i for i in list(history[row]) + list(prefix[row, :pos]) if i >= 2]
                newest = set(seq[::-1][:n])
                counted = {}
                for item, c in zip(items[row], once[row, pos]):
                    if c:
                        counted[item] = counted.get(item, 0) + c
                assert counted == {i: 1.0 for i in newest}, (n, row, pos)


def test_no_context_gives_the_catalogue_softmax():
    model = _model()
    _set_head(model, gate_bias=3.0)
    u = tf.random.normal([2, 1, 8])
    empty = tf.zeros([2, 3], tf.int64)
    got = model.item_log_probs(u, empty, tf.zeros([2, 0], tf.int64)).numpy()
    logits = model.item_logits(u).numpy()[..., 2:]
    expected = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got[..., 2:], expected, atol=1e-5)


def test_current_item_is_excluded_and_the_rest_renormalised():
    # The same weights with and without exclude_current: at position p >= 1 the item the
    # session is on (prefix[p - 1]) gets probability 0 and the others p / (1 - p(current));
    # position 0 is the session's start unless `current` names the item before the prefix.
    state = tf.random.normal([2, _model().state_size])
    history = tf.constant([[0, 7, 1, 7], [9, 0, 0, 10]], tf.int64)
    prefix = tf.constant([[2, 3, 7, 0], [5, 1, 6, 0]], tf.int64)   # 1: an unknown item
    mixture, excluding = _model(MIXTURE, seed=3), _model(HEAD, seed=3)
    u = mixture.user_embeddings(state, prefix)
    p = np.exp(mixture.item_log_probs(u, history, prefix).numpy())
    q = np.exp(excluding.item_log_probs(u, history, prefix).numpy())
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    on = np.array([[0, 2, 3, 7, 0], [0, 5, 1, 6, 0]])  # what each position is on
    for row in range(2):
        for pos in range(5):
            item = on[row, pos]
            if item >= 2:
                assert q[row, pos, item] == 0.0 and p[row, pos, item] > 0
                expected = p[row, pos] / (1.0 - p[row, pos, item])
                expected[item] = 0.0
            else:  # the start, an unknown item, padding: nothing to leave out
                expected = p[row, pos]
            np.testing.assert_allclose(q[row, pos], expected, rtol=1e-4, atol=1e-7)
    # a window that continues a session: its position 0 is on the item before it
    cont = excluding.item_log_probs(u, history, prefix, current=tf.constant([9, 0], tf.int64))
    assert np.exp(cont[0, 0, 9].numpy()) == 0.0
    np.testing.assert_allclose(np.exp(cont[0, 1:].numpy()), q[0, 1:], atol=1e-6)
    np.testing.assert_allclose(np.exp(cont[1].numpy()), q[1], atol=1e-6)
    # the evaluator's path (chosen positions only) gives the same numbers
    positions = tf.constant([[0, 0], [0, 2], [1, 3]], tf.int64)
    chosen = excluding.item_log_probs(u, history, prefix, positions=positions,
                                      current=tf.constant([9, 0], tf.int64)).numpy()
    np.testing.assert_allclose(np.exp(chosen), np.exp(cont.numpy()[[0, 0, 1], [0, 2, 3]]),
                               atol=1e-6)


def _batch(items, reset, end, history):
    items = tf.constant(items, tf.int64)
    return {"items": items, "reset": tf.constant(reset), "session_end": tf.constant(end),
            "valid": tf.reduce_any(items > 0, axis=-1), "history": tf.constant(history, tf.int64)}


@pytest.mark.parametrize("seen_bias,window,exclude,tau", [
    (0.0, 4, True, None), (-1.5, 4, True, None), (0.8, 2, True, None), (-1.5, 4, False, None),
    (-1.5, 4, True, 1.2), (0.8, 2, False, -0.7)])
def test_train_loss_is_the_mixture_log_likelihood(seen_bias, window, exclude, tau):
    # (with exclude_current, of the mixture given that the next item is not the current one)
    model = _model(HEAD.replace({"repeat_window": window, "exclude_current": exclude,
                                 "transition_bias": tau is not None}))
    model.repeat_head.set_seen_bias(seen_bias)
    if tau is not None:
        model.repeat_head.set_transition_bias(tau)
    # One row: a session [5 7 5 9] of a user under way (no reset; zero state) whose last
    # items were [9 0 7 9]: targets new, seen in the history, seen in the session, in both.
    batch = _batch([[[5, 7, 5, 9]]], [[False]], [[True]], [[9, 0, 7, 9]])
    loss, _, n = model.train_loss(batch, model.train_cache(1), training=False)
    assert int(n) == 4
    prefix = tf.constant([[5, 7, 5]], tf.int64)
    u = model.user_embeddings(tf.zeros([1, model.state_size]), prefix)
    logp = model.item_log_probs(u, tf.constant([[9, 0, 7, 9]], tf.int64), prefix).numpy()[0]
    np.testing.assert_allclose(p := np.exp(logp).sum(-1), np.ones_like(p), atol=1e-5)
    expected = -(logp[0, 5] + logp[1, 7] + logp[2, 5] + logp[3, 9]) / 4
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "sampled"])
def test_the_conditioned_loss_is_exact_where_the_current_item_is_all_but_certain(loss):
    """log(1 - p(current)) was taken from p(current): where p(current) nears 1 the
    difference is lost to float32 and a clamp held it at 1e-6, so the loss was off by tens
    (long runs diverged there, the loss in the thousands). Summed over the other items,
    it is exact: here against float64, the repeat part off (w = e^-100), the current item 5
    made all but certain by its output bias."""
    config = HEAD.replace({"seen_bias": False, "loss": loss, "num_negatives": 5})
    model = registry.build_model("hiertcn", config, V, item_counts=COUNTS)
    _set_head(model, gate_bias=-100.0)  # (w p_rep far below even p(target) here)
    model.scorer.bias.assign(tf.tensor_scatter_nd_add(model.scorer.bias, [[5]], [40.0]))
    batch = _batch([[[5, 7, 5, 9]]], [[False]], [[True]], [[9, 0, 7, 9]])
    if loss == "sampled":  # (every item in the "sample": the estimate is the exact Z)
        model.sampler = _WholeCatalogue()
    got, _, n = model.train_loss(batch, model.train_cache(1), training=loss == "sampled")
    assert int(n) == 4
    prefix = tf.constant([[5, 7, 5]], tf.int64)
    u = model.user_embeddings(tf.zeros([1, model.state_size]), prefix).numpy()[0]
    vectors, bias = (w.numpy().astype(np.float64) for w in model.output_weights())
    logits = u.astype(np.float64) @ vectors.T + bias                             # [4, V]
    known = np.arange(V) >= schema.NUM_RESERVED
    want = []
    for position, (target, on) in enumerate(zip([5, 7, 5, 9], [0, 5, 7, 5])):
        others = known & (np.arange(V) != on)
        top = logits[position, others].max()
        log_z = top + np.log(np.exp(logits[position, others] - top).sum())
        want.append(log_z - logits[position, target])
    # (positions 1 and 3: p(current) = 1 - e^-40 or so, p(target) about e^-42)
    np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-4)


def test_scores_keep_a_repeat_part_far_below_float32s_smallest_number():
    """The scores summed exp(attention) over the positions holding an item, which
    underflowed below e^-87 (training's loss takes a log-sum-exp): with the gate all on the
    repeat part, an old item's score fell to its catalogue term (-202 against -90) and its
    rank moved (numerics audit). Against float64: the context 9 5 7 5 (9 the oldest, its
    recency -90), w = sigmoid(200)."""
    model = _model(HEAD.replace({"exclude_current": False, "seen_bias": False}))
    _set_head(model, gate_bias=200.0, recency=[0.0] + [-90.0] * (model.repeat_head.max_age - 1))
    prefix = tf.constant([[5, 7, 5]], tf.int64)
    u = model.user_embeddings(tf.zeros([1, model.state_size]), prefix)
    got = model.item_log_probs(u, tf.constant([[0, 0, 0, 9]], tf.int64), prefix).numpy()[0, 3]
    vectors, bias = (w.numpy().astype(np.float64) for w in model.output_weights())
    logits = u.numpy()[0, 3].astype(np.float64) @ vectors.T + bias
    log_cat = logits - np.logaddexp.reduce(logits[2:])
    att = np.array([-90.0, -90.0, -90.0, 0.0])  # 9, 5, 7, 5 at ages 3, 2, 1, 0
    att -= np.logaddexp.reduce(att)
    log_w, log_keep = -np.logaddexp(0, -200.0), -np.logaddexp(0, 200.0)
    for item, log_rep in ((9, att[0]), (7, att[2]), (5, np.logaddexp(att[1], att[3]))):
        assert got[item] == pytest.approx(np.logaddexp(log_keep + log_cat[item], log_w + log_rep),
                                          abs=1e-4)


@pytest.mark.parametrize("loss", ["softmax", "sampled"])
@pytest.mark.parametrize("beta", [-25.0, 95.0])
def test_the_seen_bias_is_exact_however_sure_the_seen_items_and_however_large_beta(loss, beta):
    """The seen bias's normaliser log((1 - q) + e^beta q) was taken from q: where the seen
    items hold nearly all the catalogue's probability and beta is very negative, 1 - q was
    lost to float32 (loss and scores off by tens), and e^beta overflowed past beta = 88
    (NaN: `--learning-rate 1` ended in a NaN loss at step 13; numerics audit). Against
    float64, the repeat part off, items 7 and 9 (the user's) 40 above the others."""
    config = HEAD.replace({"loss": loss, "num_negatives": 5})
    model = registry.build_model("hiertcn", config, V, item_counts=COUNTS)
    _set_head(model, gate_bias=-100.0)
    model.repeat_head.set_seen_bias(beta)
    model.scorer.bias.assign(tf.tensor_scatter_nd_add(model.scorer.bias, [[7], [9]], [40.0, 40.0]))
    if loss == "sampled":  # (every item in the "sample": the estimate is the exact Z)
        model.sampler = _WholeCatalogue()
    history, session = [9, 0, 7, 9], [5, 7, 5, 9]
    with tf.GradientTape() as tape:
        got, _, _ = model.train_loss(_batch([[session]], [[False]], [[True]], [history]),
                                     model.train_cache(1), training=loss == "sampled")
    gradient = tape.gradient(got, model.repeat_head.seen_bias_unscaled)
    prefix = tf.constant([session[:3]], tf.int64)
    u = model.user_embeddings(tf.zeros([1, model.state_size]), prefix)
    scores = model.item_log_probs(u, tf.constant([history], tf.int64), prefix).numpy()[0]
    vectors, bias = (w.numpy().astype(np.float64) for w in model.output_weights())
    logits = u.numpy()[0].astype(np.float64) @ vectors.T + bias                 # [4, V]
    want, d_beta = [], []
    for position, on in enumerate([0] + session[:3]):
        seen = {i for i in history + session[:position] if i >= schema.NUM_RESERVED}
        x = logits[position].copy()
        x[:schema.NUM_RESERVED] = x[on] = -np.inf  # (on 0: a reserved index anyway)
        x[sorted(seen - {on})] += beta
        log_p = x - x.max() - np.log(np.exp(x - x.max()).sum())
        want.append(log_p)
        d_beta.append(np.exp(log_p[sorted(seen - {on})]).sum()
                      - (session[position] in seen))  # d(-log p(target)) / d beta
    want = np.array(want)
    known = np.isfinite(want)
    np.testing.assert_allclose(scores[known], want[known], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(got), -np.mean(want[range(4), session]), rtol=1e-4)
    # the gradient too (past beta = 87 it had the wrong sign, pushing beta further up)
    np.testing.assert_allclose(float(gradient), layers.SEEN_BIAS_SCALE * np.mean(d_beta),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("seen_bias,under_way,tau", [(-1.5, False, None), (None, False, None),
                                                     (0.8, True, None), (-1.5, False, 1.5),
                                                     (None, True, 2.0)])
def test_a_later_chunk_is_conditioned_on_the_item_before_it(seen_bias, under_way, tau):
    # A session [5 7 5 9 4] longer than L = 3: slot 0 holds [5 7 5], slot 1 continues it
    # with [9 4], whose first position is on 5, the previous chunk's last item. With
    # `under_way` the row's cache says a session was already under way before the batch
    # (its last item the history's newest, 9), so slot 0's first position is on 9.
    # (With the transition bias, slot 1's first position is on 5, whose earlier follower 7
    # it weighs up, as the evaluator's position on the history's newest item does.)
    config = HEAD if seen_bias is not None else HEAD.replace({"seen_bias": False})
    model = _model(config.replace({"transition_bias": tau is not None}))
    if seen_bias is not None:
        model.repeat_head.set_seen_bias(seen_bias)
    if tau is not None:
        model.repeat_head.set_transition_bias(tau)
    batch = _batch([[[5, 7, 5], [9, 4, 0]]], [[False, False]], [[False, True]], [[3, 0, 7, 9]])
    cache = model.train_cache(1)
    if under_way:
        cache = (cache[0], cache[1], tf.constant([2.0]), *cache[3:])
    loss, _, n = model.train_loss(batch, cache, training=False)
    assert int(n) == 5
    zero = tf.zeros([1, model.state_size])
    first = tf.constant([9 if under_way else 0], tf.int64)
    u0 = model.user_embeddings(zero, tf.constant([[5, 7]], tf.int64))
    logp0 = model.item_log_probs(u0, tf.constant([[3, 0, 7, 9]], tf.int64),
                                 tf.constant([[5, 7]], tf.int64), current=first).numpy()[0]
    # slot 1: its history is the newest 4 of the user's items before it; the state is
    # still the zero state (the session has not ended); its convolutions read the
    # session's items before it (the chunk context): the whole session's vectors
    u1 = model.user_embeddings(zero, tf.constant([[5, 7, 5, 9]], tf.int64))[:, 3:]
    logp1 = model.item_log_probs(u1, tf.constant([[9, 5, 7, 5]], tf.int64),
                                 tf.constant([[9]], tf.int64),
                                 current=tf.constant([5], tf.int64)).numpy()[0]
    assert logp1[0, 5] < -1e8 and logp1[1, 9] < -1e8  # ruled out: what the loss conditions on
    expected = -(logp0[0, 5] + logp0[1, 7] + logp0[2, 5] + logp1[0, 9] + logp1[1, 4]) / 5
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("high_level,summary", [(True, False), (False, False), (False, True)])
def test_a_later_chunk_in_the_next_batch_is_conditioned_on_the_item_before_it(high_level, summary):
    """A session [5 7 5 9 4] over two batches: its last chunk [9 4] in slot 0 of the
    second is on 5 at its first position, which the cache's running count tells; without
    the high level and the session summary that count was not kept, so the chunk counted
    as a session's start (trained unconditioned there, evaluated conditioned)."""
    model = _model(HEAD.replace({"high_level": high_level, "session_summary": summary}))
    first = _batch([[[5, 7, 5]]], [[True]], [[False]], [[0, 0, 0, 0]])
    _, cache, _ = model.train_loss(first, model.train_cache(1), training=False)
    assert float(cache[2][0]) == 3  # the items of the session under way
    second = _batch([[[9, 4, 0]]], [[False]], [[True]], [[0, 5, 7, 5]])
    loss, cache, n = model.train_loss(second, cache, training=False)
    assert int(n) == 2 and float(cache[2][0]) == 0
    u = model.user_embeddings(tf.zeros([1, model.state_size]),
                              tf.constant([[5, 7, 5, 9]], tf.int64))[:, 3:]
    logp = model.item_log_probs(u, tf.constant([[0, 5, 7, 5]], tf.int64),
                                tf.constant([[9]], tf.int64),
                                current=tf.constant([5], tf.int64)).numpy()[0]
    np.testing.assert_allclose(float(loss), -(logp[0, 9] + logp[1, 4]) / 2, rtol=1e-5)


@pytest.mark.parametrize("history,session,split", [
    ([0, 0, 0, 0, 0, 0], [6, 3, 8, 9, 6, 3, 4], 5),  # the window's oldest 3 came after a 6
    ([0, 0, 6, 3, 8, 9], [6, 3, 4], 1),  # ... the history's: at every served position
    ([0, 0, 0, 0, 0, 0], [6, 1, 3, 8, 6, 3, 4], 5),  # an unknown item between 6 and 3
    ([0, 0, 0, 0, 0, 0], [6, 3, 8, 6, 1, 3, 4], 5),  # ... before a later window's first position
    ([0, 6, 3, 1, 8, 9], [2, 6, 7, 4], 2)])
def test_transition_bias_is_the_same_however_the_session_is_split_or_served(
        history, session, split):
    # The transition bias at each position is the same whether the session is scored whole
    # (the evaluator's prefix), from a later window or chunk (the history then holds the
    # session's first items, known ones only: `KerasScorer.ranks`, a later training slot)
    # or served (`item_scores_with_history`: history and session so far in one buffer).
    # So it is defined on the known items (an unknown one is skipped, before a follower or
    # as the item a position is on) and on the window (repeat_window 4) alone: its oldest
    # entry, whose predecessor has left it, gets no bias.
    config = HEAD.replace({"history_size": 6, "repeat_window": 4, "transition_bias": True})
    model = _model(config)
    model.repeat_head.set_transition_bias(1.3)
    history, session = np.array([history]), np.array([session])
    u = tf.random.stateless_normal([1, session.shape[1], 8], seed=[1, 2])
    whole = np.exp(model.item_log_probs(u, history, session[:, :-1]).numpy()[0])
    pushed = push_history(keras_scorer._known(history), keras_scorer._known(session[:, :split]))
    later = model.item_log_probs(u[:, split:], pushed, session[:, split:-1],
                                 current=session[:, split - 1]).numpy()[0]
    np.testing.assert_allclose(np.exp(later), whole[split:], atol=1e-6)
    for p in range(1, session.shape[1]):
        served = model.item_scores_with_history(
            u[:, p], np.concatenate([history, session[:, :p]], axis=1), None, session[:, p - 1])
        np.testing.assert_allclose(np.exp(served.numpy()[0]), whole[p], atol=1e-6)


def test_scores_given_the_current_item_are_exact_where_it_is_all_but_certain():
    """The evaluator's and the export's scores took log(1 - p(current)) from p(current),
    as the loss did: where p(current) nears 1 the scores of every other item were off by
    tens (ranks unaffected, values not). Against float64, as the loss's test above."""
    config = HEAD.replace({"seen_bias": False})
    model = registry.build_model("hiertcn", config, V)
    _set_head(model, gate_bias=-100.0)
    model.scorer.bias.assign(tf.tensor_scatter_nd_add(model.scorer.bias, [[5]], [40.0]))
    prefix = tf.constant([[5, 7, 5]], tf.int64)
    u = model.user_embeddings(tf.zeros([1, model.state_size]), prefix)
    got = model.item_log_probs(u, tf.zeros([1, 0], tf.int64), prefix).numpy()[0]   # [4, V]
    vectors, bias = (w.numpy().astype(np.float64) for w in model.output_weights())
    logits = u.numpy()[0].astype(np.float64) @ vectors.T + bias
    known = np.arange(V) >= schema.NUM_RESERVED
    for position, on in enumerate([0, 5, 7, 5]):
        others = known & (np.arange(V) != on)
        top = logits[position, others].max()
        want = logits[position] - top - np.log(np.exp(logits[position, others] - top).sum())
        np.testing.assert_allclose(got[position, others], want[others], rtol=1e-4, atol=1e-4)
        if on:
            assert got[position, on] <= -1e8
    # (positions 1 and 3: p(current) = 1 - e^-40 or so; the same through the chosen
    # positions the evaluator scores)
    chosen = model.item_log_probs(u, tf.zeros([1, 0], tf.int64), prefix,
                                  positions=tf.constant([[0, 1], [0, 3]], tf.int64)).numpy()
    np.testing.assert_allclose(chosen, got[[1, 3]], rtol=1e-6)


class _CatalogueWithout:
    """A 'sample' of every item but `left_out`, at inclusion probability 1: the normaliser
    estimate lacks exactly their terms unless the loss counts them exactly."""

    def __init__(self, left_out=()):
        self.left_out = left_out

    def __call__(self, targets):
        ids = [i for i in np.random.default_rng(0).permutation(np.arange(2, V))
               if i not in self.left_out]
        return tf.constant(ids, tf.int64), tf.zeros([len(ids)])


class _WholeCatalogue:
    """A 'sample' of every item at inclusion probability 1 (in a shuffled order)."""

    def __call__(self, targets):
        ids = np.random.default_rng(0).permutation(np.arange(2, V))
        return tf.constant(ids, tf.int64), tf.zeros([V - 2])


SAMPLED_HEAD = HEAD.replace({"loss": "sampled", "num_negatives": 5})
COUNTS = np.array([0, 0] + list(range(1, V - 1)))  # a popularity skew


@pytest.mark.parametrize("seen_bias,tau", [(0.0, None), (-1.5, None), (None, None),
                                          (-1.5, 1.3), (None, 1.3)])
def test_sampled_head_loss_is_exact_when_the_sample_is_the_whole_catalogue(seen_bias, tau):
    config = SAMPLED_HEAD if seen_bias is not None else SAMPLED_HEAD.replace({"seen_bias": False})
    model = registry.build_model("hiertcn", config.replace({"transition_bias": tau is not None}),
                                 V, item_counts=COUNTS)
    if seen_bias is not None:
        model.repeat_head.set_seen_bias(seen_bias)
    if tau is not None:
        model.repeat_head.set_transition_bias(tau)
    # targets new, seen in the history, seen in the session, in both; every one of them is
    # also in the "sample", so a term counted twice would show
    batch = _batch([[[5, 7, 5, 9]]], [[False]], [[True]], [[9, 0, 7, 9]])
    exact, _, _ = model.train_loss(batch, model.train_cache(1), training=False)
    model.sampler = _WholeCatalogue()
    estimate, _, n = model.train_loss(batch, model.train_cache(1), training=True)
    assert int(n) == 4
    np.testing.assert_allclose(float(estimate), float(exact), rtol=1e-5)
    # 5, the item positions 1 and 3 are on (and position 0's and 2's target), left out of
    # the sample: the conditioning needs p(5) exact (the seen bias makes it a seen item;
    # without it, it is counted as the target is)
    model.sampler = _CatalogueWithout({5})
    estimate, _, _ = model.train_loss(batch, model.train_cache(1), training=True)
    np.testing.assert_allclose(float(estimate), float(exact), rtol=1e-5)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_sampled_head_normaliser_is_unbiased(exponent):
    """E[Z estimate] = Z: the mean over draws of the real sampler's exp(log Z) is the exact
    normaliser, for each target (a wrong inclusion weight would be off by its factor), with
    negatives drawn by popularity or by its square root."""
    tf.keras.utils.set_random_seed(0)  # the weights, whatever tests ran before
    model = registry.build_model("hiertcn", SAMPLED_HEAD.replace({"negative_exponent": exponent}),
                                 V, item_counts=COUNTS)
    model.repeat_head.set_seen_bias(-1.5)
    vectors, bias = model.output_weights()
    user = tf.random.stateless_normal([3, 8], seed=[1, 2]) * 3.0
    targets = tf.constant([5, 7, 9], tf.int64)
    logits = tf.matmul(user, vectors, transpose_b=True) + bias
    exact = tf.reduce_logsumexp(logits + model.reserved_mask, axis=1).numpy()
    where = tf.constant([[0, 1], [0, 2], [0, 3]], tf.int64)
    tf.random.set_seed(0)
    # (one graph called 3,000 times: each call draws anew, as each eager call did, at a
    # twentieth of the time)
    draw = tf.function(lambda: model._sampled_log_norm(
        user, targets, tf.gather(logits, targets, batch_dims=1), vectors, bias, where, None,
        None, None, None)[0])
    draws = np.stack([draw() for _ in range(3000)])
    assert draws.std(axis=0).min() > 0.1  # really a random estimate (5 of 10 items)
    z = np.exp(draws - exact)  # the estimates over the exact Z
    error = np.abs(z.mean(axis=0) - 1.0)
    # within 4 standard errors of the mean (about 2%) and the sampler's own approximation:
    # TensorFlow's unique sampler gives 1 - (1 - q)^tries for an item's inclusion
    # probability, which is not exact when half of this 10-item catalogue is drawn (30,000
    # draws of these weights: 1.3% to 2.5% off); without the inclusion weights, 30%+ low
    assert np.all(error < 4 * z.std(axis=0) / np.sqrt(len(z)) + 0.03), (error, z.std(axis=0))


# user A: sessions [2 3 4 5] and [6 7]; user B: [8 9 10]; user C: [2 2 3], [4 5 6 7 8], [9 10]
USERS = [[[2, 3, 4, 5], [6, 7]], [[8, 9, 10]], [[2, 2, 3], [4, 5, 6, 7, 8], [9, 10]]]


def test_generator_history_resets_at_user_boundaries():
    # B=2, S=2, L=3, N=4 (layout as in test_batching): row 0: A1a A1b A2; row 1: B1 C1 C2a C2b C3.
    make = lambda: batching.QueueBatcher(lambda: iter(USERS), 2, 2, 3, shuffle_buffer=1,
                                         epochs=1, history_size=4)
    batches = list(make())
    assert [b["history"].tolist() for b in batches[:2]] == [[[0, 0, 0, 0], [0, 0, 0, 0]],
                                                            [[2, 3, 4, 5], [0, 2, 2, 3]]]
    history = [batching.slot_histories(b["history"], b["items"], b["reset"]).numpy().tolist()
               for b in batches]
    assert history[0] == [[[0, 0, 0, 0], [0, 2, 3, 4]],   # A1a; A1b after A's first chunk
                          [[0, 0, 0, 0], [0, 0, 0, 0]]]   # B1; C1: a new user, buffer emptied
    assert history[1] == [[[2, 3, 4, 5], [0, 0, 0, 0]],   # A2; (empty slot)
                          [[0, 2, 2, 3], [3, 4, 5, 6]]]   # C2a; C2b: last 4 incl. C2a
    assert history[2][1][0] == [5, 6, 7, 8]               # C3
    # A restored position carries the buffers: the next batch is the same.
    first = make()
    first.next_batch()
    resumed = make()
    resumed.restore(json.loads(json.dumps(first.position_after(0))))
    np.testing.assert_array_equal(resumed.next_batch()["history"], batches[1]["history"])
    assert "history" not in next(iter(batching.QueueBatcher(lambda: iter(USERS), 2, 2, 3)))


def test_seen_logits_per_row_equal_the_per_slot_computation():
    """The training step computes the seen items' logits once per row's stream; on generator
    batches (several rows and slots, user boundaries, unknown items, repeats) they equal the
    direct per-slot computation, and the slots' histories equal `slot_histories`."""
    rng = np.random.default_rng(0)
    users = [[list(rng.integers(1, V, size=rng.integers(1, 7))) for _ in range(rng.integers(1, 5))]
             for _ in range(12)]
    model = _model(HEAD.replace({"history_size": 5}))
    batcher = batching.QueueBatcher(lambda: iter(users), 3, 2, 4, shuffle_buffer=1, epochs=1,
                                    history_size=5)
    vectors, bias = model.output_weights()
    checked = 0
    for raw in batcher:
        batch = {k: tf.constant(v) for k, v in raw.items()}
        flat = tf.reshape(tf.cast(batch["items"], tf.int64), [-1, 4])
        history, columns, stream = model._slot_history_columns(batch)
        expected = batching.slot_histories(batch["history"], batch["items"], batch["reset"])
        np.testing.assert_array_equal(history.numpy(), tf.reshape(expected, [-1, 5]).numpy())
        in_prefix = (flat >= 2)[:, None, :] & (tf.range(4)[None, :, None] > tf.range(4)[None, None, :])
        seen_items, _ = model._seen_once(_last_columns(_right_aligned(history), 5), flat, in_prefix)
        where = tf.where(flat > 0)
        user = tf.random.normal([where.shape[0], 8])
        seen_at = tf.gather(seen_items, where[:, 0])                          # [events, N + T]
        direct = (tf.einsum("ed,ejd->ej", user, tf.gather(vectors, seen_at))
                  + tf.gather(bias, seen_at))
        per_row = model._seen_logits(user, where, stream, columns, vectors, bias, 2)
        known = (seen_at >= 2).numpy()  # the other entries get no bias
        np.testing.assert_allclose(per_row.numpy()[known], direct.numpy()[known], rtol=1e-5, atol=1e-5)
        checked += int(known.sum())
    assert checked > 100


def test_online_scorer_buffer_equals_the_generator_history():
    # With L large enough that no session is split, the generator's history at a user's
    # session equals the scorer's buffer after the user's earlier sessions.
    batcher = batching.QueueBatcher(lambda: iter(USERS), 1, 1, 8, shuffle_buffer=1, epochs=1,
                                    history_size=4)
    generated = [batching.slot_histories(b["history"], b["items"], b["reset"]).numpy()[0, 0]
                 .tolist() for b in batcher]
    scorer = KerasScorer(_model())
    online = []
    for user in USERS:
        state = scorer.initial_state(["u"])
        for session in user:
            online.append(state[1][0].tolist())
            state = scorer.update(state, np.array([session + [0]], np.int64))
    assert online == generated
    np.testing.assert_array_equal(  # all-padding rows keep their buffer
        push_history(np.array([[0, 5, 6]]), np.array([[0, 0]])), [[0, 5, 6]])
    # unknown items (index 1: evaluation data only) take no place in the buffer, which
    # holds the newest known items as within a session: N = 4 keeps 2, 4 and 5 here
    state = scorer.update(scorer.initial_state(["u"]), np.array([[2, 1, 4, 1, 1, 0]], np.int64))
    state = scorer.update(state, np.array([[5, 1, 0]], np.int64))
    np.testing.assert_array_equal(state[1], [[0, 2, 4, 5]])


def test_scorer_scores_are_the_mixture():
    model = _model()
    scorer = KerasScorer(model)
    state = scorer.update(scorer.initial_state(["a", "b"]), np.array([[2, 3, 4], [5, 0, 0]]))
    sessions = np.array([[3, 6, 7], [8, 5, 0]])
    prefix = sessions[:, :-1]
    expected = model.item_log_probs(model.user_embeddings(state[0], prefix), state[1], prefix)
    np.testing.assert_allclose(scorer.score(state, sessions), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "sampled"])
def test_training_with_the_head_learns_and_evaluates(tmp_path, loss):
    users = planted_users(30)
    data = write_data(str(tmp_path / "data"), 20, users,
                      valid=[(3, u[:4]) for u in planted_users(6, seed=1)])
    config = {"model": {"embedding_dim": 16, "gru_units": 8, "channels": 16, "history_size": 8,
                        "loss": loss, "num_negatives": 5},
              "train": {"batch_size": 4, "sessions_per_batch": 3, "max_session_length": 4,
                        "checkpoint_every": 100, "shuffle_buffer": 16, "seed": 0}}
    path = str(tmp_path / "head.json")
    with open(path, "w") as f:
        json.dump(config, f)
    run = str(tmp_path / "run")
    args = ["--data", data, "--model-dir", run, "--config", path, "--repeat-head", "--no-progress"]
    assert train_lib.main(args + ["--steps", "40", "--eval-every", "40", "--eval-users", "6"]) == 0
    with open(f"{run}/train_summary.json") as f:
        summary = json.load(f)
    assert summary["final_loss"] < np.log(20) - 0.5  # well below uniform over 20 items
    assert summary["valid"]["recall@20"] > 0
    with open(f"{run}/config.json") as f:
        assert json.load(f)["model"]["loss"] == loss
    scorer = registry.load_scorer(run, data)
    state = scorer.update(scorer.initial_state(["u"]), np.array([[2, 3, 4]]))
    assert state[1].tolist() == [[0, 0, 0, 0, 0, 2, 3, 4]]
    p = np.exp(scorer.score(state, np.array([[5, 6, 7]])))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def test_records_with_immediate_repeats_are_refused_unless_kept(tmp_path, capsys):
    # records written by another tool, with an item twice in a row: the default model
    # would give such targets probability 0, so training says so before it starts
    users = planted_users(12)
    users[5][2] = [4, 7, 7, 3]
    data = write_data(str(tmp_path / "data"), 20, users,
                      valid=[(3, u[:4]) for u in planted_users(4, seed=1)])
    with pytest.raises(config_lib.ConfigError, match=r"train events that repeat the item before "
                       r"them: 1 in the first 12 users \(user 'train5', item index 7\).*--keep-current"):
        train_lib.check_current_rule(data, config_lib.HierTCNConfig())
    # a folder of an older pipeline (before 2026-12-03 it kept the repeats that dropping
    # unknown items leaves; no pipeline_version): the refusal says to write it again
    stats_path = os.path.join(data, "stats.json")
    with open(stats_path) as f:
        stats = json.load(f)
    del stats["pipeline_version"]
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    with pytest.raises(config_lib.ConfigError, match=r"has no pipeline_version \(an older "
                       r"pipeline.*`python -m pipeline \.\.\. --overwrite` writes it again; or "
                       r"pass --keep-current"):
        train_lib.check_current_rule(data, config_lib.HierTCNConfig())
    assert schema.older_pipeline_note(data, stats).startswith(f"note: {data} was written by "
                                                              "an older pipeline")
    assert schema.older_pipeline_note(data, dict(stats, pipeline_version="0.1.0")) is None
    train_lib.check_current_rule(data, config_lib.HierTCNConfig(exclude_current=False))
    train_lib.check_current_rule(data, config_lib.HierTCNConfig(repeat_head=False))
    train_lib.check_current_rule(data, HRNNConfig())  # no such rule
    # a repeat with an item between, and a session ending on the item the next starts with
    fine = write_data(str(tmp_path / "fine"), 20, [[[2, 3, 2, 4], [4, 5]]])
    train_lib.check_current_rule(fine, config_lib.HierTCNConfig())
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"model": {"embedding_dim": 8, "gru_units": 4, "channels": 8},
                                "train": {"batch_size": 2, "eval_every": 0}}))
    run = tmp_path / "run"
    args = ["--data", data, "--model-dir", str(run), "--config", str(path), "--steps", "1",
            "--no-progress"]
    assert train_lib.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --keep-current" in err and not run.exists()
    assert train_lib.main(args + ["--keep-current"]) == 0


@pytest.mark.parametrize("start_items,tau", [(False, None), (True, None), (True, 1.0)])
def test_exported_next_items_with_history_equals_eager(tmp_path, start_items, tau):
    import serving_testlib as lib
    from serving import export

    vocab = lib.tiny_vocabulary()  # [PAD], [UNK], item0 .. item11 -> indices 0 .. 13
    tf.keras.utils.set_random_seed(0)
    model = registry.build_model("hiertcn", lib.TINY.replace(
        {"repeat_head": True, "history_size": 3, "start_items": 4 if start_items else 0,
         "transition_bias": tau is not None}), vocab.size)
    model.repeat_head.gate_bias.assign(1.0)  # w ~ 0.73: the history decides the top items
    model.repeat_head.set_seen_bias(-0.5)      # and the seen items' catalogue part is lowered
    if tau is not None:
        model.repeat_head.set_transition_bias(tau)
    state = np.random.default_rng(0).normal(size=[3, model.state_size]).astype(np.float32)
    if start_items:  # row 0's sessions started with item9 and item5, row 1's with item2
        state[:, model.gru_size:] = [[0, 0, 11, 7], [0, 0, 0, 4], [0, 0, 0, 0]]
    path = export.export_model(model, vocab, str(tmp_path))
    fn = tf.saved_model.load(path).signatures["next_items"]
    sessions = np.array([["item0", "item3", ""], ["nope", "item5", "item1"], ["", "", ""]], object)
    indices = np.array([[2, 5, 0], [1, 7, 3], [0, 0, 0]], np.int64)
    history = np.array([["item6", "item9", ""], ["item2", "", "item8"], ["", "", ""]], object)
    history_indices = np.array([[8, 11, 0], [4, 0, 10], [0, 0, 0]], np.int64)
    out = fn(user_state=tf.constant(state), session_items=tf.constant(sessions),
             history_items=tf.constant(history), k=tf.constant(4))
    # Eager, as the evaluator scores: position len(session) of the session's positions.
    u = model.user_embeddings(state, indices)
    logp = model.item_log_probs(u, history_indices, indices, state).numpy()
    logp = logp[np.arange(3), (indices > 0).sum(1), 2:]
    order = np.argsort(-logp, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out["item_ids"].numpy().astype(str),
                                  np.array(vocab.ids[2:])[order])
    np.testing.assert_allclose(out["scores"].numpy(), np.take_along_axis(logp, order, 1), atol=1e-5)
    # Row 0 points at item6, item9 and its session (item0, item3; history_size 3 keeps the
    # newest three known: item9 item0 item3) and at its start items (item9, item5): these
    # lead the ranking, but for item3, which the session is on (never its next item).
    pointed = {"item9", "item0"} | ({"item5"} if start_items else set())
    assert set(out["item_ids"].numpy().astype(str)[0, :len(pointed)]) == pointed
    assert "item3" not in out["item_ids"].numpy().astype(str)[0]


STARTS = HEAD.replace({"start_items": 3})


def test_start_items_point_at_how_the_users_sessions_start():
    # Query, gate and recency zero: p_rep is uniform over the visible context entries;
    # the first items of the last 3 sessions (7, 9, 7; read from the state) are 3 more
    # entries, so 7 gets two more shares. start_recency log 2 on the newest start doubles it.
    model = _model(STARTS)
    _set_head(model)
    state = tf.zeros([1, model.state_size])
    for session in ([2, 3], [7, 3], [9, 4], [7, 5]):
        state = model.update_state(state, tf.constant([session], tf.int64))
    assert state.numpy()[0, model.gru_size:].tolist() == [7, 9, 7]
    history = tf.constant([[7, 3, 9, 4]], tf.int64)  # history_size 4: all visible
    empty = tf.zeros([1, 0], tf.int64)
    u = model.user_embeddings(state, empty)
    logits = model.item_logits(u).numpy()[0, 0]
    cat = np.concatenate([[0, 0], np.exp(logits[2:]) / np.exp(logits[2:]).sum()])
    for start_recency, shares in [([0, 0, 0], {7: 3, 3: 1, 9: 2, 4: 1}),
                                  ([0, 0, np.log(2.0)], {7: 4, 3: 1, 9: 2, 4: 1})]:
        model.repeat_head.start_recency.assign(start_recency)
        got = np.exp(model.item_log_probs(u, history, empty, state).numpy()[0, 0])
        total = sum(shares.values())
        for item, share in shares.items():
            np.testing.assert_allclose(got[item], 0.5 * cat[item] + 0.5 * share / total, atol=1e-6)
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)
    # a new user after one session started by 5: 5 is pointed at with no history given
    fresh = model.update_state(tf.zeros([1, model.state_size]), tf.constant([[5, 6]], tf.int64))
    got = np.exp(model.item_log_probs(model.user_embeddings(fresh, empty), empty, empty,
                                      fresh).numpy()[0, 0])
    assert got[5] > 0.5 and got[2] < 0.5
    with pytest.raises(ValueError, match="needs the user state"):
        model.item_log_probs(u, history, empty)


def test_train_loss_with_start_items_is_the_mixture_log_likelihood():
    # Batch 1 ends the user's sessions [7 3] and [9 4]; batch 2's session [7 5] is scored
    # with the state (GRU and start items) they left in the cache.
    model = _model(STARTS)
    model.repeat_head.start_recency.assign([0.5, 1.0, 1.5])
    first = _batch([[[7, 3], [9, 4]]], [[True, False]], [[True, True]], [[0, 0, 0, 0]])
    second = _batch([[[7, 5]]], [[False]], [[True]], [[7, 3, 9, 4]])
    _, cache, _ = model.train_loss(first, model.train_cache(1), training=False)
    loss, _, n = model.train_loss(second, cache, training=False)
    state = model.update_state(model.update_state(tf.zeros([1, model.state_size]),
                                                  tf.constant([[7, 3]], tf.int64)),
                               tf.constant([[9, 4]], tf.int64))
    np.testing.assert_allclose(cache[0].numpy(), state.numpy(), atol=1e-5)
    prefix = tf.constant([[7]], tf.int64)
    u = model.user_embeddings(state, prefix)
    logp = model.item_log_probs(u, tf.constant([[7, 3, 9, 4]], tf.int64), prefix, state).numpy()[0]
    assert int(n) == 2
    np.testing.assert_allclose(float(loss), -(logp[0, 7] + logp[1, 5]) / 2, rtol=1e-5)


@pytest.mark.parametrize("config", [
    HEAD,
    HEAD.replace({"seen_bias": False}),
    HEAD.replace({"start_items": 3}),
    HEAD.replace({"start_items": 3, "transition_bias": True}),
    HEAD.replace({"repeat_head": False}),
], ids=["head", "no-seen-bias", "start-items", "transitions", "no-head"])
def test_scorer_ranks_are_the_ranks_of_its_scores(config):
    """`KerasScorer.ranks` (in TensorFlow, non-padding positions only) gives the ranks that
    `model.metrics` gives on `score`'s full output: unknown targets inf, padding 0."""
    model = _model(config, seed=3)
    if config.transition_bias:
        model.repeat_head.set_transition_bias(1.0)
    scorer = KerasScorer(model)
    state = scorer.update(scorer.initial_state(["a", "b", "c"]),
                          np.array([[2, 3, 4, 2], [5, 0, 0, 0], [0, 0, 0, 0]]))
    sessions = np.array([[3, 6, 1, 3, 9], [8, 5, 0, 0, 0], [11, 0, 0, 0, 0]])
    scores = scorer.score(state, sessions)
    expected = metrics.event_ranks(scores.reshape(-1, V), sessions.reshape(-1)).reshape(3, 5)
    ranks = scorer.ranks(state, sessions, V)
    np.testing.assert_array_equal(ranks, expected)
    assert np.isinf(ranks[0, 2]) and (ranks[sessions == 0] == 0).all()
    assert ((ranks >= 1) & (ranks <= V - 2))[(sessions > 1)].all()
    if model.history_size:  # the chosen positions' log-probabilities are the full ones
        prefix = sessions[:, :-1]
        user = model.user_embeddings(state[0], prefix)
        positions = tf.where(sessions != 0)
        full = model.item_log_probs(user, state[1], prefix, state[0])
        np.testing.assert_allclose(
            model.item_log_probs(user, state[1], prefix, state[0], positions=positions),
            tf.gather_nd(full, positions), atol=1e-5)


def test_scorer_ranks_count_ties_against_the_target():
    """A model that scores every item the same ranks each target last (V - 2 candidates)."""
    model = _model(HEAD.replace({"repeat_head": False}))
    for v in model.trainable_variables:
        v.assign(tf.zeros_like(v))
    scorer = KerasScorer(model)
    sessions = np.array([[3, 6, 7]])
    np.testing.assert_array_equal(scorer.ranks(scorer.initial_state(["a"]), sessions, V),
                                  [[V - 2] * 3])


def test_scorer_ranks_reject_nan_and_a_foreign_vocabulary():
    model = _model()
    scorer = KerasScorer(model)
    state = scorer.initial_state(["a"])
    with pytest.raises(ValueError, match=f"scores {V} items but the data's vocabulary has {V + 1}"):
        scorer.ranks(state, np.array([[3, 4]]), V + 1)
    with pytest.raises(ValueError, match=r"item indices must lie in \[0, 12\), got \[3, 12\]"):
        scorer.ranks(state, np.array([[3, 12]]), V)
    model.scorer.bias.assign(tf.fill(model.scorer.bias.shape, np.nan))
    with pytest.raises(ValueError, match="scores contain NaN"):
        scorer.ranks(state, np.array([[3, 4]]), V)


def _long_sessions(config):
    """A scorer of `config` (seed 5), two users' state after a history session with an
    unknown item, and a 14-item session with repeats and unknown items beside a short one."""
    scorer = KerasScorer(_model(config, seed=5))
    state = scorer.update(scorer.initial_state(["a", "b"]),
                          np.array([[2, 1, 4, 2, 9], [5, 0, 0, 0, 0]]))
    sessions = np.array([[3, 6, 1, 3, 9, 9, 2, 7, 6, 1, 3, 11, 4, 4],
                         [8, 5, 8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    return scorer, state, sessions


@pytest.mark.parametrize("config", [
    HEAD.replace({"history_size": 6}),
    HEAD.replace({"start_items": 3, "repeat_window": 2}),
    HEAD.replace({"repeat_head": False}),
], ids=["head", "start-items", "no-head"])
def test_scorer_ranks_long_sessions_window_by_window(config, monkeypatch):
    """A long session is ranked in windows of positions (bounded memory); the ranks are those
    of the whole session at once, with repeats and unknown items across the windows."""
    scorer, state, sessions = _long_sessions(config)
    whole = scorer.ranks(state, sessions, V)
    for width in (1, 3, 5):
        monkeypatch.setattr(keras_scorer, "MAX_POSITIONS", width)
        np.testing.assert_array_equal(scorer.ranks(state, sessions, V), whole)
    scores = scorer.score(state, sessions)
    np.testing.assert_array_equal(
        whole, metrics.event_ranks(scores.reshape(-1, V), sessions.reshape(-1)).reshape(2, 14))


@pytest.mark.parametrize("config", [
    HEAD.replace({"history_size": 6}),
    HEAD.replace({"history_size": 6, "exclude_current": False}),
    HEAD.replace({"repeat_head": False}),
], ids=["head", "keep-current", "no-head"])
def test_scorer_ranks_rule_out_the_given_items_in_every_window(config, monkeypatch):
    """`ranks(..., excluded=)` (model.evaluate --rule-out-current) in TensorFlow: the ranks
    of `score`'s output with each position's excluded item left out (`metrics.ranks`), in
    windows too; a target that is the item before it (9 9, 4 4) is a miss."""
    scorer, state, sessions = _long_sessions(config)
    previous = metrics.previous_items(sessions)
    scores = scorer.score(state, sessions)
    expected = metrics.event_ranks(scores.reshape(-1, V), sessions.reshape(-1),
                                   previous.reshape(-1)).reshape(2, 14)
    assert expected[0, 5] == expected[0, 13] == np.inf
    for width in (14, 1, 5):
        monkeypatch.setattr(keras_scorer, "MAX_POSITIONS", width)
        np.testing.assert_array_equal(scorer.ranks(state, sessions, V, excluded=previous),
                                      expected)
    plain = scorer.ranks(state, sessions, V)
    known = (previous >= 2) & (previous != sessions)
    assert np.all(expected[known] <= plain[known])  # leaving a candidate out never lowers a rank
    if config.exclude_current and config.repeat_head:
        # the model rules the item out itself: the same ranks but at the repeats
        np.testing.assert_array_equal(expected[known], plain[known])
    else:
        assert np.any(expected[known] < plain[known])


@pytest.mark.parametrize("config", [
    HEAD.replace({"history_size": 6}),
    HEAD.replace({"repeat_head": False}),
], ids=["head", "no-head"])
def test_scorer_ranks_rule_out_seen_items_in_every_window(config, monkeypatch):
    """`ranks(..., seen=)` (model.evaluate --rule-out-seen) in TensorFlow: the ranks of
    `score`'s output without the items seen before each position (the rows' earlier items,
    then the session's own), in windows too; a repeat target is a miss."""
    scorer, state, sessions = _long_sessions(config)
    before = [np.array([4, 7, 1, 4]), np.array([], np.int64)]  # (unknown and twice: once)
    seen = metrics.seen_items(before, sessions)
    steps = sessions.shape[1]
    mask = np.zeros((2, steps, V), bool)  # the rule, spelled out position by position
    for b in range(2):
        for t in range(steps):
            for item in set(before[b].tolist()) | set(sessions[b, :t].tolist()):
                mask[b, t, item] = item >= 2
    np.testing.assert_array_equal(metrics.seen_mask(*seen, 0, steps, V), mask)
    scores = scorer.score(state, sessions)
    expected = metrics.event_ranks(scores.reshape(-1, V), sessions.reshape(-1),
                                   masked=mask.reshape(-1, V)).reshape(2, steps)
    repeats = (sessions >= 2) & mask[np.arange(2)[:, None], np.arange(steps), sessions]
    assert repeats.any() and np.all(expected[repeats] == np.inf)
    for width in (steps, 1, 5):
        monkeypatch.setattr(keras_scorer, "MAX_POSITIONS", width)
        np.testing.assert_array_equal(scorer.ranks(state, sessions, V, seen=seen), expected)
    plain = scorer.ranks(state, sessions, V)
    fresh = (sessions >= 2) & ~repeats
    assert np.all(expected[fresh] <= plain[fresh]) and np.any(expected[fresh] < plain[fresh])


def _old_run(tmp_path, data: str, option: str, key: str) -> tuple[str, str]:
    """A small run trained with `option`, its config.json then without `key`, as a version
    from before the key saved it: (the run folder, the config file its command used)."""
    path = str(tmp_path / "small.json")
    with open(path, "w") as f:
        json.dump({"model": {"embedding_dim": 8, "gru_units": 4, "channels": 8,
                             "history_size": 4, "start_items": 2},
                   "train": {"batch_size": 2, "sessions_per_batch": 2, "max_session_length": 4}},
                  f)
    run = str(tmp_path / "run")
    assert train_lib.main(["--data", data, "--model-dir", run, "--config", path, "--steps", "2",
                           option, "--no-progress"]) == 0
    with open(f"{run}/config.json") as f:
        saved = json.load(f)
    assert saved["model"].pop(key) is False
    with open(f"{run}/config.json", "w") as f:
        json.dump(saved, f)
    return run, path


def test_runs_saved_before_the_transition_bias_load_without_it(tmp_path):
    # A run folder of a version before `model.transition_bias` has no such key in its
    # config.json and no such variable in its checkpoints: it loads as trained, without it.
    data = write_data(str(tmp_path / "data"), 20, planted_users(8),
                      valid=[(3, u[:4]) for u in planted_users(3, seed=1)])
    run, path = _old_run(tmp_path, data, "--no-transition-bias", "transition_bias")
    model, config, _ = registry.load_model(run)
    assert config.model.transition_bias is False
    assert not model.repeat_head.use_transition_bias and model.repeat_head.seen_bias is not None
    # ... and resumes with the same options (not refused as another model config)
    assert train_lib.main(["--data", data, "--model-dir", run, "--config", path, "--steps", "4",
                           "--no-progress"]) == 0


def test_runs_saved_before_the_chunk_context_resume_without_it(tmp_path, capsys):
    # A run folder of a version before `model.chunk_context` has no such key in its
    # config.json and no chunk context in its checkpoints' state cache: it loads and
    # resumes as trained, without it (a cache with the context would not match them).
    rng = np.random.default_rng(0)
    users = [[list(rng.permutation(np.arange(2, 20))[:9])] for _ in range(6)]  # over L = 4
    data = write_data(str(tmp_path / "data"), 20, users,
                      valid=[(1, [u[0][:5], u[0][5:]]) for u in users[:3]])
    run, path = _old_run(tmp_path, data, "--no-chunk-context", "chunk_context")
    _, config, _ = registry.load_model(run)
    assert config.model.chunk_context is False
    # resuming it with today's default is refused with the difference; with the option, it
    # resumes
    assert train_lib.main(["--data", data, "--model-dir", run, "--config", path, "--steps", "4",
                           "--no-progress"]) != 0
    assert "model.chunk_context False -> True" in capsys.readouterr().err
    assert train_lib.main(["--data", data, "--model-dir", run, "--config", path, "--steps", "4",
                           "--no-chunk-context", "--no-progress"]) == 0
    with open(f"{run}/config.json") as f:
        assert json.load(f)["model"]["chunk_context"] is False
    # a new run has it: its cache carries each row's last receptive-field session items
    fresh = str(tmp_path / "fresh")
    assert train_lib.main(["--data", data, "--model-dir", fresh, "--config", path, "--steps", "2",
                           "--no-progress"]) == 0
    model, config, _ = registry.load_model(fresh)
    assert config.model.chunk_context is True
    assert model.train_cache(2)[-1].shape == (2, config.model.receptive_field)
