"""GRU4Rec (Hidasi et al., ICLR 2016): a session-only GRU, every session independent.

    h_0 = GRU(start, 0),  h_t = GRU(x_t, h_{t-1}),  p(item | h_t) = softmax(h_t W^T + b)

Trained on the same queue batches as HierTCN, with every slot independent (a
session-parallel model: the hidden state starts from zeros in each session). A session
longer than L is split by the generator into chunks; each chunk restarts from the start
vector, as HierTCN's TCN does. The per-user state is not used: it has width 1 and
`update_state` returns it unchanged.

Position 0 (the first item of a session, before any item is seen): a session-only model
has nothing to go on there, and DESIGN §6 has such models scored by popularity: the
evaluator (`KerasScorer`) ranks first items by the train counts (`first_item_scores`,
the `popularity` baseline's scores), so `first_item` metrics are popularity's. The start
vector's output (a learned constant) still starts the GRU and is what serving returns
for an empty session.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from model import layers
from model.config import ConfigBase, _check, check_loss
from model.sequence_model import SequenceModel


@dataclasses.dataclass(frozen=True)
class GRU4RecConfig(ConfigBase):
    """GRU4Rec hyper-parameters.

    Attributes:
      embedding_dim: item embedding width E (the GRU input).
      units: GRU hidden width = user embedding width D.
      dropout: dropout on the GRU outputs before scoring (training only).
      loss: `auto`, `softmax` or `sampled` (see `model.losses`).
      num_negatives: negatives per batch for the sampled loss.
      negative_exponent: the sampled loss draws its negatives with probability
        proportional to train count ** this (1: popularity, towards 0: uniform over the
        items with a count; word2vec's negative sampling uses 0.75).
      output_bias: a per-item bias in the scores.
    """

    embedding_dim: int = 128
    units: int = 128
    dropout: float = 0.0
    loss: str = "auto"
    num_negatives: int = 256
    negative_exponent: float = 0.5
    output_bias: bool = True

    def validate(self) -> None:
        for key in ("embedding_dim", "units", "num_negatives"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check_loss(self.loss, self.negative_exponent)


class SessionGRU(tf.keras.layers.Layer):
    """A GRU over [first, x_1 .. x_T] from a given hidden state; `first` defaults to a
    learned start vector. Output t is the hidden state after input t (T + 1 outputs, so an
    empty session still has its start position)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = layers._positive("units", units)
        self.gru = tf.keras.layers.GRU(units, return_sequences=True, name="gru")

    def build(self, input_shape):
        e = int(input_shape[-1])
        self.start = self.add_weight(name="start", shape=[e],
                                     initializer=tf.keras.initializers.RandomNormal(stddev=0.05))
        self.gru.build(tf.TensorShape([None, None, e]))
        super().build(input_shape)

    def call(self, items: tf.Tensor, initial: tf.Tensor, first: tf.Tensor | None = None) -> tf.Tensor:
        """Runs the GRU.

        Args:
          items: [batch, T, E] item embeddings (padding at the end).
          initial: [batch, units] hidden state before `first`.
          first: [batch, E] the first input (default: the start vector).

        Returns:
          [batch, T + 1, units].
        """
        if first is None:
            first = tf.broadcast_to(tf.cast(self.start, items.dtype),
                                    tf.stack([tf.shape(items)[0], tf.shape(items)[2]]))
        x = tf.concat([tf.cast(first, items.dtype)[:, None], items], axis=1)
        return self.gru(x, initial_state=tf.cast(initial, items.dtype))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class GRU4Rec(SequenceModel):
    """The session-only GRU; see the module docstring and `SequenceModel` for the API."""

    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, vocab_size: int,
                 item_counts: np.ndarray | None = None, load_pretrained: bool = True, **kwargs):
        """Creates the layers.

        Args:
          config: the hyper-parameters.
          vocab_size: V from items.tsv (including the reserved indices 0 and 1).
          item_counts: int [V] train counts, needed by the sampled loss.
          load_pretrained: accepted for the registry's common signature (no pretrained
            vectors here).
        """
        del load_pretrained
        super().__init__(config, vocab_size, item_counts, **kwargs)
        self.item_embedding = layers.item_embedding(vocab_size, config.embedding_dim)
        self.session_gru = SessionGRU(config.units, name="session_gru")
        self.drop = tf.keras.layers.Dropout(config.dropout)
        self.scorer = layers.ItemScorer(vocab_size, use_bias=config.output_bias, name="item_scorer")

    def session_only(self) -> bool:
        return True

    @property
    def state_size(self) -> int:
        return 1

    def update_state(self, state, session_items):
        return tf.convert_to_tensor(state, tf.float32)

    def user_embeddings(self, state, prefix, training=False):
        prefix = tf.convert_to_tensor(prefix, tf.int64)
        zeros = tf.zeros([tf.shape(prefix)[0], self.config.units])
        h = self.session_gru(self.item_embedding(prefix), zeros)
        return tf.cast(self.drop(h, training=training), tf.float32)

    def output_weights(self):
        return self.scorer.item_vectors(), self.scorer.bias

    def item_logits(self, user):
        return self.scorer(user)

    def session_states(self, batch, cache, training):
        """No cross-session state: zeros before every slot, the cache unchanged."""
        shape = tf.shape(batch["items"])
        return tf.zeros([shape[0], shape[1], 1]), cache
