"""HierTCN (You et al., WWW 2019): a high-level GRU across sessions and a low-level causal
TCN inside the session, conditioned on the high-level state at every step.

    h_0 = 0,  h_{n+1} = GRU(AGG(session_n), h_n),  AGG = mean item embedding + bias
    u_t = TCN([start, x_1 .. x_{t}] each concat h_n, projected to C)_t
    p(item | u_t) = softmax(u_t W^T + b)
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from model import layers
from model.config import ConfigError, HierTCNConfig
from model.sequence_model import SequenceModel


def load_item_vectors(path: str, vocab_size: int, dim: int) -> np.ndarray:
    """Loads fixed item vectors [vocab, dim] aligned with items.tsv.

    Raises:
      ConfigError: missing file or wrong shape.
    """
    try:
        vectors = np.load(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read pretrained item vectors {path}: {e}") from None
    if vectors.shape != (vocab_size, dim):
        raise ConfigError(f"pretrained item vectors {path} have shape {vectors.shape}, expected "
                         f"[{vocab_size}, {dim}] (items.tsv rows, model.embedding_dim)")
    return vectors.astype(np.float32)


class HierTCN(SequenceModel):
    """The hierarchical model; see the module docstring and `SequenceModel` for the API."""

    config_class = HierTCNConfig

    def __init__(self, config: HierTCNConfig, vocab_size: int,
                 item_counts: np.ndarray | None = None, load_pretrained: bool = True, **kwargs):
        """Creates the layers.

        Args:
          config: the hyper-parameters.
          vocab_size: V from items.tsv (including the reserved indices 0 and 1).
          item_counts: int [V] train counts, needed by the sampled loss.
          load_pretrained: read `config.pretrained_item_vectors` now (False when the
            weights come from a checkpoint).
        """
        super().__init__(config, vocab_size, item_counts, **kwargs)
        c = config
        if c.pretrained_item_vectors:
            init = "zeros"
            if load_pretrained:
                init = tf.keras.initializers.Constant(
                    load_item_vectors(c.pretrained_item_vectors, vocab_size, c.embedding_dim))
            self.item_embedding = tf.keras.layers.Embedding(
                vocab_size, c.embedding_dim, embeddings_initializer=init, trainable=False,
                name="item_embedding")
        else:
            self.item_embedding = tf.keras.layers.Embedding(
                vocab_size, c.embedding_dim, name="item_embedding",
                embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        self.aggregator = layers.SessionAggregator(name="agg")
        self.gru = layers.StackedGRU(c.gru_units, c.gru_layers, name="high_gru")
        self.input_projection = layers.StatefulInput(c.channels, name="input_projection")
        self.blocks = [layers.TemporalBlock(c.channels, c.kernel_size, 2 ** i, c.convs_per_block,
                                            c.dropout, name=f"tcn_block_{i}")
                       for i in range(c.num_blocks)]
        self.scorer = layers.ItemScorer(vocab_size, use_bias=c.output_bias, tied=c.tied_output,
                                        dtype="float32", name="item_scorer")

    @property
    def state_size(self) -> int:
        return self.config.gru_units * self.config.gru_layers

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    def _sums(self, items: tf.Tensor):
        """int [..., T] -> (sum of non-padding embeddings [..., E], counts [...] float32)."""
        mask = tf.cast(items > 0, tf.float32)
        emb = tf.cast(self.item_embedding(items), tf.float32)
        return tf.reduce_sum(emb * mask[..., None], axis=-2), tf.reduce_sum(mask, axis=-1)

    def _gru_step(self, state, sums, counts):
        return tf.cast(self.gru(self.aggregator(sums, counts), state), tf.float32)

    def update_state(self, state, session_items):
        state = tf.convert_to_tensor(state, tf.float32)
        if not self.config.high_level:
            return state
        sums, counts = self._sums(tf.convert_to_tensor(session_items, tf.int64))
        return tf.where((counts > 0)[:, None], self._gru_step(state, sums, counts), state)

    def user_embeddings(self, state, prefix, training=False):
        state = tf.convert_to_tensor(state, tf.float32)
        if not self.config.high_level:
            state = tf.zeros_like(state)
        emb = self.item_embedding(tf.convert_to_tensor(prefix, tf.int64))
        x = self.input_projection((emb, tf.cast(state, emb.dtype)))
        for block in self.blocks:
            x = block(x, training=training)
        return tf.cast(x, tf.float32)

    def output_weights(self):
        tied = self.item_embedding.embeddings if self.config.tied_output else None
        return self.scorer.item_vectors(tied), self.scorer.bias

    def item_logits(self, user):
        tied = self.item_embedding.embeddings if self.config.tied_output else None
        return self.scorer(user, tied)

    def train_cache(self, batch_size: int):
        """(state [B, H], running AGG sum [B, E], running count [B]) per row.

        The running sums let a session split over chunks or batches aggregate exactly as
        `update_state` does on the whole session.
        """
        e = self.item_embedding.output_dim
        return (self.initial_state(batch_size), tf.zeros([batch_size, e], tf.float32),
                tf.zeros([batch_size], tf.float32))

    def session_states(self, batch, cache, training):
        """Runs the high-level GRU over the S slots first (AGG does not depend on the state),
        zeroing the state at `reset` and stepping it at `session_end`."""
        items = tf.cast(batch["items"], tf.int64)
        reset, end = batch["reset"], batch["session_end"]
        state, acc, cnt = cache
        if not self.config.high_level:
            return tf.zeros(tf.concat([tf.shape(items)[:2], [self.state_size]], 0)), cache
        sums, counts = self._sums(items)
        before = []
        for s in range(items.shape[1]):
            r = reset[:, s]
            state = tf.where(r[:, None], 0.0, state)
            acc = tf.where(r[:, None], 0.0, acc)
            cnt = tf.where(r, 0.0, cnt)
            before.append(state)
            acc, cnt = acc + sums[:, s], cnt + counts[:, s]
            e = end[:, s]
            state = tf.where(e[:, None], self._gru_step(state, acc, cnt), state)
            acc = tf.where(e[:, None], 0.0, acc)
            cnt = tf.where(e, 0.0, cnt)
        return tf.stack(before, axis=1), (state, acc, cnt)
