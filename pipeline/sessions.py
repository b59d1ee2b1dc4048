"""Sessionization of one user's events (pure functions, DESIGN.md §6 steps 1-4; and a
row read twice, from two input files, read once).

Events are `(time_ms, order, item)` tuples, or `(time_ms, order, item, session_id)` for a
log with its own session ids: `order` is the input order (file rank, then line), so
sorting the tuples orders by (time, input order) deterministically.
"""
from __future__ import annotations

import bisect
import collections
import operator
from typing import NamedTuple, Sequence

# rows_filtered reasons counted by this module.
CAPPED = "max_events_per_user"
DUPLICATE = "duplicate_event"
REPEAT = "immediate_repeat"
SHORT = "short_session"
# stats.json: sessions (by --session-col) that start before an earlier one of their user ended
OVERLAPPING = "sessions_overlapping"
# stats.json: consecutive events within the sessions (as sessionized, before the vocabulary
# cut), and those of them at the same time (to the millisecond: their order is the input's)
PAIRS = "session_event_pairs"
SAME_TIME_PAIRS = "same_time_pairs"
# stats.json: of the same-time pairs, those whose two item ids are in ascending or
# descending order, as text and as (length, text) (numbers of any width in their numeric
# order): near all of them one way, the file was sorted by item id within a time (Amazon's
# review files are), an order the models would learn and the metrics reward; about half
# each way where the input's order is another
ID_ORDER = "same_time_pairs_in_id_order"
ID_ORDERS = ("ascending", "descending", "ascending_by_length", "descending_by_length")
# stats.json: consecutive events within the sessions at different times whose rows came in
# the input's order ("forward") and in reverse ("backward"): near all backward, the file
# lists events newest first, and so its same-time events (kept in input order) are reversed
INPUT_ORDER = "time_ordered_pairs_by_input_order"
INPUT_ORDERS = ("forward", "backward")
# stats.json: the users whose events reached sessionization (well-formed rows that --filter
# kept), and those of them left with no session (every one shorter than
# --min-session-length): a sparse log (reviews, purchases) can lose most of its users so
# while it keeps most of its events
USERS_SESSIONIZED = "users_sessionized"
USERS_WITH_NO_SESSION = "users_with_no_session"

RawEvent = tuple  # (time_ms, order, item) or (time_ms, order, item, session_id)


class Session(NamedTuple):
    """One session after collapsing.

    Attributes:
      items: raw item ids in order.
      times: unix seconds per event (floor of the milliseconds).
      tied: consecutive events at the same time (to the millisecond: in input order).
      run: the most events in a row at one time.
    """

    items: list[str]
    times: list[int]
    tied: int = 0
    run: int = 1

    @property
    def start(self) -> int:
        """Unix seconds of the first event."""
        return self.times[0]


def keep_most_recent(events: list[RawEvent], max_events: int) -> tuple[list[RawEvent], int]:
    """Orders events by (time, input order) and keeps the `max_events` most recent.

    Returns:
      (kept events in order, number dropped).
    """
    events = sorted(events)
    dropped = max(0, len(events) - max_events)
    return events[dropped:], dropped


