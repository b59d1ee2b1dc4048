"""Non-neural baselines as `Scorer`s, fitted on the train split only (DESIGN.md §5-§6).

* `popularity`: train event counts (`items.tsv`).
* `sknn`: V-SKNN, vector-multiplication session kNN (Ludewig & Jannach 2018).
* `spop`: items of the current session by their count in it.
* `upop`: items of the user's recent history and current session by recency-weighted count.
* `mv`: the authors' moving average: frequency among the user's last 10 events.

Ordering rule shared by all: a baseline's own score decides first; ties and every item it
does not score are ordered by global popularity. The popularity part is an additive term
`0.5 * rank / (max_rank + 1)` (`model.base.popularity_term`: the rank of an item's train
count among the distinct counts), in [0, 0.5): strictly smaller than the smallest step of
the integer primary scores (`sknn`, `spop`, `mv`), and added only to unscored items by
`upop`, whose scored items all exceed 1. Items with equal counts keep equal terms, and the
conservative rank of `model.metrics` counts such ties against the target. Scores are
float32 (the `Scorer` contract): the primary scores are exact below 2**22, but beside a
primary score S the popularity terms resolve steps of about S * 2**-24 only, so items of
adjacent ranks can tie there among more than about 2**23 / S distinct counts (counted
against the target: a metric can only come out slightly low, never high).

All are vectorized over rows, positions and items (numpy and scipy.sparse); the Python
loops run over positions or sessions, never over items. Each computes its scores block by
block of positions (`Scorer.score_blocks`), carrying what the next block needs, so that a
very long session costs memory for one block (`model.base.SCORE_BUDGET`).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from model.base import BlockScorer, Scorer, State, blocks, popularity_term, push_history
from pipeline import schema

NAMES = ("popularity", "sknn", "spop", "upop", "mv")
# V-SKNN computes its similarities for at most about this many (prefix, session) pairs at once.
CHUNK_PAIRS = 1 << 22


def _known(sessions: np.ndarray) -> np.ndarray:
    """int64 `sessions` with unknown items as padding (which `push_history` leaves out)."""
    sessions = np.asarray(sessions, dtype=np.int64)
    return np.where(sessions >= schema.NUM_RESERVED, sessions, schema.PAD_INDEX)


def _scores_with_popularity(pop: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32 [rows, steps, V] filled with the popularity term."""
    out = np.empty(shape + pop.shape, dtype=np.float32)
    out[...] = pop
    return out


class Popularity(BlockScorer):
    """Every position scores items by their train count."""

    name = "popularity"

    def __init__(self, counts: np.ndarray):
        """Args: counts: int [V] train event counts by vocabulary index."""
        self.pop = popularity_term(counts)  # (float32 counts tied above 2**24)
        self._sorted = np.sort(self.pop[schema.NUM_RESERVED:])  # the candidates' scores

    @classmethod
    def fit(cls, data_dir: str) -> "Popularity":
        """Counts from `items.tsv` (train events of each item)."""
        return cls(schema.read_vocabulary(data_dir).counts)

    def initial_state(self, user_ids: list[str]) -> State:
        return None

    def ranks(self, state, sessions, vocab_size, excluded=None, seen=None):
        """`Scorer.ranks` without the [rows, steps, V] score blocks: every position scores
        the items alike, so a target's conservative rank is the number of candidates
        scoring at least its score, one lookup in their sorted scores (a 164k-item
        catalogue's test split took 114 s of CPU filling and counting the blocks). With
        items ruled out (`excluded`, `seen`), or arguments the blocks would refuse, the
        blocks."""
        sessions = np.asarray(sessions, dtype=np.int64)
        if (excluded is not None or seen is not None or len(self.pop) != vocab_size
                or (sessions.size and (sessions.min() < 0 or sessions.max() >= vocab_size))):
            return super().ranks(state, sessions, vocab_size, excluded, seen)
        below = np.searchsorted(self._sorted, self.pop[sessions], side="left")
        out = (len(self._sorted) - below).astype(np.float64)
        out[sessions == schema.UNKNOWN_INDEX] = np.inf
        out[sessions == schema.PAD_INDEX] = 0.0
        return out

    def score_blocks(self, state, sessions, width):
        rows, steps = np.shape(sessions)
        for start, stop in blocks(steps, width):
            yield _scores_with_popularity(self.pop, (rows, stop - start))

    def update(self, state: State, sessions: np.ndarray) -> State:
        return state


