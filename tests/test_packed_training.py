"""HierTCN's packed training encoder equals the padded one: same loss, same gradients, same
state cache, batch after batch of the real queue generator (issue 6's speed work)."""
import numpy as np
import pytest
import tensorflow as tf

from model import batching
from model import config as config_lib
from model.hiertcn import HierTCN, PackedSlots, packed_causal_conv

# The published model (no repeat head: its batches carry no `history`).
SMALL = {"embedding_dim": 8, "gru_units": 4, "repeat_head": False, "dropout": 0.0}  # same masks
CONFIGS = {
    "default_shape": config_lib.HierTCNConfig(**SMALL, channels=8),
    "deep_with_shortcut": config_lib.HierTCNConfig(**SMALL, channels=6, num_blocks=3,
                                                   convs_per_block=2),
    "session_only": config_lib.HierTCNConfig(**SMALL, channels=8, high_level=False),
    "session_summary": config_lib.HierTCNConfig(**SMALL, channels=8, session_summary=True),
    "summary_session_only": config_lib.HierTCNConfig(**SMALL, channels=8, high_level=False,
                                                     session_summary=True),
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
    # per slot, the sum over its earlier positions: [0 5 11] and [0 8]
    assert packed.exclusive_sum(x).numpy()[:, 0].tolist() == [0.0, 0.0, 5.0, 8.0, 11.0]


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


def test_packed_conv_on_a_subset_of_rows_equals_the_whole_conv_there():
    # The chunk context's cone: a conv computed only at some rows (`target`) from only the
    # rows they read (`source`) equals the whole conv at those rows, values and gradient.
    # Slots [5 6 7] and [8 9], x = [1 2 4] and [10 20] (packed: 5 8 6 9 7), kernel 2,
    # dilation 1, weights 1: the whole conv is [1 3 6] and [10 30].
    conv = tf.keras.layers.Conv1D(1, 2, padding="causal", use_bias=False,
                                  kernel_initializer="ones")
    conv.build([None, None, 1])
    packed = PackedSlots(tf.constant([[5, 6, 7], [8, 9, 0]], tf.int64))
    x = tf.constant([[1.0], [10.0], [2.0], [20.0], [4.0]])
    target = packed.rows_from(tf.constant([1, 0]))              # all but item 5
    assert target.index.numpy().tolist() == [1, 2, 3, 4]
    assert target.of.numpy().tolist() == [4, 0, 1, 2, 3]
    out = packed_causal_conv(x, packed, conv, None, target)
    assert out.numpy()[:, 0].tolist() == [10.0, 3.0, 30.0, 6.0]  # packed: 8 6 9 7
    assert target.to_row_major(out).numpy()[:, 0].tolist() == [3.0, 6.0, 10.0, 30.0]
    # from a subset: items 7 and 9 read 6 and 8, which are among the source rows
    later = packed.rows_from(tf.constant([2, 1]))
    source = tf.gather(x, target.index)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, source])
        ours = packed_causal_conv(source, packed, conv, target, later)
        whole = tf.gather(packed_causal_conv(x, packed, conv), later.index)
        weights = tf.constant([[3.0], [5.0]])
        loss_ours, loss_whole = (tf.reduce_sum(v * weights) for v in (ours, whole))
    assert later.to_row_major(ours).numpy()[:, 0].tolist() == [6.0, 30.0]
    np.testing.assert_allclose(ours.numpy(), whole.numpy())
    np.testing.assert_allclose(tape.gradient(loss_ours, source).numpy(),
                               tf.gather(tape.gradient(loss_whole, x), target.index).numpy())


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


def test_session_summary_carries_across_chunks():
    # Kernel 1, one block: a position sees only its input item, the state and the summary,
    # so a session split into chunks of 2 gives the whole-session vectors except at each
    # chunk's first position (whose input is the start vector, not the previous item).
    tf.keras.utils.set_random_seed(0)
    config = config_lib.HierTCNConfig(**SMALL, channels=8, kernel_size=1, num_blocks=1,
                                      session_summary=True, chunk_context=False)
    model = HierTCN(config, 30)
    model.build_weights()
    sessions = [np.array([3, 4, 5]), np.array([6, 7, 8, 9, 10])]
    batch = next(iter(batching.QueueBatcher(lambda: [sessions], 1, 5, 2)))
    batch = {k: tf.constant(v) for k, v in batch.items()}
    u, _ = model.encode(batch, model.train_cache(1), False)            # [5 slots, 2, D]
    state = model.update_state(model.initial_state(1), sessions[0][None])
    whole = model.user_embeddings(state, sessions[1][None, :-1])[0]     # [5, D]
    chunked = u.numpy()[2:5].reshape(6, -1)[:5]                         # slots [6 7] [8 9] [10]
    for p in (1, 3):
        np.testing.assert_allclose(chunked[p], whole[p].numpy(), atol=1e-5)
    assert not np.allclose(chunked[2], whole[2].numpy(), atol=1e-3)     # chunk start
    # without the summary, position 3 would not see items 6 and 7
    summary_off = HierTCN(config.replace({"session_summary": False}), 30)
    summary_off.build_weights()
    summary_off.set_weights([w for w, v in zip(model.get_weights(), model.weights)
                             if "summary_projection" not in v.name])
    off = summary_off.user_embeddings(state, sessions[1][None, :-1])[0]
    assert not np.allclose(off[3].numpy(), whole[3].numpy(), atol=1e-3)


