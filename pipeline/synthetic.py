"""Synthetic interaction log with planted cross-session structure.

`python -m pipeline.synthetic --output FILE --users N [--seed S] [--repeat-prob P] ...`
writes a CSV raw log (header `user,item,time`, unix seconds, rows in time order like a
real log); `generate(...)` returns the same rows for tests and benchmarks. Same seed,
same bytes.

Generative story:

1. Catalogue. `items` items are dealt round-robin into `topics` latent topics. A global
   Zipf law (exponent `zipf`) over a random permutation of the catalogue gives every item
   a popularity; within a topic, items are sampled proportionally to it (popularity skew).
   Each topic also orders its items in a random chain: "what tends to come next".
2. Users. Each user has long-term interests: 1-3 favourite topics with Dirichlet weights,
   and 3 favourite items per favourite topic. Interests drift slowly: before each session,
   with probability `drift`, one favourite topic is replaced by a random other topic (with new
   favourite items). A user has 5-30 sessions (`sessions`).
3. Sessions. A session's intent is one of the user's current favourite topics (with
   probability 0.9, by weight; otherwise a random topic). The first item is one of the
   user's favourite items of that topic with probability 0.6 (this is the cross-session
   signal: history predicts how a session starts and which topic it is about); inside
   the session the intent switches to another favourite topic with probability 0.05 per
   event. Each next event is, in order of precedence:
   - with probability `repeat_prob`, a revisit of an item of the user's own history
     (previous sessions and this one), recency-biased: the k-th most recent distinct
     item other than the previous one is chosen with weight 0.8^k;
   - with probability 0.5, a successor of the previous item in the intent topic's chain
     (1-3 steps ahead): short-term sequential structure;
   - else an item of the intent topic by popularity, or, with probability 0.15, of any
     topic by popularity (noise).
   With probability 0.05 an event is a duplicate click (the same item again), which the
   pipeline collapses. Session length is 1 + Poisson(6), so a few sessions are single
   events and get dropped.
4. Time. Users start uniformly within the first 30 days of a 90-day window; events are
   10 s-10 min apart (log-uniform), sessions 2 h-5 days apart (log-uniform), so the
   default 30-minute gap recovers the planted sessions.

The default of 700 users yields ~88k raw events, ~79k after the pipeline: the demo size.
"""
from __future__ import annotations

import array
import os
import sys
import uuid
from typing import NamedTuple

import numpy as np

from pipeline import argtypes, storage

DEFAULT_USERS = 700
START_TIME = 1_600_000_000


# rows written a block at a time
WRITE_BLOCK = 100_000

# The command's bounds: the log is built in memory (24 bytes an event) before it is written,
# so a size it cannot hold is refused up front rather than run for hours into an
# out-of-memory kill (`--users 10**30` hung). The default user has about 122 events (17.5
# sessions of 7 events): 10 million users are about 1.2 billion events.
MAX_USERS = 10_000_000
MAX_ITEMS = 10_000_000  # (the catalogue's own arrays: popularity, chains, topics)
MAX_SESSIONS = 100_000  # per user
MAX_LOG_EVENTS = 1_000_000_000  # about 24 GB of arrays
EVENTS_PER_SESSION = 7  # 1 + Poisson(6), on average


class Row(NamedTuple):
    """One raw event."""

    user: int
    item: int
    time: int


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def generate(users: int = DEFAULT_USERS, **options) -> list[Row]:
    """Generates the log (see the module docstring for the story) as rows sorted by (time,
    user); `options` and errors as `generate_arrays`."""
    return [Row(*r) for r in zip(*(a.tolist() for a in generate_arrays(users, **options)))]


