"""serving.state_store on a real SQLite file: upserts, WAL, version-keyed states."""
from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
import time

import numpy as np
import pytest

from serving import state_store
from serving.state_store import SQLiteStateStore, resolve_state, trim_sessions


@pytest.fixture
def store(tmp_path):
    with SQLiteStateStore(str(tmp_path / "states.sqlite"), history_items=5) as s:
        yield s


def test_trim_sessions_keeps_newest_items_and_boundaries():
    assert trim_sessions([["a", "b", "c"], [], ["d", "e"]], 3) == (("c",), ("d", "e"))
    assert trim_sessions([["a"], ["b"]], 10) == (("a",), ("b",))
    assert trim_sessions([], 3) == ()


def test_trim_sessions_with_the_known_ids_keeps_the_newest_known_ones_and_those_between():
    """A repeat head reads the newest known items: unknown ids (items newer than the
    model) must not push known ones out of the store, yet stay (a later version may know
    them), up to RAW_HISTORY_FACTOR x the history in all."""
    known = {"a", "b", "c", "d"}
    sessions = [["a", "x", "b"], ["y", "c", "z"], ["d", "w"]]
    assert trim_sessions(sessions, 3) == (("z",), ("d", "w"))  # raw ids: only d is known
    assert trim_sessions(sessions, 3, known) == (("b",), ("y", "c", "z"), ("d", "w"))
    assert trim_sessions(sessions, 4, known) == tuple(map(tuple, sessions))
    assert trim_sessions(sessions, 3, set()) == tuple(map(tuple, sessions))  # all 8 < 12
    assert trim_sessions([["a"] + [f"u{i}" for i in range(20)]], 2, known) == (
        tuple(f"u{i}" for i in range(12, 20)),)  # 2 x 4 ids at most
    assert trim_sessions(sessions, 3, None) == trim_sessions(sessions, 3)


def test_end_session_folds_and_stores_the_session_as_the_pipeline_writes_it(store):
    """A reload or a double click is not an event of the model's sessions: collapsed
    before the update and in the stored history (`collapse=False` for records that keep
    repeats)."""
    seen = []
    update = lambda state, session: seen.append(list(session)) or state + len(session)  # noqa: E731
    _, record = state_store.end_session(store, "u", 1, 1, update, ["a", "a", "b", "", "b", "a"])
    assert seen == [["a", "b", "a"]] and record.history == ["a", "b", "a"]  # ("" pads)
    _, record = state_store.end_session(store, "v", 1, 1, update, ["a", "a"], collapse=False)
    assert record.history == ["a", "a"]
    assert state_store.collapse_repeats([]) == []
    # "[UNK]", a data folder's unknown item whose raw id it lost (serving.backfill): two
    # of them are two items, as the folder's records hold them
    assert state_store.collapse_repeats(["[UNK]", "[UNK]", "a", "[UNK]", "x", "x"]) == [
        "[UNK]", "[UNK]", "a", "[UNK]", "x"]


def test_end_session_with_the_known_ids_stores_the_newest_known_history(tmp_path):
    with SQLiteStateStore(str(tmp_path / "s.sqlite"), history_items=2) as store:
        update = lambda state, session: state + len(session)  # noqa: E731
        known_ids = lambda ids: {i for i in ids if i.startswith("k")}  # noqa: E731
        for session in (["k1", "k2"], ["k3", "new1"], ["new2", "new3"]):
            _, record = state_store.end_session(store, "u", 1, 1, update, session,
                                                known_items=known_ids)
        assert record.history == ["k2", "k3", "new1", "new2", "new3"]
        assert record.state.tolist() == [6]
        # version 2 rebuilds from that history and keeps it whole too
        rebuilt = resolve_state(store, "u", 2, 1, update, known_items=known_ids)
        assert rebuilt.source == "rebuilt" and rebuilt.history == record.history
        assert store.get("u", 2).history == record.history
        # without the known ids, the newest 2 ids
        _, record = state_store.end_session(store, "u", 1, 1, update, ["k4"])
        assert record.history == ["new3", "k4"]


def test_a_session_that_is_not_a_list_of_string_ids_is_refused_before_anything_is_stored(store):
    """A string session was stored, and folded in, as one item a character ("4202570" ->
    "4", "2", ...); an integer id is not the string the vocabulary holds (API audit)."""
    update = lambda state, session: state + len(session)  # noqa: E731
    with pytest.raises(TypeError, match=r"user 'u1'\'s session is the string '4202570', not "
                                        r"a list of item ids: pass \['4202570'\]"):
        state_store.end_session(store, "u1", 1, 1, update, "4202570")
    with pytest.raises(TypeError, match="holds the int 42: item ids are strings"):
        state_store.end_session(store, "u1", 1, 1, update, ["a", 42])
    with pytest.raises(TypeError, match="session 1 of user 'u1' is the string 'ab'"):
        store.put("u1", 1, np.zeros(1, np.float32), [["a"], "ab"])
    assert store.latest("u1") is None
    _, record = state_store.end_session(store, "u1", 1, 1, update, ("4202570",))
    assert record.history == ["4202570"]


def test_put_get_upsert_and_persistence(store, tmp_path):
    assert store.get("u", 1) is None and store.latest("u") is None
    store.put("u", 1, np.array([1, 2], np.float32), [["a", "b"]])
    store.put("u", 1, np.array([3, 4], np.float32), [["a", "b"], ["c", "d", "e", "f"]])
    rec = store.get("u", 1)
    np.testing.assert_array_equal(rec.state, [3, 4])
    assert rec.state.dtype == np.float32
    assert rec.sessions == (("b",), ("c", "d", "e", "f"))  # history_items=5
    assert rec.history == ["b", "c", "d", "e", "f"]
    with SQLiteStateStore(store.path) as again:  # a second connection sees the commit
        np.testing.assert_array_equal(again.get("u", 1).state, [3, 4])
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM user_states").fetchone()[0] == 1
    assert store.delete("u") == 1 and store.get("u", 1) is None


