"""Where a user's high-level state and recent items live between sessions (DESIGN.md §7).

A state is a point in one model version's GRU space: version N+1 reads it as noise. So
records are keyed by (user id, model version), and a state of another version is never
used silently: `resolve_state` rebuilds it from the user's recent sessions with the new
version's `update_state` (or starts from zeros when there are none) and says which. A
user keeps a record per version (the `versions_kept` most recently written), so clients
of two versions at once (a rollout, pinned clients finishing on the old one, a rollback)
do not rebuild each other's states: each record counts the sessions the user has ended
in all (`sessions_total`), and a version's record that others have moved past takes only
the sessions it missed.
Version numbers can be reused (a new export base starts again at 1, a version folder
replaced in place), so each record also keeps the model's fingerprint (its outputs on a
fixed probe, `serving.client.HierTCNClient.fingerprint`): a record of the same version
number from another model is rebuilt the same way.

`StateStore` is the small interface (get / latest / put / delete, and prune: the users
inactive since a cut-off, a retention limit); `SQLiteStateStore` is
the default (one file, WAL journal, one atomic write per put). A write can be made
conditional on the user's newest record (`put(..., expected=record)`), so that two
processes ending sessions of one user at the same time never lose one of them:
`end_session` reads, updates and writes in that way and starts again on a conflict. A
Redis backend would keep one hash per (user, version) (`state` bytes, `sessions` JSON,
`updated`, `fingerprint` bytes, `sessions_total`) and a sorted set of the user's versions
by `updated`, written with `WATCH`/`MULTI`, which gives the same semantics.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import random
import shlex
import shutil
import sqlite3
import threading
import time
from typing import Any, Callable, Collection, Sequence

import numpy as np

from model.config import HierTCNConfig
from pipeline import schema, storage

log = logging.getLogger("serving.state_store")

# `put(..., expected=ANY)`: an unconditional write.
ANY = object()
# How long `end_session` keeps starting again after concurrent writes of the same user.
RETRY_SECONDS = 30.0
# The records kept per user by default: its newest versions' (a rollout serves two).
VERSIONS_KEPT = 3


class StateConflict(RuntimeError):
    """A conditional `put` found the user's record changed since it was read."""


