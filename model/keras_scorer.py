"""Adapter from a trained `SequenceModel` to `model.base.Scorer` (what `model.evaluate` uses)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from model.base import Scorer
from model.sequence_model import SequenceModel


class KerasScorer(Scorer):
    """Scores with compiled `tf.function`s of the model's own methods.

    state = float32 [B, H]; score = item_logits(user_embeddings(state, sessions[:, :-1]));
    update = update_state. Batch and length are dynamic dimensions (one trace each).
    """

    def __init__(self, model: SequenceModel, name: str = "hiertcn"):
        self.model = model
        self.name = name
        h = model.state_size
        state_spec = tf.TensorSpec([None, h], tf.float32)
        items_spec = tf.TensorSpec([None, None], tf.int64)
        self._score = tf.function(
            lambda state, sessions: model.item_logits(model.user_embeddings(state, sessions[:, :-1])),
            input_signature=[state_spec, items_spec])
        self._update = tf.function(model.update_state, input_signature=[state_spec, items_spec])

    def initial_state(self, user_ids: list[str]) -> np.ndarray:
        return np.zeros([len(user_ids), self.model.state_size], np.float32)

    def score(self, state, sessions: np.ndarray) -> np.ndarray:
        return self._score(np.asarray(state, np.float32), np.asarray(sessions, np.int64)).numpy()

    def update(self, state, sessions: np.ndarray) -> np.ndarray:
        return self._update(np.asarray(state, np.float32), np.asarray(sessions, np.int64)).numpy()
