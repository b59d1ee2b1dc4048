"""HierTCN's layers: the item embedding (shared by every model), session aggregation,
stacked high-level GRU, stateful input projection, causal TCN block and the item scorer.

Each layer validates its arguments in `__init__` (ValueError naming the bad value), creates
its weights in `build` and returns every argument from `get_config`. All call paths use
core TensorFlow ops only, so the serving signatures can reuse them unchanged.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from pipeline import schema


def item_embedding(vocab_size: int, dim: int, pretrained: np.ndarray | None = None,
                   frozen: bool = False) -> tf.keras.layers.Embedding:
    """The item embedding of every model: [vocab_size, dim], named "item_embedding" (the
    checkpoints' variable names rely on it).

    Args:
      vocab_size: rows (items.tsv rows, plus any extra token of the model).
      dim: the embedding width.
      pretrained: fixed vectors [vocab_size, dim] to use (frozen).
      frozen: not trained; without `pretrained` the vectors start at zero and are meant
        to be restored from a checkpoint. Trainable embeddings start at N(0, 0.05^2).

    Raises:
      ValueError: `pretrained` of another shape.
    """
    if pretrained is not None:
        if tuple(pretrained.shape) != (vocab_size, dim):
            raise ValueError(f"pretrained item vectors have shape {tuple(pretrained.shape)}, "
                             f"expected ({vocab_size}, {dim})")
        init = tf.keras.initializers.Constant(pretrained)
    elif frozen:
        init = "zeros"
    else:
        init = tf.keras.initializers.RandomNormal(stddev=0.05)
    return tf.keras.layers.Embedding(vocab_size, dim, embeddings_initializer=init,
                                     trainable=not (frozen or pretrained is not None),
                                     name="item_embedding")


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _rate(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class SessionAggregator(tf.keras.layers.Layer):
    """AGG(session) = mean of the session's non-padding item embeddings + bias.

    The mean is taken from running sums so that a session split over several chunks (or
    batches) aggregates exactly as if it had been seen at once.
    """

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=[int(input_shape[-1])],
                                    initializer="zeros", trainable=True)
        super().build(input_shape)

    def call(self, sums: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
        """Aggregates from sums.

        Args:
          sums: [..., E] sum of the session's item embeddings.
          counts: [...] number of non-padding items (0 gives just the bias).

        Returns:
          [..., E] the session aggregate.
        """
        denom = tf.maximum(tf.cast(counts, sums.dtype), 1.0)[..., None]
        return sums / denom + tf.cast(self.bias, sums.dtype)


class StackedGRU(tf.keras.layers.Layer):
    """The high-level GRU: `num_layers` stacked cells, one step per session.

    The state is all layers' states concatenated, [batch, units * num_layers]. The Keras
    `GRUCell`s hold the weights (and their names); the step computes their equations
    (reset gate applied after the recurrent matmul, the Keras default) itself, so that the
    first layer's input projection, which does not depend on the state, can be done for
    many steps in one matmul: `step(project_inputs(x), state)` == `call(x, state)`.
    """

    def __init__(self, units: int, num_layers: int, **kwargs):
        super().__init__(**kwargs)
        self.units = _positive("units", units)
        self.num_layers = _positive("num_layers", num_layers)
        self.cells = [tf.keras.layers.GRUCell(units, name=f"cell_{i}") for i in range(num_layers)]

    @property
    def state_size(self) -> int:
        return self.units * self.num_layers

    def build(self, input_shape):
        dim = int(input_shape[-1])
        for cell in self.cells:
            cell.build(tf.TensorShape([None, dim]))
            dim = self.units
        super().build(input_shape)

    def project_inputs(self, inputs: tf.Tensor) -> tf.Tensor:
        """[..., E] -> [..., 3 units]: the first layer's x W + b (any number of steps)."""
        cell = self.cells[0]
        x = tf.reshape(inputs, [-1, inputs.shape[-1]])
        y = tf.nn.bias_add(tf.matmul(x, tf.cast(cell.kernel, x.dtype)),
                           tf.cast(cell.bias[0], x.dtype))
        return tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [3 * self.units]], 0))

    def step_weights(self, dtype=tf.float32) -> list[tuple[tf.Tensor, ...]]:
        """Per cell (kernel, recurrent kernel, input bias, recurrent bias) in `dtype`:
        read once for many `step`s."""
        return [(tf.cast(c.kernel, dtype), tf.cast(c.recurrent_kernel, dtype),
                 *tf.unstack(tf.cast(c.bias, dtype))) for c in self.cells]

    def step(self, projected: tf.Tensor, state: tf.Tensor, weights=None) -> tf.Tensor:
        """One step from the projected input.

        Args:
          projected: [batch, 3 units] `project_inputs` of the session aggregate.
          state: [batch, units * num_layers].
          weights: `step_weights(projected.dtype)` (default: read now).

        Returns:
          [batch, units * num_layers] the new state.
        """
        weights = weights or self.step_weights(projected.dtype)
        x, new, u = projected, [], self.units
        states = tf.split(tf.cast(state, x.dtype), self.num_layers, axis=-1)
        for i, (h, (kernel, recurrent, bias, recurrent_bias)) in enumerate(zip(states, weights)):
            if i:
                x = tf.nn.bias_add(tf.matmul(x, kernel), bias)
            inner = tf.nn.bias_add(tf.matmul(h, recurrent), recurrent_bias)
            x_zr, x_h = tf.split(x, [2 * u, u], axis=-1)
            inner_zr, inner_h = tf.split(inner, [2 * u, u], axis=-1)
            z, r = tf.split(tf.sigmoid(x_zr + inner_zr), 2, axis=-1)
            x = z * h + (1 - z) * tf.tanh(x_h + r * inner_h)
            new.append(x)
        return tf.concat(new, axis=-1)

    def call(self, inputs: tf.Tensor, state: tf.Tensor) -> tf.Tensor:
        """One step.

        Args:
          inputs: [batch, E] the session aggregate.
          state: [batch, units * num_layers].

        Returns:
          [batch, units * num_layers] the new state.
        """
        return self.step(self.project_inputs(inputs), state)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "num_layers": self.num_layers}


