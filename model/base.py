"""The one interface that `model.evaluate` needs from every model, neural or not.

The evaluator (DESIGN.md §6) walks users in batches of rows. For each batch it first feeds
the users' history sessions through `update`, then, session by session, asks `ranks` for
the full-catalogue rank of every position's target (by default computed from `score`'s
scores) and feeds the sessions through `update` too (online evaluation: a scored session
becomes history). A row whose user has no session at
that step gets an all-padding row, which must leave its state unchanged.
"""
from __future__ import annotations

import abc
import itertools
from typing import Any, Iterator

import numpy as np

from model import metrics
from pipeline import schema

State = Any

# At most this many score floats ([rows, positions, vocab]) are computed at once: the
# evaluator gives a batch whose longest target session is long fewer rows, and `ranks`
# scores a session longer than that allows in blocks of positions (a crawler's thousands
# of clicks cost memory for one block, not for the whole session).
SCORE_BUDGET = 1 << 25


def popularity_term(counts: np.ndarray) -> np.ndarray:
    """float32 [V] in [0, 0.5): `0.5 * rank / (max_rank + 1)`, where an item's rank is its
    count's among the distinct counts (0 for a count of 0; reserved indices count 0): the
    popularity scores (`popularity`), and where session-only models score a session's
    first item (DESIGN §6). Ranks, not counts: float32 tells apart every pair of fewer
    than 2**24 distinct counts, however large (counts themselves lose their last digits
    above 2**24, and the most popular items of a large log tied)."""
    counts = np.asarray(counts, dtype=np.int64).copy()
    counts[:schema.NUM_RESERVED] = 0
    ranks = np.unique(counts, return_inverse=True)[1].reshape(counts.shape)
    return (0.5 * ranks / (ranks.max(initial=0) + 1.0)).astype(np.float32)


def block_width(rows: int, vocab_size: int) -> int:
    """Positions of a batch of `rows` sessions scored per block within `SCORE_BUDGET`."""
    return max(1, SCORE_BUDGET // max(1, rows * vocab_size))


def blocks(steps: int, width: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the blocks of `width` positions of `steps` (one empty block when
    steps == 0)."""
    for start in range(0, max(steps, 1), width):
        yield start, min(start + width, steps)


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

    def score_blocks(self, state: State, sessions: np.ndarray,
                     width: int) -> Iterator[np.ndarray]:
        """`score`'s output block by block: float32 [batch, stop - start, vocab] for the
        positions [start, stop) of `blocks(steps, width)`, in order.

        By default `score` is computed whole and sliced. A model whose scores at a position
        follow from a running summary of the positions before (the baselines) overrides
        this to hold one block at a time.
        """
        scores = self.score(state, sessions)
        for start, stop in blocks(np.shape(sessions)[1], width):
            yield scores[:, start:stop]

    def ranks(self, state: State, sessions: np.ndarray, vocab_size: int,
              excluded: np.ndarray | None = None,
              seen: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Conservative full-catalogue rank of the item at every position (`model.metrics`).

        The evaluator asks for ranks, not scores. This ranks `score_blocks`'s blocks of
        `block_width` positions; a model may compute the same ranks without handing
        [batch, steps, vocab] scores over (see `KerasScorer`).

        Args:
          state: the rows' state before these sessions.
          sessions: int64 [batch, steps], item indices padded with 0 at the end.
          vocab_size: V, the data's vocabulary size (the width the scores must have).
          excluded: int64 [batch, steps], an item per position that is not a candidate
            there (0: none; `metrics.ranks`), or None.
          seen: (items, since) int64 [batch, M] each (`metrics.seen_items`): items[b, m]
            is not a candidate at the positions t > since[b, m] of row b; or None.

        Returns:
          float64 [batch, steps]: the rank of sessions[:, t] among the candidates scored
          from the state and sessions[:, :t]; `inf` for an unknown target, 0 at padding.

        Raises:
          ValueError: the scores have the wrong shape or contain NaN.
        """
        sessions = np.asarray(sessions, dtype=np.int64)
        rows, steps = sessions.shape
        out = np.zeros(sessions.shape)
        width = block_width(rows, vocab_size)
        for span, part in itertools.zip_longest(blocks(steps, width),
                                                self.score_blocks(state, sessions, width)):
            if span is None or part is None:
                raise ValueError(f"{self.name}.score_blocks gave another number of blocks "
                                 f"than blocks({steps}, {width})")
            start, stop = span
            part = np.asarray(part)
            window = sessions[:, start:stop]
            if part.shape != window.shape + (vocab_size,):
                raise ValueError(
                    f"{self.name}.score returned shape {part.shape} for positions "
                    f"[{start}, {stop}) of sessions {sessions.shape}: expected "
                    f"[batch, steps, {vocab_size}] (the data's vocabulary size)")
            masked = (None if seen is None else
                      metrics.seen_mask(*seen, start, stop, vocab_size).reshape(-1, vocab_size))
            out[:, start:stop] = metrics.event_ranks(
                part.reshape(-1, vocab_size), window.reshape(-1),
                None if excluded is None else np.asarray(excluded)[:, start:stop].reshape(-1),
                masked).reshape(window.shape)
            del part  # one block at a time
        return out


class BlockScorer(Scorer):
    """A scorer that computes its scores block by block (`score_blocks`, abstract here);
    `score` is the one block of the whole sessions."""

    @abc.abstractmethod
    def score_blocks(self, state: State, sessions: np.ndarray,
                     width: int) -> Iterator[np.ndarray]:
        """See `Scorer.score_blocks`."""

    def score(self, state: State, sessions: np.ndarray) -> np.ndarray:
        return next(iter(self.score_blocks(state, sessions, max(1, np.shape(sessions)[1]))))