def same_model(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two fingerprints come from one model (None: unknown, taken as the same).

    The tolerance absorbs float round-off between machines; two trained models differ
    by orders of magnitude more.
    """
    if a is None or b is None:
        return True
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-3, atol=1e-4))

# The recent items kept per user: what the default HierTCN's repeat head reads
# (`model.history_size`).
DEFAULT_HISTORY_ITEMS = HierTCNConfig().history_size
# bytes the -wal file is cut back to after a checkpoint (SQLite keeps its peak otherwise)
WAL_SIZE_LIMIT = 16 * 2 ** 20
# How long `erase_journal` waits for other processes' reads to end.
JOURNAL_WAIT_MS = 1000
# With the ids the model knows at hand, the store keeps the newest `history_items` known
# ids and the unknown ones among them (the head reads the newest known items, so unknown
# ones must not push known ones out), at most this many times `history_items` ids in all.
RAW_HISTORY_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class UserState:
    """One stored record.

    Attributes:
      user_id: raw user id.
      version: the model version the state belongs to.
      state: float32 [H], the high-level state after the user's last session.
      sessions: the user's recent sessions, oldest first, item ids in order, at most
        the store's history size in total (the oldest kept session may be cut).
      updated: unix seconds of the write, strictly increasing from one write of a user
        to the next (it identifies the record for conditional writes).
      fingerprint: float32, the writing model's outputs on a fixed probe (None: not
        recorded), which tells two models exported under one version number apart.
      sessions_total: the sessions the user had ended in all, in any version, when this
        record was written (None: not counted; such a record is its user's only one).
    """

    user_id: str
    version: int
    state: np.ndarray
    sessions: tuple[tuple[str, ...], ...]
    updated: float
    fingerprint: np.ndarray | None = None
    sessions_total: int | None = None

    @property
    def history(self) -> list[str]:
        """The recent item ids, newest last (the `history_items` input)."""
        return [item for session in self.sessions for item in session]


def collapse_repeats(items: Sequence[str]) -> list[str]:
    """A session as the pipeline writes it and the export reads it: padding ("") left out,
    then each id equal to the one before it (a reload, a double click), but `[UNK]`, an
    unknown item whose raw id a data folder lost (`serving.backfill`): two of them are two
    items, as the folder's records hold them.

    Ids are compared as the export looks them up: whitespace at their ends left out (the
    pipeline's `str.strip()`), but for an id of whitespace only.

    >>> collapse_repeats(["a", "a", "b", "", "b", "a", "[UNK]", "[UNK]", " a", "a "])
    ['a', 'b', 'a', '[UNK]', '[UNK]', ' a']
    """
    items = [item for item in items if item != ""]
    keys = [item.strip() or item for item in items]
    return [item for k, item in enumerate(items)
            if k == 0 or keys[k] != keys[k - 1] or keys[k] == schema.UNKNOWN_TOKEN]


def check_session(items: Sequence[str], what: str) -> None:
    """Refuses a session that is not a list of string ids: a string is not a list of its
    characters (it was stored, and folded in, as one item a character), and an integer id
    is not the string the vocabulary holds.

    Raises:
      TypeError: naming `what`.
    """
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{what} is the string {items[:40]!r}, not a list of item ids: pass "
                        f"[{items[:40]!r}] for a session of one item")
    bad = next((item for item in items if not isinstance(item, str)), None)
    if bad is not None:
        raise TypeError(f"{what} holds the {type(bad).__name__} {bad!r}: item ids are "
                        "strings, as in the pipeline's items.tsv (str(...) them)")


def trim_sessions(sessions: Sequence[Sequence[str]], max_items: int,
                  known: Collection[str] | None = None) -> tuple[tuple[str, ...], ...]:
    """Keeps the newest `max_items` ids, session boundaries kept, oldest first.

    With `known` (the ids the model version knows), only known ids count: the newest
    `max_items` known ids stay with the unknown ones among them, which a repeat head skips
    (at most `RAW_HISTORY_FACTOR` x `max_items` ids in all).

    >>> trim_sessions([["a", "b", "c"], ["d", "e"]], 3)
    (('c',), ('d', 'e'))
    >>> trim_sessions([["a", "b", "c"], ["d", "e"]], 3, known={"a", "b", "c"})
    (('a', 'b', 'c'), ('d', 'e'))
    """
    out: list[tuple[str, ...]] = []
    left = max_items  # known ids still wanted (every id counts without `known`)
    room = max_items if known is None else RAW_HISTORY_FACTOR * max_items
    for session in reversed([tuple(s) for s in sessions if len(s)]):
        if left <= 0 or room <= 0:
            break
        start = len(session)
        while start > 0 and left > 0 and room > 0:
            start -= 1
            room -= 1
            if known is None or session[start] in known:
                left -= 1
        out.append(session[start:])
    return tuple(reversed(out))


# The ids (of a list) that the pinned model version knows; from a
# `serving.client.HierTCNClient`: `client.known_ids`.
KnownFn = Callable[[Sequence[str]], Collection[str]]


def _known(known_items: KnownFn | None, sessions: Sequence[Sequence[str]]) -> Collection[str] | None:
    if known_items is None:
        return None
    return set(known_items([item for session in sessions for item in session]))


class StateStore(abc.ABC):
    """A key-value store of user states keyed by (user id, model version)."""

    history_items: int = DEFAULT_HISTORY_ITEMS

    @abc.abstractmethod
    def get(self, user_id: str, version: int) -> UserState | None:
        """The user's record for exactly this version, or None."""

    @abc.abstractmethod
    def latest(self, user_id: str) -> UserState | None:
        """The user's most recently written record of any version, or None."""

    @abc.abstractmethod
    def put(self, user_id: str, version: int, state: np.ndarray,
            sessions: Sequence[Sequence[str]], expected: Any = ANY,
            fingerprint: np.ndarray | None = None,
            sessions_total: int | None = None,
            known: Collection[str] | None = None) -> UserState:
        """Atomically writes the user's record of `version`.

        The user's counted records of other versions stay (the store's `versions_kept`
        newest ones) when `sessions_total` is given; without it they are dropped, since
        nothing would tell how far behind this one they are (an uncounted record is always
        its user's only one).

        Args:
          user_id: raw user id.
          version: the model version that computed `state`.
          state: float32 [H].
          sessions: the user's recent sessions, oldest first (trimmed to `history_items`,
            `trim_sessions`).
          expected: `ANY` (default): write whatever is stored; None: only if the user has
            no record; a `UserState`: only if it is still the user's newest record
            (same version and `updated`).
          fingerprint: the model's fingerprint (`UserState.fingerprint`), or None.
          sessions_total: the sessions the user has ended in all, `state` and `sessions`
            included (`UserState.sessions_total`), or None.
          known: the ids among `sessions` that the model knows (None: not known; every
            id counts towards `history_items`).

        Returns:
          The record as stored.

        Raises:
          StateConflict: `expected` is not what is stored (nothing was written).
        """

    @abc.abstractmethod
    def delete(self, user_id: str) -> int:
        """Deletes every record of the user; returns how many there were."""

    def holds_any(self) -> bool | None:
        """Whether the store holds any user's record (None: this store cannot say cheaply);
        the client's hint that an empty store wants `serving.backfill`."""
        return None

    def prune(self, before: float, dry_run: bool = False,
              progress: Callable[[int], None] | None = None) -> "Pruned":
        """Deletes every record of the users whose newest record was written before
        `before` (seconds since the epoch; `UserState.updated`): users who ended no
        session since, a retention limit on personal data. A user with one recent record
        keeps all of them.

        Args:
          before: the cut-off time.
          dry_run: count them, delete nothing.
          progress: called with the number of users looked at since its last call.

        Returns:
          What was (or, with `dry_run`, would be) deleted, and what is kept.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot prune")


@dataclasses.dataclass(frozen=True)
class Pruned:
    """What `StateStore.prune` deleted (or would delete, `dry_run`)."""

    users: int  # users whose records went
    records: int  # their records (a user keeps up to `versions_kept`)
    kept_users: int  # users with a record written since the cut-off
    dry_run: bool


class SQLiteStateStore(StateStore):
    """`StateStore` in one SQLite file (WAL journal, so readers never block the writer)."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS user_states (
            user_id TEXT NOT NULL,
            model_version INTEGER NOT NULL,
            state BLOB NOT NULL,
            sessions TEXT NOT NULL,
            updated REAL NOT NULL,
            model_fingerprint BLOB,
            sessions_total INTEGER,
            PRIMARY KEY (user_id, model_version))"""
    _COLUMNS = ("user_id", "model_version", "state", "sessions", "updated", "model_fingerprint",
                "sessions_total")
    # columns added since the first files, with their types: such a file gets them
    _ADDED = (("model_fingerprint", "BLOB"), ("sessions_total", "INTEGER"))
    _SELECT = ("SELECT user_id, model_version, state, sessions, updated, model_fingerprint, "
               "sessions_total FROM user_states ")

    def __init__(self, path: str, history_items: int = DEFAULT_HISTORY_ITEMS,
                 versions_kept: int = VERSIONS_KEPT, busy_timeout_s: float = 30.0):
        """Opens (or creates) the database.

        Args:
          path: the SQLite file.
          history_items: the recent item ids kept per user.
          versions_kept: the records kept per user, its most recently written versions'.
          busy_timeout_s: how long a read or write waits for another process's write lock
            before it gives up with "database is locked".

        Raises:
          ValueError: `history_items` or `versions_kept` < 1, or the file is not a usable
            SQLite database.
        """
        if history_items < 1:
            raise ValueError(f"history_items must be >= 1, got {history_items}")
        if versions_kept < 1:
            raise ValueError(f"versions_kept must be >= 1, got {versions_kept}")
        if not busy_timeout_s >= 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s}")
        self.path = path
        self.history_items = history_items
        self.versions_kept = versions_kept
        self._busy_ms = int(busy_timeout_s * 1000)
        self.journal_erased: bool | None = None  # by the last `erase_journal`
        self._lock = threading.Lock()
        created = _create_private(path)
        denied = _access_error(path)
        if denied:
            raise ValueError(denied)
        self._db = None
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._identity = _identity(path)
            self._wal(max(busy_timeout_s, 1.0))
            self._db.execute("PRAGMA synchronous=NORMAL")
            # a deleted or replaced record's bytes are overwritten, not left in free pages
            # (users' histories are personal data: a `forget`ed user's ids stayed in the
            # file where SQLite is built without SECURE_DELETE, as upstream's is)
            self._db.execute("PRAGMA secure_delete=ON")
            # the -wal file back to at most this size after a checkpoint (a reader that held
            # a snapshot through 12,000 writes left 78 MB on disk while the store was open)
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.execute(self._SCHEMA)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(user_states)")]
            first = len(self._COLUMNS) - len(self._ADDED)
            if first <= len(columns) < len(self._COLUMNS) \
                    and columns == list(self._COLUMNS[:len(columns)]):  # an earlier store's file
                for name, kind in self._ADDED[len(columns) - first:]:
                    try:
                        self._db.execute(f"ALTER TABLE user_states ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError:  # another process added it meanwhile
                        pass
                columns = [row[1] for row in self._db.execute("PRAGMA table_info(user_states)")]
        except BaseException as e:
            if self._db is not None:  # (the error's traceback would keep it open)
                self._db.close()
            if created:  # (a file this made, still empty: not left behind as if a store)
                _remove_if_empty(path)
            if not isinstance(e, sqlite3.DatabaseError):
                raise
            if "not a database" in str(e) and not _sqlite_header(path):
                # (another file, not a damaged database: said so)
                raise ValueError(f"{path} is not a SQLite database (a CSV, a log?): pass the "
                                 "state file as --state-db, or a new name to start one") \
                    from None
            advice = ("its disk is full: make room there" if _disk_full(path)
                      else _path_advice(path, e) or _advice(e))
            raise ValueError(f"cannot open state database {path}: {e}; {advice}") from None
        if columns != list(self._COLUMNS):
            self._db.close()
            raise ValueError(f"state database {path} has a table user_states with columns "
                             f"({', '.join(columns)}), not this store's "
                             f"({', '.join(self._COLUMNS)}): pass another --state-db")

    def _wal(self, timeout_s: float = 30.0) -> None:
        """Puts the file in WAL mode. Switching a new file needs it to itself, and SQLite
        answers "database is locked" at once, busy timeout or not, when other processes
        open the same new file at that moment: retried until `timeout_s`."""
        if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if not _locked(e) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def moved(self) -> bool:
        """Whether the path no longer names the file this store opened (removed, or
        replaced by another): the writes since went to a file no one can open again."""
        return self._identity is not None and _identity(self.path) != self._identity

    def _check_not_moved(self) -> None:
        """Refuses a write once the path names another file than the one opened (a long-
        lived store whose file was removed: its writes succeeded into a file no one could
        open again, and were lost without a word)."""
        if self.moved():
            raise ValueError(f"cannot write to state database {self.path}: the file was removed "
                             "or replaced since this store opened it, so the write would go to "
                             "a file no one can open again; not stored: open the store again")

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SQLiteStateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, row) -> UserState:
        user_id, version, blob, sessions, updated, fingerprint, sessions_total = row
        try:
            state = np.frombuffer(blob, dtype=np.float32).copy()
            if fingerprint is not None:
                fingerprint = np.frombuffer(fingerprint, dtype=np.float32).copy()
            sessions = json.loads(sessions)
            if not (isinstance(sessions, list)
                    and all(isinstance(s, list) and all(isinstance(i, str) for i in s)
                            for s in sessions)):
                raise ValueError("sessions is not a JSON list of lists of item ids")
        except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"state database {self.path}: the record of user {user_id!r} "
                             f"(version {version}) is corrupt ({e}); delete the user's records "
                             f"(python -m serving.client --state-db {shlex.quote(self.path)} "
                             f"forget --user {shlex.quote(user_id)}) or pass another "
                             "--state-db") from None
        return UserState(user_id=user_id, version=int(version), state=state,
                         sessions=tuple(tuple(s) for s in sessions), updated=updated,
                         fingerprint=fingerprint,
                         sessions_total=None if sessions_total is None else int(sessions_total))

    def _read(self, sql: str, params: tuple) -> Any:
        """The first row of a query, SQLite's errors as one ValueError that says what to do."""
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchone()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"cannot read state database {self.path}: {e}; "
                             f"{_advice(e)}") from None

    def get(self, user_id: str, version: int) -> UserState | None:
        row = self._read(self._SELECT + "WHERE user_id = ? AND model_version = ?",
                         (user_id, int(version)))
        return self._record(row) if row else None

    def latest(self, user_id: str) -> UserState | None:
        row = self._read(self._SELECT + "WHERE user_id = ? "
                         "ORDER BY updated DESC, model_version DESC LIMIT 1", (user_id,))
        return self._record(row) if row else None

    def put(self, user_id: str, version: int, state: np.ndarray,
            sessions: Sequence[Sequence[str]], expected: Any = ANY,
            fingerprint: np.ndarray | None = None,
            sessions_total: int | None = None,
            known: Collection[str] | None = None) -> UserState:
        for i, session in enumerate(sessions):
            check_session(session, f"session {i} of user {user_id!r}")
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise ValueError(f"state must be one user's vector [H], got shape {state.shape}")
        if not np.all(np.isfinite(state)):  # (a diverged model's): it would poison every answer
            raise ValueError(f"state of user {user_id!r} holds NaN or infinite values: not stored")
        if fingerprint is not None:
            fingerprint = np.asarray(fingerprint, dtype=np.float32).ravel().copy()
        kept = trim_sessions(sessions, self.history_items, known)
        self._check_not_moved()
        with self._lock:
            try:
                # the write lock, until COMMIT / ROLLBACK (SQLITE_BUSY after the busy timeout)
                self._db.execute("BEGIN IMMEDIATE")
                newest = self._db.execute(
                    "SELECT model_version, updated FROM user_states WHERE user_id = ? "
                    "ORDER BY updated DESC, model_version DESC LIMIT 1", (user_id,)).fetchone()
                if expected is not ANY:
                    want = None if expected is None else (expected.version, expected.updated)
                    if (None if newest is None else (int(newest[0]), newest[1])) != want:
                        raise StateConflict(f"user {user_id!r}: the stored record changed "
                                            "while this write was computed")
                # strictly after the record it replaces, even within one clock tick
                updated = time.time()
                if newest is not None and updated <= newest[1]:
                    updated = float(np.nextafter(newest[1], np.inf))
                record = UserState(user_id, int(version), state.copy(), kept, updated,
                                   fingerprint, sessions_total)
                self._db.execute(
                    "INSERT INTO user_states (user_id, model_version, state, sessions, updated, "
                    "model_fingerprint, sessions_total) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (user_id, model_version) DO UPDATE SET "
                    "state = excluded.state, sessions = excluded.sessions, "
                    "updated = excluded.updated, model_fingerprint = excluded.model_fingerprint, "
                    "sessions_total = excluded.sessions_total",
                    (user_id, record.version, state.tobytes(),
                     json.dumps([list(s) for s in kept]), record.updated,
                     None if fingerprint is None else fingerprint.tobytes(), sessions_total))
                # the newest `versions_kept` records stay; an uncounted one stays alone
                if sessions_total is not None:
                    self._db.execute("DELETE FROM user_states WHERE user_id = ? AND "
                                     "model_version != ? AND sessions_total IS NULL",
                                     (user_id, record.version))
                self._db.execute(
                    "DELETE FROM user_states WHERE user_id = ? AND model_version NOT IN ("
                    "SELECT model_version FROM user_states WHERE user_id = ? "
                    "ORDER BY updated DESC, model_version DESC LIMIT ?)",
                    (user_id, user_id, self.versions_kept if sessions_total is not None else 1))
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:  # (SQLite has rolled back itself on a full disk)
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError):
                    raise ValueError(f"cannot write to state database {self.path}: {e}; the "
                                     "records stored before are kept" + _write_advice(e)) from e
                raise
        return record

    def holds_any(self) -> bool:
        return self._read("SELECT EXISTS (SELECT 1 FROM user_states)", ())[0] == 1

    def delete(self, user_id: str) -> int:
        self._check_not_moved()
        try:
            with self._lock:
                deleted = self._db.execute("DELETE FROM user_states WHERE user_id = ?",
                                           (user_id,)).rowcount
        except sqlite3.DatabaseError as e:
            raise ValueError(f"cannot write to state database {self.path}: {e}; "
                             f"{_advice(e)}") from None
        if deleted:
            self.erase_journal()
        return deleted

    def erase_journal(self) -> bool:
        """Copies the -wal file's pages into the database and empties it (SQLite's
        TRUNCATE checkpoint): until then it holds the records as they were before a delete
        (a `forget`ed user's ids stayed in it while any other process had the store
        open). Returns False where another process's read kept it from being emptied
        (those pages go once it is checkpointed again)."""
        try:
            with self._lock:
                # (the checkpoint waits for readers' transactions: a second at most, not
                # the busy timeout of writes)
                self._db.execute(f"PRAGMA busy_timeout={JOURNAL_WAIT_MS}")
                try:
                    busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        except sqlite3.DatabaseError as e:
            log.warning("state database %s: the -wal file was not emptied: %s", self.path, e)
            busy = True
        self.journal_erased = not busy
        return self.journal_erased


    # users looked at per transaction of `prune`: the write lock is held for one batch at a
    # time, so live end-sessions wait milliseconds, not the whole prune
    PRUNE_BATCH = 1000

    def prune(self, before: float, dry_run: bool = False,
              progress: Callable[[int], None] | None = None) -> Pruned:
        if not isinstance(before, (int, float)) or before != before:
            raise ValueError(f"before must be a time in seconds, got {before!r}")
        users = records = kept = 0
        after = None  # the last user id looked at: batches walk the primary key in order
        while True:
            with self._lock:
                try:
                    # one transaction per batch: its users' newest records are read and
                    # deleted under the write lock, so an end-session that wrote since the
                    # batch was read is never lost (a dry run takes no write lock)
                    self._db.execute("BEGIN" if dry_run else "BEGIN IMMEDIATE")
                    rows = self._db.execute(
                        "SELECT user_id, MAX(updated), COUNT(*) FROM user_states "
                        + ("" if after is None else "WHERE user_id > ? ")
                        + "GROUP BY user_id ORDER BY user_id LIMIT ?",
                        (() if after is None else (after,)) + (self.PRUNE_BATCH,)).fetchall()
                    old = [(user, count) for user, newest, count in rows if newest < before]
                    if old and not dry_run:
                        self._db.executemany("DELETE FROM user_states WHERE user_id = ?",
                                             [(user,) for user, _ in old])
                    self._db.execute("COMMIT")
                except BaseException as e:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    if isinstance(e, sqlite3.DatabaseError):
                        raise ValueError(
                            f"cannot prune state database {self.path}: {e}; the {users:,} "
                            "users pruned before it stay deleted, the rest are kept"
                            + _write_advice(e)) from e
                    raise
            if not rows:
                if users and not dry_run:
                    self.erase_journal()
                return Pruned(users, records, kept, dry_run)
            users += len(old)
            records += sum(count for _, count in old)
            kept += len(rows) - len(old)
            after = rows[-1][0]
            if progress is not None:
                progress(len(rows))

    def free_bytes(self) -> int:
        """Bytes of the file's free pages (after deletes): later writes reuse them, and
        `vacuum` gives them back to the disk."""
        pages = self._read("PRAGMA freelist_count", ())[0]
        return int(pages) * int(self._read("PRAGMA page_size", ())[0])

    def vacuum(self) -> None:
        """Rewrites the file without its free pages (SQLite's VACUUM), then empties the
        -wal file. It writes a copy of the live data first (the disk needs that much room
        free) and holds the write lock while it runs: writers wait (up to the busy timeout)."""
        try:
            with self._lock:
                self._db.execute("VACUUM")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"cannot vacuum state database {self.path}: {e}; its records "
                             "are unchanged" + _write_advice(e)) from None
        self.erase_journal()


