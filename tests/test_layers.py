"""HierTCN's layers on tiny tensors: causality, receptive field, config round trips."""
import numpy as np
import pytest
import tensorflow as tf

from model import layers


def _tcn(num_blocks=2, convs=1, kernel=5):
    # Seeded so that no ReLU path is dead by chance: the receptive-field test needs the
    # perturbation inside the field to reach the output.
    tf.keras.utils.set_random_seed(0)
    blocks = [layers.TemporalBlock(16, kernel, 2 ** i, convs) for i in range(num_blocks)]
    def run(x):
        for b in blocks:
            x = b(x)
        return x
    return blocks, run


def test_tcn_is_causal():
    _, run = _tcn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=[2, 12, 16]).astype(np.float32)
    y = run(tf.constant(x)).numpy()
    for t in range(12):
        x2 = x.copy()
        x2[:, t + 1:] = rng.normal(size=x2[:, t + 1:].shape)
        np.testing.assert_allclose(run(tf.constant(x2)).numpy()[:, :t + 1], y[:, :t + 1], atol=1e-6)


@pytest.mark.parametrize("num_blocks,convs,kernel,expected", [
    (2, 1, 5, 13),   # 1 + 4 * (1 + 2): the authors' default
    (2, 2, 5, 25),   # the deep preset: covers L = 20
    (3, 1, 3, 15),   # 1 + 2 * (1 + 2 + 4)
])
def test_receptive_field_as_computed(num_blocks, convs, kernel, expected):
    blocks, run = _tcn(num_blocks, convs, kernel)
    assert 1 + sum(b.receptive_field - 1 for b in blocks) == expected
    t = 40
    x = np.random.default_rng(1).normal(size=[1, t, 16]).astype(np.float32)
    y = run(tf.constant(x)).numpy()[0, -1]
    # Changing the input exactly `expected` steps back (outside the field) changes nothing;
    # one step later (inside) changes the output.
    far, near = x.copy(), x.copy()
    far[0, t - 1 - expected] += 5.0
    near[0, t - expected] += 5.0
    np.testing.assert_allclose(run(tf.constant(far)).numpy()[0, -1], y, atol=1e-6)
    assert np.abs(run(tf.constant(near)).numpy()[0, -1] - y).max() > 1e-4


def test_session_aggregator_mean_plus_bias():
    agg = layers.SessionAggregator()
    # sums of [1,2] and [3,4] with 2 items -> mean [2,3]; an empty row gives the bias (0).
    out = agg(tf.constant([[4.0, 6.0], [0.0, 0.0]]), tf.constant([2.0, 0.0]))
    np.testing.assert_allclose(out.numpy(), [[2.0, 3.0], [0.0, 0.0]])


def test_stateful_input_equals_concat_then_project():
    lay = layers.StatefulInput(3)
    items = tf.random.normal([2, 4, 5])
    state = tf.random.normal([2, 6])
    out = lay((items, state)).numpy()
    assert out.shape == (2, 5, 3)
    x = np.concatenate([np.broadcast_to(lay.start.numpy(), [2, 1, 5]), items.numpy()], axis=1)
    cat = np.concatenate([x, np.broadcast_to(state.numpy()[:, None], [2, 5, 6])], axis=-1)
    np.testing.assert_allclose(out, cat @ lay.kernel.numpy(), atol=1e-5)


def test_stacked_gru_state_is_layers_concatenated():
    gru = layers.StackedGRU(3, 2)
    assert gru.state_size == 6
    out = gru(tf.ones([2, 4]), tf.zeros([2, 6]))
    assert out.shape == (2, 6)
    # the second layer's input is the first layer's new state
    h1, _ = gru.cells[1](out[:, :3], [tf.zeros([2, 3])])
    np.testing.assert_allclose(out[:, 3:].numpy(), h1.numpy(), atol=1e-6)


