"""Adapter from a trained `SequenceModel` to `model.base.Scorer` (what `model.evaluate` uses)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from model import base
from model.base import Scorer, push_history
from model.sequence_model import SequenceModel
from pipeline import schema

# `KerasScorer.ranks` scores at most this many positions of a session per call, and at most
# `base.SCORE_BUDGET` floats ([rows, positions, V]): a very long session (a crawler's
# thousands of clicks) costs memory linear in its length, not quadratic.
MAX_POSITIONS = 512


def target_ranks(scores: tf.Tensor, targets: tf.Tensor, excluded: tf.Tensor | None = None,
                 seen: tf.Tensor | None = None, active: tf.Tensor | None = None
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """`model.metrics.ranks` in TensorFlow: float32 [n, V], int64 [n] (and int64 [n] an
    item per row that is not a candidate, 0: none; int64 [n, M] items per row, distinct,
    that are not candidates where bool [n, M] `active`) -> (float64 [n] conservative ranks
    among the candidates (indices >= 2), `inf` for an unknown or an excluded target;
    bool: some score is NaN)."""
    target = tf.gather(scores, targets, batch_dims=1)[:, None]
    # counted over the whole row, then the reserved columns' share taken off (no slice copy)
    ge = tf.reduce_sum(tf.cast(scores >= target, tf.int32), axis=1)
    ge -= tf.reduce_sum(tf.cast(scores[:, :schema.NUM_RESERVED] >= target, tf.int32), axis=1)
    missed = targets == schema.UNKNOWN_INDEX
    if excluded is not None:
        out_of = excluded >= schema.NUM_RESERVED
        above = tf.gather(scores, excluded, batch_dims=1) >= target[:, 0]
        ge -= tf.cast(out_of & (excluded != targets) & above, tf.int32)
        missed |= out_of & (excluded == targets)
    if seen is not None:
        out_of = active & (seen >= schema.NUM_RESERVED)
        above = tf.gather(scores, seen, batch_dims=1) >= target
        ge -= tf.reduce_sum(tf.cast(out_of & (seen != targets[:, None]) & above, tf.int32),
                            axis=1)
        missed |= tf.reduce_any(out_of & (seen == targets[:, None]), axis=1)
    rank = tf.where(missed, tf.constant(np.inf, tf.float64), tf.cast(ge, tf.float64))
    return rank, tf.reduce_any(tf.math.is_nan(scores))


def _seen_at(positions: tf.Tensor, seen: tf.Tensor, since: tf.Tensor, start: tf.Tensor
             ) -> tuple[tf.Tensor, tf.Tensor]:
    """`metrics.seen_items`'s (items, since) [B, M] of the window beginning at position
    `start`, per ranked position ([n, 2] (row, step in the window)): (int64 [n, M] the
    row's items, bool [n, M] whether each is ruled out there)."""
    rows = positions[:, 0]
    at = positions[:, 1] + start
    return tf.gather(seen, rows), tf.gather(since, rows) < at[:, None]


def _known(items: np.ndarray) -> np.ndarray:
    """The known items (index >= 2) of `items`; padding and unknown items as 0."""
    return np.where(items >= schema.NUM_RESERVED, items, schema.PAD_INDEX)


class KerasScorer(Scorer):
    """Scores with compiled `tf.function`s of the model's own methods.

    state = float32 [B, H]; score = item_logits(user_embeddings(state, sessions[:, :-1]))
    (at position 0 the model's `first_item_scores` when it has them); update = update_state. For a model with a repeat head (`history_size` N > 0) the state
    is (float32 [B, H], int64 [B, N] the user's last N items, newest last) and the scores
    are the mixture's log-probabilities `item_log_probs`. Batch and length are dynamic
    dimensions (one trace each).

    `ranks` computes the evaluator's ranks inside TensorFlow from the scores of the
    non-padding positions only: neither the padding's [.., V] scores nor the scores
    themselves leave the compiled function (the same numbers as ranking `score`'s output).
    The user vectors of the whole sessions come first (`user_embeddings`, linear in the
    length); the ranks then follow window by window of `MAX_POSITIONS` positions.
    """

    def __init__(self, model: SequenceModel, name: str = "hiertcn"):
        self.model = model
        self.name = name
        h = model.state_size
        state_spec = tf.TensorSpec([None, h], tf.float32)
        items_spec = tf.TensorSpec([None, None], tf.int64)
        user_spec = tf.TensorSpec([None, None, None], tf.float32)
        if model.history_size:
            def score(state, history, sessions):
                prefix = sessions[:, :-1]
                return model.item_log_probs(model.user_embeddings(state, prefix), history, prefix,
                                            state)

            def ranks(state, history, user, window, current, excluded, seen, since, start):
                positions = tf.where(window != schema.PAD_INDEX)
                scores = model.item_log_probs(user, history, window[:, :-1], state,
                                              positions=positions, current=current)
                return (positions,) + target_ranks(
                    scores, tf.gather_nd(window, positions), tf.gather_nd(excluded, positions),
                    *_seen_at(positions, seen, since, start))

            self._score = tf.function(score, autograph=False, input_signature=[state_spec, items_spec, items_spec])
            self._ranks = tf.function(ranks, autograph=False, input_signature=[
                state_spec, items_spec, user_spec, items_spec, tf.TensorSpec([None], tf.int64),
                items_spec, items_spec, items_spec, tf.TensorSpec([], tf.int64)])
        else:
            first = model.first_item_scores
            first = None if first is None else tf.constant(first, tf.float32)

            def score(state, sessions):
                scores = model.item_logits(model.user_embeddings(state, sessions[:, :-1]))
                if first is None:
                    return scores
                return tf.concat([tf.broadcast_to(first, tf.shape(scores[:, :1])),
                                  scores[:, 1:]], axis=1)

            def ranks(user, window, at_start, excluded, seen, since, start):
                positions = tf.where(window != schema.PAD_INDEX)
                scores = model.item_logits(tf.gather_nd(user, positions))
                if first is not None:  # the session's first item: `first_item_scores`
                    starts = at_start & (positions[:, 1] == 0)
                    scores = tf.where(starts[:, None], first[None, :], scores)
                return (positions,) + target_ranks(
                    scores, tf.gather_nd(window, positions), tf.gather_nd(excluded, positions),
                    *_seen_at(positions, seen, since, start))

            self._score = tf.function(score, autograph=False, input_signature=[state_spec, items_spec])
            self._ranks = tf.function(ranks, autograph=False, input_signature=[
                user_spec, items_spec, tf.TensorSpec([], tf.bool), items_spec, items_spec,
                items_spec, tf.TensorSpec([], tf.int64)])
        self._user = tf.function(lambda state, sessions: model.user_embeddings(state, sessions[:, :-1]),
                                 autograph=False, input_signature=[state_spec, items_spec])
        self._update = tf.function(model.update_state, autograph=False, input_signature=[state_spec, items_spec])

    def initial_state(self, user_ids: list[str]):
        state = np.zeros([len(user_ids), self.model.state_size], np.float32)
        if self.model.history_size:
            return state, np.zeros([len(user_ids), self.model.history_size], np.int64)
        return state

    def _inputs(self, state, sessions):
        sessions = np.asarray(sessions, np.int64)
        if self.model.history_size:
            high, history = state
            return np.asarray(high, np.float32), history, sessions
        return np.asarray(state, np.float32), sessions

    def score(self, state, sessions: np.ndarray) -> np.ndarray:
        return self._score(*self._inputs(state, sessions)).numpy()

    def ranks(self, state, sessions: np.ndarray, vocab_size: int,
              excluded: np.ndarray | None = None,
              seen: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        sessions = np.asarray(sessions, np.int64)
        excluded = (np.zeros_like(sessions) if excluded is None
                    else np.asarray(excluded, np.int64))
        # (no exclusions: M = 0 columns)
        seen_items, since = ((np.zeros((len(sessions), 0), np.int64),) * 2 if seen is None
                             else (np.asarray(seen[0], np.int64), np.asarray(seen[1], np.int64)))
        if vocab_size != self.model.vocab_size:
            raise ValueError(f"{self.name} scores {self.model.vocab_size} items but the data's "
                             f"vocabulary has {vocab_size}: evaluate it on the data it was "
                             "trained on")
        if sessions.size and (sessions.min() < 0 or sessions.max() >= vocab_size):
            raise ValueError(f"item indices must lie in [0, {vocab_size}), got "
                             f"[{sessions.min()}, {sessions.max()}]")
        high, history = state if self.model.history_size else (state, None)
        high = np.asarray(high, np.float32)
        user = self._user(high, sessions)  # [rows, steps, D]: linear in the session length
        rows, steps = sessions.shape
        # Positions ranked per call: [rows, width, V] scores at most (and the repeat head's
        # [rows, width, width] tensors), however long a session is.
        width = min(MAX_POSITIONS, base.block_width(rows, vocab_size))
        out = np.zeros(sessions.shape)
        before = history
        for start in range(0, steps, width):
            window = sessions[:, start:start + width]
            if start and self.model.history_size:
                # the next window's positions see the history with the session before it
                # pushed on (`item_log_probs` reads the newest known items of both, so the
                # scores are the same however a session is split; unknown items must not
                # take a place in the pushed buffer)
                before = push_history(_known(before), _known(sessions[:, start - width:start]))
            if not window.any():
                continue
            part = user[:, start:start + width]
            if self.model.history_size:
                # the item the window's first position is on (a later window of a session)
                current = sessions[:, start - 1] if start else np.zeros(rows, np.int64)
                positions, rank, nan = self._ranks(high, before, part, window, current,
                                                   excluded[:, start:start + width],
                                                   seen_items, since, np.int64(start))
            else:
                positions, rank, nan = self._ranks(part, window, tf.constant(start == 0),
                                                   excluded[:, start:start + width],
                                                   seen_items, since, np.int64(start))
            if nan.numpy():
                raise ValueError("scores contain NaN: the model produced an invalid output")
            positions = positions.numpy()
            out[positions[:, 0], start + positions[:, 1]] = rank.numpy()
        return out

    def update(self, state, sessions: np.ndarray):
        sessions = np.asarray(sessions, np.int64)
        if self.model.history_size:
            high, history = state
            # the buffer holds the newest known items: an unknown item (evaluation data only;
            # training has none) takes no place in it, as within a session in `ranks`
            return (self._update(np.asarray(high, np.float32), sessions).numpy(),
                    push_history(_known(history), _known(sessions)))
        return self._update(np.asarray(state, np.float32), sessions).numpy()
