"""Loads users' histories from a pipeline output into the state store.

A deployment starts with an empty state store: every user's first request after it is a
new user's, zero state and no history, however long their past in the log. `backfill`
replays each user's sessions of a data folder (the last split that holds the user: its
record carries the earlier sessions as context) through the served version's
`update_state`, as `end-session` would have one session at a time, and stores the state
with the recent sessions, so that returning users are served from their past at once.

Users are folded in batches (one `update_state` call per batch and session position). A
user the store already holds is left as it is (its record may be newer than the log);
`replace=True` overwrites a record of the same version, and `refresh=True` gives a user
whose newest record is an older version's (a model refresh) a record of this version:
the log's sessions, then the sessions the store counts beyond the log's (ended since it
was made), which its newest record holds. Each record is one transaction:
an interrupted run goes on where it stopped when run again. Item ids come from the
folder's `items.tsv`; an item the folder keeps as the unknown index (outside the
vocabulary, in valid and test) has lost its raw id there and is stored as `[UNK]`, which
every version reads as unknown.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from serving import state_store

# Users per update_state call: TF Serving's batching configuration in the README takes up
# to 32 rows a call (this project's server up to 64 with --enable-batching).
DEFAULT_BATCH_USERS = 32
# At most this many item slots (rows x the longest session) per update_state call: one
# long session would otherwise pad every row of its call to its length.
MAX_SLOTS_PER_CALL = 1 << 16
# A data folder whose items the version mostly does not know is another model's.
MIN_KNOWN_SHARE = 0.5


class BackfillError(ValueError):
    """The data folder does not fit the served version."""


@dataclasses.dataclass
class BackfillCounts:
    users: int = 0  # stored
    kept: int = 0  # already in the store (another version's newest record too), left as is
    # of `kept`: their newest record is an older version's, or another model's of this
    # version's number (`refresh`)
    kept_older: int = 0
    kept_uncounted: int = 0  # of `kept_older`: without a session count (`refresh` cannot)
    # of `kept_older`: counting fewer sessions than the log, yet its newest session is not
    # the log's (`refresh` cannot tell which sessions came after the log's)
    kept_unaligned: int = 0
    changed: int = 0  # of `kept`: written meanwhile (end-session, a backfill); rerun retries
    refreshed: int = 0  # of `users`: stored over a `kept_older` kind of newest record
    sessions: int = 0  # folded in
    events: int = 0


def item_names(data_dir: str) -> list[str]:
    """The folder's raw item ids by index, the unknown index as `[UNK]`."""
    from pipeline import schema

    names = list(schema.read_vocabulary(data_dir).ids)
    names[schema.UNKNOWN_INDEX] = schema.UNKNOWN_TOKEN
    return names


def check_catalogue(client, data_dir: str, names: Sequence[str] | None = None) -> None:
    """Raises `BackfillError` when fewer than half of the folder's 1,000 most frequent
    items are known to the client's pinned version (nothing when it cannot say)."""
    sample = list((item_names(data_dir) if names is None else names)[2:1002])
    if not sample:
        return
    known = client.known_ids(sample)
    if known is not None and len(known) < MIN_KNOWN_SHARE * len(sample):
        raise BackfillError(
            f"{len(sample) - len(known):,} of the {len(sample):,} most frequent items of "
            f"{data_dir} are unknown to version {client.pinned_version}: the folder is not the "
            "data this version was trained on (its states would be noise)")


