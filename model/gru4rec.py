"""GRU4Rec (Hidasi et al., ICLR 2016): a session-only GRU, every session independent.

    h_0 = GRU(start, 0),  h_t = GRU(x_t, h_{t-1}),  p(item | h_t) = softmax(h_t W^T + b)

Trained on the same queue batches as HierTCN, with every session independent (a
session-parallel model: the hidden state starts from zeros in each session). A session
longer than L is split by the generator into chunks; like Hidasi et al.'s session-parallel
mini-batches, the hidden state carries on from one chunk to the next, so training sees
each session as evaluation and serving do (`SessionRNN`, shared with HRNN). The per-user
state is not used: it has width 1 and `update_state` returns it unchanged.

Position 0 (the first item of a session, before any item is seen): a session-only model
has nothing to go on there, and DESIGN §6 has such models scored by popularity: the
evaluator (`KerasScorer`) ranks first items by the train counts (`first_item_scores`,
the `popularity` baseline's scores), so `first_item` metrics are popularity's, and the
export's `next_items` returns the same scores for an empty session. The start vector's
output (a learned constant) still starts the GRU, and is trained to predict the first item
as well, unlike Hidasi et al.'s session-parallel batches, which never predict it
(`first_item_targets`: False leaves those targets out; on valid it did no better).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from model import layers
from model.config import ConfigBase, _check, check_loss
from model.sequence_model import SequenceModel, continuing_slots


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
      first_item_targets: train on each session's first item too, predicted from the
        start vector (evaluation and serving score first items by popularity either way).
        False: as Hidasi et al., whose session-parallel batches never predict it. Measured
        (2026-12-05, best valid R@20 / MRR@20, the tables' budgets): synthetic default
        0.4273 / 0.1761 and 0.4240 / 0.1712 on seeds 0 and 1 with it, 0.4182 / 0.1691 and
        0.4251 / 0.1687 without; MovieLens-1M 0.2188 / 0.0529 with, 0.2204 / 0.0534
        without: no better without it, so it stays on.
    """

    embedding_dim: int = 128
    units: int = 128
    dropout: float = 0.0
    loss: str = "auto"
    num_negatives: int = 256
    negative_exponent: float = 0.5
    output_bias: bool = True
    first_item_targets: bool = True

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


def _at(sequence: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """[B, T, ...], int [B] -> [B, ...]: each row's entry at its own index."""
    return tf.gather(sequence, index, axis=1, batch_dims=1)


class SessionRNN(SequenceModel):
    """A session GRU trained on the queue batches with exact chunk continuation (GRU4Rec,
    HRNN).

    The slots of a batch run one after the other: a session the generator split into
    chunks resumes from the cache (the session GRU's hidden state before the chunk's last
    item, and that item), so its next chunk is computed as if the session had been seen
    at once. A new session starts from `session_initial(state)`; the user state moves at a
    session's end by `session_step(state, final hidden state)` and is zeroed at `reset`.
    Subclasses create `item_embedding`, `session_gru` (a `SessionGRU`) and `drop`.
    """

    @property
    def session_units(self) -> int:
        return self.session_gru.units

    def session_initial(self, state: tf.Tensor) -> tf.Tensor:
        """[B, H] user state -> [B, session_units] hidden state before a new session."""
        raise NotImplementedError

    def session_step(self, state: tf.Tensor, final: tf.Tensor) -> tf.Tensor:
        """The user state after a session whose last hidden state is `final` [B, D]."""
        raise NotImplementedError

    def continues_session(self, batch, cache):
        """See `SequenceModel.continues_session`: for slot 0, the cache's open session."""
        return continuing_slots(batch["reset"], batch["session_end"], cache[3])

    def update_state(self, state, session_items):
        state, items = self.checked_inputs(state, session_items)
        h = self.session_gru(self.item_embedding(items), self.session_initial(state))
        length = tf.reduce_sum(tf.cast(items > 0, tf.int32), axis=1)
        new = self.session_step(state, _at(h, length))
        return tf.where((length > 0)[:, None], new, state)

    def user_embeddings(self, state, prefix, training=False):
        state, prefix = self.checked_inputs(state, prefix, "prefix")
        h = self.session_gru(self.item_embedding(prefix), self.session_initial(state))
        return tf.cast(self.drop(h, training=training), tf.float32)

    def train_cache(self, batch_size: int):
        """(user state [B, H], session hidden state before the last item [B, D], that last
        item [B], the row's last slot ended inside a session [B] bool)."""
        return (self.initial_state(batch_size),
                tf.zeros([batch_size, self.session_units], tf.float32),
                tf.zeros([batch_size], tf.int64), tf.zeros([batch_size], tf.bool))

    def encode(self, batch, cache, training):
        """Slot by slot: the user state, zeroed at `reset`, starts each new session; a
        continuing chunk resumes from the cache; the user state steps at `session_end`.

        Returns:
          (user vectors [B * S, L, D], the cache after the batch).
        """
        items = tf.cast(batch["items"], tf.int64)
        reset, end, valid = batch["reset"], batch["session_end"], batch["valid"]
        state, hidden, last, open_ = cache
        emb = self.item_embedding(items)
        outputs = []
        for s in range(items.shape[1]):
            state = tf.where(reset[:, s, None], 0.0, state)
            new = reset[:, s] | ~open_
            initial = tf.where(new[:, None], tf.cast(self.session_initial(state), tf.float32),
                               hidden)
            start = tf.broadcast_to(tf.cast(self.session_gru.start, emb.dtype), tf.shape(emb[:, s, 0]))
            first = tf.where(new[:, None], start, self.item_embedding(last))
            h = tf.cast(self.session_gru(emb[:, s], initial, first), tf.float32)
            outputs.append(h[:, :-1])
            length = tf.reduce_sum(tf.cast(items[:, s] > 0, tf.int32), axis=1)
            v, e = valid[:, s], valid[:, s] & end[:, s]
            state = tf.where(e[:, None], self.session_step(state, _at(h, length)), state)
            hidden = tf.where(v[:, None], _at(h, tf.maximum(length - 1, 0)), hidden)
            last = tf.where(v, _at(items[:, s], tf.maximum(length - 1, 0)), last)
            open_ = tf.where(v, ~end[:, s], open_)
        u = tf.stack(outputs, axis=1)
        u = tf.reshape(u, tf.concat([[-1], tf.shape(u)[2:]], 0))
        return self.drop(u, training=training), (state, hidden, last, open_)


class GRU4Rec(SessionRNN):
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
        self.scorer = layers.ItemScorer(vocab_size, use_bias=config.output_bias, dtype="float32",
                                        name="item_scorer")

    def session_only(self) -> bool:
        return True

    @property
    def state_size(self) -> int:
        return 1

    def session_initial(self, state):
        return tf.zeros([tf.shape(state)[0], self.config.units])

    def session_step(self, state, final):
        return state

    def update_state(self, state, session_items):
        return self.checked_inputs(state, session_items)[0]

    def output_weights(self):
        return self.scorer.item_vectors(), self.scorer.bias

    def item_logits(self, user):
        return self.scorer(user)