class StatefulInput(tf.keras.layers.Layer):
    """Builds the TCN input: [start, item embeddings] each concatenated with the state and
    projected to the channel width without bias.

    concat(x_t, h) @ W = x_t @ W_x + h @ W_h, so the state is projected once per row
    instead of being tiled over the steps.
    """

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = _positive("channels", channels)

    def build(self, input_shape):
        item_shape, state_shape = input_shape
        e, h = int(item_shape[-1]), int(state_shape[-1])
        self.start = self.add_weight(name="start", shape=[e],
                                     initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        self.kernel = self.add_weight(name="kernel", shape=[e + h, self.channels],
                                      initializer="glorot_uniform")
        super().build(input_shape)

    def call(self, inputs) -> tf.Tensor:
        """Projects.

        Args:
          inputs: (item_embeddings [batch, T, E], state [batch, H]).

        Returns:
          [batch, T + 1, channels]: position 0 is the start vector.
        """
        items, state = inputs
        e = items.shape[-1]
        start = tf.broadcast_to(tf.cast(self.start, items.dtype), tf.stack([tf.shape(items)[0], 1, e]))
        x = tf.concat([start, items], axis=1)
        kernel = tf.cast(self.kernel, items.dtype)
        return (tf.einsum("bte,ec->btc", x, kernel[:e])
                + tf.matmul(tf.cast(state, items.dtype), kernel[e:])[:, None, :])

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


class TemporalBlock(tf.keras.layers.Layer):
    """Residual block of causal dilated convolutions: relu(x + F(x)), F = (conv, ReLU,
    dropout) x convs (Bai et al. 2018; the HierTCN authors used one conv per block).

    Output at step t depends only on inputs at steps <= t.
    """

    def __init__(self, channels: int, kernel_size: int = 5, dilation: int = 1, convs: int = 1,
                 dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.channels = _positive("channels", channels)
        self.kernel_size = _positive("kernel_size", kernel_size)
        self.dilation = _positive("dilation", dilation)
        self.convs = _positive("convs", convs)
        self.dropout = _rate("dropout", dropout)
        self.conv_layers = [
            tf.keras.layers.Conv1D(channels, kernel_size, dilation_rate=dilation, padding="causal",
                                   activation="relu", name=f"conv_{i}") for i in range(convs)]
        self.drop = tf.keras.layers.Dropout(dropout)
        self.shortcut = None

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * self.dilation * self.convs

    def build(self, input_shape):
        shape = tf.TensorShape(input_shape)
        for conv in self.conv_layers:
            conv.build(shape)
            shape = shape[:-1].concatenate([self.channels])
        if int(input_shape[-1]) != self.channels:
            self.shortcut = tf.keras.layers.Conv1D(self.channels, 1, name="shortcut")
            self.shortcut.build(input_shape)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, training=None) -> tf.Tensor:
        """[batch, T, in_channels] -> [batch, T, channels]."""
        x = inputs
        for conv in self.conv_layers:
            x = self.drop(conv(x), training=training)
        res = inputs if self.shortcut is None else self.shortcut(inputs)
        return tf.nn.relu(x + res)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "kernel_size": self.kernel_size,
                "dilation": self.dilation, "convs": self.convs, "dropout": self.dropout}


