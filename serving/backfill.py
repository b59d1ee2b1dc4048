"""Loads users' histories from a pipeline output into the state store.

A deployment starts with an empty state store: every user's first request after it is a
new user's, zero state and no history, however long their past in the log. `backfill`
replays each user's sessions of a data folder (the last split that holds the user: its
record carries the earlier sessions as context) through the served version's
`update_state`, as `end-session` would have one session at a time, and stores the state
with the recent sessions, so that returning users are served from their past at once.

Users are folded in batches (one `update_state` call per batch and session position). A
user the store already holds is left as it is (its record may be newer than the log);
`replace=True` overwrites it. Item ids come from the folder's `items.tsv`; an item the
folder keeps as the unknown index (outside the vocabulary, in valid and test) has lost
its raw id there and is stored as `[UNK]`, which every version reads as unknown.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from serving import state_store

# Users per update_state call.
DEFAULT_BATCH_USERS = 256
# A data folder whose items the version mostly does not know is another model's.
MIN_KNOWN_SHARE = 0.5


class BackfillError(ValueError):
    """The data folder does not fit the served version."""


@dataclasses.dataclass
class BackfillCounts:
    users: int = 0  # stored
    kept: int = 0  # already in the store, left as they were
    sessions: int = 0  # folded in
    events: int = 0


def backfill(client, store: state_store.StateStore, data_dir: str, *,
             batch_users: int = DEFAULT_BATCH_USERS, replace: bool = False,
             max_users: int | None = None,
             on_users: Callable[[int], None] | None = None) -> BackfillCounts:
    """Stores the state and recent sessions of every user of `data_dir` for the client's
    pinned version (`client.pin()` first).

    Args:
      client: a pinned `serving.client.HierTCNClient`.
      store: the state store.
      data_dir: a pipeline output folder (the one the version was trained on, or a newer
        run of the pipeline over the same catalogue).
      batch_users: users per `update_state` call.
      replace: overwrite the records of users the store already holds.
      max_users: stop after this many users (None: all).
      on_users: called with the number of users handled (stored or kept) after each batch.

    Raises:
      BackfillError: fewer than half of the folder's items are known to the version.
      serving.client.ServingError: a call failed.
    """
    from pipeline import schema

    vocab = schema.read_vocabulary(data_dir)
    names = list(vocab.ids)
    names[schema.UNKNOWN_INDEX] = schema.UNKNOWN_TOKEN
    version = client.pinned_version
    state_size = client.state_size()
    fingerprint = client.fingerprint()
    _check_catalogue(client, names[2:], data_dir, version)
    counts = BackfillCounts()
    seen: set[str] = set()
    batch: list[tuple[str, list[list[str]]]] = []

    def flush() -> None:
        if batch:
            _store(client, store, batch, version, state_size, fingerprint, replace, counts)
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
            if not replace and store.latest(record.user_id) is not None:
                counts.kept += 1
                if on_users:
                    on_users(1)
                continue
            batch.append((record.user_id,
                          [[names[i] for i in session] for session in record.sessions]))
            if len(batch) >= batch_users:
                flush()
        flush()
    return counts


def _check_catalogue(client, items: Sequence[str], data_dir: str, version: int) -> None:
    sample = list(items[:1000])
    if not sample:
        return
    known = client.known_ids(sample)
    if known is not None and len(known) < MIN_KNOWN_SHARE * len(sample):
        raise BackfillError(
            f"{len(sample) - len(known):,} of the {len(sample):,} most frequent items of "
            f"{data_dir} are unknown to version {version}: the folder is not the data this "
            "version was trained on (its states would be noise)")


def _store(client, store: state_store.StateStore, batch: list[tuple[str, list[list[str]]]],
           version: int, state_size: int, fingerprint: np.ndarray, replace: bool,
           counts: BackfillCounts) -> None:
    """Folds the batch's sessions position by position and writes each user's record."""
    states = np.zeros([len(batch), state_size], np.float32)
    longest = max(len(sessions) for _, sessions in batch)
    for position in range(longest):
        rows = [r for r, (_, sessions) in enumerate(batch) if len(sessions) > position]
        states[rows] = client.update_state(states[rows],
                                           [batch[r][1][position] for r in rows])
    ids = list(dict.fromkeys(item for _, sessions in batch for s in sessions for item in s))
    known = client.known_ids(ids)
    for (user, sessions), state in zip(batch, states):
        try:
            store.put(user, version, state, sessions, expected=state_store.ANY if replace else None,
                      fingerprint=fingerprint, sessions_total=len(sessions),
                      known=known)
        except state_store.StateConflict:  # written meanwhile (a live end-session): newer
            counts.kept += 1
            continue
        counts.users += 1
        counts.sessions += len(sessions)
        counts.events += sum(len(s) for s in sessions)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.backfill`; returns the exit status."""
    import json
    import sys

    from pipeline import argtypes

    parser = argtypes.Parser(prog="python -m serving.backfill",
                             description="Store every user's state and recent sessions from "
                                         "a pipeline output for the served version, so that "
                                         "returning users are served from their past at once.",
                             formatter_class=argtypes.DefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=argtypes.local_path,
                        help="the pipeline output the served version was trained on")
    parser.add_argument("--target", default="127.0.0.1:8500", help="HOST:PORT of the server")
    parser.add_argument("--model-name", required=True, help="the served model's name")
    parser.add_argument("--version", type=argtypes.positive_int, default=None,
                        help="the version to store states for (default: the latest)")
    parser.add_argument("--state-db", default="user_states.sqlite", type=argtypes.local_path,
                        help="SQLite file of user states (created when missing)")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite the users the store already holds (kept by default: "
                             "their records may be newer than the log)")
    parser.add_argument("--batch-users", type=argtypes.positive_int,
                        default=DEFAULT_BATCH_USERS, help="users per update_state call")
    parser.add_argument("--max-users", type=argtypes.positive_int, default=None,
                        help="stop after this many users (default: all)")
    parser.add_argument("--timeout", type=argtypes.positive_float, default=60.0,
                        help="seconds per call")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from model import quiet

    quiet.import_tensorflow()  # (the records are read with tf.data) its notes held back
    from tqdm import tqdm

    from pipeline import schema
    from serving.client import HierTCNClient, ServingError

    try:
        schema.read_vocabulary(args.data)  # a wrong folder: said before anything is made
        with HierTCNClient(args.target, args.model_name, args.timeout, tls=args.tls) as client:
            version = client.pin(args.version)
            bar = tqdm(desc=f"backfill version {version}", unit="user", file=sys.stderr,
                       disable=args.no_progress or not sys.stderr.isatty(), mininterval=1.0)
            with state_store.SQLiteStateStore(args.state_db) as store, bar:
                counts = backfill(client, store, args.data, batch_users=args.batch_users,
                                  replace=args.replace, max_users=args.max_users,
                                  on_users=bar.update)
    except (ServingError, schema.DataError, BackfillError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"model": args.model_name, "version": version, "data": args.data,
              "state_db": args.state_db, **dataclasses.asdict(counts)}
    print(json.dumps(result) if args.json else
          f"stored {counts.users:,} users' states ({counts.sessions:,} sessions, "
          f"{counts.events:,} events) for {args.model_name} version {version} in "
          f"{args.state_db}" + (f"; {counts.kept:,} users already there were kept "
                                "(--replace overwrites them)" if counts.kept else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