def generate_arrays(users: int = DEFAULT_USERS, *, seed: int = 0, items: int = 5000,
                    topics: int = 50, repeat_prob: float = 0.3, drift: float = 0.1,
                    zipf: float = 1.0, sessions: tuple[int, int] = (5, 30),
                    max_events: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generates the log (see the module docstring for the story) as int64 arrays (24 bytes
    an event, where a list of rows took about 200).

    Args:
      users: number of users.
      seed: random seed; the output is a pure function of the arguments.
      items: catalogue size.
      topics: number of latent topics.
      repeat_prob: probability that an event revisits an item of the user's history.
      drift: per-session probability that one long-term interest is replaced.
      zipf: exponent of the global popularity law.
      sessions: (fewest, most) sessions per user, drawn uniformly.
      max_events: stop after this many events (users are generated in turn), if given.

    Returns:
      (user, item, time) arrays sorted by (time, user), ties in the order generated.

    Raises:
      ValueError: an argument out of range.
    """
    if not 0 <= repeat_prob <= 1 or not 0 <= drift <= 1:
        raise ValueError(f"repeat_prob and drift must be in [0, 1], got {repeat_prob}, {drift}")
    # a user likes up to 3 topics (one more to drift to) and 3 favourite items of each
    fewest_topics = 4 if drift > 0 else 3
    if users < 1 or topics < fewest_topics or items < 3 * topics:
        raise ValueError(f"need users >= 1, topics >= {fewest_topics}"
                         f"{' (3 with drift 0)' if drift > 0 else ''} and items >= 3 x topics, "
                         f"got {users} users, {topics} topics, {items} items")
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    if not 1 <= sessions[0] <= sessions[1]:
        raise ValueError(f"sessions must be (fewest, most) with 1 <= fewest <= most, got {sessions}")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** zipf
    popularity = popularity[rng.permutation(items)]
    topic_items = [np.arange(t, items, topics) for t in range(topics)]
    topic_probs = [popularity[ti] / popularity[ti].sum() for ti in topic_items]
    topic_cdfs = [np.cumsum(p) for p in topic_probs]
    chains = [rng.permutation(ti) for ti in topic_items]
    chain_pos = np.empty(items, dtype=np.int64)
    for chain in chains:
        chain_pos[chain] = np.arange(len(chain))
    item_topic = np.arange(items) % topics
    rows = (array.array("q"), array.array("q"), array.array("q"))  # user, item, time

    def emit(user, item, t):
        rows[0].append(user)
        rows[1].append(item)
        rows[2].append(int(t))

    def favourites_of(topic):
        return list(rng.choice(topic_items[topic], size=3, replace=False, p=topic_probs[topic]))

    def by_popularity(topic):
        k = np.searchsorted(topic_cdfs[topic], rng.random() * topic_cdfs[topic][-1], side="right")
        return int(topic_items[topic][min(k, len(topic_items[topic]) - 1)])

    for user in range(users):
        n_fav = int(rng.integers(1, 4))
        fav_topics = [int(t) for t in rng.choice(topics, size=n_fav, replace=False)]
        weights = rng.dirichlet(np.ones(n_fav))
        fav_items = {t: favourites_of(t) for t in fav_topics}
        history: list[int] = []
        t = START_TIME + rng.uniform(0, 30 * 86400)
        for _ in range(int(rng.integers(sessions[0], sessions[1] + 1))):
            if rng.random() < drift:
                k = int(rng.integers(n_fav))
                del fav_items[fav_topics[k]]
                fav_topics[k] = int(rng.choice(np.setdiff1d(np.arange(topics), fav_topics)))
                fav_items[fav_topics[k]] = favourites_of(fav_topics[k])
            if rng.random() < 0.9:
                intent = fav_topics[int(rng.choice(n_fav, p=weights))]
            else:
                intent = int(rng.integers(topics))
            item = -1
            for position in range(1 + int(rng.poisson(6))):
                if item >= 0 and rng.random() < 0.05:
                    emit(user, item, t)
                    t += _log_uniform(rng, 10, 600)
                    continue
                if position > 0 and rng.random() < 0.05 and n_fav > 1:
                    intent = fav_topics[int(rng.integers(n_fav))]
                if position == 0 and intent in fav_items and rng.random() < 0.6:
                    item = int(rng.choice(fav_items[intent]))
                elif history and rng.random() < repeat_prob and (recent := [
                        i for i in dict.fromkeys(reversed(history[-200:])) if i != item]):
                    w = 0.8 ** np.arange(len(recent))
                    item = int(recent[int(rng.choice(len(recent), p=w / w.sum()))])
                elif item >= 0 and item_topic[item] == intent and rng.random() < 0.5:
                    chain = chains[intent]
                    item = int(chain[(chain_pos[item] + int(rng.integers(1, 4))) % len(chain)])
                elif rng.random() < 0.15:
                    item = by_popularity(int(rng.integers(topics)))
                else:
                    item = by_popularity(intent)
                history.append(item)
                emit(user, item, t)
                t += _log_uniform(rng, 10, 600)
            t += _log_uniform(rng, 2 * 3600, 5 * 86400)
        if max_events is not None and len(rows[0]) >= max_events:
            for column in rows:
                del column[max_events:]
            break
    user, item, time = (np.frombuffer(column, np.int64) for column in rows)
    order = np.lexsort((user, time))  # (stable: ties in the order generated)
    return user[order], item[order], time[order]


def write_csv(path: str, rows) -> None:
    """Writes rows (a list of `Row`s, or `generate_arrays`' arrays) as CSV with header
    `user,item,time` (its folder created when missing), through a hidden file beside it and
    a rename: a kill never leaves a cut log."""
    if isinstance(rows, tuple) and rows and isinstance(rows[0], np.ndarray):  # (generate_arrays')
        rows = _ArrayRows(rows)
    elif not isinstance(rows, list):  # (an iterable of rows)
        rows = list(rows)
    path = storage.link_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # (a new file of an unguessable name: a planted link in a shared folder is not followed;
    # short: one made from the log's own name passed the 255-byte limit where the log's did not)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1][:16]}")
    try:
        with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), "w",
                       encoding="utf-8") as f:
            f.write("user,item,time\n")
            for start in range(0, len(rows), WRITE_BLOCK):  # (not one string of the log)
                f.write("".join(f"{r.user},{r.item},{r.time}\n"
                                for r in rows[start:start + WRITE_BLOCK]))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _ArrayRows:
    """`generate_arrays`' columns, read as a sequence of `Row`s a slice at a time."""

    def __init__(self, columns):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, where: slice) -> list[Row]:
        return [Row(*r) for r in zip(*(c[where].tolist() for c in self.columns))]


def parse_range(text: str) -> tuple[int, int]:
    """"MIN,MAX" -> (MIN, MAX), e.g. a `--sessions` option.

    Raises:
      ValueError: not two comma-separated integers.
    """
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"must be MIN,MAX (two integers), got {text!r}") from None
    return low, high


