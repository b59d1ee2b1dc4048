"""HRNN (Quadrana et al., RecSys 2017, "HRNN Init"): a session GRU started from the user
state, and a user GRU updated once per session with the session GRU's final state.

    s_0 = tanh(c_{n-1} W_init + b_init),  s_t = GRU_ses(x_t, s_{t-1})  (x_0 = start vector)
    c_n = GRU_usr(s_last, c_{n-1}),  c_0 = 0,  p(item | s_t) = softmax(s_t W^T + b)

Same batching and state cache as HierTCN: the user state is carried from batch to batch
without gradient and zeroed at a user boundary. Unlike HierTCN, the user state before a
session depends on the previous session's recurrent run, so the S slots of a batch are
processed one after the other. A session that the generator split into chunks continues
exactly: the cache carries the session GRU's hidden state before the chunk's last item and
that item, so the next chunk resumes as if the session had been seen at once (as
evaluation and serving do; `model.gru4rec.SessionRNN`, shared with GRU4Rec).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from model import layers
from model.config import ConfigBase, _check, check_loss
from model.gru4rec import SessionGRU, SessionRNN


@dataclasses.dataclass(frozen=True)
class HRNNConfig(ConfigBase):
    """HRNN hyper-parameters (Quadrana et al. use one layer at each level).

    Attributes:
      embedding_dim: item embedding width E (the session GRU input).
      session_units: session GRU width = user embedding width D.
      user_units: units per user GRU layer.
      user_layers: stacked user GRU layers; the state H = user_units * user_layers
        (2 x 128 matches HierTCN's high-level GRU).
      dropout: dropout on the session GRU outputs before scoring (training only).
      loss: `auto`, `softmax` or `sampled` (see `model.losses`).
      num_negatives: negatives per batch for the sampled loss.
      negative_exponent: the sampled loss draws its negatives with probability
        proportional to train count ** this (1: popularity, towards 0: uniform over the
        items with a count; word2vec's negative sampling uses 0.75).
      output_bias: a per-item bias in the scores.
    """

    embedding_dim: int = 128
    session_units: int = 128
    user_units: int = 128
    user_layers: int = 1
    dropout: float = 0.0
    loss: str = "auto"
    num_negatives: int = 256
    negative_exponent: float = 0.5
    output_bias: bool = True

    def validate(self) -> None:
        for key in ("embedding_dim", "session_units", "user_units", "user_layers", "num_negatives"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check_loss(self.loss, self.negative_exponent)


class HRNN(SessionRNN):
    """The hierarchical RNN; see the module docstring and `SequenceModel` for the API."""

    config_class = HRNNConfig

    def __init__(self, config: HRNNConfig, vocab_size: int,
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
        c = config
        self.item_embedding = layers.item_embedding(vocab_size, c.embedding_dim)
        self.session_gru = SessionGRU(c.session_units, name="session_gru")
        self.init = tf.keras.layers.Dense(c.session_units, activation="tanh", name="session_init")
        self.user_gru = layers.StackedGRU(c.user_units, c.user_layers, name="user_gru")
        self.drop = tf.keras.layers.Dropout(c.dropout)
        self.scorer = layers.ItemScorer(vocab_size, use_bias=c.output_bias, dtype="float32",
                                        name="item_scorer")

    @property
    def state_size(self) -> int:
        return self.config.user_units * self.config.user_layers

    def session_initial(self, state):
        return self.init(state)

    def session_step(self, state, final):
        return tf.cast(self.user_gru(final, state), tf.float32)

    def output_weights(self):
        return self.scorer.item_vectors(), self.scorer.bias

    def item_logits(self, user):
        return self.scorer(user)
