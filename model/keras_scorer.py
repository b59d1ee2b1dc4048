"""Adapter from a trained `SequenceModel` to `model.base.Scorer` (what `model.evaluate` uses)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from model.base import Scorer, push_history
from model.sequence_model import SequenceModel


class KerasScorer(Scorer):
    """Scores with compiled `tf.function`s of the model's own methods.

    state = float32 [B, H]; score = item_logits(user_embeddings(state, sessions[:, :-1]));
    update = update_state. For a model with a repeat head (`history_size` N > 0) the state
    is (float32 [B, H], int64 [B, N] the user's last N items, newest last) and the scores
    are the mixture's log-probabilities `item_log_probs`. Batch and length are dynamic
    dimensions (one trace each).
    """

    def __init__(self, model: SequenceModel, name: str = "hiertcn"):
        self.model = model
        self.name = name
        h = model.state_size
        state_spec = tf.TensorSpec([None, h], tf.float32)
        items_spec = tf.TensorSpec([None, None], tf.int64)
        if model.history_size:
            def score(state, history, sessions):
                prefix = sessions[:, :-1]
                return model.item_log_probs(model.user_embeddings(state, prefix), history, prefix,
                                            state)

            self._score = tf.function(score, input_signature=[state_spec, items_spec, items_spec])
        else:
            self._score = tf.function(
                lambda state, sessions: model.item_logits(model.user_embeddings(state, sessions[:, :-1])),
                input_signature=[state_spec, items_spec])
        self._update = tf.function(model.update_state, input_signature=[state_spec, items_spec])

    def initial_state(self, user_ids: list[str]):
        state = np.zeros([len(user_ids), self.model.state_size], np.float32)
        if self.model.history_size:
            return state, np.zeros([len(user_ids), self.model.history_size], np.int64)
        return state

    def score(self, state, sessions: np.ndarray) -> np.ndarray:
        sessions = np.asarray(sessions, np.int64)
        if self.model.history_size:
            high, history = state
            return self._score(np.asarray(high, np.float32), history, sessions).numpy()
        return self._score(np.asarray(state, np.float32), sessions).numpy()

    def update(self, state, sessions: np.ndarray):
        sessions = np.asarray(sessions, np.int64)
        if self.model.history_size:
            high, history = state
            return (self._update(np.asarray(high, np.float32), sessions).numpy(),
                    push_history(history, sessions))
        return self._update(np.asarray(state, np.float32), sessions).numpy()
