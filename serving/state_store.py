"""Where a user's high-level state and recent items live between sessions (DESIGN.md §7).

A state is a point in one model version's GRU space: version N+1 reads it as noise. So
records are keyed by (user id, model version), and a state of another version is never
used silently: `resolve_state` rebuilds it from the user's recent sessions with the new
version's `update_state` (or starts from zeros when there are none) and says which.

`StateStore` is the small interface (get / latest / put / delete); `SQLiteStateStore` is
the default (one file, WAL journal, one atomic upsert per write). A write can be made
conditional on the record it was computed from (`put(..., expected=record)`), so that two
processes ending sessions of one user at the same time never lose one of them:
`end_session` reads, updates and writes in that way and starts again on a conflict. A
Redis backend would keep one hash per user (`version`, `state` bytes, `sessions` JSON,
`updated`) written with `WATCH`/`MULTI`/`HSET`, which gives the same semantics.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from model.config import HierTCNConfig

log = logging.getLogger("serving.state_store")

# `put(..., expected=ANY)`: an unconditional write.
ANY = object()
# How many times `end_session` starts again after a concurrent write of the same user.
MAX_ATTEMPTS = 20


class StateConflict(RuntimeError):
    """A conditional `put` found the user's record changed since it was read."""

# The recent items kept per user: what the default HierTCN's repeat head reads
# (`model.history_size`).
DEFAULT_HISTORY_ITEMS = HierTCNConfig().history_size


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
    """

    user_id: str
    version: int
    state: np.ndarray
    sessions: tuple[tuple[str, ...], ...]
    updated: float

    @property
    def history(self) -> list[str]:
        """The recent item ids, newest last (the `history_items` input)."""
        return [item for session in self.sessions for item in session]


def trim_sessions(sessions: Sequence[Sequence[str]], max_items: int) -> tuple[tuple[str, ...], ...]:
    """Keeps the newest `max_items` ids, session boundaries kept, oldest first.

    >>> trim_sessions([["a", "b", "c"], ["d", "e"]], 3)
    (('c',), ('d', 'e'))
    """
    out: list[tuple[str, ...]] = []
    left = max_items
    for session in reversed([tuple(s) for s in sessions if len(s)]):
        if left <= 0:
            break
        out.append(session[-left:])
        left -= len(out[-1])
    return tuple(reversed(out))


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
            sessions: Sequence[Sequence[str]], expected: Any = ANY) -> UserState:
        """Atomically replaces the user's record (records of other versions are dropped).

        Args:
          user_id: raw user id.
          version: the model version that computed `state`.
          state: float32 [H].
          sessions: the user's recent sessions, oldest first (trimmed to `history_items`).
          expected: `ANY` (default): write whatever is stored; None: only if the user has
            no record; a `UserState`: only if it is still the user's newest record
            (same version and `updated`).

        Returns:
          The record as stored.

        Raises:
          StateConflict: `expected` is not what is stored (nothing was written).
        """

    @abc.abstractmethod
    def delete(self, user_id: str) -> int:
        """Deletes every record of the user; returns how many there were."""


class SQLiteStateStore(StateStore):
    """`StateStore` in one SQLite file (WAL journal, so readers never block the writer)."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS user_states (
            user_id TEXT NOT NULL,
            model_version INTEGER NOT NULL,
            state BLOB NOT NULL,
            sessions TEXT NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (user_id, model_version))"""
    _COLUMNS = ("user_id", "model_version", "state", "sessions", "updated")

    def __init__(self, path: str, history_items: int = DEFAULT_HISTORY_ITEMS):
        """Opens (or creates) the database.

        Raises:
          ValueError: `history_items` < 1 or the file is not a usable SQLite database.
        """
        if history_items < 1:
            raise ValueError(f"history_items must be >= 1, got {history_items}")
        self.path = path
        self.history_items = history_items
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(self._SCHEMA)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(user_states)")]
        except sqlite3.DatabaseError as e:
            raise ValueError(f"cannot open state database {path}: {e}; "
                             "pass another --state-db") from None
        if columns != list(self._COLUMNS):
            self._db.close()
            raise ValueError(f"state database {path} has a table user_states with columns "
                             f"({', '.join(columns)}), not this store's "
                             f"({', '.join(self._COLUMNS)}): pass another --state-db")

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SQLiteStateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, row) -> UserState:
        user_id, version, blob, sessions, updated = row
        try:
            state = np.frombuffer(blob, dtype=np.float32).copy()
            sessions = json.loads(sessions)
            if not (isinstance(sessions, list)
                    and all(isinstance(s, list) and all(isinstance(i, str) for i in s)
                            for s in sessions)):
                raise ValueError("sessions is not a JSON list of lists of item ids")
        except (TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"state database {self.path}: the record of user {user_id!r} "
                             f"(version {version}) is corrupt ({e}); delete it or pass "
                             "another --state-db") from None
        return UserState(user_id=user_id, version=int(version), state=state,
                         sessions=tuple(tuple(s) for s in sessions), updated=updated)

    def get(self, user_id: str, version: int) -> UserState | None:
        with self._lock:
            row = self._db.execute(
                "SELECT user_id, model_version, state, sessions, updated FROM user_states "
                "WHERE user_id = ? AND model_version = ?", (user_id, int(version))).fetchone()
        return self._record(row) if row else None

    def latest(self, user_id: str) -> UserState | None:
        with self._lock:
            row = self._db.execute(
                "SELECT user_id, model_version, state, sessions, updated FROM user_states "
                "WHERE user_id = ? ORDER BY updated DESC, model_version DESC LIMIT 1",
                (user_id,)).fetchone()
        return self._record(row) if row else None

    def put(self, user_id: str, version: int, state: np.ndarray,
            sessions: Sequence[Sequence[str]], expected: Any = ANY) -> UserState:
        state = np.asarray(state, dtype=np.float32)
        if state.ndim != 1:
            raise ValueError(f"state must be one user's vector [H], got shape {state.shape}")
        kept = trim_sessions(sessions, self.history_items)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock, until COMMIT / ROLLBACK
            try:
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
                record = UserState(user_id, int(version), state.copy(), kept, updated)
                self._db.execute("DELETE FROM user_states WHERE user_id = ? AND model_version != ?",
                                 (user_id, record.version))
                self._db.execute(
                    "INSERT INTO user_states (user_id, model_version, state, sessions, updated) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, model_version) DO UPDATE SET "
                    "state = excluded.state, sessions = excluded.sessions, "
                    "updated = excluded.updated",
                    (user_id, record.version, state.tobytes(),
                     json.dumps([list(s) for s in kept]), record.updated))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return record

    def delete(self, user_id: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM user_states WHERE user_id = ?",
                                    (user_id,)).rowcount


@dataclasses.dataclass(frozen=True)
class ResolvedState:
    """A user's state ready for one model version.

    Attributes:
      state: float32 [H].
      sessions: the recent sessions (oldest first) that go with it.
      source: `stored` (same version), `new` (no record: zeros), `rebuilt` (another
        version's record, replayed through this version's update_state) or `reset`
        (another version's record and nothing to replay: zeros).
      message: one line for logs and the CLI.
      record: the user's newest stored record when this was resolved (None: none), what
        a write computed from this state expects (`put(..., expected=record)`).
    """

    state: np.ndarray
    sessions: tuple[tuple[str, ...], ...]
    source: str
    message: str
    record: UserState | None = None

    @property
    def history(self) -> list[str]:
        """The recent item ids, newest last."""
        return [item for session in self.sessions for item in session]


UpdateFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def resolve_state(store: StateStore, user_id: str, version: int, state_size: int,
                  update_state: UpdateFn | None = None,
                  recent_sessions: Sequence[Sequence[str]] | None = None) -> ResolvedState:
    """Returns the user's state for `version`, never another version's state.

    Args:
      store: the state store.
      user_id: raw user id.
      version: the model version the caller has pinned.
      state_size: H of that version (from its metadata).
      update_state: (state [H], one session's ids) → state [H] on `version`; used to
        rebuild a state of another version.
      recent_sessions: the user's recent sessions, oldest first, to rebuild from; default
        the sessions stored with the other version's record.

    Returns:
      The resolved state; a rebuilt one is also written to the store.

    Raises:
      ValueError: a stored state of this version does not have `state_size` numbers.
    """
    record = store.get(user_id, version)
    if record is not None:
        if record.state.shape != (state_size,):
            raise ValueError(f"stored state of user {user_id!r} for version {version} has "
                             f"{record.state.size} numbers, the model has {state_size}")
        return ResolvedState(record.state, record.sessions, "stored",
                             f"user {user_id}: stored state of version {version}", record)
    zeros = np.zeros([state_size], np.float32)
    other = store.latest(user_id)
    if other is None:
        return ResolvedState(zeros, (), "new", f"user {user_id}: new user, state starts at zeros")
    sessions = trim_sessions(other.sessions if recent_sessions is None else recent_sessions,
                             store.history_items)
    if update_state is None or not sessions:
        message = (f"user {user_id}: stored state is from version {other.version}, the model is "
                   f"version {version}; no recent sessions to rebuild from, starting from zeros")
        log.info(message)
        return ResolvedState(zeros, sessions, "reset", message, other)
    state = zeros
    for session in sessions:
        state = np.asarray(update_state(state, session), dtype=np.float32)
    stored = store.put(user_id, version, state, sessions, expected=other)
    message = (f"user {user_id}: stored state is from version {other.version}, the model is "
               f"version {version}; rebuilt from {len(sessions)} recent sessions "
               f"({sum(len(s) for s in sessions)} items)")
    log.info(message)
    return ResolvedState(state, sessions, "rebuilt", message, stored)


def end_session(store: StateStore, user_id: str, version: int, state_size: int,
                update_state: UpdateFn, items: Sequence[str]) -> tuple[ResolvedState, UserState]:
    """Folds one finished session into the user's stored state: resolves the state
    (`resolve_state`), runs `update_state` and writes the result with the session added
    to the recent ones, on the condition that nobody wrote the user in between; after a
    concurrent write it starts again from the new record, so no session is lost.

    Returns:
      (the state the session was folded into, the record written).

    Raises:
      StateConflict: still conflicting after `MAX_ATTEMPTS` attempts.
      ValueError: as `resolve_state`.
    """
    items = list(items)
    for attempt in range(MAX_ATTEMPTS):
        try:
            resolved = resolve_state(store, user_id, version, state_size, update_state)
            state = np.asarray(update_state(resolved.state, items), dtype=np.float32)
            record = store.put(user_id, version, state, list(resolved.sessions) + [items],
                               expected=resolved.record)
            return resolved, record
        except StateConflict:
            time.sleep(0.001 * (attempt + 1) * (1 + np.random.random()))
    raise StateConflict(f"user {user_id!r}: the stored state changed {MAX_ATTEMPTS} times "
                        "while this session was being folded in; try again")