def test_a_non_finite_state_is_refused_and_the_stored_one_kept(store):
    store.put("u", 1, np.array([1, 2], np.float32), [["a"]])
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or infinite values: not stored"):
            store.put("u", 1, np.array([bad, 2], np.float32), [["a"], ["b"]])
    np.testing.assert_array_equal(store.get("u", 1).state, [1, 2])


def test_wal_journal(store):
    store.put("u", 1, np.zeros(2, np.float32), [["a"]])
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert os.path.exists(store.path + "-wal")


def test_an_uncounted_record_replaces_the_other_versions(store):
    """A put without `sessions_total` (a file of an earlier store, a caller of its own):
    nothing tells how far behind it another version's record is, so it stays alone."""
    store.put("u", 1, np.zeros(2, np.float32), [["a"]], sessions_total=1)
    store.put("u", 2, np.zeros(2, np.float32), [["a"]])
    store.put("u", 2, np.ones(2, np.float32), [["a"], ["b"]])
    assert store.get("u", 1) is None
    assert store.latest("u").version == 2


def test_concurrent_writers_never_lose_a_row(tmp_path):
    path = str(tmp_path / "states.sqlite")
    stores = [SQLiteStateStore(path) for _ in range(2)]

    def write(s, offset):
        for i in range(50):
            s.put(f"user{offset + i}", 1, np.full(4, i, np.float32), [[f"item{i}"]])

    threads = [threading.Thread(target=write, args=(s, 100 * n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM user_states").fetchone()[0] == 100
    np.testing.assert_array_equal(stores[0].get("user149", 1).state, np.full(4, 49, np.float32))
    for s in stores:
        s.close()


def test_resolve_state_new_and_stored(store):
    new = resolve_state(store, "u", 1, 3)
    assert new.source == "new" and new.state.tolist() == [0, 0, 0] and new.history == []
    store.put("u", 1, np.array([1, 2, 3], np.float32), [["a", "b"]])
    stored = resolve_state(store, "u", 1, 3)
    assert stored.source == "stored" and stored.state.tolist() == [1, 2, 3]
    assert stored.history == ["a", "b"]
    # a state of another size under the same number is another model's: never served
    other = resolve_state(store, "u", 1, 4, update_state=lambda state, session: state + 1)
    assert other.source == "rebuilt" and other.state.tolist() == [1, 1, 1, 1]
    assert "the stored state of version 1 has 3 numbers, the model has 4" in other.message


def test_another_model_under_the_same_version_number_is_rebuilt(store):
    """A new export base numbers from 1 again: the record's fingerprint tells the models
    apart; round-off between machines does not."""
    mine, theirs = np.array([0.5, -2.0, 7.0], np.float32), np.array([0.1, 0.3, 2.0], np.float32)
    store.put("u", 1, np.array([9, 9], np.float32), [["a", "b"], ["c"]], fingerprint=mine)
    assert store.get("u", 1).fingerprint.tolist() == mine.tolist()
    update = lambda state, session: state + len(session)  # noqa: E731
    same = resolve_state(store, "u", 1, 2, update, fingerprint=mine * (1 + 1e-6))
    assert same.source == "stored" and same.state.tolist() == [9, 9]
    assert resolve_state(store, "u", 1, 2, update).source == "stored"  # no fingerprint: trusted
    rebuilt = resolve_state(store, "u", 1, 2, update, fingerprint=theirs)
    assert rebuilt.source == "rebuilt" and rebuilt.state.tolist() == [3, 3]
    assert "from another model exported under that number" in rebuilt.message
    record = store.get("u", 1)
    assert record.state.tolist() == [3, 3] and record.fingerprint.tolist() == theirs.tolist()
    assert resolve_state(store, "u", 1, 2, update, fingerprint=theirs).source == "stored"
    # end_session writes the fingerprint it resolved with
    _, written = state_store.end_session(store, "v", 1, 2, update, ["x"], fingerprint=mine)
    assert store.get("v", 1).fingerprint.tolist() == mine.tolist() == written.fingerprint.tolist()
    resolved, _ = state_store.end_session(store, "v", 1, 2, update, ["y"], fingerprint=theirs)
    assert resolved.source == "rebuilt" and store.get("v", 1).state.tolist() == [2, 2]


def test_a_file_of_the_store_before_fingerprints_is_upgraded(tmp_path):
    path = str(tmp_path / "old.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("""CREATE TABLE user_states (user_id TEXT NOT NULL, model_version INTEGER NOT
                      NULL, state BLOB NOT NULL, sessions TEXT NOT NULL, updated REAL NOT NULL,
                      PRIMARY KEY (user_id, model_version))""")
        db.execute("INSERT INTO user_states VALUES ('u', 2, ?, '[[\"a\"]]', 5.0)",
                   (np.array([1, 2], np.float32).tobytes(),))
    with SQLiteStateStore(path) as s:
        record = s.get("u", 2)
        assert record.state.tolist() == [1, 2] and record.fingerprint is None
        assert resolve_state(s, "u", 2, 2, fingerprint=np.ones(3, np.float32)).source == "stored"
        s.put("u", 2, np.zeros(2, np.float32), [["a"]], fingerprint=np.ones(3, np.float32))
    with SQLiteStateStore(path) as s:
        assert s.get("u", 2).fingerprint.tolist() == [1, 1, 1]


def test_state_of_another_version_is_rebuilt_from_recent_sessions(store):
    store.put("u", 1, np.array([9, 9], np.float32), [["a", "b"], ["c"]])
    calls = []

    def update(state, session):  # stands in for version 2's update_state: count items
        calls.append(list(session))
        return state + len(session)

    resolved = resolve_state(store, "u", 2, 2, update_state=update)
    assert resolved.source == "rebuilt" and "version 1" in resolved.message
    assert calls == [["a", "b"], ["c"]]  # replayed oldest first, from zeros, never [9, 9]
    assert resolved.state.tolist() == [3, 3]
    assert store.get("u", 2).state.tolist() == [3, 3] and store.get("u", 1) is None
    assert resolve_state(store, "other", 2, 2, update_state=update).source == "new"


def test_state_of_another_version_without_sessions_starts_from_zeros(store):
    store.put("u", 1, np.array([9, 9], np.float32), [["a"]])
    resolved = resolve_state(store, "u", 2, 2)  # no update function: cannot rebuild
    assert resolved.source == "reset" and resolved.state.tolist() == [0, 0]
    assert "starting from zeros" in resolved.message
    supplied = resolve_state(store, "u", 2, 2, update_state=lambda s, x: s + 1, recent_sessions=[])
    assert supplied.source == "reset"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="history_items"):
        SQLiteStateStore(str(tmp_path / "x.sqlite"), history_items=0)
    bad = tmp_path / "not_a_db.sqlite"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="not_a_db.sqlite is not a SQLite database"):
        SQLiteStateStore(str(bad))
    with SQLiteStateStore(str(tmp_path / "y.sqlite")) as s:
        with pytest.raises(ValueError, match="one user's vector"):
            s.put("u", 1, np.zeros([1, 2], np.float32), [])
    # the store keeps what the default model's repeat head reads
    from model.config import HierTCNConfig
    assert state_store.DEFAULT_HISTORY_ITEMS == HierTCNConfig().history_size
    assert s.history_items == state_store.DEFAULT_HISTORY_ITEMS


@pytest.mark.parametrize("clock", ["real", "frozen", "backwards"])
def test_conditional_put_writes_only_over_the_record_it_was_computed_from(store, monkeypatch,
                                                                          clock):
    """Also where the clock stands still (a coarse one) or steps back (NTP): each record
    is stamped after the one it replaces, so `latest` is the newest write and a write
    computed from the replaced record is refused."""
    if clock == "frozen":
        monkeypatch.setattr(state_store.time, "time", lambda: 1e6)
    elif clock == "backwards":
        ticks = itertools.count(10**6, -1)
        monkeypatch.setattr(state_store.time, "time", lambda: float(next(ticks)))
    first = store.put("u", 1, np.zeros(2, np.float32), [["a"]], expected=None)
    with pytest.raises(state_store.StateConflict):
        store.put("u", 1, np.ones(2, np.float32), [["x"]], expected=None)  # not new any more
    second = store.put("u", 1, np.ones(2, np.float32), [["a"], ["b"]], expected=first)
    assert second.updated > first.updated
    with pytest.raises(state_store.StateConflict):  # computed from `first`, now stale
        store.put("u", 2, np.full(2, 7, np.float32), [["c"]], expected=first)
    kept = store.latest("u")
    assert (kept.version, kept.sessions, kept.updated) == (1, (("a",), ("b",)), second.updated)
    np.testing.assert_array_equal(kept.state, [1, 1])


def test_concurrent_end_sessions_of_one_user_lose_nothing(tmp_path):
    """Two connections (as two client processes) end 15 sessions each of the same user; the
    update is slow enough that their read-update-write cycles overlap."""
    path = str(tmp_path / "states.sqlite")
    stores = [SQLiteStateStore(path, history_items=100) for _ in range(2)]
    conflicts = []

    def update(state, session):  # the state counts the sessions folded in
        time.sleep(0.005)
        return state + 1

    def end_sessions(s, name):
        put = s.put

        def counting_put(*args, **kwargs):
            try:
                return put(*args, **kwargs)
            except state_store.StateConflict:
                conflicts.append(name)
                raise

        s.put = counting_put
        for i in range(15):
            state_store.end_session(s, "shared", 1, 3, update, [f"{name}{i}", "x"])

    threads = [threading.Thread(target=end_sessions, args=(s, n)) for s, n in zip(stores, "ab")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = stores[0].get("shared", 1)
    assert len(record.sessions) == 30
    assert sorted(s[0] for s in record.sessions) == sorted(f"{n}{i}" for n in "ab" for i in range(15))
    np.testing.assert_array_equal(record.state, [30, 30, 30])
    assert conflicts  # the cycles did overlap, and were redone
    for s in stores:
        s.close()


def test_a_foreign_table_or_a_corrupt_record_is_named(tmp_path):
    foreign = str(tmp_path / "foreign.sqlite")
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE user_states (user_id TEXT, state BLOB, updated REAL)")
    with pytest.raises(ValueError, match=r"columns \(user_id, state, updated\), not this store's"):
        SQLiteStateStore(foreign)
    with SQLiteStateStore(str(tmp_path / "s.sqlite")) as s:
        s.put("u", 3, np.zeros(2, np.float32), [["a"]])
        with sqlite3.connect(s.path) as db:
            db.execute("UPDATE user_states SET sessions = 'not json'")
        with pytest.raises(ValueError, match=r"s.sqlite: the record of user 'u' \(version 3\) "
                                             r"is corrupt"):
            s.get("u", 3)


def test_a_full_database_is_one_error_and_keeps_what_was_stored(store):
    """SQLite's own "database or disk is full" (a page limit here, as a full disk gives):
    a ValueError that says so (the client prints it in one line), not SQLite's second error
    from a ROLLBACK after SQLite rolled back itself; earlier records are intact and the
    store writes again once there is room."""
    store.put("kept", 1, np.arange(4, dtype=np.float32), [["a", "b"]])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    big = np.random.default_rng(0).random(20_000).astype(np.float32)  # 80 KB: new pages
    with pytest.raises(ValueError, match="cannot write to state database .*database or disk "
                                         "is full; the records stored before are kept; make "
                                         "room or fix the disk"):
        store.put("new", 1, big, [["c"]])
    assert not store._db.in_transaction
    np.testing.assert_array_equal(store.get("kept", 1).state, np.arange(4))
    assert store.get("new", 1) is None
    store._db.execute(f"PRAGMA max_page_count = {pages * 1000}")
    store.put("new", 1, big, [["c"]])
    np.testing.assert_array_equal(store.get("new", 1).state, big)


def _open_and_put(path, barrier, results):
    barrier.wait()
    try:
        with SQLiteStateStore(path) as s:
            s.put("u", 1, [0.0], [["a"]])
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path):
    """Switching a new file to WAL needs it alone, and SQLite answers "database is locked"
    at once (no busy timeout) to the others: several workers starting on a new --state-db
    failed now and then (10 of 160 opens with 4 processes), told to pass another file."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(12):
        path = str(tmp_path / f"new{trial}.sqlite")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_and_put, args=(path, barrier, results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        outcomes += [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
    assert outcomes == ["ok"] * 72


def test_clients_of_two_versions_take_turns_without_rebuilding_each_other(store):
    """A rollout (or a pinned client finishing on the old version): version 1 and 2 both
    write one user. Each keeps its record; a record another version has moved past folds
    in only the sessions it missed, never the whole history again."""
    calls = {1: [], 2: []}

    def update(version):
        def fn(state, session):
            calls[version].append(list(session))
            return state + (1 if version == 1 else 10) * len(session)
        return fn

    end = lambda version, items: state_store.end_session(store, "u", version, 2,  # noqa: E731
                                                         update(version), items)
    assert end(1, ["a"])[0].source == "new"
    resolved, record = end(2, ["b"])  # version 2's first call: rebuilt from a
    assert resolved.source == "rebuilt" and calls[2] == [["a"], ["b"]]
    assert record.sessions_total == 2 and store.get("u", 1).sessions_total == 1
    calls = {1: [], 2: []}
    resolved, record = end(1, ["c", "d"])
    assert resolved.source == "caught_up" and "1 session behind version 2's" in resolved.message
    assert calls[1] == [["b"], ["c", "d"]]  # b (missed), then the new session
    assert record.state.tolist() == [4, 4] and record.sessions_total == 3
    resolved, record = end(2, ["e"])
    assert resolved.source == "caught_up" and calls[2] == [["c", "d"], ["e"]]
    assert record.state.tolist() == [50, 50] and record.sessions == (("a",), ("b",), ("c", "d"),
                                                                     ("e",))
    # no write in between: the own record is served as it is, with the newest history
    again = resolve_state(store, "u", 2, 2, update(2))
    assert again.source == "stored" and again.history == ["a", "b", "c", "d", "e"]
    behind = resolve_state(store, "u", 1, 2, update(1))
    assert behind.source == "caught_up" and behind.state.tolist() == [5, 5]
    now = resolve_state(store, "u", 2, 2, update(2))  # version 1 wrote, but nothing new
    assert now.source == "stored" and now.state.tolist() == [50, 50]


def test_a_record_further_behind_than_the_history_is_rebuilt(tmp_path):
    with SQLiteStateStore(str(tmp_path / "s.sqlite"), history_items=2) as store:
        update = lambda state, session: state + len(session)  # noqa: E731
        state_store.end_session(store, "u", 1, 1, update, ["a"])
        for item in "bcd":  # three sessions on version 2; two items kept
            state_store.end_session(store, "u", 2, 1, update, [item])
        resolved = resolve_state(store, "u", 1, 1, update)
        assert resolved.source == "rebuilt" and resolved.state.tolist() == [2]
        assert "older than version 2's by 3 sessions, more than its recent sessions hold" \
            in resolved.message


def test_a_catch_up_over_a_session_the_store_cut_says_it_is_approximate(tmp_path):
    """The store keeps the newest `history_items` ids, so the oldest session it holds may
    be a cut one: folding it in is still the nearest state (a rebuild would also lose what
    came before it), and the message says it is not exact."""
    with SQLiteStateStore(str(tmp_path / "s.sqlite"), history_items=4) as store:
        update = lambda state, session: state + len(session)  # noqa: E731
        state_store.end_session(store, "u", 1, 1, update, ["a", "b", "c"])
        for session in (["d", "e", "f"], ["g", "h", "i"]):
            state_store.end_session(store, "u", 2, 1, update, session)
        assert store.latest("u").sessions == (("f",), ("g", "h", "i"))
        resolved = resolve_state(store, "u", 1, 1, update)
        assert resolved.source == "caught_up" and resolved.state.tolist() == [3 + 1 + 3]
        assert "approximately: the store may hold only the last 1 items of the oldest" \
            in resolved.message
        # one session behind, held whole: exact, and said without the caveat
        state_store.end_session(store, "u", 2, 1, update, ["j"])
        exact = resolve_state(store, "u", 1, 1, update)
        assert exact.source == "caught_up" and exact.state.tolist() == [8]
        assert "approximately" not in exact.message


def test_a_write_that_waits_out_another_writers_lock_is_one_error(tmp_path):
    """`BEGIN IMMEDIATE` gives up after the busy timeout with SQLite's "database is
    locked": one ValueError that says to try again, and the stored record stays (a put's
    and a prune's; a dry run takes no write lock)."""
    path = str(tmp_path / "s.sqlite")
    with SQLiteStateStore(path, busy_timeout_s=0.2) as store:
        store.put("u", 1, np.ones(2, np.float32), [["a"]])
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(ValueError, match="database is locked.*try again"):
                store.put("u", 1, np.zeros(2, np.float32), [["b"]])
            with pytest.raises(ValueError, match="cannot prune state database .*database is "
                                                 "locked.*try again"):
                store.prune(time.time() + 10)
            assert store.prune(time.time() + 10, dry_run=True).users == 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert store.get("u", 1).state.tolist() == [1, 1]
        store.put("u", 1, np.zeros(2, np.float32), [["b"]])  # the lock gone, it writes
        assert store.get("u", 1).history == ["b"]
    with pytest.raises(ValueError, match="busy_timeout_s must be >= 0"):
        SQLiteStateStore(path, busy_timeout_s=-1)


def test_the_newest_versions_records_are_kept(tmp_path):
    with SQLiteStateStore(str(tmp_path / "s.sqlite"), versions_kept=2) as store:
        update = lambda state, session: state + 1  # noqa: E731
        for version in (1, 2, 3):
            state_store.end_session(store, "u", version, 1, update, [f"i{version}"])
        assert store.get("u", 1) is None
        assert [store.get("u", v).sessions_total for v in (2, 3)] == [2, 3]
        assert store.delete("u") == 2
    with pytest.raises(ValueError, match="versions_kept must be >= 1"):
        SQLiteStateStore(str(tmp_path / "t.sqlite"), versions_kept=0)


def test_a_file_of_the_store_before_session_counts_is_upgraded(tmp_path):
    path = str(tmp_path / "old.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("""CREATE TABLE user_states (user_id TEXT NOT NULL, model_version INTEGER NOT
                      NULL, state BLOB NOT NULL, sessions TEXT NOT NULL, updated REAL NOT NULL,
                      model_fingerprint BLOB, PRIMARY KEY (user_id, model_version))""")
        db.execute("INSERT INTO user_states VALUES ('u', 2, ?, '[[\"a\"]]', 5.0, NULL)",
                   (np.array([1, 2], np.float32).tobytes(),))
    with SQLiteStateStore(path) as s:
        assert s.get("u", 2).sessions_total is None
        update = lambda state, session: state + 1  # noqa: E731
        resolved, record = state_store.end_session(s, "u", 2, 2, update, ["b"])
        assert resolved.source == "stored" and record.sessions_total == 1  # counted from here
        assert record.state.tolist() == [2, 3]


def test_a_damaged_file_is_one_error_that_says_so(tmp_path):
    path = str(tmp_path / "s.sqlite")
    with SQLiteStateStore(path) as s:
        for i in range(300):
            s.put(f"user{i}", 1, np.full(64, i, np.float32), [[f"item{i}"]])
        s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as f:  # the table's pages, not the schema's (page 1)
        f.seek(8192)
        f.write(b"\xff" * 12288)
    with SQLiteStateStore(path) as s:
        with pytest.raises(ValueError, match=r"cannot read state database .*malformed; the file "
                                             r"is damaged: restore it from a backup"):
            for i in range(300):
                s.get(f"user{i}", 1)


def test_a_store_that_fails_to_open_closes_its_connection(tmp_path):
    """A caller that keeps the error (a retry loop's last error) holds no open file (static
    audit: the error's traceback kept the connection of a damaged file open)."""
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4080)  # a header, a damaged page 1

    def open_files():
        return sum(os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    errors = []
    for _ in range(3):
        try:
            SQLiteStateStore(str(path))
        except ValueError as e:
            errors.append(e)
    assert len(errors) == 3 and "cannot open state database" in str(errors[0])
    assert open_files() == 0


def test_a_path_too_long_for_sqlite_says_so_and_leaves_no_empty_file(tmp_path):
    """SQLite opens no file whose full path passes about 504 bytes and says only "unable
    to open database file" (paths audit); the 0-byte file made before it stayed behind."""
    folder = tmp_path
    while len(os.fsencode(str(folder))) < 420:
        folder = folder / ("d" * 60)
    folder.mkdir(parents=True)
    long_path = folder / ("s" * (530 - len(os.fsencode(str(folder)))) + ".sqlite")
    assert len(os.fsencode(str(long_path))) > state_store.SQLITE_PATH_BYTES
    with pytest.raises(ValueError, match=r"cannot open state database .*unable to open database "
                                         r"file; its full path is \d+ bytes, and SQLite opens a "
                                         r"file whose path is at most about 504: pass a "
                                         r"--state-db in a folder with a shorter path"):
        SQLiteStateStore(str(long_path))
    assert os.listdir(folder) == []
    # at the limit it opens
    fits = folder / ("t" * (state_store.SQLITE_PATH_BYTES - len(os.fsencode(str(folder))) - 1))
    SQLiteStateStore(str(fits)).close()
    assert os.path.getsize(fits) > 0


def test_a_file_that_is_no_database_is_said_to_be_another_file(tmp_path):
    """A CSV passed as the state file is not "damaged": the error says what it is, and
    the file is left as it was."""
    path = tmp_path / "log.csv"
    path.write_text("user,item,time\n" + "u,a,1\n" * 200)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"log.csv is not a SQLite database \(a CSV, a log\?\): "
                                         r"pass the state file as --state-db"):
        SQLiteStateStore(str(path))
    assert path.read_bytes() == before


def test_forget_deletes_a_users_records_without_a_server(tmp_path, capsys):
    from serving import client
    path = str(tmp_path / "s.sqlite")
    with SQLiteStateStore(path) as s:
        s.put("u", 1, np.zeros(2, np.float32), [["a"]], sessions_total=1)
        s.put("u", 2, np.zeros(2, np.float32), [["a"]], sessions_total=1)
        s.put("w", 2, np.zeros(2, np.float32), [["b"]])
        with sqlite3.connect(path) as db:
            db.execute("UPDATE user_states SET sessions = 'not json' WHERE user_id = 'u'")
        with pytest.raises(ValueError, match=r"corrupt .*; delete the user's records \(python -m "
                                             r"serving.client --state-db .*s.sqlite forget "
                                             r"--user u\)"):
            s.get("u", 2)
    assert client.main(["--state-db", path, "forget", "--user", "u"]) == 0
    assert capsys.readouterr().out.strip() == f"user u: deleted 2 stored records from {path}"
    with SQLiteStateStore(path) as s:
        assert s.latest("u") is None and s.latest("w") is not None
    assert client.main(["--state-db", str(tmp_path / "none.sqlite"), "forget", "--user", "u"]) == 1
    assert "none.sqlite does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.sqlite")
    with pytest.raises(SystemExit):
        client.main(["--state-db", path, "status"])
    assert "status needs --model-name" in capsys.readouterr().err


def test_an_empty_session_is_refused(store):
    with pytest.raises(ValueError, match="an empty session; nothing to fold in"):
        state_store.end_session(store, "u", 1, 2, lambda s, x: s + 1, [])
    assert store.latest("u") is None


def test_a_write_that_fails_below_sqlite_says_so_not_pass_another_file(tmp_path):
    """Under a file-size limit or a quota SQLite reports "disk I/O error" (it maps only
    ENOSPC to "database or disk is full"); the advice was "pass another --state-db", as if
    the file were bad, though every record written before is intact."""
    import subprocess
    import sys

    from tiny_logs import file_size_limited

    path = tmp_path / "states.sqlite"
    code = ("import sys\nfrom serving import state_store\n"
            f"try:\n    state_store.SQLiteStateStore({str(path)!r})\n"
            "except ValueError as e:\n    print(e)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(file_size_limited(1024, [sys.executable, "-c", code]), cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cannot open state database {path}: disk I/O error; a "
                                  "write to it or to its -wal or -shm file failed"), proc.stdout
    assert "pass another --state-db" not in proc.stdout
    # ... and a write to a store that opened: the same advice after the records kept
    code = ("import numpy as np\nfrom serving import state_store\n"
            f"s = state_store.SQLiteStateStore({str(path)!r})\n"
            "try:\n    s.put('u', 1, np.ones(300_000, np.float32), [['a']])\n"
            "except ValueError as e:\n    print(e)\n")
    assert not path.exists()  # (the empty file made before SQLite failed is not left)
    proc = subprocess.run(file_size_limited(200_000, [sys.executable, "-c", code]), cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cannot write to state database {path}: disk I/O error; "
                                  "the records stored before are kept; make room or fix the "
                                  "disk"), proc.stdout


def test_the_wal_file_shrinks_back_after_a_long_reader(tmp_path, monkeypatch):
    """A reader that holds a snapshot makes the -wal file grow with every write meanwhile;
    SQLite kept that peak on disk for as long as the store stayed open (78 MB after 12,000
    writes beside one reader): it is cut back to WAL_SIZE_LIMIT once checkpointed."""
    monkeypatch.setattr(state_store, "WAL_SIZE_LIMIT", 2 ** 20)
    path = tmp_path / "states.sqlite"
    state = np.ones(1000, np.float32)
    with SQLiteStateStore(str(path)) as store:
        reader = sqlite3.connect(path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM user_states").fetchall()  # holds a snapshot
        for k in range(1500):
            store.put(f"u{k}", 1, state, [["a"]])
        peak = os.path.getsize(f"{path}-wal")
        assert peak > 5 * 2 ** 20
        reader.execute("COMMIT")
        reader.close()
        for k in range(1500):  # past the next automatic checkpoint
            store.put(f"v{k}", 1, state, [["a"]])
        assert os.path.getsize(f"{path}-wal") < peak / 2
        assert store.get("u7", 1) is not None and store.get("v1499", 1) is not None


def test_a_new_store_file_is_its_owners_alone_and_an_existing_one_keeps_its_mode(tmp_path):
    """Its users' item histories are personal data: a new file (and its WAL) was created
    readable by everyone under the usual umask 022 (security review)."""
    path = tmp_path / "states.sqlite"
    old = os.umask(0o022)
    try:
        with SQLiteStateStore(str(path)) as s:
            s.put("u", 1, np.array([1, 2], np.float32), [["a", "b"]])
            assert os.stat(path).st_mode & 0o777 == 0o600
            assert os.stat(f"{path}-wal").st_mode & 0o777 == 0o600
        shared = tmp_path / "shared.sqlite"
        sqlite3.connect(shared).close()
        os.chmod(shared, 0o640)
        with SQLiteStateStore(str(shared)):
            pass
        assert os.stat(shared).st_mode & 0o777 == 0o640
        # through a link to a file not made yet (SQLite made it 0644)
        (tmp_path / "real").mkdir()
        os.symlink(tmp_path / "real" / "linked.sqlite", tmp_path / "link.sqlite")
        with SQLiteStateStore(str(tmp_path / "link.sqlite")) as s:
            s.put("u", 1, np.array([1, 2], np.float32), [["a", "b"]])
        assert os.stat(tmp_path / "real" / "linked.sqlite").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_sessions_behind_trusts_the_counts_only_where_the_contents_agree():
    s = [("a",), ("b", "c"), ("a",), ("d",)]
    # the counts agree with the contents (the session before the 2 is the last one folded),
    # even where that session recurs
    assert state_store.sessions_behind(s, ["b", "c"], 2) == 2
    assert state_store.sessions_behind(s, ["a"], 1) == 1
    # they do not: the newest occurrence of the last session folded decides
    assert state_store.sessions_behind(s, ["b", "c"], 1) == 2
    assert state_store.sessions_behind(s, ["d"], 1) == 0
    assert state_store.sessions_behind(s, ["e"], 1) is None
    # where the session before the last one folded is given, it must precede it there
    # (directly, or with one session between: one a side dropped)
    assert state_store.sessions_behind(s, ["a"], 0, ["b", "c"]) == 1
    assert state_store.sessions_behind(s, ["a"], 0, ["x"]) is None
    assert state_store.sessions_behind(s, ["d"], 0, ["b", "c"]) == 0
    # nothing to check the count by: the count
    assert state_store.sessions_behind(s, ["e"], 4) == 4 and state_store.sessions_behind(s, [], 1) == 1
    # [UNK] (a backfill's item the log did not know) matches any item; the oldest held
    # session may be the end of a cut one
    assert state_store.sessions_behind(s, ["[UNK]", "c"], 0) == 2
    assert state_store.sessions_behind([("c",), ("d",)], ["b", "c"], 0) == 1
    assert state_store.sessions_behind([("d",), ("c",)], ["b", "c"], 1) is None


def test_a_rolled_back_version_behind_by_count_but_not_by_content_is_served_as_stored(store):
    """Lifecycle audit: a refresh's backfill from a newer pipeline run counted one session
    more (an early session the older run had dropped for its vocabulary) for the same
    history: rolled back, version 1 folded its last session a second time."""
    update = lambda state, session: state + len(session)  # noqa: E731
    store.put("u", 1, np.array([5.0], np.float32), [["b", "c", "d"], ["e", "f"]],
              sessions_total=2)
    store.put("u", 2, np.array([7.0], np.float32), [["x", "b"], ["b", "c", "d"], ["e", "f"]],
              sessions_total=3)
    resolved = resolve_state(store, "u", 1, 1, update)
    assert resolved.source == "stored" and resolved.state.tolist() == [5.0]
    # a session ended on version 2 since: version 1 folds that one alone
    state_store.end_session(store, "u", 2, 1, update, ["g"])
    resolved = resolve_state(store, "u", 1, 1, update)
    assert resolved.source == "caught_up" and resolved.state.tolist() == [6.0]


def test_a_store_knows_when_its_file_was_removed_or_replaced(tmp_path):
    """A backfill whose state file was removed while it ran said it had stored its users
    (failure-injection audit): the store can tell, and the backfill says it."""
    path = tmp_path / "s.sqlite"
    with SQLiteStateStore(str(path)) as store:
        store.put("u", 1, np.zeros(2, np.float32), [["a"]])
        assert not store.moved()
        os.remove(path)
        assert store.moved()
        # and refuses to write on: a long-lived store (a web service's) went on storing
        # into the removed file, each write said to succeed (serving audit)
        for write in (lambda: store.put("v", 1, np.zeros(2, np.float32), [["b"]]),
                      lambda: state_store.end_session(store, "v", 1, 2, lambda s, x: s, ["b"]),
                      lambda: store.delete("u")):
            with pytest.raises(ValueError, match="the file was removed or replaced since this "
                               "store opened it, so the write would go to a file no one can "
                               "open again; not stored: open the store again"):
                write()
    with SQLiteStateStore(str(path)) as store:
        sqlite3.connect(tmp_path / "other.sqlite").close()
        os.replace(tmp_path / "other.sqlite", path)
        assert store.moved()


def test_a_user_who_may_not_write_the_file_is_refused_before_sqlite_touches_it(tmp_path):
    """In WAL mode SQLite writes -wal and -shm beside the file even to read: a user who
    could only read it made them as their own and locked its owner out (unprivileged-user
    audit). Such a user is refused in one line, and nothing is made beside the file."""
    import tempfile

    folder = tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "s.sqlite")
        with SQLiteStateStore(path) as store:
            store.put("u", 1, np.zeros(2, np.float32), [["a"]])
        made = sorted(os.listdir(folder))
        if os.geteuid() == 0:  # root may write anything: be someone else for the check
            os.seteuid(65534)
        else:
            os.chmod(path, 0o400)
        try:
            with pytest.raises(ValueError, match=r"cannot use state database .*s\.sqlite \(\S+ "
                               r"mode \d+\): this user may not read and write it; ask its "
                               r"owner for access"):
                SQLiteStateStore(path)
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        assert sorted(os.listdir(folder)) == made
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def test_a_store_on_a_read_only_file_system_is_said_so(read_only_mount):
    """A store file on a file system mounted read-only (SQLite writes -wal and -shm beside
    it even to read): the error says so, not that this user lacks permission (root was told
    to ask the owner for chmod g+rw)."""
    mnt, remount_read_only = read_only_mount
    path = str(mnt / "s.sqlite")
    with SQLiteStateStore(path) as store:
        store.put("u1", 1, np.ones(4, np.float32), [["a", "b"]])
    remount_read_only()
    with pytest.raises(ValueError, match="read-only file system") as raised:
        SQLiteStateStore(path)
    assert "ask its owner" not in str(raised.value)


def _age(path, seconds, where, params=()):
    """Moves records' write times `seconds` into the past."""
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE user_states SET updated = updated - ? WHERE {where}",
                   (seconds, *params))


def test_prune_deletes_the_users_whose_newest_record_is_older_than_the_cut_off(tmp_path):
    """A user goes with all their records when the newest is older than the cut-off; a user
    with one recent record keeps the old ones too. Batches of 2 users walk the whole
    table; a user written between two batches (a live end-session) is kept."""
    path = str(tmp_path / "s.sqlite")
    day = 86_400
    with SQLiteStateStore(path) as store:
        store.PRUNE_BATCH = 2
        for user in ("a", "b", "c", "d", "e", "f", "g"):
            store.put(user, 1, np.ones(2, np.float32), [["x"]], sessions_total=1)
        store.put("b", 2, np.ones(2, np.float32), [["x"]], sessions_total=1)
        store.put("d", 2, np.ones(2, np.float32), [["x"]], sessions_total=1)
        _age(path, 40 * day, "user_id IN ('a', 'b', 'f', 'g')")
        _age(path, 40 * day, "user_id = 'd' AND model_version = 1")  # d's v2 is recent
        before = time.time() - 30 * day
        seen = []
        dry = store.prune(before, dry_run=True, progress=seen.append)
        assert (dry.users, dry.records, dry.kept_users, dry.dry_run) == (4, 5, 3, True)
        assert seen == [2, 2, 2, 1]
        assert store._db.execute("SELECT COUNT(*) FROM user_states").fetchone()[0] == 9

        def live_write(n):  # after the first batch, g ends a session
            if not seen:
                store.put("g", 1, np.zeros(2, np.float32), [["y"]], sessions_total=2)
            seen.append(n)
        seen.clear()
        done = store.prune(before, progress=live_write)
        assert (done.users, done.records, done.kept_users, done.dry_run) == (3, 4, 4, False)
        left = store._db.execute("SELECT user_id, model_version FROM user_states "
                                 "ORDER BY user_id, model_version").fetchall()
        assert left == [("c", 1), ("d", 1), ("d", 2), ("e", 1), ("g", 1)]
        assert store.latest("g").history == ["y"]
        assert store.prune(before).users == 0
    with pytest.raises(ValueError, match="before must be a time"):
        SQLiteStateStore(path).prune(float("nan"))


def test_prune_command_without_a_server(tmp_path, capsys):
    from serving import client
    path = str(tmp_path / "s.sqlite")
    with SQLiteStateStore(path) as store:
        big = np.zeros(4096, np.float32)  # 16 KB a record: pages to free
        for i in range(60):
            store.put(f"u{i:02d}", 1, big, [["a", "b"]], sessions_total=1)
    _age(path, 10 * 86_400, "user_id < 'u40'")
    assert client.main(["--state-db", path, "prune", "--inactive-days", "7", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("would prune 40 users (40 records) whose newest record was written "
                          "before 20") and out.endswith(f"; 20 kept: {path} (--dry-run: "
                                                        "nothing deleted)")
    assert client.main(["--state-db", path, "prune", "--inactive-days", "7"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("pruned 40 users (40 records)")
    assert "MB free inside the file, reused by later writes (--vacuum gives it back" in out
    size = os.path.getsize(path)
    assert client.main(["--state-db", path, "prune", "--inactive-days", "7", "--vacuum",
                        "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["users"], result["kept_users"], result["vacuumed"]) == (0, 20, True)
    assert result["free_bytes"] >= 40 * 16_384
    assert os.path.getsize(path) == result["file_bytes"] < size - 40 * 16_384
    with SQLiteStateStore(path) as store:
        assert store.free_bytes() == 0
        assert store.latest("u59").history == ["a", "b"] and store.latest("u00") is None
    assert client.main(["--state-db", str(tmp_path / "none.sqlite"), "prune",
                        "--inactive-days", "1"]) == 1
    assert "none.sqlite does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.sqlite")
    for bad in ("0", "-1", "nan", "inf", "1e6"):
        with pytest.raises(SystemExit):
            client.main(["--state-db", path, "prune", "--inactive-days", bad])
        assert "--inactive-days: must be > 0.0 and <= 100000.0" in capsys.readouterr().err


def _holds(path, text):
    """Whether the store's file or its -wal file holds `text`'s bytes anywhere (free pages
    and old frames included)."""
    found = False
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            with open(name, "rb") as f:
                found |= text.encode() in f.read()
    return found


def test_a_forgotten_users_ids_are_gone_from_the_file_and_its_journal(tmp_path, capsys):
    """Users' histories are personal data: after `forget` (and `prune`), while another
    process has the store open, neither the file's free pages nor the -wal file keep the
    user's id or items (the -wal file kept them until the last connection closed, and the
    file's free pages kept them where SQLite is built without SECURE_DELETE)."""
    from serving import client
    path = str(tmp_path / "s.sqlite")
    other = SQLiteStateStore(path)  # another process's store, open all along
    try:
        with SQLiteStateStore(path) as store:
            assert store._db.execute("PRAGMA secure_delete").fetchone() == (1,)
            for i in range(50):
                store.put(f"user{i}", 1, np.zeros(64, np.float32), [["common"]],
                          sessions_total=1)
            store.put("victim_u1", 1, np.zeros(64, np.float32), [["secret_item_a", "b"]],
                      sessions_total=1)
            store.put("victim_u2", 1, np.zeros(64, np.float32), [["secret_item_c", "d"]],
                      sessions_total=1)
        assert other.latest("victim_u1") is not None
        assert _holds(path, "victim_u1") and _holds(path, "secret_item_a")
        assert client.main(["--state-db", path, "--json", "forget", "--user", "victim_u1"]) == 0
        assert json.loads(capsys.readouterr().out) == {"user": "victim_u1", "deleted": 1,
                                                       "journal_erased": True}
        assert not _holds(path, "victim_u1") and not _holds(path, "secret_item_a")
        _age(path, 400 * 86_400, "user_id = 'victim_u2'")
        assert client.main(["--state-db", path, "prune", "--inactive-days", "365"]) == 0
        assert capsys.readouterr().out.startswith("pruned 1 user (1 record)")
        assert not _holds(path, "victim_u2") and not _holds(path, "secret_item_c")
        assert other.latest("user7") is not None
        # a reader inside a transaction keeps its snapshot's pages: said
        other._db.execute("BEGIN")
        other._db.execute("SELECT COUNT(*) FROM user_states").fetchone()
        assert client.main(["--state-db", path, "forget", "--user", "user3"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == f"user user3: deleted 1 stored record from {path}"
        assert "note: another process was reading" in captured.err
        other._db.execute("COMMIT")
    finally:
        other.close()
    with pytest.raises(SystemExit):
        client.main(["--state-db", f"file:{path}", "forget", "--user", "u"])
    assert "is an SQLite URI: pass the file's path" in capsys.readouterr().err
