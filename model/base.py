"""The one interface that `model.evaluate` needs from every model, neural or not.

The evaluator (DESIGN.md §6) walks users in batches of rows. For each batch it first feeds
the users' history sessions through `update`, then, session by session, asks `score` for
the scores of every position of the target sessions and feeds them through `update` too
(online evaluation: a scored session becomes history). A row whose user has no session at
that step gets an all-padding row, which must leave its state unchanged.
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

from pipeline import schema

State = Any


def push_history(buffer: np.ndarray, sessions: np.ndarray) -> np.ndarray:
    """The last N items of buffer + sessions: a user's bounded recent-item buffer.

    Args:
      buffer: int64 [rows, N] earlier items, newest last, left-padded with 0.
      sessions: int64 [rows, steps] new items, padded with 0 at the end.

    Returns:
      int64 [rows, N], the same layout (an all-padding session leaves its row unchanged).
    """
    seq = np.concatenate([buffer, sessions], axis=1)
    order = np.argsort(seq != schema.PAD_INDEX, axis=1, kind="stable")
    return np.take_along_axis(seq, order, axis=1)[:, seq.shape[1] - buffer.shape[1]:]


class Scorer(abc.ABC):
    """A model as the evaluator sees it.

    Scores are over the whole vocabulary, indices as in `items.tsv`; the evaluator
    ignores the reserved columns 0 (padding) and 1 (unknown).
    """

    name: str = "model"

    @abc.abstractmethod
    def initial_state(self, user_ids: list[str]) -> State:
        """State of a batch of users before their first session."""

    @abc.abstractmethod
    def score(self, state: State, sessions: np.ndarray) -> np.ndarray:
        """Next-item scores at every position of a batch of sessions.

        Args:
          state: the rows' state before these sessions.
          sessions: int64 [batch, steps], item indices padded with 0 at the end.

        Returns:
          float32 [batch, steps, vocab]: row t scores the item at position t given the
          state and sessions[:, :t] (t = 0 scores the first item from the state alone).
        """

    @abc.abstractmethod
    def update(self, state: State, sessions: np.ndarray) -> State:
        """State after the sessions have ended; all-padding rows keep their state."""
