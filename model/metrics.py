"""Ranking metrics of the evaluation protocol (DESIGN.md §6), in pure numpy.

Every scored event ranks its target against the full catalogue: all vocabulary items with
index >= 2 (padding 0 and unknown 1 are not candidates; items the user has seen are not
removed, unless the evaluation rules them out for every model: `masked`, `seen_items`).
The rank is conservative: 1 + the number of *other* candidates scoring >= the target, so
a model that gives many items the same score gains nothing from the tie. An unknown
target (index 1) cannot be ranked and counts as a miss. Recall@K is the share of
events with rank <= K, MRR@K the mean of 1/rank over events with rank <= K (0 otherwise),
both micro-averaged over events.

The headline events are also split two ways: by target (`repeat`: seen earlier in the
user's history or session, `new`: not) and by user (`returning_users`: the user's record
has earlier sessions, from train or an earlier split; `cold_users`: the split's sessions are
all the user has, so only the user's own earlier target sessions are history).
"""
from __future__ import annotations

import numpy as np

from pipeline import schema

KS = (1, 5, 10, 20)
METRIC_KEYS = tuple(f"recall@{k}" for k in KS) + tuple(f"mrr@{k}" for k in KS)
COUNT_KEYS = ("events", "unknown_targets")
ITEM_GROUPS = ("first_item", "repeat", "new")
USER_GROUPS = ("returning_users", "cold_users")
GROUPS = ITEM_GROUPS + USER_GROUPS
# Upper bound on the elements of one [rows, vocab] comparison (bounds temporary memory).
CHUNK_ELEMENTS = 1 << 22


