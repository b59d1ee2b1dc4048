"""Train/valid/test assignment of sessions (pure functions, DESIGN.md §6 step 5).

`time`: global cut-offs over the start times of all remaining sessions,
t_valid = percentile 100·(1 − valid − test) and t_test = percentile 100·(1 − test), both
with numpy's `method="lower"` (so each cut-off is a real session start); a session goes
to train if it starts before t_valid, to valid if in [t_valid, t_test), else to test.
Sessions are never cut. A zero fraction leaves its split empty.

`users`: cold users; a user's sessions all go to one split chosen by a seeded hash of the
user id, so the assignment does not depend on the data or on the worker.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Sequence

import numpy as np

SPLIT_METHODS = ("time", "users")
TRAIN, VALID, TEST = "train", "valid", "test"


def time_cutoffs(starts: Sequence[int] | np.ndarray, valid_fraction: float,
                 test_fraction: float) -> dict:
    """Global cut-offs of the `time` split.

    Args:
      starts: unix seconds of every session start (any order).
      valid_fraction, test_fraction: shares of the latest sessions (roughly; ties at a
        cut-off all go to the later split).

    Returns:
      {"t_valid": int | None, "t_test": int | None}; None means "no session" (an empty
      split, or no sessions at all).
    """
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size == 0:
        return {"t_valid": None, "t_test": None}

    def cut(fraction_after: float) -> int:
        return int(np.percentile(starts, 100.0 * (1.0 - fraction_after), method="lower"))

    t_test = cut(test_fraction) if test_fraction > 0 else None
    if valid_fraction > 0:
        t_valid = cut(valid_fraction + test_fraction)
    else:
        t_valid = t_test
    return {"t_valid": t_valid, "t_test": t_test}


def time_split_of(start: int, cutoffs: dict) -> str:
    """Split of a session starting at `start` (unix seconds) under `time_cutoffs`."""
    t_valid, t_test = cutoffs["t_valid"], cutoffs["t_test"]
    if t_test is not None and start >= t_test:
        return TEST
    if t_valid is not None and start >= t_valid:
        return VALID
    return TRAIN


# stats keys of the events of a split's sessions at or after a later split's cut-off
# (sessions go whole to the split of their start: DESIGN §6)
LATE_EVENTS = ("train_after_t_valid", "train_after_t_test", "valid_after_t_test")
_LATE = tuple((key, *key.split("_after_")) for key in LATE_EVENTS)  # (key, split, cut-off)


def late_events(times: list[int], name: str, cutoffs: dict) -> dict[str, int]:
    """The events of a session of split `name` (`times`, unix seconds, ascending) at or
    after the cut-offs of the splits after it, under `LATE_EVENTS` keys (only those > 0)."""
    late = {}
    for key, split_name, cutoff in _LATE:
        at = cutoffs.get(cutoff)
        if split_name == name and at is not None:
            n = len(times) - bisect.bisect_left(times, at)
            if n:
                late[key] = n
    return late


def user_split_of(user: str, valid_fraction: float, test_fraction: float, seed: int) -> str:
    """Split of every session of `user` under the cold-user split."""
    digest = hashlib.sha256(f"{seed}\x00{user}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return TEST
    if u < test_fraction + valid_fraction:
        return VALID
    return TRAIN