def backfill(client, store: state_store.StateStore, data_dir: str, *,
             batch_users: int = DEFAULT_BATCH_USERS, replace: bool = False,
             max_users: int | None = None,
             on_users: Callable[[int], None] | None = None,
             counts: BackfillCounts | None = None,
             names: Sequence[str] | None = None, refresh: bool = False) -> BackfillCounts:
    """Stores the state and recent sessions of every user of `data_dir` for the client's
    pinned version (`client.pin()` first). Each user's record is one transaction: an
    interrupted run leaves whole records, and the same run again (without `replace`) goes
    on from where it stopped.

    Args:
      client: a pinned `serving.client.HierTCNClient`.
      store: the state store.
      data_dir: a pipeline output folder (the one the version was trained on, or a newer
        run of the pipeline over the same catalogue).
      batch_users: users per `update_state` call (fewer where sessions are long).
      replace: overwrite the user's record when the newest one is this version's (a
        user whose newest record is another version's is kept: its client has moved on,
        and a record from the log would roll it back).
      max_users: stop after this many users (None: all).
      on_users: called with the number of users handled (stored or kept) as they are.
      counts: the counts to add to (the caller's, to report an interrupted run).
      names: `item_names(data_dir)` that the caller has read and checked
        (`check_catalogue`); None: read and checked here.
      refresh: store a record of this version for a user whose newest record is an older
        version's (after a model refresh; kept by default, and this version then rebuilds
        the user from the stored recent sessions on the first request): the log's sessions,
        then those the store counts beyond the log's (`sessions_total` minus the log's
        sessions: taken as ended after the log was made, so the store's count must include
        the log's sessions, as it does where it was backfilled from this log or an earlier
        run of the pipeline over the same history), as far as the newest record holds them.
        A record without a count is kept.

    Raises:
      BackfillError: fewer than half of the folder's items are known to the version.
      serving.client.ServingError: a call failed.
    """
    from pipeline import schema

    if names is None:
        names = item_names(data_dir)
        check_catalogue(client, data_dir, names)
    version = client.pinned_version
    state_size = client.state_size()
    fingerprint = client.fingerprint()
    counts = BackfillCounts() if counts is None else counts
    seen: set[str] = set()
    batch: list[tuple[str, list[list[str]], object]] = []

    def flush() -> None:
        if batch:
            _store(client, store, batch, version, state_size, fingerprint, counts)
            if on_users:
                on_users(len(batch))
            batch.clear()

    for split in reversed(schema.SPLITS):  # the last split's record holds the earlier ones
        for record in schema.iter_users(data_dir, split):
            if record.user_id in seen:
                continue
            if max_users is not None and len(seen) >= max_users:
                break
            seen.add(record.user_id)
            stored = store.latest(record.user_id)
            # (a record this run does not overwrite: kept, or refreshed over)
            over = stored is not None and not (replace and stored.version == version)
            if over:
                stale = _stale(stored, version, state_size, fingerprint)
                older = stale and stored.sessions_total is not None
                if not (refresh and older):
                    counts.kept += 1
                    counts.kept_older += stale
                    counts.kept_uncounted += stale and stored.sessions_total is None
                    if on_users:
                        on_users(1)
                    continue
            sessions = [[names[i] for i in session] for session in record.sessions]
            total = len(sessions)
            if over:
                since = with_sessions_since(sessions, stored)
                if since is None:  # (its sessions since the log cannot be told: kept)
                    counts.kept += 1
                    counts.kept_older += 1
                    counts.kept_unaligned += 1
                    if on_users:
                        on_users(1)
                    continue
                sessions, total = since
            batch.append((record.user_id, sessions, stored, total))
            if len(batch) >= batch_users:
                flush()
        flush()
    return counts


def with_sessions_since(sessions: list[list[str]], stored: state_store.UserState
                        ) -> tuple[list[list[str]], int] | None:
    """The log's `sessions` of a user, then those its newest stored record (of an older
    version, counted) holds beyond them, ended since the log was made; and the user's
    session count after them. None where the record counts fewer sessions than the log
    yet its newest session is not among the log's: a store that never took the log (a
    file of a version before backfill, or live sessions only) counts its own sessions,
    which may all have ended after the log's (appending none lost them, without a word).

    Those are the stored count beyond the log's, where the stored session before them is
    the log's last (`state_store.sessions_behind`); else the stored sessions after the
    log's last one (where the log's session before it precedes it there too): two pipeline
    runs, or a one-item session ended live, count differently (re-appending by the counts
    alone folded a session twice). The newest record holds the
    last few sessions (an older one cut to the history bound).
    """
    counted = stored.sessions_total - len(sessions)
    if counted < 0:  # the store is behind the log (its count must include the log's): none,
        # where the log holds its newest session
        newest, cut = stored.sessions[-1] if stored.sessions else (), len(stored.sessions) == 1
        if newest and not any(state_store._alike(newest, s, cut) for s in sessions):
            return None
        beyond = 0
    else:
        beyond = state_store.sessions_behind(stored.sessions, sessions[-1] if sessions else (),
                                             counted, sessions[-2] if len(sessions) > 1 else None)
        beyond = min(counted if beyond is None else beyond, len(stored.sessions))
    since = [list(s) for s in stored.sessions[len(stored.sessions) - beyond:]]
    return sessions + since, max(stored.sessions_total, len(sessions) + beyond)