def ranks(scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray | None = None,
          masked: np.ndarray | None = None) -> np.ndarray:
    """Conservative full-catalogue ranks.

    Args:
      scores: float [N, V] scores over the whole vocabulary (columns 0 and 1 ignored).
      targets: int [N] target indices, each >= 1 (1 = unknown).
      excluded: int [N] an item per row that is not a candidate (0 or 1: none), e.g. the
        item the session is on (`evaluate(..., rule_out_current=True)`).
      masked: bool [N, V] items per row that are not candidates (True), e.g. the items the
        user has had before (`evaluate(..., rule_out_seen=True)`).

    Returns:
      float64 [N]: 1 + the number of other candidates (indices >= 2) scoring >= the
      target; `inf` for an unknown target (and for a target that is its row's excluded
      item or masked: ruled out, a miss).

    Raises:
      ValueError: shapes disagree, a target is out of range, or a score is NaN.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [N, V] and targets [N], got {scores.shape} and {targets.shape}")
    if targets.size and (targets.min() < schema.UNKNOWN_INDEX or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in [1, {scores.shape[1]}), got "
                         f"[{targets.min()}, {targets.max()}]")
    if excluded is not None:
        excluded = np.asarray(excluded, dtype=np.int64)
        if excluded.shape != targets.shape:
            raise ValueError(f"excluded must be [N] like targets, got {excluded.shape}")
    if masked is not None and np.shape(masked) != scores.shape:
        raise ValueError(f"masked must be [N, V] like scores, got {np.shape(masked)}")
    out = np.full(targets.shape, np.inf)
    rows = max(1, CHUNK_ELEMENTS // max(scores.shape[1], 1))
    for start in range(0, len(targets), rows):
        s = scores[start:start + rows]
        t = targets[start:start + rows]
        if np.isnan(s).any():
            raise ValueError("scores contain NaN: the model produced an invalid output")
        known = t != schema.UNKNOWN_INDEX
        at = np.arange(len(t))
        target_scores = s[at, t][:, None]
        # The target itself is a candidate and counts once in ">=": that is the "1 +".
        above = s[:, schema.NUM_RESERVED:] >= target_scores
        if masked is not None:
            m = np.asarray(masked[start:start + rows], dtype=bool)
            above &= ~m[:, schema.NUM_RESERVED:]
            known &= ~m[at, t]
        ge = above.sum(axis=1)
        if excluded is not None:
            e = excluded[start:start + rows]
            out_of = e >= schema.NUM_RESERVED
            counted = out_of & (e != t) & (s[at, e] >= target_scores[:, 0])
            if masked is not None:  # (a masked item is not in `above`: not taken out twice)
                counted &= ~m[at, e]
            ge -= counted
            known &= ~(out_of & (e == t))
        out[start:start + rows][known] = ge[known]
    return out


def event_ranks(scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray | None = None,
                masked: np.ndarray | None = None) -> np.ndarray:
    """`ranks` of the rows of `scores` [N, V] whose target is not padding (0), read a chunk
    of rows at a time (`scores` may be a view of a larger array); float64 [N], 0 at the
    padding rows. `excluded` [N] and `masked` [N, V] as in `ranks`."""
    targets = np.asarray(targets, dtype=np.int64)
    out = np.zeros(targets.shape)
    keep = np.flatnonzero(targets != schema.PAD_INDEX)
    rows = max(1, CHUNK_ELEMENTS // max(np.shape(scores)[1], 1))
    for start in range(0, len(keep), rows):
        idx = keep[start:start + rows]
        out[idx] = ranks(scores[idx], targets[idx],
                         None if excluded is None else np.asarray(excluded)[idx],
                         None if masked is None else masked[idx])
    return out


def previous_items(sessions: np.ndarray) -> np.ndarray:
    """int64 [B, T]: the item each position of `sessions` [B, T] is on (the one before it
    in the session; 0 at position 0): what `rule_out_current` leaves out of the candidates."""
    sessions = np.asarray(sessions, dtype=np.int64)
    out = np.zeros_like(sessions)
    out[:, 1:] = sessions[:, :-1]
    return out


def seen_items(seen: list[np.ndarray], sessions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What `rule_out_seen` leaves out of the candidates, per row, without a [B, T, M] array:
    (items int64 [B, M], since int64 [B, M]), 0-padded; item items[b, m] is not a candidate
    at the positions t > since[b, m] of row b. A row's items are distinct: its known items
    before the session (`seen[b]`, since -1: every position), then each known item of the
    session not among them at its first position j (since j: the positions after it).
    """
    sessions = np.asarray(sessions, dtype=np.int64)
    rows = []
    for b, before in enumerate(seen):
        before = np.asarray(before, dtype=np.int64)
        before = np.unique(before[before >= schema.NUM_RESERVED])
        row = sessions[b]
        item, first = np.unique(row, return_index=True)
        new = (item >= schema.NUM_RESERVED) & ~np.isin(item, before)
        rows.append((np.concatenate([before, item[new]]),
                     np.concatenate([np.full(len(before), -1, np.int64), first[new]])))
    width = max((len(i) for i, _ in rows), default=0)
    items = np.zeros((len(rows), width), np.int64)
    since = np.zeros((len(rows), width), np.int64)
    for b, (i, s) in enumerate(rows):
        items[b, :len(i)], since[b, :len(s)] = i, s
    return items, since


def seen_mask(items: np.ndarray, since: np.ndarray, start: int, stop: int,
              vocab_size: int) -> np.ndarray:
    """bool [B, stop - start, V]: `seen_items`'s exclusions at the positions [start, stop)."""
    items, since = np.asarray(items), np.asarray(since)
    mask = np.zeros((items.shape[0], stop - start, vocab_size), dtype=bool)
    at = np.arange(start, stop)
    for b in range(items.shape[0]):
        keep = items[b] >= schema.NUM_RESERVED
        if keep.any():
            mask[b][:, items[b][keep]] = since[b][keep][None, :] < at[:, None]
    return mask


def _summary(rank: np.ndarray, unknown: np.ndarray) -> dict:
    """Metrics of one group of events (0.0 for an empty group)."""
    n = len(rank)
    out = {}
    for k in KS:
        hit = rank <= k
        out[f"recall@{k}"] = float(hit.sum() / n) if n else 0.0
    for k in KS:
        rr = np.where(rank <= k, 1.0 / rank, 0.0)
        out[f"mrr@{k}"] = float(rr.sum() / n) if n else 0.0
    out["events"] = int(n)
    out["unknown_targets"] = int(unknown.sum())
    return out