class _Untracked:
    """A value kept out of Keras's tracking of a layer's attributes (a variable set on a
    layer would become one of its weights, and of its checkpoints)."""

    __slots__ = ("kernel_t",)

    def __init__(self):
        self.kernel_t = None


class ItemScorer(tf.keras.layers.Layer):
    """Scores user embeddings against every item: u @ W^T + b, W [vocab, D].

    With `tied=True` there is no own matrix: the caller passes the item vectors.
    An export scores with a [D, vocab] copy of W instead (`serving_layout`).
    """

    def __init__(self, vocab_size: int, use_bias: bool = True, tied: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = _positive("vocab_size", vocab_size)
        self.use_bias = bool(use_bias)
        self.tied = bool(tied)
        self._serving = _Untracked()

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.kernel = None if self.tied else self.add_weight(
            name="kernel", shape=[self.vocab_size, d], initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=[self.vocab_size], initializer="zeros",
                                    trainable=self.use_bias)
        super().build(input_shape)

    def item_vectors(self, tied_vectors: tf.Tensor | None = None) -> tf.Tensor:
        """[vocab, D] output item vectors."""
        if self.tied:
            if tied_vectors is None:
                raise ValueError("a tied ItemScorer needs the item vectors")
            return tied_vectors
        return self.kernel

    def rows(self, indices: tf.Tensor, tied_vectors: tf.Tensor | None = None
             ) -> tuple[tf.Tensor, tf.Tensor]:
        """(item vectors float32 [N, D], bias [N]) of the items `indices` int64 [N]: a score
        is u . v + b. Inside `serving_layout` they are read from the copy W^T (an export
        does not hold W)."""
        if self._serving.kernel_t is not None:
            vectors = tf.transpose(tf.gather(self._serving.kernel_t, indices, axis=1))
        else:
            vectors = tf.gather(self.item_vectors(tied_vectors), indices)
        return tf.cast(vectors, tf.float32), tf.gather(tf.cast(self.bias, tf.float32), indices)

    def transposed_copy(self) -> tf.Variable | None:
        """For an export: a new variable holding W transposed, [D, vocab]
        (`serving_layout`); None for a tied scorer, whose W is the input embedding,
        needed as it is."""
        if self.tied:
            return None
        return tf.Variable(tf.transpose(self.kernel), trainable=False, name="kernel_transposed")

    @contextlib.contextmanager
    def serving_layout(self, kernel_t: tf.Variable):
        """While the context lasts, `call` scores with `kernel_t` (`transposed_copy`) in
        place of W, so functions traced inside it read the copy, not W: oneDNN reads it
        for a few rows of users about 1.5 times as fast (1.9 against 2.8 ms for one row
        at 50,000 items and D = 128, 5.5 against 8.2 ms for 32 rows). Afterwards `call`
        uses W again."""
        self._serving.kernel_t = kernel_t
        try:
            yield
        finally:
            self._serving.kernel_t = None

    def call(self, user: tf.Tensor, tied_vectors: tf.Tensor | None = None) -> tf.Tensor:
        """[..., D] -> [..., vocab] float32 scores."""
        rows = tf.reshape(user, [-1, tf.shape(user)[-1]])
        if self._serving.kernel_t is not None:
            logits = tf.linalg.matmul(rows, tf.cast(self._serving.kernel_t, user.dtype))
        else:
            w = tf.cast(self.item_vectors(tied_vectors), user.dtype)
            logits = tf.linalg.matmul(rows, w, transpose_b=True)
        logits = tf.cast(logits, tf.float32) + tf.cast(self.bias, tf.float32)  # autocast: bfloat16
        return tf.reshape(logits, tf.concat([tf.shape(user)[:-1], [self.vocab_size]], 0))

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "use_bias": self.use_bias,
                "tied": self.tied}