def _calls(rows: list[int], lengths: dict[int, int]) -> list[list[int]]:
    """`rows` in groups of at most MAX_SLOTS_PER_CALL slots (rows x the longest), shortest
    sessions first; a session longer than that goes alone."""
    groups: list[list[int]] = []
    for r in sorted(rows, key=lambda r: lengths[r]):
        if groups and (len(groups[-1]) + 1) * lengths[r] <= MAX_SLOTS_PER_CALL:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _stale(stored: state_store.UserState, version: int, state_size: int,
           fingerprint: np.ndarray | None) -> bool:
    """Whether a stored record is an older version's, or another model's exported under
    this version's number (its fingerprint or state size differs: a new export base numbers
    from 1 again), whose state means nothing to this model; such a record of this number
    was "kept (a record of this version)" and --refresh passed it by (audit)."""
    return stored.version < version or (stored.version == version and (
        stored.state.shape != (state_size,)
        or not state_store.same_model(stored.fingerprint, fingerprint)))


def _store(client, store: state_store.StateStore, batch: list, version: int, state_size: int,
           fingerprint: np.ndarray, counts: BackfillCounts) -> None:
    """Folds the batch's sessions position by position and writes each user's record, on
    the condition that it is still the one read (a live end-session in between wins)."""
    states = np.zeros([len(batch), state_size], np.float32)
    longest = max(len(sessions) for _, sessions, _, _ in batch)
    for position in range(longest):
        rows = [r for r, (_, sessions, _, _) in enumerate(batch) if len(sessions) > position]
        lengths = {r: max(len(batch[r][1][position]), 1) for r in rows}
        for group in _calls(rows, lengths):
            states[group] = client.update_state(states[group],
                                                [batch[r][1][position] for r in group])
    ids = list(dict.fromkeys(item for _, sessions, _, _ in batch for s in sessions
                             for item in s))
    known: set[str] | None = set()
    for start in range(0, len(ids), MAX_SLOTS_PER_CALL):  # (long histories: many ids)
        part = client.known_ids(ids[start:start + MAX_SLOTS_PER_CALL])
        known = None if part is None else known | part
        if known is None:
            break
    for (user, sessions, stored, total), state in zip(batch, states):
        try:
            store.put(user, version, state, sessions, expected=stored, fingerprint=fingerprint,
                      sessions_total=total, known=known)
        except state_store.StateConflict:  # written meanwhile (end-session, a backfill)
            counts.kept += 1
            counts.changed += 1
            continue
        counts.users += 1
        counts.refreshed += stored is not None and _stale(stored, version, state_size,
                                                          fingerprint)
        counts.sessions += len(sessions)
        counts.events += sum(len(s) for s in sessions)


class _ProgressLines:
    """Progress as a line every `every` seconds, for a stderr that is not a terminal (a
    scheduler's log), where a bar redrawn with carriage returns would be one long line."""

    def __init__(self, counts: BackfillCounts, disabled: bool, every: float = 30.0,
                 total: int | None = None):
        import time

        self.counts, self.disabled, self.every, self.total = counts, disabled, every, total
        self.clock = time.monotonic
        self.start = self.shown = self.clock()
        self.handled = 0

    def update(self, n: int) -> None:
        import sys

        self.handled += n
        now = self.clock()
        if self.disabled or now - self.shown < self.every:
            return
        self.shown = now
        spent = now - self.start
        of, left = "", ""
        if self.total:
            of = f" of {self.total:,}"
            if self.handled < self.total:
                left = f", about {(self.total - self.handled) * spent / self.handled:.0f} s left"
        print(f"backfill: {self.handled:,}{of} users handled ({self.counts.users:,} stored, "
              f"{self.counts.kept:,} kept) in {spent:.0f} s{left}", file=sys.stderr,
              flush=True)