class MetricsAccumulator:
    """Collects ranks batch by batch and summarises them as the §6 metrics JSON.

    Only the ranks of the events are kept (8 bytes per event, and 4 for its user when
    given), never the scores.
    """

    def __init__(self):
        self._rank: list[np.ndarray] = []
        self._unknown: list[np.ndarray] = []
        self._repeat: list[np.ndarray] = []
        self._first: list[np.ndarray] = []
        self._user: list[np.ndarray] = []
        self._cold: list[np.ndarray] = []

    def add(self, scores: np.ndarray, targets: np.ndarray, is_repeat: np.ndarray,
            is_first: np.ndarray, is_cold: np.ndarray | None = None) -> None:
        """Adds a batch of events from their scores.

        Args:
          scores: float [N, V] next-item scores (a view of a larger array is fine: only the
            rows with a target are read, a chunk at a time).
          targets: int [N] target indices; 0 (padding) marks a row that is not an event.
          is_repeat: bool [N] the target was seen earlier in the user's history or session.
          is_first: bool [N] the target is the first item of its session.
          is_cold: bool [N] the event's user has no sessions before the split (given for
            every batch, or for none: then the user groups are not reported).
        """
        self.add_ranks(event_ranks(scores, targets), targets, is_repeat, is_first,
                       is_cold=is_cold)

    def add_ranks(self, rank: np.ndarray, targets: np.ndarray, is_repeat: np.ndarray,
                  is_first: np.ndarray, user: np.ndarray | None = None,
                  is_cold: np.ndarray | None = None) -> None:
        """Adds a batch of events from their ranks (as `ranks` computes them: `inf` for an
        unknown target); the other arguments as in `add`. `user` int [N]: each event's
        user as an index (0, 1, ...) for `per_user` (given for every batch or for none)."""
        targets = np.asarray(targets, dtype=np.int64)
        keep = np.flatnonzero(targets != schema.PAD_INDEX)
        self._rank.append(np.asarray(rank, dtype=np.float64)[keep])
        # (an unknown target, not every miss: a ruled-out target's rank is `inf` as well)
        self._unknown.append(targets[keep] == schema.UNKNOWN_INDEX)
        self._repeat.append(np.asarray(is_repeat, dtype=bool)[keep])
        self._first.append(np.asarray(is_first, dtype=bool)[keep])
        if user is not None:
            self._user.append(np.asarray(user, dtype=np.int32)[keep])
        if is_cold is not None:
            self._cold.append(np.asarray(is_cold, dtype=bool)[keep])

    def result(self) -> dict:
        """The metrics JSON: headline keys over non-first events plus `first_item`,
        `repeat` and `new` objects with the same keys, and `returning_users` and
        `cold_users` when every batch gave `is_cold`.

        Raises:
          ValueError: `is_cold` was given for some batches but not all.
        """
        rank = np.concatenate(self._rank) if self._rank else np.zeros(0)
        repeat = np.concatenate(self._repeat) if self._repeat else np.zeros(0, bool)
        first = np.concatenate(self._first) if self._first else np.zeros(0, bool)
        unknown = np.concatenate(self._unknown) if self._unknown else np.zeros(0, bool)
        later = ~first
        out = _summary(rank[later], unknown[later])
        for name, mask in (("first_item", first), ("repeat", later & repeat),
                           ("new", later & ~repeat)):
            out[name] = _summary(rank[mask], unknown[mask])
        if self._cold:
            if len(self._cold) != len(self._rank):
                raise ValueError("is_cold was given for some batches only")
            cold = np.concatenate(self._cold)
            for name, mask in (("returning_users", later & ~cold), ("cold_users", later & cold)):
                out[name] = _summary(rank[mask], unknown[mask])
        return out

    def per_user(self, num_users: int) -> dict[str, np.ndarray]:
        """Per-user sums of the headline events (positions >= 1), for paired comparisons
        of two models over the same users (`paired_bootstrap`): `events` int64 [U] and,
        per metric key, float64 [U] the sum over the user's events of the hit (recall@K)
        or of the reciprocal rank within K (mrr@K). Summed over users and divided by the
        events they give the headline metrics of `result`.

        Raises:
          ValueError: the events were added without `user`.
        """
        if len(self._user) != len(self._rank):
            raise ValueError("per_user needs the user of every event (add_ranks(user=...))")
        rank = np.concatenate(self._rank) if self._rank else np.zeros(0)
        user = np.concatenate(self._user) if self._user else np.zeros(0, np.int32)
        later = ~(np.concatenate(self._first) if self._first else np.zeros(0, bool))
        rank, user = rank[later], user[later]
        out = {"events": np.bincount(user, minlength=num_users).astype(np.int64)}
        for k in KS:
            hit = rank <= k
            out[f"recall@{k}"] = np.bincount(user, weights=hit.astype(np.float64),
                                             minlength=num_users)
            out[f"mrr@{k}"] = np.bincount(user, weights=np.where(hit, 1.0 / rank, 0.0),
                                          minlength=num_users)
        return out