class RepeatHead(tf.keras.layers.Layer):
    """The repeat head (in the spirit of RepeatNet, Ren et al. 2019): how much the next
    item is a revisit, and which of the user's recent items it revisits.

        w_p = sigmoid(u_p . g + b)                                    (repeat weight)
        a_pj = (u_p W_q) . e_j / sqrt(E) + r[min(age_pj, max_age - 1)]
        p_rep(j | p) = softmax over the context positions j visible at p

    age_pj counts the visible context items newer than j (0 = the latest), so the learned
    recency bias r works for any context length. With `num_starts` R > 0 the context ends
    with R more entries, the first items of the user's last R sessions (oldest first),
    whose bias is s[k] + u_p . v in place of r (a learned bias per session age plus a
    weight that depends on the position). The model scatters p_rep onto item indices and
    mixes it with its catalogue softmax.

    With `seen_bias`, the layer also holds a learned scalar beta (initially 0) that the
    model adds to the catalogue logits of the items the user has already seen (the
    history and the session so far), before the catalogue softmax: negative where
    consumed items do not come back (a rated movie), positive where they do.

    With `transition_bias`, a learned scalar tau (initially 0) is added to a_pj where the
    context entry j followed an earlier occurrence of the item position p is on (the
    user's own transitions, as a personalised Markov chain has them: a shopper who went
    from A to B before and is on A again); the caller passes that indicator.
    """

    def __init__(self, max_age: int, num_starts: int = 0, seen_bias: bool = False,
                 transition_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.max_age = _positive("max_age", max_age)
        if num_starts < 0:
            raise ValueError(f"num_starts must be >= 0, got {num_starts}")
        self.num_starts = int(num_starts)
        self.use_seen_bias = bool(seen_bias)
        self.use_transition_bias = bool(transition_bias)

    def build(self, input_shape):
        user_shape, key_shape = input_shape[0], input_shape[1]
        d, e = int(user_shape[-1]), int(key_shape[-1])
        self.query = self.add_weight(name="query", shape=[d, e], initializer="glorot_uniform")
        self.gate = self.add_weight(name="gate", shape=[d], initializer="zeros")
        self.gate_bias = self.add_weight(name="gate_bias", shape=[], initializer="zeros")
        self.recency = self.add_weight(name="recency", shape=[self.max_age], initializer="zeros")
        if self.num_starts:
            self.start_recency = self.add_weight(name="start_recency", shape=[self.num_starts],
                                                 initializer="zeros")
            self.start_query = self.add_weight(name="start_query", shape=[d], initializer="zeros")
        if self.use_seen_bias:
            self.seen_bias_unscaled = self.add_weight(name="seen_bias", shape=[],
                                                      initializer="zeros")
        if self.use_transition_bias:
            self.transition_bias_unscaled = self.add_weight(name="transition_bias", shape=[],
                                                            initializer="zeros")
        super().build(input_shape)

    @property
    def seen_bias(self) -> tf.Tensor:
        """beta = SEEN_BIAS_SCALE x the variable: one scalar that must travel several units
        (about -4 where seen items never return) learns as fast as the other weights."""
        return SEEN_BIAS_SCALE * self.seen_bias_unscaled

    def set_seen_bias(self, beta: float) -> None:
        self.seen_bias_unscaled.assign(beta / SEEN_BIAS_SCALE)

    @property
    def transition_bias(self) -> tf.Tensor:
        """tau = SEEN_BIAS_SCALE x the variable (scaled as beta is, for the same reason)."""
        return SEEN_BIAS_SCALE * self.transition_bias_unscaled

    def set_transition_bias(self, tau: float) -> None:
        self.transition_bias_unscaled.assign(tau / SEEN_BIAS_SCALE)

    def call(self, inputs) -> tuple[tf.Tensor, tf.Tensor]:
        """Gate logits and attention log-probabilities.

        Args:
          inputs: (user [B, P, D], context item embeddings [B, M, E], visible bool
            [B, P, M], age int32 [B, P, M - num_starts]: of the entries before the starts),
            and with `transition_bias` follows float32 [B, P, M - num_starts]: 1 where the
            entry followed an earlier occurrence of the item position p is on, else 0.

        Returns:
          (gate logit [B, P] (w = sigmoid), log p_rep [B, P, M]: `NEG_LOGIT`-like values
          where not visible; a row with nothing visible must be discarded by the caller).
        """
        user, keys, visible, age = inputs[:4]
        user = tf.cast(user, tf.float32)
        keys = tf.cast(keys, tf.float32)
        # Plain (batched) matmuls: oneDNN's einsum kernels took several times as long here.
        lead = tf.shape(user)[:-1]
        flat = tf.reshape(user, [-1, tf.shape(user)[-1]])
        query = tf.reshape(tf.matmul(flat, self.query), tf.concat([lead, [-1]], 0))
        gate = tf.reduce_sum(user * self.gate, axis=-1) + self.gate_bias  # (a [.., 1] matmul is slow)
        logits = tf.matmul(query, keys, transpose_b=True) / tf.sqrt(float(keys.shape[-1]))
        bias = tf.gather(self.recency, tf.minimum(age, self.max_age - 1))
        if self.use_transition_bias:
            bias += self.transition_bias * inputs[4]
        if self.num_starts:
            # the starts' weight also depends on the position (the user vector): how a session
            # starts matters most before its first item
            per_position = tf.reduce_sum(user * self.start_query, axis=-1)[..., None]
            bias = tf.concat([bias, self.start_recency + per_position], axis=-1)
        logits += bias
        logits = tf.where(visible, logits, NEG_LOGIT)
        return gate, tf.nn.log_softmax(logits, axis=-1)

    def get_config(self):
        return {**super().get_config(), "max_age": self.max_age, "num_starts": self.num_starts,
                "seen_bias": self.use_seen_bias, "transition_bias": self.use_transition_bias}


# The seen bias's scale (`RepeatHead.seen_bias`): with Adam each step moves a weight by
# about the learning rate whatever its gradient, so a 10x scale lets beta move 10x faster
# (measured on MovieLens-1M valid: beta reached -1.75 in 450 steps, and -4 set by hand
# scored R@20 0.261 instead of 0.256).
SEEN_BIAS_SCALE = 10.0

# A finite "minus infinity" for masked logits: exp() of it is exactly 0 in float32 and,
# unlike -inf, it keeps gradients and log-sum-exps finite.
NEG_LOGIT = -1e9


def reserved_mask(vocab_size) -> tf.Tensor:
    """float32 [V], added to catalogue logits: `NEG_LOGIT` at the reserved indices (which
    evaluation never ranks and no target holds), 0 at the items."""
    return tf.concat([tf.fill([schema.NUM_RESERVED], NEG_LOGIT),
                      tf.zeros([vocab_size - schema.NUM_RESERVED], tf.float32)], axis=0)