@pytest.mark.parametrize("name", ["default_shape", "deep_with_shortcut", "session_only",
                                  "session_summary"])
@pytest.mark.parametrize("encoder", ["packed", "padded"])
def test_chunked_sessions_train_on_what_evaluation_sees(name, encoder):
    # Sessions of up to 40 items in chunks of L = 6, S = 2 slots a batch: a session runs
    # over several slots and batches. With the chunk context, the user vector at every
    # training target is the whole-session one that evaluation and serving compute
    # (`user_embeddings` over the session so far after `update_state` of the earlier
    # ones); without it, a later chunk's first positions differ.
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    users = [[rng.integers(2, 30, size=n) for n in rng.integers(1, 41, size=rng.integers(1, 4))]
             for _ in range(5)]
    rows = 2
    results = {}
    for context in (True, False):
        model = HierTCN(CONFIGS[name].replace({"chunk_context": context}), 30)
        model.build_weights()
        if context:
            weights = model.get_weights()
            assert model.context_size == model.receptive_field
        else:
            model.set_weights(weights)
            assert model.context_size == 0
        cache = model.train_cache(rows)
        got = {}  # (user, session, position) -> the training view's vector
        # which user and session each row's slots belong to, in the generator's order
        owners = [[] for _ in range(rows)]
        batcher = batching.QueueBatcher(lambda: users, rows, 2, 6, epochs=1, shuffle_buffer=1)
        queue = [[(u, k) for k, session in enumerate(sessions) for _ in range(-(-len(session) // 6))]
                 for u, sessions in enumerate(users)]
        assigned = 0
        for batch in batcher:
            while assigned < batcher.consumed:  # users fed to rows: the shortest row, as the batcher
                owners[min(range(rows), key=lambda r: len(owners[r]))].extend(queue[assigned])
                assigned += 1
            batch = {k: tf.constant(v) for k, v in batch.items()}
            encode = model.encode_events if encoder == "packed" else model.encode
            user, cache = encode(batch, cache, False)
            user = user.numpy()
            if encoder == "padded":
                mask = batch["items"].numpy().reshape(rows * 2, -1) > 0
                user = user[mask]
            i = 0
            for r in range(rows):
                for slot in range(2):
                    chunk = batch["items"].numpy()[r, slot]
                    if not chunk.any():
                        continue
                    u, k = owners[r].pop(0)
                    done = sum(1 for key in got if key[:2] == (u, k))
                    for p in range(int((chunk > 0).sum())):
                        got[(u, k, done + p)] = user[i]
                        i += 1
            assert i == len(user)
        results[context] = got
    for context, got in results.items():
        differ = 0
        state = model.initial_state(1)
        for u, sessions in enumerate(users):
            state = model.initial_state(1)
            for k, session in enumerate(sessions):
                whole = model.user_embeddings(state, session[None, :-1])[0].numpy()
                for p in range(len(session)):
                    same = np.allclose(got[(u, k, p)], whole[p], atol=1e-5)
                    if context:
                        assert same, (u, k, p)
                    differ += not same
                state = model.update_state(state, session[None])
        if not context:
            assert differ > 0


def test_short_sessions_skip_the_chunk_context_with_the_same_results():
    # Sessions of at most L items: no slot continues a session, so `model.train`'s
    # `skip_chunk_context` (the step without the context's work) changes nothing; with a
    # longer session it does not skip.
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    users = [[rng.integers(2, 30, size=n) for n in rng.integers(1, 8, size=3)] for _ in range(6)]
    model = HierTCN(CONFIGS["default_shape"], 30)
    model.build_weights()
    model.skip_chunk_context(25, 7)
    assert model.reads_chunk_context and model.context_size
    model.skip_chunk_context(None, 7)
    assert model.reads_chunk_context
    caches = {True: model.train_cache(2), False: model.train_cache(2)}
    for batch in batching.QueueBatcher(lambda: users, 2, 2, 7, epochs=1):
        batch = {k: tf.constant(v) for k, v in batch.items()}
        out = {}
        for reads in (True, False):
            model.reads_chunk_context = reads
            user, caches[reads] = model.encode_events(batch, caches[reads], False)
            out[reads] = user.numpy()
        np.testing.assert_allclose(out[True], out[False], atol=1e-6)
        for a, b in zip(caches[True], caches[False]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    model.reads_chunk_context = True
    model.skip_chunk_context(7, 7)
    assert not model.reads_chunk_context
