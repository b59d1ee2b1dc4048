"""The base class every trainable model derives from: the hooks that `model.train`,
`model.keras_scorer` and `serving/` use, so one training loop serves every model.

How to add a model (e.g. a baseline):

1. Write `model/NAME.py` with a frozen config dataclass deriving from
   `model.config.ConfigBase` (strict overrides and dict/JSON round trips for free) and a
   `SequenceModel` subclass that sets `config_class`, takes
   `(config, vocab_size, item_counts=None, load_pretrained=True)` in `__init__`, builds
   its layers there, and implements `state_size`, `update_state`, `user_embeddings`,
   `item_logits`, `output_weights` and `session_states` (the state before each slot of
   a batch; `train_cache` if it carries more than the state). A model whose training
   does not follow "state before each slot + per-step user vectors" (e.g. a flat TCN
   over the whole history) overrides `encode` or `train_loss` instead. A session-only
   model returns zeros from `session_states` and its state unchanged from
   `update_state`.
2. Register the class in `model.registry.MODELS` and its name in `model.config.MODEL_NAMES`
   (what `model.train --help` names before TensorFlow loads; a test checks they match).
3. `python -m model.train --model NAME`, `model.evaluate --model-dir RUN` and the serving
   export then work unchanged.

Training batches come from `model.batching.QueueBatcher`: a dict with `items` int64
[B, S, L] (chunks of sessions, padded with 0), `reset`, `session_end` and `valid` bool
[B, S], and for a model with `history_size` N > 0 `history` int64 [B, N] (each row's
recent items before the batch; `batching.slot_histories` gives each slot's). The loop
keeps the model's `train_cache` (tuple of tensors with leading dim B) from batch to batch
without gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from model import losses
from model.base import popularity_term


class SequenceModel(tf.keras.Model):
    """A next-item model with a per-user state carried across sessions.

    Subclasses keep these signatures; all methods accept any batch and length and use
    core TF ops only, so serving can wrap them in signatures.
    """

    config_class: type = None
    # whether `encode` compiles with XLA (`train.jit_compile`): the GRUs' recurrent loops and
    # the flat TCN's ragged packing do not
    xla_ready: bool = False

    def __init__(self, config: Any, vocab_size: int, item_counts: np.ndarray | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (2 reserved + 1 item), got {vocab_size}")
        self.config = config
        self.vocab_size = int(vocab_size)
        self.loss_fn = losses.make_loss(getattr(config, "loss", "softmax"), self.vocab_size,
                                        getattr(config, "num_negatives", 256), item_counts,
                                        getattr(config, "negative_exponent", 1.0))
        # the sampled loss's negatives, for a model that computes its own loss (a repeat head)
        self.sampler = getattr(self.loss_fn, "sampler", None)
        # float32 [V] scores of a session's first item when evaluated, instead of the
        # model's own (session-only models score it by popularity, DESIGN §6); None: its own
        self.first_item_scores: np.ndarray | None = (
            popularity_term(item_counts) if item_counts is not None and self.session_only()
            else None)

    def session_only(self) -> bool:
        """Whether the model reads nothing before the current session (from `self.config`;
        then its first items are scored by popularity when evaluated)."""
        return False

    def continues_session(self, batch: dict, cache: tuple) -> tf.Tensor:
        """bool [B * S]: the batch's slots that continue a session begun in an earlier slot
        (a later chunk of a session longer than L), from the batch's flags and the cache
        before it (`train_cache`); needed by a `session_only` model."""
        raise NotImplementedError

    # --- the serving / evaluation API -------------------------------------------------
    @property
    def state_size(self) -> int:
        """H, the width of the per-user state."""
        raise NotImplementedError

    def initial_state(self, batch_size) -> tf.Tensor:
        """float32 [batch, H] zeros: a new user's state."""
        return tf.zeros([batch_size, self.state_size], tf.float32)

    def update_state(self, state: tf.Tensor, session_items: tf.Tensor) -> tf.Tensor:
        """[B, H], int64 [B, T] (padded with 0 at the end) -> [B, H] after the session;
        all-padding rows unchanged."""
        raise NotImplementedError

    def user_embeddings(self, state: tf.Tensor, prefix: tf.Tensor, training=False) -> tf.Tensor:
        """[B, H], int64 [B, T] (padded with 0 at the end) -> float32 [B, T + 1, D];
        position t = after prefix[:, :t]."""
        raise NotImplementedError

    def checked_inputs(self, state, items, name: str = "session_items"
                       ) -> tuple[tf.Tensor, tf.Tensor]:
        """(float32 [B, H], int64 [B, T]) of `update_state`'s and `user_embeddings`'s
        arguments, after the checks their static shapes allow (a library user's wrong
        width or batch was read as another user's state, float ids cut to integers).

        Raises:
          TypeError: item ids that are not integers.
          ValueError: a state that is not [B, H], items not [B, T], or their B differ.
        """
        state = tf.convert_to_tensor(state, tf.float32)
        ids = items if isinstance(items, tf.Tensor) else tf.convert_to_tensor(items)
        if not ids.dtype.is_integer and ids.shape.num_elements() != 0:  # ([[]] is float32)
            raise TypeError(f"{name} must be integer item indices, got {ids.dtype.name}")
        ids = tf.cast(ids, tf.int64)
        if state.shape.rank is not None and (state.shape.rank != 2 or state.shape[1] not in (
                None, self.state_size)):
            raise ValueError(f"the state must be [batch, {self.state_size}] (the model's "
                             f"state_size), got {state.shape}")
        if ids.shape.rank is not None and ids.shape.rank != 2:
            raise ValueError(f"{name} must be [batch, length] item indices, got {ids.shape}")
        if None not in (state.shape[:1].num_elements(), ids.shape[:1].num_elements()) and (
                state.shape[0] != ids.shape[0]):
            raise ValueError(f"the state has {state.shape[0]} rows but {name} has "
                             f"{ids.shape[0]}: one row per user")
        return state, ids

    def item_logits(self, user: tf.Tensor) -> tf.Tensor:
        """float32 [..., D] -> [..., V] scores over the whole vocabulary."""
        raise NotImplementedError

    def output_weights(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(item vectors [V, D], bias [V]) of the output layer, for the training loss."""
        raise NotImplementedError

    def output_rows(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(item vectors float32 [N, D], bias [N]) of the output layer's rows `indices`
        int64 [N]: `item_logits(u)[:, i]` is u . v_i + b_i, what an external
        nearest-neighbour index over the catalogue needs beside `last_user_embedding`."""
        return self.scorer.rows(indices)

    @property
    def history_size(self) -> int:
        """N, the user's recent items the scores also depend on (a repeat head); 0 when
        `item_logits` alone scores the next item."""
        return 0

    def item_log_probs(self, user: tf.Tensor, history: tf.Tensor, prefix: tf.Tensor,
                       state: tf.Tensor | None = None,
                       positions: tf.Tensor | None = None,
                       current: tf.Tensor | None = None) -> tf.Tensor:
        """Next-item log-probabilities of a model with `history_size` > 0.

        Args:
          user: float32 [B, P, D], position p after prefix[:, :p].
          history: int64 [B, N'] the user's items before the session, newest last, 0 pads
            anywhere.
          prefix: int64 [B, T] the session so far, padded with 0 at the end.
          state: float32 [B, H] the user state the scores start from (a model whose
            mixture reads it, e.g. HierTCN's start items).
          positions: int64 [n, 2] (row, position) pairs: score only these positions (the
            [.., V] part is computed for them alone), or None for all of them.
          current: int64 [B], the session's item just before prefix[:, 0] when the prefix
            continues a session (a later window of a long one), else 0 or None: the item
            position 0 is on (position p >= 1 is on prefix[:, p - 1]).

        Returns:
          float32 [B, P, V], or [n, V] with `positions`: position p depends on the newest
          `history_size` known items of history + prefix[:, :p] (so the scores are the same
          however they are split).
        """
        raise NotImplementedError

    def item_scores_with_history(self, user: tf.Tensor, history: tf.Tensor,
                                 state: tf.Tensor | None = None,
                                 current: tf.Tensor | None = None) -> tf.Tensor:
        """Serving scores of the user after a session: float32 [B, D], int64 [B, N'] (the
        user's recent items, the session so far included, newest last), the state [B, H]
        before the session, int64 [B] the session's last item (0: an empty session) ->
        [B, V]."""
        if not self.history_size:
            return self.item_logits(user)
        no_prefix = tf.zeros([tf.shape(user)[0], 0], tf.int64)
        return self.item_log_probs(user[:, None], history, no_prefix, state,
                                   current=current)[:, 0]

    def repeat_losses(self, user: tf.Tensor, targets: tf.Tensor, where: tf.Tensor,
                      flat_items: tf.Tensor, batch: dict, cache: tuple,
                      training: bool = True) -> tf.Tensor:
        """Per-target negative log-likelihood of a model with `history_size` > 0.

        Args:
          user: [N, D] user vectors at the targets; targets: int64 [N].
          where: int64 [N, 2] (slot, position) of each target in `flat_items` [B * S, L].
          batch: the generator batch (its `history` int64 [B, history_size], per row).
          cache: the rows' carried tensors before the batch (`train_cache`).
          training: with the sampled loss, estimate the catalogue's normaliser from the
            negatives (else the exact full softmax).
        """
        raise NotImplementedError

    def last_user_embedding(self, state: tf.Tensor, session_items: tf.Tensor) -> tf.Tensor:
        """[B, H], int64 [B, T] (padded at the end) -> [B, D]: the user after the session's
        last item (the start position for an empty session)."""
        state, session_items = self.checked_inputs(state, session_items)
        u = self.user_embeddings(state, session_items)
        length = tf.reduce_sum(tf.cast(session_items > 0, tf.int32), axis=1)
        return tf.gather(u, length, axis=1, batch_dims=1)

    def build_weights(self) -> None:
        """Creates every variable with a one-row dummy call (before a restore)."""
        state = self.initial_state(1)
        items = tf.ones([1, 2], tf.int64) * 2
        user = self.user_embeddings(self.update_state(state, items), items)
        self.item_logits(user)
        if self.history_size:
            self.item_log_probs(user, items, items, state)

    # --- the training hooks -----------------------------------------------------------
    def train_cache(self, batch_size: int) -> tuple[tf.Tensor, ...]:
        """Zeros of what is carried per row from batch to batch (default: the state)."""
        return (self.initial_state(batch_size),)

    def session_states(self, batch: dict, cache: tuple, training: bool):
        """Returns (state before each slot [B, S, H], the cache after the batch)."""
        raise NotImplementedError

    def encode(self, batch: dict, cache: tuple, training: bool):
        """User vectors at every slot position: ([B * S, L, D], the cache after the batch)."""
        items = tf.cast(batch["items"], tf.int64)
        b, s, l = tf.shape(items)[0], tf.shape(items)[1], tf.shape(items)[2]
        before, new_cache = self.session_states(batch, cache, training)
        flat_items = tf.reshape(items, [b * s, l])
        u = self.user_embeddings(tf.reshape(before, [b * s, self.state_size]),
                                 flat_items[:, :-1], training=training)
        return u, new_cache

    def encode_events(self, batch: dict, cache: tuple, training: bool):
        """User vectors at the non-padding targets only: ([N, D] in the row-major order of
        `tf.where(items > 0)`, the cache after the batch).

        The default gathers them from `encode`; a model may compute them directly on the
        packed events so that no compute is spent on padding (HierTCN does).
        """
        u, new_cache = self.encode(batch, cache, training)
        items = tf.cast(batch["items"], tf.int64)
        return tf.gather_nd(u, tf.where(tf.reshape(items, [-1, tf.shape(items)[2]]) > 0)), new_cache

    def train_loss(self, batch: dict, cache: tuple, training: bool = True, encode=None):
        """Mean loss over the batch's non-padding targets.

        Inputs of a slot are [start, a1..a(m-1)], targets [a1..am]: the first item is
        predicted from the state alone (a `session_only` model's config may leave it out:
        `first_item_targets`). Targets are gathered before the output layer, so padding
        costs no output compute.

        Args:
          batch: a generator batch (see the module docstring).
          cache: the rows' carried tensors (`train_cache`).
          training: dropout and sampled loss on.
          encode: replaces `self.encode_events` by this padded encoder and a gather, e.g.
            the XLA-compiled `tf.function` of `self.encode` (the target gather after it
            has a dynamic shape, so it stays outside XLA).

        Returns:
          (loss scalar, new cache tuple, number of events int32: every non-padding
          position, first items that `first_item_targets=False` leaves out included).
        """
        items = tf.cast(batch["items"], tf.int64)
        flat_items = tf.reshape(items, [-1, tf.shape(items)[2]])
        where = tf.where(flat_items > 0)
        if encode is None:
            user, new_cache = self.encode_events(batch, cache, training)
        else:
            u, new_cache = encode(batch, cache, training)
            user = tf.gather_nd(u, where)
        targets = tf.gather_nd(flat_items, where)
        n = tf.shape(targets)[0]
        if self.session_only() and not getattr(self.config, "first_item_targets", True):
            # A session's first item is left out of a session-only model's targets (which
            # evaluation and serving score by popularity there, `first_item_scores`), as
            # Hidasi et al.'s session-parallel batches never predict it. A later chunk's
            # position 0 continues its session: a target.
            first = (where[:, 1] == 0) & ~tf.gather(self.continues_session(batch, cache),
                                                    where[:, 0])
            kept = tf.where(~first)[:, 0]
            user, targets = tf.gather(user, kept), tf.gather(targets, kept)
        if self.history_size:
            per_event = self.repeat_losses(user, targets, where, flat_items, batch, cache,
                                            training)
        else:
            item_vectors, bias = self.output_weights()
            per_event = self.loss_fn(user, targets, item_vectors, bias, training)
        loss = tf.reduce_sum(per_event) / tf.maximum(tf.cast(tf.shape(targets)[0], tf.float32),
                                                     1.0)
        return loss, new_cache, n

    def get_config(self):
        return {"config": self.config.to_dict(), "vocab_size": self.vocab_size}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(cls.config_class.from_dict(config["config"]), config["vocab_size"])


def session_starts(reset: tf.Tensor, end: tf.Tensor) -> tf.Tensor:
    """bool [B, S]: the slots that start a session within the batch (at a user boundary
    or after a slot that ended one); slot 0 only at a reset (the cache knows the rest)."""
    return reset | tf.pad(end[:, :-1], [[0, 0], [1, 0]])


def continuing_slots(reset: tf.Tensor, end: tf.Tensor, carried: tf.Tensor) -> tf.Tensor:
    """bool [B * S]: the slots that continue a session begun in an earlier slot, from the
    batch's `reset` and `session_end` [B, S] and bool [B] whether each row's session was
    under way before the batch."""
    continues = ~session_starts(reset, end) & tf.concat(
        [carried[:, None], tf.ones_like(reset[:, 1:])], axis=1)
    return tf.reshape(continues, [-1])