def expected_events(users: int, sessions: tuple[int, int]) -> int:
    """About how many events `generate_arrays` makes for `users` users (no `max_events`)."""
    return round(users * (sessions[0] + sessions[1]) / 2 * EVENTS_PER_SESSION)


def main(argv=None) -> int:
    """CLI entry point."""
    p = argtypes.Parser(prog="python -m pipeline.synthetic",
                                description=__doc__.split("\n")[0],
                                formatter_class=argtypes.DefaultsHelpFormatter)
    p.add_argument("--output", required=True, metavar="FILE", type=argtypes.local_path)
    p.add_argument("--users", type=argtypes.number(int, 1, high=MAX_USERS), default=DEFAULT_USERS,
                   help="number of users")
    p.add_argument("--seed", type=argtypes.non_negative_int, default=0,
                   help="random seed (same seed, same log)")
    p.add_argument("--items", type=argtypes.number(int, 1, high=MAX_ITEMS), default=5000,
                   help="catalogue size")
    p.add_argument("--topics", type=argtypes.number(int, 1, high=MAX_ITEMS), default=50,
                   help="number of latent topics")
    p.add_argument("--repeat-prob", type=float, default=0.3,
                   help="probability that an event revisits an item of the user's history")
    p.add_argument("--drift", type=float, default=0.1,
                   help="per-session probability that one long-term interest is replaced")
    # (an exponent beyond 10 makes the popularity of a large catalogue's tail 0 in float64:
    # nan and inf were numpy's "Probabilities contain NaN")
    p.add_argument("--zipf", type=argtypes.number(float, -10.0, high=10.0), default=1.0,
                   help="exponent of the global popularity law")
    p.add_argument("--sessions", default="5,30", metavar="MIN,MAX",
                   help="sessions per user, drawn uniformly from MIN..MAX")
    p.add_argument("--max-events", type=argtypes.positive_int, default=None,
                   help="stop after this many events (for sizing benchmarks)")
    args = p.parse_args(argv)
    if not args.output:  # (it wrote a hidden file in the parent of the current folder)
        p.error("--output is empty: name the CSV file to write")
    if os.path.isdir(args.output):
        p.error(f"--output {args.output} is a folder: name the CSV file to write")
    try:
        sessions = parse_range(args.sessions)
    except ValueError as e:
        p.error(f"--sessions {e}")
    if not 1 <= sessions[0] <= sessions[1] <= MAX_SESSIONS:
        p.error(f"--sessions must be MIN,MAX with 1 <= MIN <= MAX <= {MAX_SESSIONS:,}, "
                f"got {args.sessions}")
    # (a Ctrl-C printed a traceback; the log is written through a hidden file and a rename)
    argtypes.interrupts_in_one_line(f"\ninterrupted: nothing was written to {args.output}")
    events = expected_events(args.users, sessions)
    if min(events, args.max_events or events) > MAX_LOG_EVENTS:
        p.error(f"--users {args.users} with --sessions {args.sessions} make about {events:,} "
                f"events, over the {MAX_LOG_EVENTS:,} this command holds in memory (24 bytes "
                "each): pass fewer users or sessions, or --max-events")
    try:
        rows = generate_arrays(args.users, seed=args.seed, items=args.items, topics=args.topics,
                        repeat_prob=args.repeat_prob, drift=args.drift, zipf=args.zipf,
                        sessions=sessions, max_events=args.max_events)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_csv(args.output, rows)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    print(f"synthetic: {len(rows[0]):,} events of {len(np.unique(rows[0])):,} users → "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    argtypes.survive_closed_output()  # (`2>&-`, an ASCII-only stdout: the log is written)
    sys.exit(main())