def _users_to_handle(data_dir: str, max_users: int | None) -> int | None:
    """The users the backfill goes through: stats.json's count of users written (None for
    a folder from a pipeline before it counted them: the progress has no total)."""
    from pipeline import schema

    written = schema.read_stats(data_dir).get(schema.USERS_WRITTEN)
    if not isinstance(written, int) or isinstance(written, bool) or written <= 0:
        return None
    return written if max_users is None else min(written, max_users)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.backfill`; returns the exit status."""
    import json
    import sys

    from model import cli as model_cli
    from pipeline import argtypes
    from serving import cli

    parser = argtypes.Parser(prog="python -m serving.backfill",
                             project_version=False,  # (--version: the model version's)
                             description="Store every user's state and recent sessions from "
                                         "a pipeline output for the served version, so that "
                                         "returning users are served from their past at once.",
                             formatter_class=argtypes.DefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=argtypes.home_path,
                        help="the pipeline output the served version was trained on")
    cli.add_connection_args(parser, timeout=60.0)
    parser.add_argument("--model-name", required=True, type=cli.model_name,
                        help="the served model's name")
    parser.add_argument("--version", type=argtypes.positive_int, default=None,
                        help="the version to store states for (default: the latest)")
    parser.add_argument("--state-db", default="user_states.sqlite", type=cli.state_db,
                        help="SQLite file of user states (created when missing)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite the users whose newest record is this version's (kept "
                             "by default: their records may be newer than the log; another "
                             "version's newest record is kept but with --refresh)")
    parser.add_argument("--refresh", action="store_true",
                        help="after a model refresh: give the users whose newest record is an "
                             "older version's a record of this version, folded from the log "
                             "and then from the sessions the store counts beyond the log's "
                             "(ended since it was made; the store's count must include the "
                             "log's sessions: a store backfilled from this log or an earlier "
                             "run over the same history). Without it this version rebuilds "
                             "each from the stored recent sessions on the first request")
    parser.add_argument("--batch-users", type=argtypes.positive_int,
                        default=DEFAULT_BATCH_USERS,
                        help="users per update_state call, at most the server's batch size "
                             "(fewer where sessions are long)")
    parser.add_argument("--max-users", type=argtypes.positive_int, default=None,
                        help="stop after this many users (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    wrong = cli.connection_error(args)
    if wrong:
        parser.error(wrong)
    from model import quiet

    quiet.import_tensorflow()  # (the records are read with tf.data) its notes held back
    from tqdm import tqdm

    from pipeline import schema
    from serving.client import HierTCNClient, ServingError

    counts, version = BackfillCounts(), None
    new_store = not os.path.lexists(args.state_db)
    try:
        # a wrong folder, or a file (the raw log, its items.tsv): said before anything is made
        model_cli.check_data_folder(args.data)
        names = item_names(args.data)
        for split in schema.SPLITS:  # (a split without shards failed once the store was made)
            schema.shard_files(args.data, split)
        with HierTCNClient(args.target, args.model_name, args.timeout,
                           session_width=args.session_width, tls=args.tls, tls_ca=args.tls_ca,
                           tls_server_name=args.tls_server_name) as client:
            version = client.pin(args.version)
            check_catalogue(client, args.data, names)
            tty = sys.stderr.isatty()
            total = _users_to_handle(args.data, args.max_users)
            bar = tqdm(desc=f"backfill version {version}", unit="user", file=sys.stderr,
                       disable=args.no_progress or not tty, mininterval=1.0, total=total)
            lines = _ProgressLines(counts, args.no_progress or tty,  # (a log: a line a while)
                                   total=total)

            def on_users(n: int) -> None:
                bar.update(n)
                lines.update(n)

            with state_store.SQLiteStateStore(args.state_db) as store, bar:
                try:
                    backfill(client, store, args.data, batch_users=args.batch_users,
                             replace=args.replace, max_users=args.max_users,
                             on_users=on_users, counts=counts, names=names,
                             refresh=args.refresh)
                except ValueError:
                    if not store.moved():  # (the store refuses to write on: said below)
                        raise
                if store.moved():
                    print(f"error: {args.state_db} was removed or replaced while the backfill "
                          f"ran: the {counts.users:,} user{'s' * (counts.users != 1)} it "
                          "stored went to a file no one can open now; run it again",
                          file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        if new_store and not counts.users:
            state_store.remove_if_no_record(args.state_db)
        print(f"\ninterrupted: {counts.users:,} users stored in {args.state_db} (each record "
              "whole); the same command goes on from there", file=sys.stderr)
        return 130
    except (ServingError, schema.DataError, BackfillError, ValueError) as e:
        if new_store and not counts.users:  # (a damaged shard found on the first read)
            state_store.remove_if_no_record(args.state_db)
        hint = ("; pass a smaller --batch-users" if "batch size" in str(e) else "")
        then = ("once the folder can be read whole (its permissions, a restored copy, a "
                "rerun of the pipeline), the same command goes on from there"
                if isinstance(e, schema.DataError) else
                "the same command goes on from there")
        print(f"error: {e}{hint}"
              + (f" ({counts.users:,} users stored before it; {then})" if counts.users else ""),
              file=sys.stderr)
        return 1
    result = {"model": args.model_name, "version": version, "data": args.data,
              "state_db": args.state_db, **dataclasses.asdict(counts)}
    same = counts.kept - counts.kept_older - counts.changed
    older = counts.kept_older - (counts.kept_uncounted if args.refresh else 0) \
        - counts.kept_unaligned
    def users(n: int, rest: str) -> str:
        """"N users<rest>", or for one "1 user<rest>" with its verbs and nouns singular."""
        if n != 1:
            return f"{n:,} users{rest}"
        for plural, singular in (("' records", "'s record"), (" were ", " was "),
                                 ("' states", "'s state")):
            rest = rest.replace(plural, singular)
        return f"1 user{rest}"

    print(json.dumps(result) if args.json else
          "stored " + users(counts.users, "' states") + f" ({counts.sessions:,} sessions, "
          f"{counts.events:,} events) for {args.model_name} version {version} in "
          f"{args.state_db}"
          + (f" ({counts.refreshed:,} over an older version's record, or another model's "
             "of this number)" if counts.refreshed else "")
          + ("; " + users(same, " already there were kept (a record of this version, which "
                                "--replace overwrites, or of a newer one)") if same else "")
          + ("; " + users(older, " whose newest record is an older version's (or another "
                                 "model's of this number) were kept: this "
                                 "version rebuilds each from its stored recent sessions on its "
                                 "first request (--refresh folds the log for them, then the "
                                 "sessions stored since)") if older else "")
          + ("; " + users(counts.kept_uncounted, " whose newest record is an older version's "
                          "without a session count (written before the store counted "
                          "sessions) were kept: nothing says which of their stored sessions "
                          "the log holds") if args.refresh and counts.kept_uncounted else "")
          + ("; " + users(counts.kept_unaligned, " whose newest record is an older version's, "
                          "counting fewer sessions than the log but ending with a session "
                          "the log does not hold (a store that never took the log), were "
                          "kept: nothing says which of their stored sessions came after the "
                          "log's") if counts.kept_unaligned else "")
          + ("; " + users(counts.changed, "' records changed while this ran (written by a "
                          "live end-session or another backfill) and were kept: the same "
                          "command again handles them") if counts.changed else ""))
    return 0


if __name__ == "__main__":
    from model import processes
    from pipeline import argtypes

    # SIGTERM (a scheduler's stop) is Ctrl-C: the line that says how many users were
    # stored, exit 130 (it ended the process without a word, status 143); before the
    # store is opened (TensorFlow's import) nothing was stored
    _NOTHING = "interrupted: nothing was stored"
    argtypes.survive_closed_output()  # (a full disk under `> log`: said at the end)
    argtypes.interrupts_in_one_line(_NOTHING)
    with argtypes.sigterm_as_interrupt():
        _status = processes.interrupted_is(_NOTHING, main)
    processes.exit_now(_status)