def drop_duplicates(events: Sequence[RawEvent]) -> tuple[list[RawEvent], int]:
    """Drops the copies of rows read twice: overlapping exports, a file given twice under
    two names (`a.csv` and `a.csv.gz`), which at equal times the collapse of immediate
    repeats cannot catch (A B C A B C).

    Events are the same when their time, item (and session id) are; the input file (of
    `order`) tells a copy from a repeat. The rows of one file are the log's own, each an
    event however often it repeats one (a re-view in a log of whole-minute or whole-day
    times), and another file adds only those it holds more often than the files before:
    of each event, the most any one file holds of it is kept, the earliest of them.

    Returns:
      (remaining events in their order, number dropped).
    """
    from pipeline.sources import ORDERS_PER_FILE  # (here: that module imports Beam)

    first: dict = {}   # event -> order of its first row
    repeated: dict = {}   # event seen again -> [rows per file, rows kept]
    kept = []
    for e in events:
        key = (e[0], e[2]) if len(e) == 3 else (e[0], e[2], e[3])
        if key not in first:  # (nearly every row: kept as fast as a set would)
            first[key] = e[1]
            kept.append(e)
            continue
        entry = repeated.get(key)
        if entry is None:
            entry = repeated[key] = [collections.Counter({first[key] // ORDERS_PER_FILE: 1}), 1]
        in_file, file = entry[0], e[1] // ORDERS_PER_FILE
        in_file[file] += 1
        if in_file[file] > entry[1]:
            entry[1] = in_file[file]
            kept.append(e)
    return kept, len(events) - len(kept)


def _cut(ordered: list[RawEvent], max_events: int) -> tuple[int, list[RawEvent], int]:
    """(index of the first row at or after the cap's cut in rows ordered by (time, input
    order); the rows from there without their copies; how many copies went among them:
    `drop_duplicates`'s, done once). The cut is the time of the `max_events`-th most recent
    event, copies dropped: no row before it can be among the most recent events, however
    many more rows come. (A copy has its row's time, so the rows from the cut on lose the
    same copies alone as with the rows before them.)"""
    distinct, duplicates = drop_duplicates(ordered)
    if len(distinct) <= max_events:
        return 0, distinct, duplicates
    cut = distinct[-max_events][0]
    start = bisect.bisect_left(ordered, cut, key=lambda e: e[0])
    tail = distinct[bisect.bisect_left(distinct, cut, key=lambda e: e[0]):]
    return start, tail, len(ordered) - start - len(tail)


def bound_events(events: Sequence[RawEvent], max_events: int) -> tuple[list[RawEvent], int, int]:
    """Orders events by (time, input order), drops duplicates (`drop_duplicates`), then
    keeps the `max_events` most recent of the rest, in that order: a user's rows read
    twice keep as many distinct events as read once.

    Returns:
      (kept events in order, duplicates dropped, events dropped by the cap). A row older
      than the cap's cut counts as capped, a copy or not, so that the counts do not
      depend on which rows `bound_rows` met first (the runner's chunk order).
    """
    ordered = sorted(events)
    start, distinct, duplicates = _cut(ordered, max_events)
    events, capped = keep_most_recent(distinct, max_events)
    return events, duplicates, start + capped


def bound_rows(events: Sequence[RawEvent], max_events: int) -> tuple[list[RawEvent], int, int]:
    """Bounds a user's rows read so far, keeping what `bound_events` over all of them
    needs: the time of the `max_events`-th most recent event (copies dropped) is a cut
    before which no event can be among the user's `max_events` most recent, however many
    rows come later; every row at or after it stays, copies included (a copy arriving
    later must meet the row it copies). So the final `bound_events` keeps exactly the
    events of one pass over all the rows, in whatever order they came.

    Returns:
      (the rows kept, in order; 0 duplicates; the rows dropped, all capped, as
      `bound_events` counts every row before the cut).
    """
    ordered = sorted(events)
    start, _, _ = _cut(ordered, max_events)
    return ordered[start:], 0, start


def split_at_gaps(events: Sequence[RawEvent], gap_seconds: int) -> list[list[RawEvent]]:
    """Splits ordered events where the gap to the previous event is strictly > the gap."""
    gap_ms = gap_seconds * 1000
    sessions: list[list[RawEvent]] = []
    previous = None
    for event in events:
        if previous is None or event[0] - previous > gap_ms:
            sessions.append([])
        sessions[-1].append(event)
        previous = event[0]
    return sessions


def group_by_session(events: Sequence[RawEvent]) -> list[list[RawEvent]]:
    """The log's own sessions of ordered events: each session id's events in order, the
    sessions ordered by their first event (ids that come back later stay one session)."""
    groups: dict[str, list[RawEvent]] = {}
    for event in events:
        groups.setdefault(event[3], []).append(event)
    return list(groups.values())  # insertion order: the order of the first events


def overlapping(user_sessions: Sequence[Session]) -> int:
    """How many of a user's sessions (in order of their starts) start before an earlier one
    has ended: with the log's own session ids, such a session sees that earlier one whole as
    history, later events included (the model folds a session in when it ends)."""
    count, end = 0, None
    for s in user_sessions:
        if end is not None and s.times[0] < end:
            count += 1
        end = s.times[-1] if end is None else max(end, s.times[-1])
    return count


def collapse_repeats(events: Sequence[RawEvent]) -> tuple[list[RawEvent], int]:
    """Drops every event whose item equals the previous event's item.

    Returns:
      (remaining events, number dropped).
    """
    kept = [e for k, e in enumerate(events) if k == 0 or e[2] != events[k - 1][2]]
    return kept, len(events) - len(kept)


def sessionize(events: list[RawEvent], gap_seconds: int, min_length: int,
               max_events: int, session_ids: bool = False,
               pairs: collections.Counter | None = None) -> tuple[list[Session], collections.Counter]:
    """One user's events → sessions (DESIGN.md §6 steps 1-4).

    Args:
      events: the user's (time_ms, order, item[, session_id]) events in any order.
      gap_seconds: a gap strictly greater starts a new session (not with `session_ids`).
      session_ids: sessions are the log's own (`group_by_session`), not time gaps.
      min_length: sessions shorter than this after collapsing are dropped.
      max_events: only the most recent events are kept (bounded per-user state), after
        dropping duplicates (`drop_duplicates`).
      pairs: where given, `PAIRS` and `SAME_TIME_PAIRS` in it are increased by the kept
        sessions' consecutive events and those at the same time, `ID_ORDER + "." + order`
        by those of the latter in each of `ID_ORDERS`, and `INPUT_ORDER + "." + order` by
        the others in each of `INPUT_ORDERS`.

    Returns:
      (sessions in time order, rows_filtered counts by reason).
    """
    filtered: collections.Counter = collections.Counter()
    events, filtered[DUPLICATE], filtered[CAPPED] = bound_events(events, max_events)
    sessions = []
    consecutive = same_time = 0
    id_order = [0] * len(ID_ORDERS)
    input_order = [0] * len(INPUT_ORDERS)
    for raw in group_by_session(events) if session_ids else split_at_gaps(events, gap_seconds):
        kept, repeats = collapse_repeats(raw)
        filtered[REPEAT] += repeats
        if len(kept) < min_length:
            filtered[SHORT] += len(kept)
            continue
        consecutive += len(kept) - 1
        tied, run = _ties(kept, input_order)
        if tied:
            same_time += tied
            _count_id_order(kept, id_order)
        sessions.append(Session([e[2] for e in kept], [e[0] // 1000 for e in kept], tied, run))
    if pairs is not None:
        pairs[PAIRS] += consecutive
        pairs[SAME_TIME_PAIRS] += same_time
        for prefix, names, counts in ((ID_ORDER, ID_ORDERS, id_order),
                                      (INPUT_ORDER, INPUT_ORDERS, input_order)):
            for order, n in zip(names, counts):
                pairs[f"{prefix}.{order}"] += n
    return sessions, +filtered


def _ties(kept: Sequence[RawEvent], input_order: list[int]) -> tuple[int, int]:
    """(consecutive events of one session at the same time, the most in a row at one
    time); adds to `input_order` (as `INPUT_ORDERS`) its pairs at different times whose
    rows came in input order and in reverse (a tie is always in input order: events sort
    by (time, order))."""
    ms = [e[0] for e in kept]
    orders = [e[1] for e in kept]
    tied = sum(map(operator.eq, ms, ms[1:]))
    backward = sum(map(operator.gt, orders, orders[1:]))
    input_order[0] += len(ms) - 1 - tied - backward
    input_order[1] += backward
    if not tied:
        return 0, 1
    run = longest = 1
    for a, b in zip(ms, ms[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return tied, longest


def _count_id_order(kept: Sequence[RawEvent], counts: list[int]) -> None:
    """Adds to `counts` (as `ID_ORDERS`) the same-time pairs of one session whose item ids
    are in each order (after collapsing, no pair holds one item twice)."""
    for a, b in zip(kept, kept[1:]):
        if a[0] != b[0]:
            continue
        x, y = a[2], b[2]
        counts[0 if x < y else 1] += 1
        counts[2 if (len(x), x) < (len(y), y) else 3] += 1