def p_floor(users: int) -> float:
    """The least two-sided p-value of a sign-flip test over U users (the paired test that
    assumes nothing of the differences' distribution; under no difference each user's
    sign is a coin): where every user's difference has one sign, 2 of the 2^U sign
    assignments are as far from zero. The bootstrap's resamples then all have that sign
    and give p = 0 however few the users (an audit's one-user log: "p < 0.001,
    significant"); 1 user: 1, 2 users: 0.5, 5 users: 0.0625, 11 users: 0.00098."""
    return min(1.0, 2.0 ** (1 - users))


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, events: np.ndarray,
                     rounds: int = 2000, seed: int = 0) -> dict:
    """How sure a difference of a metric between two models on the same events is.

    The users are resampled with replacement (a user's events are not independent of
    each other, so the user is the unit); the metric of a resample is the sum of its
    users' per-user sums over the sum of their events (`MetricsAccumulator.per_user`).

    Args:
      ours, theirs: float [U] per-user sums of one metric for the two models.
      events: int [U] per-user events (the same for both: the same split).
      rounds: bootstrap resamples.
      seed: the resampling seed (the result is a function of the inputs and the seed).

    Returns:
      {"difference": ours - theirs on all events, "ci95": [low, high] (percentiles of the
      resampled differences), "p_value": two-sided bootstrap p-value of a zero
      difference, at least `p_floor(U)` where that is within the resamples' resolution,
      "users": U (those with a scored event: the others are left out), "rounds": rounds}.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    events = np.asarray(events, np.float64)
    if not (ours.shape == theirs.shape == events.shape) or ours.ndim != 1:
        raise ValueError(f"per-user arrays differ in shape: {ours.shape}, {theirs.shape}, "
                         f"{events.shape}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    # a user without a scored event (sessions of one item) adds nothing to either sum: a
    # user of the test only in name, whose resamples of none but such users differ by 0
    # (20 of them beside 5 users, all better: p = 0.004 "over 25 users", not 0.0625)
    scored = events > 0
    ours, theirs, events = ours[scored], theirs[scored], events[scored]
    total = events.sum()
    if total <= 0:
        raise ValueError("no events to compare")
    diff = ours - theirs
    users = len(diff)
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, (1 << 22) // users)  # resamples at a time: bounded memory
    for start in range(0, rounds, chunk):
        idx = rng.integers(0, users, size=(min(chunk, rounds - start), users))
        n = events[idx].sum(axis=1)
        stats.append(diff[idx].sum(axis=1) / np.maximum(n, 1.0))
    stats = np.concatenate(stats)
    low, high = np.percentile(stats, [2.5, 97.5])
    p = min(1.0, 2.0 * min(np.mean(stats <= 0.0), np.mean(stats >= 0.0)))
    if p_floor(users) * rounds >= 1.0:
        p = max(p, p_floor(users))
    return {"difference": float(diff.sum() / total), "ci95": [float(low), float(high)],
            "p_value": float(p), "users": int(users), "rounds": int(rounds)}