def test_stacked_gru_step_is_the_keras_cells_and_projects_many_steps_at_once():
    tf.keras.utils.set_random_seed(0)
    gru = layers.StackedGRU(3, 2)
    x, state = tf.random.normal([2, 5, 4]), tf.random.normal([2, 6])
    gru(x[:, 0], state)
    for cell in gru.cells:  # non-zero biases, so both bias rows are checked
        cell.bias.assign(tf.random.normal(cell.bias.shape))
    projected = gru.project_inputs(x)                        # [2, 5, 9], all steps at once
    for t in range(5):
        h0, _ = gru.cells[0](x[:, t], [state[:, :3]])
        h1, _ = gru.cells[1](h0, [state[:, 3:]])
        np.testing.assert_allclose(gru.step(projected[:, t], state).numpy(),
                                   tf.concat([h0, h1], 1).numpy(), atol=1e-6)


def test_item_scorer_and_tied():
    sc = layers.ItemScorer(5)
    u = tf.random.normal([2, 3, 4])
    out = sc(u)
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out.numpy(), u.numpy() @ sc.kernel.numpy().T, atol=1e-5)
    tied = layers.ItemScorer(5, tied=True)
    w = tf.random.normal([5, 4])
    np.testing.assert_allclose(tied(u, w).numpy(), u.numpy() @ w.numpy().T, atol=1e-5)


@pytest.mark.parametrize("make,bad", [
    (lambda: layers.TemporalBlock(0), "channels must be a positive integer, got 0"),
    (lambda: layers.TemporalBlock(4, kernel_size=-1), "kernel_size must be a positive integer, got -1"),
    (lambda: layers.TemporalBlock(4, dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (lambda: layers.StackedGRU(8, 0), "num_layers must be a positive integer, got 0"),
    (lambda: layers.ItemScorer(0), "vocab_size must be a positive integer, got 0"),
    (lambda: layers.StatefulInput(2.5), "channels must be a positive integer, got 2.5"),
])
def test_arguments_validated_early(make, bad):
    with pytest.raises(ValueError, match=bad):
        make()


@pytest.mark.parametrize("layer", [
    layers.TemporalBlock(4, 3, 2, 2, 0.1), layers.StackedGRU(3, 2), layers.StatefulInput(3),
    layers.ItemScorer(7, use_bias=False, tied=True), layers.SessionAggregator()])
def test_get_config_round_trip(layer):
    config = layer.get_config()
    again = type(layer).from_config(config)
    assert again.get_config() == config


def test_block_save_reload_gives_same_output(tmp_path):
    block = layers.TemporalBlock(4, 3, 2)
    x = tf.random.normal([2, 6, 3])
    y = block(x).numpy()
    path = str(tmp_path / "ckpt")
    tf.train.Checkpoint(layer=block).write(path)
    again = layers.TemporalBlock.from_config(block.get_config())
    again.build(x.shape)
    tf.train.Checkpoint(layer=again).read(path).assert_consumed()
    np.testing.assert_allclose(again(x).numpy(), y, atol=1e-6)
    assert again.shortcut is not None  # 3 -> 4 channels needs the 1x1 shortcut


def test_item_embedding_trainable_pretrained_and_frozen():
    trained = layers.item_embedding(6, 3)
    trained.build([None])
    assert trained.name == "item_embedding" and trained.trainable
    assert trained.embeddings.shape == (6, 3) and 0 < np.std(trained.embeddings.numpy()) < 0.1
    vectors = np.arange(18, dtype=np.float32).reshape(6, 3)
    fixed = layers.item_embedding(6, 3, vectors)
    np.testing.assert_array_equal(fixed(tf.constant([2, 5])).numpy(), vectors[[2, 5]])
    assert not fixed.trainable_weights
    frozen = layers.item_embedding(6, 3, frozen=True)  # to be restored from a checkpoint
    frozen.build([None])
    assert not frozen.trainable_weights and not frozen.embeddings.numpy().any()
    with pytest.raises(ValueError, match=r"shape \(5, 3\), expected \(6, 3\)"):
        layers.item_embedding(6, 3, vectors[:5])