class SessionPop(BlockScorer):
    """`spop`: count of the item in the current session so far, then popularity."""

    name = "spop"

    def __init__(self, counts: np.ndarray):
        """Args: counts: int [V] train event counts by vocabulary index."""
        self.pop = popularity_term(counts)

    @classmethod
    def fit(cls, data_dir: str) -> "SessionPop":
        return cls(schema.read_vocabulary(data_dir).counts)

    def initial_state(self, user_ids: list[str]) -> State:
        return None

    def score_blocks(self, state, sessions, width):
        sessions = np.asarray(sessions, dtype=np.int64)
        rows, steps = sessions.shape
        running = np.array(np.broadcast_to(self.pop, (rows, len(self.pop))))  # position t
        idx = np.arange(rows)
        for start, stop in blocks(steps, width):
            out = np.empty((rows, stop - start, len(self.pop)), dtype=np.float32)
            for t in range(start, stop):
                if t:
                    running[idx, sessions[:, t - 1]] += 1.0
                out[:, t - start] = running
            yield out
            del out  # before the next block is allocated

    def update(self, state: State, sessions: np.ndarray) -> State:
        return state


class MovingAverage(BlockScorer):
    """`mv`: frequency among the user's last `window` events, across sessions.

    The window slides over the user's history and the current session alike, over known
    items only (an unknown item, never a candidate, takes no slot, as in HierTCN's repeat
    head); ties and the rest by popularity. State: int64 [rows, window], the last known
    events, oldest first.
    """

    name = "mv"

    def __init__(self, counts: np.ndarray, window: int = 10):
        """Args: counts: int [V] train counts; window: events counted (the authors' 10)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.pop = popularity_term(counts)
        self.window = window

    @classmethod
    def fit(cls, data_dir: str) -> "MovingAverage":
        return cls(schema.read_vocabulary(data_dir).counts)

    def initial_state(self, user_ids: list[str]) -> State:
        return np.zeros((len(user_ids), self.window), dtype=np.int64)

    def score_blocks(self, state, sessions, width):
        sessions = np.asarray(sessions, dtype=np.int64)
        rows, steps = sessions.shape
        known = sessions >= schema.NUM_RESERVED
        # the session's known items packed to the left (padding after them), after the state
        packed = np.take_along_axis(np.where(known, sessions, schema.PAD_INDEX),
                                    np.argsort(~known, axis=1, kind="stable"), axis=1)
        seq = np.concatenate([state, packed], axis=1)
        # known items before each position: position t sees seq[:, before : before + window]
        before = np.concatenate([np.zeros((rows, 1), np.int64),
                                 np.cumsum(known, axis=1)[:, :-1]], axis=1)
        r = np.arange(rows)[:, None]
        for start, stop in blocks(steps, width):
            out = _scores_with_popularity(self.pop, (rows, stop - start))
            t = np.arange(stop - start)[None, :]
            for k in range(self.window):
                out[r, t, np.take_along_axis(seq, before[:, start:stop] + k, axis=1)] += 1.0
            yield out
            del out  # before the next block is allocated

    def update(self, state: State, sessions: np.ndarray) -> State:
        return push_history(state, _known(sessions))


class UserPop(BlockScorer):
    """`upop`: the user's recent items by recency-weighted count, then popularity.

    The user's last `history` known events of earlier sessions and every known event of
    the current session so far each weigh `decay ** age`, age 0 for the latest known event
    before the scored position (an unknown item, never a candidate, takes no place and no
    age, as in HierTCN's repeat head); events of the current session weigh
    `session_weight` times more. An item's weight r is the sum over its events; items
    with r > 0 score 1 + r, every other item its popularity term (< 0.5), so the user's
    items come first. State: int64 [rows, history], the last events, oldest first.
    """

    name = "upop"

    def __init__(self, counts: np.ndarray, decay: float = 0.95, session_weight: float = 2.0,
                 history: int = 200):
        """Args:
          counts: int [V] train event counts.
          decay: weight ratio between an event and the next newer one, in (0, 1].
          session_weight: extra factor for events of the current session, >= 1.
          history: events of earlier sessions kept per user.
        """
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        if session_weight < 1.0:
            raise ValueError(f"session_weight must be >= 1, got {session_weight}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.pop = popularity_term(counts)
        self.decay, self.session_weight, self.history = decay, session_weight, history

    @classmethod
    def fit(cls, data_dir: str) -> "UserPop":
        return cls(schema.read_vocabulary(data_dir).counts)

    def initial_state(self, user_ids: list[str]) -> State:
        return np.zeros((len(user_ids), self.history), dtype=np.int64)

    def score_blocks(self, state, sessions, width):
        sessions = np.asarray(sessions, dtype=np.int64)
        rows, steps = sessions.shape
        vocab = len(self.pop)
        age = np.arange(self.history - 1, -1, -1)
        flat = (np.arange(rows)[:, None] * vocab + state).ravel()
        weights = np.broadcast_to(self.decay ** age, state.shape).ravel()
        r = np.bincount(flat, weights=weights, minlength=rows * vocab).reshape(rows, vocab)
        r[:, schema.PAD_INDEX] = 0.0
        idx = np.arange(rows)
        for start, stop in blocks(steps, width):
            out = np.empty((rows, stop - start, vocab), dtype=np.float32)
            for t in range(start, stop):
                if t:  # (a row whose item before t is unknown or padding: unchanged)
                    known = sessions[:, t - 1] >= schema.NUM_RESERVED
                    r[known] *= self.decay
                    r[idx[known], sessions[known, t - 1]] += self.session_weight
                out[:, t - start] = np.where(r > 0, 1.0 + r, self.pop)
            yield out
            del out  # before the next block is allocated

    def update(self, state: State, sessions: np.ndarray) -> State:
        return push_history(state, _known(sessions))


# V-SKNN's defaults (Ludewig & Jannach's): neighbours, and the most recent sessions sharing
# an item they are drawn from
SKNN_K = 100
SKNN_SAMPLE_SIZE = 500


class SessionKNN(BlockScorer):
    """`sknn`: V-SKNN (Ludewig & Jannach 2018, "Evaluation of session-based recommendation
    algorithms") as that paper defines it. Their session-rec `VMContextKNN` (with
    `weighting="div"`) computes the same similarities and neighbours; by default it also
    divides each neighbour's contribution by the distance from the end of the current
    session of the newest item the two share (`weighting_score="div_score"`), which is not
    done here.

    * Current session (prefix of length t) as a vector: the item at 1-based position j
      weighs j / t (linear decay, most recent item 1); a repeated item takes the weight
      of its latest occurrence.
    * Past sessions: the train sessions only, binary item vectors, ordered by the time of
      their last event. Sessions scored during evaluation are not added (session-rec's
      default `extend=False`): the evaluator walks users, not time, so adding them would
      let a later session of one user help an earlier one of another.
    * Candidates: the `sample_size` most recent past sessions sharing an item with the
      current one; neighbours: the `k` of those with the highest similarity = dot product
      of the weighted current vector with the neighbour's binary vector, not normalised
      (session-rec divides by the number of distinct current items, a constant per prefix
      that changes no ranking). Equal similarities prefer the more recent session.
    * Item score: the sum of the similarities of the neighbours that contain the item.
    * Position 0 (empty session) and items no neighbour contains fall back to popularity.

    The similarities are computed against each item's `sample_size` most recent sessions
    only (`_newest_per_row`), which gives the same candidates and similarities: a session
    among the `sample_size` most recent sharing an item with the prefix is among the
    `sample_size` most recent of every item it shares (else as many newer sessions would
    share an item), so its similarity is whole; the others are not candidates. The cost
    per prefix is then at most its distinct items x `sample_size`, whatever the items'
    popularity (a hit song sits in a large share of a music log's sessions).

    Scores are computed as t × the above (integer weights j), which keeps them exact
    integers and changes no ranking; then the popularity term is added.

    With `remind=False` (session-rec's `remind` option; `model.evaluate --no-remind`) the
    items of the session so far get no neighbour score, only the popularity term, so they
    rank below every item a neighbour holds: for logs where an item is consumed once (a
    rated movie). The default, True, is the paper's and session-rec's.
    """

    name = "sknn"

    def __init__(self, sessions: sp.csr_matrix, counts: np.ndarray, k: int = SKNN_K,
                 sample_size: int = SKNN_SAMPLE_SIZE, remind: bool = True):
        """Args:
          sessions: [past sessions, V] binary item matrix, rows oldest to newest.
          counts: int [V] train event counts.
          k: neighbours per prediction.
          sample_size: most recent sessions sharing an item considered as candidates.
          remind: whether the session's own items keep their neighbour scores.
        """
        if k < 1 or sample_size < 1:
            raise ValueError(f"k and sample_size must be >= 1, got k={k}, sample_size={sample_size}")
        self.remind = bool(remind)
        if not self.remind:
            self.name = "sknn:noremind"
        self.pop = popularity_term(counts)
        m = sp.csr_matrix(sessions, dtype=np.float64)
        m.sum_duplicates()
        m.data[:] = 1.0
        self.sessions = m
        # each item's newest sessions [V, past sessions], and the same transposed: the
        # similarities are (newest_t[candidates] @ query.T).T, whose conversion to csr
        # orders each prefix's sessions (a linear transposition) where query @ newest would
        # need a sort of every row's entries; the candidates (the sessions of the query's
        # items) keep its cost that of the products, whatever the number of past sessions
        self.newest = _newest_per_row(m.T.tocsr(), sample_size)
        self.doc_freq = np.diff(self.newest.indptr)  # (each item's sessions there)
        self.newest_t = self.newest.T.tocsr()
        self.k, self.sample_size = k, sample_size

    @classmethod
    def fit(cls, data_dir: str, k: int = SKNN_K, sample_size: int = SKNN_SAMPLE_SIZE,
            remind: bool = True) -> "SessionKNN":
        """Reads the train sessions, ordered by the time of their last event."""
        vocab = schema.read_vocabulary(data_dir)
        items, lengths, ends = [], [], []
        for user in schema.iter_users(data_dir, "train"):
            for s, t in zip(user.sessions, user.times):
                items.append(s)
                lengths.append(len(s))
                ends.append(t[-1] if len(t) else 0)
        order = np.argsort(np.asarray(ends, dtype=np.int64), kind="stable")
        items = [items[i] for i in order]
        lengths = np.asarray(lengths, dtype=np.int64)[order]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        indices = np.concatenate(items) if items else np.zeros(0, dtype=np.int64)
        matrix = sp.csr_matrix((np.ones(len(indices)), indices, indptr),
                               shape=(len(items), vocab.size))
        return cls(matrix, vocab.counts, k=k, sample_size=sample_size, remind=remind)

    def initial_state(self, user_ids: list[str]) -> State:
        return None

    def update(self, state: State, sessions: np.ndarray) -> State:
        return state

    def _queries(self, sessions: np.ndarray, start: int, stop: int
                 ) -> tuple[np.ndarray, sp.csr_matrix]:
        """Weighted prefix vectors of every position t in [start, stop), t >= 1, that has an
        item to predict.

        Returns:
          flat int64 [N] positions in the block (row * (stop - start) + t - start) and csr
          [N, V] with weight j (1-based position of the item's latest occurrence in the
          prefix).
        """
        rows, steps = sessions.shape
        lengths = (sessions != schema.PAD_INDEX).sum(axis=1)
        # next_j[r, j]: position of the next occurrence of sessions[r, j] in its row.
        order = np.lexsort((np.tile(np.arange(steps), rows), sessions.ravel(),
                            np.repeat(np.arange(rows), steps)))
        flat = sessions.ravel()[order]
        same = (flat[1:] == flat[:-1]) & (order[1:] // steps == order[:-1] // steps)
        next_j = np.full(rows * steps, steps, dtype=np.int64)
        next_j[order[:-1][same]] = order[1:][same] % steps
        # The item at j is in the vectors of prefixes t = j+1 .. min(next_j, length - 1):
        # one entry per (prefix, distinct item), at most [rows, stop - start, min(steps, V)]
        # for the prefixes of the block.
        r = np.repeat(np.arange(rows), steps)
        j = np.tile(np.arange(steps), rows)
        first = np.maximum(j + 1, start)
        last = np.minimum(np.minimum(next_j, lengths[r] - 1), stop - 1)
        count = np.clip(last - first + 1, 0, None)
        r, j, first = np.repeat(r, count), np.repeat(j, count), np.repeat(first, count)
        t = first + np.arange(len(j)) - np.repeat(np.cumsum(count) - count, count)
        positions, query_row = np.unique(r * (stop - start) + t - start, return_inverse=True)
        query = sp.csr_matrix(((j + 1).astype(np.float64), (query_row, sessions[r, j])),
                              shape=(len(positions), self.sessions.shape[1]))
        return positions, query

    def _neighbour_scores(self, query: sp.csr_matrix) -> sp.csr_matrix:
        """Item scores [N, V] of a chunk of prefix vectors [N, V]."""
        candidates = np.unique(self.newest[np.unique(query.indices)].indices)  # (sorted)
        sim = (self.newest_t[candidates] @ query.T.tocsr()).T.tocsr()  # (indices sorted)
        n = sim.shape[0]
        # the most recent sessions of each row: its last `sample_size` entries (indexed
        # directly, without a pass over all of the row's entries)
        ends = sim.indptr[1:].astype(np.int64)
        begins = np.maximum(sim.indptr[:-1], ends - self.sample_size)
        counts = ends - begins
        row = np.repeat(np.arange(n), counts)
        at = np.arange(len(row)) + np.repeat(begins - (np.cumsum(counts) - counts), counts)
        col, val = candidates[sim.indices[at]], sim.data[at]
        order = np.lexsort((-col, -val, row))
        row, col, val = row[order], col[order], val[order]
        start = np.searchsorted(row, np.arange(n))
        top = np.arange(len(row)) - start[row] < self.k
        weights = sp.csr_matrix((val[top], (row[top], col[top])),
                                shape=(n, self.sessions.shape[0]))
        return (weights @ self.sessions).tocsr()

    def score_blocks(self, state, sessions, width):
        sessions = np.asarray(sessions, dtype=np.int64)
        rows, steps = sessions.shape
        vocab = len(self.pop)
        doc_freq = self.doc_freq
        for first, last in blocks(steps, width):
            out = _scores_with_popularity(self.pop, (rows, last - first))
            positions, query = self._queries(sessions, first, last)
            flat_out = out.reshape(-1, vocab)
            # Chunks of prefixes with at most ~CHUNK_PAIRS (prefix, past session) products.
            cost = np.cumsum(query.sign() @ doc_freq)
            start = 0
            while start < len(positions):
                done = cost[start - 1] if start else 0
                stop = max(start + 1, int(np.searchsorted(cost, done + CHUNK_PAIRS, side="right")))
                scores = self._neighbour_scores(query[start:stop]).tocoo()
                flat_out[positions[start:stop][scores.row], scores.col] += \
                    scores.data.astype(np.float32)
                start = stop
            if not self.remind:  # the prefixes' own items (the queries' entries): popularity
                own = query.tocoo()
                flat_out[positions[own.row], own.col] = self.pop[own.col]
            yield out
            del out  # before the next block is allocated


def _newest_per_row(m: sp.csr_matrix, count: int) -> sp.csr_matrix:
    """`m` with each row's entries cut to its last `count` columns (for `SessionKNN`: the
    rows are items, the columns their sessions from oldest to newest)."""
    m = m.copy()
    m.sort_indices()
    per_row = np.diff(m.indptr)
    from_end = np.repeat(m.indptr[1:], per_row) - 1 - np.arange(m.nnz)
    keep = from_end < count
    rows = np.repeat(np.arange(m.shape[0]), per_row)[keep]
    return sp.csr_matrix((m.data[keep], (rows, m.indices[keep])), shape=m.shape)


_CLASSES = {"popularity": Popularity, "sknn": SessionKNN, "spop": SessionPop,
            "upop": UserPop, "mv": MovingAverage}


def fit(name: str, data_dir: str, remind: bool = True, k: int = SKNN_K,
        sample_size: int = SKNN_SAMPLE_SIZE) -> Scorer:
    """Fits the baseline `name` (one of NAMES) on the train split of `data_dir`; `remind`,
    `k` and `sample_size` are sknn's (`SessionKNN`).

    Raises:
      ValueError: unknown name, or an sknn option for another baseline.
      schema.DataError: the folder is not a pipeline output.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(NAMES)}")
    if name == "sknn":
        return SessionKNN.fit(data_dir, k=k, sample_size=sample_size, remind=remind)
    if not remind or k != SKNN_K or sample_size != SKNN_SAMPLE_SIZE:
        raise ValueError(f"remind, k and sample_size are options of sknn, not of {name}")
    return _CLASSES[name].fit(data_dir)