def _advice(e: sqlite3.DatabaseError) -> str:
    """What to do about an error of SQLite's on a file that opened."""
    if _locked(e):
        return "another process holds it locked: try again"
    if "disk I/O error" in str(e):  # SQLite's word for a failed write other than ENOSPC
        return ("a write to it or to its -wal or -shm file failed (a quota, a file-size limit, "
                "a failing disk?): make room or fix the disk and try again; the records "
                "written before are kept")
    if "malformed" in str(e) or "not a database" in str(e):
        return ("the file is damaged: restore it from a backup or pass another --state-db "
                "(`sqlite3 FILE .recover` salvages what it can)")
    return "pass another --state-db"


def _write_advice(e: sqlite3.DatabaseError) -> str:
    """What to do about a failed write (after the words that nothing stored was lost)."""
    if _locked(e):
        return "; another process holds it locked: try again"
    if "disk I/O error" in str(e) or "disk is full" in str(e):  # (ENOSPC / other write errors)
        return ("; make room or fix the disk (a full disk, a quota, a file-size limit, a "
                "failing disk?) and try again")
    return ""


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, None for none (or an in-memory database)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _access_error(path: str) -> str | None:
    """Why this user cannot use the store file, or None. SQLite in WAL mode writes the
    file's `-wal` and `-shm` beside it, also to read: a user who may only read it made them
    as their own, and locked its owner out of the store."""
    if path == ":memory:" or path.startswith("file:") or not os.path.exists(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    may = storage.allowed
    if may(path, os.R_OK | os.W_OK) and (
            may(folder, os.W_OK | os.X_OK)
            or all(may(path + end, os.R_OK | os.W_OK) for end in ("-wal", "-shm"))):
        return None
    if storage.read_only(path):
        return (f"cannot use state database {path}: it is on a read-only file system, and "
                "SQLite writes beside it (its -wal and -shm files) even to read; make it "
                "writable, or copy the file to a writable folder and pass that --state-db")
    try:
        st = os.stat(path)
        import pwd
        owner = f"{pwd.getpwuid(st.st_uid).pw_name}'s"
    except (ImportError, KeyError, OSError):
        owner, st = "another user's", None
    mode = f", mode {st.st_mode & 0o777:o}" if st is not None else ""
    what = ("this user may not read and write it" if not may(path, os.R_OK | os.W_OK)
            else f"this user may not write its folder {folder}, where SQLite keeps the "
                 "-wal and -shm files it needs even to read")
    return (f"cannot use state database {path} ({owner}{mode}): {what}; ask its owner for "
            "access (chmod g+rw, the same group, and a group-writable folder) or pass "
            "another --state-db")


def _create_private(path: str) -> bool:
    """Creates a new store file readable and writable by its owner alone (its users' item
    histories are personal data; SQLite gives its -wal and -shm files the same mode):
    whether it did. An existing file, or one this cannot create (SQLite says why), is left
    as it is."""
    if path == ":memory:" or path.startswith("file:"):
        return False
    try:  # (through a link to a file not made yet: O_EXCL refuses the link itself, and
        # SQLite then made the file with the umask's mode, 0644)
        os.close(os.open(os.path.realpath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return False
    return True


def remove_if_no_record(path: str) -> None:
    """Removes a state database a command made that holds no record (it failed before
    storing one: an empty file would look like a backfill's result, or a store the client
    wrote to), with its -wal and -shm files; anything else is left."""
    import urllib.parse

    try:
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
        db = sqlite3.connect(uri, uri=True)
        try:
            rows = db.execute("SELECT COUNT(*) FROM user_states").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return
    if rows:
        return
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


def _remove_if_empty(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            os.unlink(os.path.realpath(path))
    except OSError:
        pass


# The longest full path SQLite's unix VFS opens with its journal names beside it (its
# MAX_PATHNAME, 512 bytes, less the "-journal" suffix): 504 bytes with SQLite 3.40.
SQLITE_PATH_BYTES = 504


def _path_advice(path: str, e: sqlite3.DatabaseError) -> str:
    """What to do when SQLite could not open a file whose full path is too long for it
    (it says only "unable to open database file"); "" for any other case."""
    full = len(os.fsencode(os.path.abspath(os.path.realpath(path))))
    if "unable to open" not in str(e) or full <= SQLITE_PATH_BYTES:
        return ""
    return (f"its full path is {full} bytes, and SQLite opens a file whose path is at most "
            f"about {SQLITE_PATH_BYTES}: pass a --state-db in a folder with a shorter path")


def _sqlite_header(path: str) -> bool:
    """Whether the file begins as every SQLite database does (a damaged one still does)."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return True  # (not readable: said by SQLite's own error)


def _locked(e: Exception) -> bool:
    """SQLite's "database is locked" (SQLITE_BUSY)."""
    return "database is locked" in str(e)


def _disk_full(path: str) -> bool:
    """Whether the file system holding `path` has (almost) no room left."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < (64 << 10)
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class ResolvedState:
    """A user's state ready for one model version.

    Attributes:
      state: float32 [H].
      sessions: the recent sessions (oldest first) that go with it.
      source: `stored` (this version's record, up to date), `new` (no record: zeros),
        `caught_up` (this version's record, behind another version's: the sessions it
        missed folded in), `rebuilt` (another version's record, replayed through this
        version's update_state) or `reset` (another version's record and nothing to
        replay: zeros).
      message: one line for logs and the CLI.
      record: the user's newest stored record when this was resolved (None: none), what
        a write computed from this state expects (`put(..., expected=record)`).
      sessions_total: the sessions the user has ended in all (None: not counted).
    """

    state: np.ndarray
    sessions: tuple[tuple[str, ...], ...]
    source: str
    message: str
    record: UserState | None = None
    sessions_total: int | None = 0

    @property
    def history(self) -> list[str]:
        """The recent item ids, newest last."""
        return [item for session in self.sessions for item in session]


# One user's state [H] and one session's ids → the state after it, on one model version;
# from a `serving.client.HierTCNClient` (whose `update_state` takes batches):
# `lambda state, session: client.update_state(state[None], [session])[0]`.
UpdateFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def sessions_behind(sessions: Sequence[Sequence[str]], last: Sequence[str],
                    count: int | None, before: Sequence[str] | None = None) -> int | None:
    """How many of a record's `sessions` (oldest first) came after the session `last` that
    another record (or a log) ends with, `before` the session it has before `last` (None:
    none).

    `count`, the two session counts apart, where the session before that many is `last`
    (or there is none left to check it by). The counts can disagree with the contents: two
    pipeline runs count a user's sessions differently (a session whose items the newer
    vocabulary keeps too few of is dropped), and a one-item session ended live counts where
    the pipeline drops it as too short; trusting them folded a session into a state twice.
    Then: how many follow the newest occurrence of `last` that has `before` just before it
    (or one session before that: a session one side dropped; with `before`, an occurrence
    at the oldest held session is no evidence); None where there is none. An
    `[UNK]` matches any item (a backfill's item the log's vocabulary did not know), and the
    oldest session held may be the end of a cut one.
    """
    n = len(sessions)
    if not last:
        return count
    if count is not None and count >= 0 and (
            count >= n or _alike(sessions[n - count - 1], last, n - count - 1 == 0)):
        return count
    for j in range(n - 1, -1, -1):
        if _alike(sessions[j], last, j == 0) and (
                not before
                or any(_alike(sessions[i], before, i == 0) for i in range(max(j - 2, 0), j))):
            return n - 1 - j
    return None


def _alike(held: Sequence[str], session: Sequence[str], maybe_cut: bool) -> bool:
    """Whether a stored session is `session` (the end of it where `maybe_cut`), an
    `[UNK]` on either side matching any item."""
    if maybe_cut and 0 < len(held) < len(session):
        session = session[len(session) - len(held):]
    return len(held) == len(session) and all(
        a == b or schema.UNKNOWN_TOKEN in (a, b) for a, b in zip(held, session))


def _may_be_cut(sessions: Sequence[Sequence[str]], history_items: int,
                known: Collection[str] | None) -> bool:
    """Whether `put` may have cut the oldest of these stored sessions (`trim_sessions`):
    they hold as many ids as it keeps."""
    items = [item for session in sessions for item in session]
    if known is None:
        return len(items) >= history_items
    return (sum(item in known for item in items) >= history_items
            or len(items) >= RAW_HISTORY_FACTOR * history_items)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def resolve_state(store: StateStore, user_id: str, version: int, state_size: int,
                  update_state: UpdateFn | None = None,
                  recent_sessions: Sequence[Sequence[str]] | None = None,
                  fingerprint: np.ndarray | None = None,
                  known_items: KnownFn | None = None) -> ResolvedState:
    """Returns the user's state for `version`, never another model's state.

    The user's newest record (of any version) holds the recent sessions. This version's
    own record is served when it is that record, or when the newer one counts no session
    more (`UserState.sessions_total`); when it is behind by sessions the newest record
    still holds, those are folded into it; otherwise the state is rebuilt from zeros over
    the newest record's sessions.

    Args:
      store: the state store.
      user_id: raw user id.
      version: the model version the caller has pinned.
      state_size: H of that version (from its metadata).
      update_state: (state [H], one session's ids) → state [H] on `version`; used to
        rebuild a state of another version and to catch one up.
      recent_sessions: the user's recent sessions, oldest first, to rebuild from; default
        the sessions stored with the newest record.
      fingerprint: the pinned model's fingerprint (None: version numbers alone decide); a
        record of this version with another fingerprint or another state size came from
        another model exported under the same number and is rebuilt like another version's.
      known_items: the ids of a list that `version` knows (None: not known): a state
        written here keeps the history as the model reads it (`trim_sessions`).

    Returns:
      The resolved state; a rebuilt or caught-up one is also written to the store (with
      `fingerprint`).
    """
    zeros = np.zeros([state_size], np.float32)
    newest = store.latest(user_id)
    if newest is None:
        return ResolvedState(zeros, (), "new", f"user {user_id}: new user, state starts at zeros")
    # an uncounted record (a file of an earlier store, a put without a count) is its
    # user's only one: the count starts again from it
    total = newest.sessions_total if newest.sessions_total is not None else 0
    own = newest if newest.version == int(version) else store.get(user_id, version)
    if own is None:
        what = f"stored state is from version {newest.version}, the model is version {version}"
    elif own.state.shape != (state_size,):
        what = (f"the stored state of version {version} has {own.state.size} numbers, the "
                f"model has {state_size}")
    elif not same_model(own.fingerprint, fingerprint):
        what = (f"the stored state of version {version} is from another model exported under "
                "that number (its fingerprint differs)")
    else:
        behind = (0 if own is newest else None if own.sessions_total is None
                  or newest.sessions_total is None else newest.sessions_total - own.sessions_total)
        counted = behind
        if own is not newest and behind is not None and own.sessions:
            behind = sessions_behind(newest.sessions, own.sessions[-1], behind,
                                     own.sessions[-2] if len(own.sessions) > 1 else None)
        if behind != counted:
            log.info("user %s: the records of versions %d and %d are %d sessions apart by "
                     "their counts, %s by their contents", user_id, int(version),
                     newest.version, counted, "unaligned" if behind is None else behind)
        if behind == 0:
            return ResolvedState(own.state, newest.sessions, "stored",
                                 f"user {user_id}: stored state of version {version}", newest,
                                 total)
        if (behind is not None and 0 < behind <= len(newest.sessions)
                and update_state is not None and recent_sessions is None):
            state = own.state
            for session in newest.sessions[-behind:]:
                state = np.asarray(update_state(state, session), dtype=np.float32)
            known = _known(known_items, newest.sessions)
            stored = store.put(user_id, version, state, newest.sessions, expected=newest,
                               fingerprint=fingerprint, sessions_total=total, known=known)
            # the store keeps whole sessions but the oldest one it holds, which `put` may
            # have cut to `history_items`: folding that in is the nearest state there is
            # (a rebuild from zeros would also lose every session before it), yet not exact
            cut = behind == len(newest.sessions) and _may_be_cut(
                newest.sessions, store.history_items, known)
            message = (f"user {user_id}: the stored state of version {version} was "
                       f"{_plural(behind, 'session')} behind version {newest.version}'s; "
                       "caught up" + (f" (approximately: the store may hold only the last "
                                      f"{len(newest.sessions[0])} items of the oldest of them)"
                                      if cut else ""))
            log.info(message)
            return ResolvedState(state, stored.sessions, "caught_up", message, stored, total)
        what = (f"the stored state of version {version} is older than version "
                f"{newest.version}'s" + (f" by {_plural(behind, 'session')}, more than "
                                         "its recent sessions hold" if behind and behind > 0
                                         else "" if behind is not None or counted is None
                                         else ", and its last session is not among that "
                                         "version's recent ones"))
    sessions = newest.sessions if recent_sessions is None else recent_sessions
    known = _known(known_items, sessions)
    sessions = trim_sessions(sessions, store.history_items, known)
    if recent_sessions is not None:
        total = None
    if update_state is None or not sessions:
        message = f"user {user_id}: {what}; no recent sessions to rebuild from, starting from zeros"
        log.info(message)
        return ResolvedState(zeros, sessions, "reset", message, newest, total)
    state = zeros
    for session in sessions:
        state = np.asarray(update_state(state, session), dtype=np.float32)
    stored = store.put(user_id, version, state, sessions, expected=newest,
                       fingerprint=fingerprint, sessions_total=total, known=known)
    items = sum(len(s) for s in sessions)
    message = (f"user {user_id}: {what}; rebuilt from {_plural(len(sessions), 'recent session')}"
               f" ({_plural(items, 'item')})")
    log.info(message)
    return ResolvedState(state, sessions, "rebuilt", message, stored, total)


def end_session(store: StateStore, user_id: str, version: int, state_size: int,
                update_state: UpdateFn, items: Sequence[str],
                fingerprint: np.ndarray | None = None,
                known_items: KnownFn | None = None,
                collapse: bool = True) -> tuple[ResolvedState, UserState]:
    """Folds one finished session into the user's stored state: resolves the state
    (`resolve_state`), runs `update_state` and writes the result with the session added
    to the recent ones, on the condition that nobody wrote the user in between; after a
    concurrent write it starts again from the new record (for up to `RETRY_SECONDS`,
    backing off), so no session is lost.

    `fingerprint` is the pinned model's (`resolve_state`), stored with the record;
    `known_items` tells which ids it knows (`resolve_state`), so that the stored history
    holds the newest `history_items` known ids however many unknown ones came between.
    With `collapse` (the default) the session's immediate repeats are left out first, as
    the pipeline writes sessions and the export reads them (`collapse_repeats`).

    Returns:
      (the state the session was folded into, the record written).

    Raises:
      StateConflict: still conflicting after `RETRY_SECONDS`.
    """
    check_session(items, f"user {user_id!r}'s session")
    items = collapse_repeats(list(items)) if collapse else list(items)
    if not items:
        raise ValueError(f"user {user_id!r}: an empty session; nothing to fold in")
    deadline = time.monotonic() + RETRY_SECONDS
    attempts = 0
    while True:
        try:
            resolved = resolve_state(store, user_id, version, state_size, update_state,
                                     fingerprint=fingerprint, known_items=known_items)
            state = np.asarray(update_state(resolved.state, items), dtype=np.float32)
            total = None if resolved.sessions_total is None else resolved.sessions_total + 1
            sessions = list(resolved.sessions) + [items]
            record = store.put(user_id, version, state, sessions, expected=resolved.record,
                               fingerprint=fingerprint, sessions_total=total,
                               known=_known(known_items, sessions))
            return resolved, record
        except StateConflict:
            attempts += 1
            if time.monotonic() >= deadline:
                raise StateConflict(
                    f"user {user_id!r}: the stored state changed {attempts} times in "
                    f"{RETRY_SECONDS:g} s while this session was being folded in (other "
                    "processes keep writing this user); try again") from None
            # exponential back-off with jitter, so that writers of one user spread out
            time.sleep(min(0.05, 0.001 * 2 ** min(attempts, 6)) * random.uniform(0.5, 1.5))
