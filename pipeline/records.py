"""One user's sessions → the user's records of each split (pure function).

Train sessions lose their out-of-vocabulary events (and the immediate repeats that leaves:
A X A → A), and are dropped when left shorter than the minimum; valid/test sessions keep
such events as `schema.UNKNOWN_INDEX`. A valid or test record holds, as context, the
user's sessions of the earlier splits exactly as they were written there, then the user's
target sessions of its own split; a training record holds training sessions only, so it
never contains a valid or test event.
"""
from __future__ import annotations

import collections
from typing import NamedTuple, Sequence

from pipeline import schema
from pipeline.sessions import Session

OOV_IN_TRAIN = "unknown_item_in_train"
SHORT_AFTER_VOCABULARY = "short_train_session_after_vocabulary"
REPEAT_AFTER_VOCABULARY = "immediate_repeat_after_vocabulary"


class UserRecords(NamedTuple):
    """Output of `build_user_records`.

    Attributes:
      records: split → serialized SequenceExample (only splits with a target session).
      sessions: split → number of target sessions written.
      events: split → number of target events written.
      filtered: rows_filtered counts by reason.
      unknown: split → target events that are items outside the vocabulary (valid, test).
      longest: split → the most events of one target session written.
      times: split → the unix seconds of each target session's events written.
    """

    records: dict[str, bytes]
    sessions: dict[str, int]
    events: dict[str, int]
    filtered: collections.Counter
    unknown: dict[str, int] = {}
    longest: dict[str, int] = {}
    times: dict[str, list[list[int]]] = {}


def build_user_records(user: str, sessions: Sequence[Session], splits: Sequence[str],
                       index: dict[str, int], min_length: int) -> UserRecords:
    """Encodes a user's sessions and builds one record per split.

    Args:
      user: raw user id.
      sessions: the user's sessions in time order.
      splits: split name of each session (non-decreasing in `schema.SPLITS` order).
      index: vocabulary, raw item id → index.
      min_length: minimum train session length after dropping unknown items.

    Returns:
      A `UserRecords`.
    """
    filtered: collections.Counter = collections.Counter()
    targets: dict[str, list[tuple[list[int], list[int]]]] = {s: [] for s in schema.SPLITS}
    unknown: collections.Counter = collections.Counter()
    for session, split in zip(sessions, splits):
        if split == schema.SPLITS[0]:
            kept = [(index[i], t) for i, t in zip(session.items, session.times) if i in index]
            filtered[OOV_IN_TRAIN] += len(session.items) - len(kept)
            collapsed = [k for j, k in enumerate(kept) if j == 0 or k[0] != kept[j - 1][0]]
            filtered[REPEAT_AFTER_VOCABULARY] += len(kept) - len(collapsed)
            kept = collapsed
            if len(kept) < min_length:
                filtered[SHORT_AFTER_VOCABULARY] += len(kept)
                continue
            targets[split].append(([k[0] for k in kept], [k[1] for k in kept]))
        else:
            encoded = [index.get(i, schema.UNKNOWN_INDEX) for i in session.items]
            unknown[split] += encoded.count(schema.UNKNOWN_INDEX)
            targets[split].append((encoded, list(session.times)))
    ordered = [s for split in schema.SPLITS for s in targets[split]]
    item_features = schema.encode_int64_features([s[0] for s in ordered])
    time_features = schema.encode_int64_features([s[1] for s in ordered])
    records, n_sessions, n_events, longest = {}, {}, {}, {}
    context = 0
    for split in schema.SPLITS:
        own = targets[split]
        if own:
            end = context + len(own)
            records[split] = schema.assemble_sequence_example(
                user, context, item_features[:end], time_features[:end])
            n_sessions[split] = len(own)
            n_events[split] = sum(len(s[0]) for s in own)
            longest[split] = max(len(s[0]) for s in own)
        context += len(own)
    times = {split: [s[1] for s in own] for split, own in targets.items() if own}
    return UserRecords(records, n_sessions, n_events, +filtered, dict(+unknown), longest, times)
