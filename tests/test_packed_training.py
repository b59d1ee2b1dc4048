"""HierTCN's packed training encoder equals the padded one: same loss, same gradients, same
state cache, batch after batch of the real queue generator (issue 6's speed work)."""
import numpy as np
import pytest
import tensorflow as tf

from model import batching
from model import config as config_lib
from model.hiertcn import HierTCN, PackedSlots, packed_causal_conv

CONFIGS = {
    "default_shape": config_lib.HierTCNConfig(embedding_dim=8, gru_units=4, channels=8),
    "deep_with_shortcut": config_lib.HierTCNConfig(embedding_dim=8, gru_units=4, channels=6,
                                                   num_blocks=3, convs_per_block=2),
    "session_only": config_lib.HierTCNConfig(embedding_dim=8, gru_units=4, channels=8,
                                             high_level=False),
}


def test_packed_slots_layout_is_position_major():
    # Slots [5 6 7] and [8 9]: position 0 of both, then position 1 of both, then 7.
    packed = PackedSlots(tf.constant([[5, 6, 7], [8, 9, 0]], tf.int64))
    assert packed.items.numpy().tolist() == [5, 8, 6, 9, 7]
    assert packed.slot.numpy().tolist() == [0, 1, 0, 1, 0]
    assert packed.pos.numpy().tolist() == [0, 0, 1, 1, 2]
    assert [int(packed.start(s)) for s in (1, 2, 3, 9)] == [2, 4, 5, 5]
    x = tf.constant([[5.0], [8.0], [6.0], [9.0], [7.0]])
    assert packed.shift(x, 1).numpy()[:, 0].tolist() == [5.0, 8.0, 6.0]   # rows 6, 9, 7
    assert packed.to_row_major(x).numpy()[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]


@pytest.mark.parametrize("dilation, expected", [
    (1, [1.0, 3.0, 6.0, 10.0, 30.0]),   # out_t = x_t + x_(t-1): no 4 + 10 across the border
    (2, [1.0, 2.0, 5.0, 10.0, 20.0]),   # out_t = x_t + x_(t-2)
])
def test_packed_conv_equals_per_sequence_causal_conv(dilation, expected):
    # Two sequences [x0 x1 x2] = [1 2 4] and [y0 y1] = [10 20]; kernel 2, no bias, all
    # weights 1 and 1-d inputs, x_(-1) = x_(-2) = 0 in each sequence.
    conv = tf.keras.layers.Conv1D(1, 2, dilation_rate=dilation, padding="causal",
                                  use_bias=False, kernel_initializer="ones")
    conv.build([None, None, 1])
    packed = PackedSlots(tf.constant([[5, 6, 7], [8, 9, 0]], tf.int64))
    x = tf.constant([[1.0], [10.0], [2.0], [20.0], [4.0]])   # position-major
    out = packed.to_row_major(packed_causal_conv(x, packed, conv)).numpy()[:, 0]
    np.testing.assert_allclose(out, expected)
    # Same gradient as the padded Keras conv: d sum(out) / d x_t = taps that read x_t.
    padded = tf.constant([[[1.0], [2.0], [4.0]], [[10.0], [20.0], [0.0]]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, padded])
        ours = tf.reduce_sum(packed_causal_conv(x, packed, conv))
        ref = tf.reduce_sum(conv(padded)[:, :, 0] * tf.constant([[1.0, 1, 1], [1, 1, 0]]))
    ref_grad = tape.gradient(ref, padded).numpy()[:, :, 0]
    np.testing.assert_allclose(packed.to_row_major(tape.gradient(ours, x)).numpy()[:, 0],
                               [*ref_grad[0], *ref_grad[1, :2]])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_training_matches_padded(name):
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    users = [[rng.integers(2, 30, size=rng.integers(1, 17)) for _ in range(rng.integers(1, 4))]
             for _ in range(8)]
    model = HierTCN(CONFIGS[name], 30)
    model.build_weights()
    padded_cache = packed_cache = model.train_cache(3)
    for batch in batching.QueueBatcher(lambda: users, 3, 3, 7, epochs=1):
        batch = {k: tf.constant(v) for k, v in batch.items()}
        with tf.GradientTape() as tape:
            loss_a, padded_cache, n_a = model.train_loss(batch, padded_cache, True, encode=model.encode)
        grads_a = tape.gradient(loss_a, model.trainable_variables)
        with tf.GradientTape() as tape:
            loss_b, packed_cache, n_b = model.train_loss(batch, packed_cache, True)
        grads_b = tape.gradient(loss_b, model.trainable_variables)
        assert int(n_a) == int(n_b)
        np.testing.assert_allclose(loss_a.numpy(), loss_b.numpy(), rtol=1e-5)
        for a, b in zip(padded_cache, packed_cache):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        for var, a, b in zip(model.trainable_variables, grads_a, grads_b):
            np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                       atol=1e-5, err_msg=var.name)
