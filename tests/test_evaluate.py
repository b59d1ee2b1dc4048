"""model.evaluate on hand-made TFRecords: lock-step order, online updates, the CLI."""
import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from model import evaluate as ev
from model import base, baselines, metrics
from model.base import Scorer
from pipeline import schema

VOCAB = 30  # items 2..29: a miss of the scorer below ranks 28, outside every cut-off

# user: (history sessions, target sessions)
VALID = {
    "a": ([[5, 6], [7, 8]], [[9, 10, 12], [13, 14]]),
    "b": ([], [[3, 4], [20, 1]]),
    "c": ([[21, 22]], [[23, 22, 23]]),
}


def write_data(root, splits: dict, vocab_size: int = VOCAB, counts=None) -> str:
    """Writes a tiny pipeline-style data folder.

    Args:
      root: folder to write into.
      splits: split -> {user: (history sessions, target sessions[, first time])}; events
        are one second apart, sessions 10000 s apart, each user's first session at its
        first time (default: after the previous user's last session).
      vocab_size: indices 0..vocab_size-1.
      counts: train counts by index (defaults to descending counts).
    """
    import tensorflow as tf

    root = str(root)
    if counts is None:
        counts = list(range(vocab_size, 0, -1))
    schema.write_vocabulary(os.path.join(root, schema.ITEMS_FILE),
                            [(f"i{i}", counts[i]) for i in range(2, vocab_size)])
    stats = {"pipeline_version": "0.1.0", "splits": {}}  # (as this version's pipeline writes)
    for split, users in splits.items():
        os.makedirs(os.path.join(root, split))
        path = os.path.join(root, split, "part-00000" + schema.SHARD_SUFFIX)
        clock = 0
        with tf.io.TFRecordWriter(path, options=schema.COMPRESSION) as w:
            for user, (history, targets, *start) in users.items():
                sessions = history + targets
                clock = start[0] if start else clock
                times = []
                for s in sessions:
                    times.append(list(range(clock, clock + len(s))))
                    clock += 10_000
                w.write(schema.make_sequence_example(user, len(history), sessions, times))
        stats["splits"][split] = {"users": len(users)}
    with open(os.path.join(root, schema.STATS_FILE), "w") as f:
        json.dump(stats, f)
    return root


class NextIndex(Scorer):
    """Scores 1 for (the user's last item + 1), 0 elsewhere; records every call.

    State: int64 [rows], the last item of the user's latest session (0 before any).
    """

    name = "next-index"

    def __init__(self):
        self.calls = []

    def initial_state(self, user_ids):
        self.calls.append(("init", list(user_ids)))
        return np.zeros(len(user_ids), dtype=np.int64)

    def score(self, state, sessions):
        self.calls.append(("score", sessions.tolist()))
        rows, steps = sessions.shape
        last = np.concatenate([state[:, None], sessions[:, :-1]], axis=1)
        out = np.zeros((rows, steps, VOCAB), dtype=np.float32)
        r, t = np.nonzero(last + 1 < VOCAB)
        out[r, t, last[r, t] + 1] = 1.0
        return out

    def update(self, state, sessions):
        self.calls.append(("update", sessions.tolist()))
        lengths = (sessions != 0).sum(axis=1)
        ends = sessions[np.arange(len(sessions)), np.maximum(lengths - 1, 0)]
        return np.where(lengths > 0, ends, state)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), {"valid": VALID})


def _expected():
    # Hits (the item is last + 1): a: 9 (first), 10, 13 (first, after the online update),
    # 14; misses 12. b: 4; misses 3 (first, state 0), 20 (first), unknown 1.
    # c: 23 (first, from history), 23 (repeat in session); miss 22 (repeat of history).
    def group(events, hits, unknown):
        return {**{f"recall@{k}": hits / events for k in metrics.KS},
                **{f"mrr@{k}": hits / events for k in metrics.KS},
                "events": events, "unknown_targets": unknown}

    out = group(7, 4, 1)
    out.update(first_item=group(5, 3, 0), repeat=group(2, 1, 0), new=group(5, 3, 1))
    # By user: b has no history sessions (cold: 4 hit, the unknown 1 missed); a and c have.
    out.update(returning_users=group(5, 3, 0), cold_users=group(2, 1, 1))
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_metrics_match_hand_computed_for_any_batch_size(data, batch_size):
    out = ev.evaluate(NextIndex(), data, "valid", batch_size=batch_size, progress=False)
    expected = dict(_expected(), model="next-index", split="valid", data=data)
    # a's 3 events past its sessions' first items are the most, of the headline's 7
    expected["heaviest_user"] = {"user": "a", "events": 3, "of_users": 3, "of_events": 7}
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == (pytest.approx(value) if not isinstance(value, str) else value), key


class PreviousFirst(NextIndex):
    """Scores the item the session is on highest, (the user's last item + 1) next."""

    name = "previous-first"

    def score(self, state, sessions):
        out = super().score(state, sessions)
        rows, steps = sessions.shape
        r, t = np.nonzero(sessions[:, :-1] > 1)
        out[r, t + 1, sessions[r, t]] = 2.0
        return out


def test_rule_out_current_ranks_without_the_item_the_session_is_on(data):
    # NextIndex's hits are rank 1 either way; PreviousFirst puts the current item above
    # them (rank 2 at positions >= 1): ruled out, the same ranks as NextIndex
    plain = ev.evaluate(NextIndex(), data, "valid", progress=False)
    ruled = ev.evaluate(NextIndex(), data, "valid", progress=False, rule_out_current=True)
    assert ruled.pop("rule_out_current") is True and ruled == plain
    shadowed = ev.evaluate(PreviousFirst(), data, "valid", progress=False)
    assert shadowed["mrr@20"] < plain["mrr@20"] and shadowed["recall@1"] < plain["recall@1"]
    fair = ev.evaluate(PreviousFirst(), data, "valid", progress=False, rule_out_current=True)
    for key in ("recall@1", "mrr@20", "recall@20"):
        assert fair[key] == pytest.approx(plain[key]), key


def test_history_first_then_targets_in_lock_step_with_padding_rows(data):
    scorer = NextIndex()
    ev.evaluate(scorer, data, "valid", batch_size=3, progress=False)
    assert scorer.calls == [
        ("init", ["a", "b", "c"]),
        ("update", [[5, 6], [0, 0], [21, 22]]),
        ("update", [[7, 8], [0, 0], [0, 0]]),
        ("score", [[9, 10, 12], [3, 4, 0], [23, 22, 23]]),
        ("update", [[9, 10, 12], [3, 4, 0], [23, 22, 23]]),
        ("score", [[13, 14], [20, 1], [0, 0]]),
        ("update", [[13, 14], [20, 1], [0, 0]]),
    ]


def test_score_budget_splits_batches_without_changing_metrics(data, monkeypatch):
    monkeypatch.setattr(base, "SCORE_BUDGET", 2 * 3 * VOCAB)  # two rows of 3 steps at most
    scorer = NextIndex()
    out = ev.evaluate(scorer, data, "valid", batch_size=3, progress=False)
    assert [c[1] for c in scorer.calls if c[0] == "init"] == [["a", "b"], ["c"]]
    assert out["recall@20"] == pytest.approx(4 / 7) and out["first_item"]["events"] == 5


def test_users_read_once_evaluate_as_the_split(data):
    """`load_users` keeps the records for repeated evaluations (training's valid runs):
    evaluating them gives the same calls and metrics as reading the split."""
    users = ev.load_users(data, "valid")
    assert [u.user_id for u in users] == ["a", "b", "c"]
    assert [[s.tolist() for s in u.sessions] for u in users][0] == [[5, 6], [7, 8], [9, 10, 12], [13, 14]]
    fresh, kept = NextIndex(), NextIndex()
    expected = ev.evaluate(fresh, data, "valid", batch_size=2, progress=False)
    for _ in range(2):  # the same list twice: nothing is consumed
        assert ev.evaluate(kept, data, "valid", batch_size=2, progress=False, users=users) == expected
    assert kept.calls == fresh.calls * 2
    chosen = ev.load_users(data, "valid", user_ids={"c", "a"})
    assert [u.user_id for u in chosen] == ["a", "c"]
    assert (ev.evaluate(NextIndex(), data, "valid", progress=False, users=chosen)
            == ev.evaluate(NextIndex(), data, "valid", progress=False, user_ids={"a", "c"}))
    # a and b hold 9 + 4 events: over the bound, nothing is kept (the split streams)
    assert ev.load_users(data, "valid", max_events=12) is None
    assert len(ev.load_users(data, "valid", user_ids={"a", "b"}, max_events=13)) == 2


def test_max_users(data):
    out = ev.evaluate(NextIndex(), data, "valid", max_users=1, progress=False)
    assert out["events"] == 3 and out["first_item"]["events"] == 2 and out["recall@1"] == pytest.approx(2 / 3)


def test_sample_users_are_the_same_whatever_the_file_order(tmp_path):
    # 12 users: u_k's target session [k + 2, 4]; NextIndex hits 4 only after 3 (u1).
    users = {f"u{k}": ([[2, 3]], [[k + 2, 4]]) for k in range(12)}
    os.makedirs(tmp_path / "a"), os.makedirs(tmp_path / "b")
    a = write_data(tmp_path / "a", {"valid": users})
    b = write_data(tmp_path / "b", {"valid": dict(reversed(list(users.items())))})
    sample = ev.sample_users(a, "valid", 5)
    chosen = sample.ids
    assert len(chosen) == 5 and sample == ev.sample_users(b, "valid", 5)
    assert sample[1:] == (5, 10, 12, 24, 0)  # 5 of 12 users, 10 of 24 target events
    all_users = ev.sample_users(a, "valid", 12)
    assert all_users.ids is None and all_users[1:] == (12, 24, 12, 24, 0)  # all: no filter
    scorer = NextIndex()
    out_a = ev.evaluate(scorer, a, "valid", user_ids=chosen, progress=False)
    evaluated = {u for call, ids in scorer.calls if call == "init" for u in ids}
    assert evaluated == chosen
    out_b = ev.evaluate(NextIndex(), b, "valid", user_ids=chosen, progress=False)
    assert out_a["events"] == out_b["events"] == 5
    assert out_a["recall@1"] == out_b["recall@1"] == (0.2 if "u1" in chosen else 0.0)


def test_sample_users_stop_before_the_event_budget(tmp_path):
    # u_k holds k + 1 target events (and a context session, not counted)
    users = {f"u{k}": ([[2, 3]], [list(range(2, k + 3))]) for k in range(8)}
    data = write_data(str(tmp_path), {"valid": users})
    from model.batching import user_order_key
    order = sorted(users, key=user_order_key)
    sizes = [int(u[1:]) + 1 for u in order]
    budget = sizes[0] + sizes[1] + sizes[2]
    sample = ev.sample_users(data, "valid", 0, budget)  # no user limit: the events stop it
    assert sample.ids == frozenset(order[:3]) and sample[1:] == (3, budget, 8, 36, 0)
    # one event short of the third user: two users; the user limit binds first when lower
    assert ev.sample_users(data, "valid", 0, budget - 1).ids == frozenset(order[:2])
    assert ev.sample_users(data, "valid", 1, budget).ids == frozenset(order[:1])
    # a budget of one event: the one user who holds one, the others passed over
    assert ev.sample_users(data, "valid", 0, 1).ids == frozenset({"u0"})
    assert ev.sample_users(data, "valid", 0, 1).over_budget == 7
    # below every user's events: the one with the fewest, still (a sample is never empty;
    # the first in the order could be a crawler many times the budget)
    without_u0 = {u: s for u, s in users.items() if u != "u0"}
    (tmp_path / "no_u0").mkdir()
    no_u0 = write_data(str(tmp_path / "no_u0"), {"valid": without_u0})
    smallest = ev.sample_users(no_u0, "valid", 0, 1)
    assert smallest.ids == frozenset({"u1"}) and smallest[1:] == (1, 2, 7, 35, 6)
    assert ev.sample_users(data, "valid", 0, 36).ids is None  # every event: every user
    out = ev.evaluate(NextIndex(), data, "valid", user_ids=sample.ids, progress=False)
    assert out["events"] + out["first_item"]["events"] == budget


def test_a_user_over_the_event_budget_alone_is_passed_over_not_stopped_at(tmp_path):
    """A crawler with more valid events than the whole budget: first in the hash order it
    made every evaluation its own, later it stopped the sample there; it is left out and
    the users after it are taken, up to the budget, and the sample counts it."""
    from model.batching import user_order_key

    names = [f"u{k}" for k in range(12)]
    order = sorted(names, key=user_order_key)
    for at in (0, 3):  # the crawler first, then fourth in the hash order
        users = {u: ([], [[2, 3, 4]]) for u in names}  # 3 target events each
        users[order[at]] = ([], [[2 + j % 5 for j in range(500)]])
        (tmp_path / f"at{at}").mkdir()
        data = write_data(str(tmp_path / f"at{at}"), {"valid": users})
        sample = ev.sample_users(data, "valid", 0, 20)
        others = [u for u in order if u != order[at]]
        assert sample.ids == frozenset(others[:6]), (at, sorted(sample.ids))
        assert (sample.users, sample.events, sample.over_budget) == (6, 18, 1)
        # and without a budget the crawler counts like anyone
        assert ev.sample_users(data, "valid", 0).ids is None


def test_bad_arguments_raise(data, tmp_path):
    with pytest.raises(schema.DataError, match="choose valid or test"):
        ev.evaluate(NextIndex(), data, "train")
    with pytest.raises(schema.DataError, match="items.tsv not found"):
        ev.evaluate(NextIndex(), str(tmp_path), "valid")
    with pytest.raises(ValueError, match="batch_size"):
        ev.evaluate(NextIndex(), data, "valid", batch_size=0)


@pytest.fixture(scope="module")
def full_data(tmp_path_factory):
    train = {"a": ([], [[5, 6], [7, 8], [2, 3, 4]]), "b": ([], [[2, 3], [3, 4, 5]])}
    test = {"a": ([[5, 6], [7, 8], [2, 3, 4], [9, 10]], [[2, 3, 5]]), "b": ([[2, 3]], [[4, 5, 4, 2]])}
    return write_data(tmp_path_factory.mktemp("full"), {"train": train, "valid": VALID, "test": test})


def test_cli_writes_every_key(full_data, tmp_path, capsys):
    path = tmp_path / "out" / "m.json"
    assert ev.main(["--data", full_data, "--split", "test", "--model", "popularity",
                    "--output", str(path), "--no-progress"]) == 0
    written = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == written
    keys = set(metrics.METRIC_KEYS) | set(metrics.COUNT_KEYS)
    assert set(written) == keys | set(metrics.GROUPS) | {"model", "split", "data",
                                                         "heaviest_user", "code"}
    assert written["code"] == ev.code_digest() and len(written["code"]) == 16
    for group in metrics.GROUPS:
        assert set(written[group]) == keys
    assert (written["model"], written["split"], written["data"]) == ("popularity", "test", full_data)
    # Positions >= 1: a's 3 and 5 (both in a's history: repeat); b's 5 (new), 4 (earlier
    # in the session: repeat) and 2 (in b's history: repeat).
    assert written["events"] == 5 and written["repeat"]["events"] == 4 and written["new"]["events"] == 1
    assert not [p for p in os.listdir(path.parent) if p != "m.json"]  # no temporary left


def test_cli_sample_users_evaluates_the_hash_chosen_users(full_data, tmp_path, capsys):
    """--sample-users N: the users `sample_users` takes (by a hash of the ids, not the
    files' first ones), said on stderr and recorded in the output."""
    sample = ev.sample_users(full_data, "test", 1, salt=ev.SAMPLE_SALT)
    assert ev.main(["--data", full_data, "--split", "test", "--model", "popularity",
                    "--sample-users", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    want = ev.evaluate(baselines.fit("popularity", full_data), full_data, "test",
                       user_ids=sample.ids, progress=False)
    assert got.pop("sample") == {"users": 1, "of_users": 2, "target_events": sample.events,
                                 "of_target_events": 7}
    assert got == want and got["events"] == sample.events - 1  # (positions >= 1)
    assert err.splitlines() == [f"evaluating 1 of the 2 test users ({sample.events} of 7 target "
                                "events), chosen by a hash of their ids"]


@pytest.mark.parametrize("argv, message", [
    (["--split", "valid", "--model", "popularity"], "the following arguments are required: --data"),
    (["--data", "DATA", "--split", "train", "--model", "popularity"], "invalid choice: 'train'"),
    (["--data", "DATA", "--split", "test", "--model", "bert"], "invalid choice: 'bert'"),
    # (a neural model's name: where its figures come from, not "invalid choice")
    (["--data", "DATA", "--split", "test", "--model", "gru4rec"],
     "argument --model: gru4rec is trained, not fitted here: evaluate its run folder, "
     "--model-dir RUN (python -m model.train --model gru4rec --model-dir RUN trains one)"),
    (["--data", "DATA", "--split", "test", "--model", "mv", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--data", "DATA", "--split", "test", "--model", "mv", "--max-users", "x"],
     "--max-users: 'x' is not an integer"),
    (["--data", "DATA", "--split", "test"], "one of the arguments --model-dir --model is required"),
    (["--data", "DATA", "--split", "test", "--model", "sknn", "--checkpoint", "latest"],
     "--checkpoint applies to --model-dir, not to a baseline"),
    (["--data", "DATA", "--split", "test", "--model", "mv", "--max-users", "1",
      "--sample-users", "1"], "pass one of --sample-users and --max-users"),
    # (an OverflowError and islice's ValueError, tracebacks; fuzzing audit)
    (["--data", "DATA", "--split", "test", "--model", "sknn", "--neighbour-sample", str(10**30)],
     f"argument --neighbour-sample: must be <= 2147483647, got 1{'0' * 30}"),
    (["--data", "DATA", "--split", "test", "--model", "popularity", "--max-users", str(10**30)],
     f"argument --max-users: must be <= {2**63 - 1}, got 1{'0' * 30}"),
    (["--data", "DATA", "--split", "test", "--model", "popularity", "--sample-users", str(2**63)],
     f"argument --sample-users: must be <= {2**63 - 1}, got {2**63}"),
])
def test_cli_bad_options_give_one_line_errors(full_data, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        ev.main([full_data if a == "DATA" else a for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_missing_or_foreign_folders_give_one_line_errors(full_data, tmp_path, capsys):
    assert ev.main(["--data", str(tmp_path / "nope"), "--split", "test", "--model", "mv"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "log.csv").write_text("user,item,time\n")
    assert ev.main(["--data", str(tmp_path / "log.csv"), "--split", "test", "--model", "mv"]) == 2
    assert "log.csv: is a file, not a folder (pass the --output folder of" in capsys.readouterr().err
    assert ev.main(["--data", str(tmp_path), "--split", "test", "--model", "mv"]) == 2
    err = capsys.readouterr().err
    assert "items.tsv not found" in err and err.count("\n") == 1
    assert ev.main(["--data", full_data, "--split", "test", "--model-dir", str(tmp_path / "run")]) == 2
    assert "python -m model.train" in capsys.readouterr().err
    # an output that cannot be written is said before the evaluation, in one line
    assert ev.main(["--data", full_data, "--split", "test", "--model", "mv",
                    "--per-user-output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--per-user-output {tmp_path} is a folder: pass a file name" in err
    assert err.count("\n") == 1
    same = str(tmp_path / "out.json")
    assert ev.main(["--data", full_data, "--split", "test", "--model", "mv", "--output", same,
                    "--per-user-output", same]) == 2
    assert "is --output's file too" in capsys.readouterr().err and not os.path.exists(same)


def test_scores_of_the_wrong_vocabulary_size_are_rejected(tmp_path):
    other = write_data(tmp_path, {"valid": VALID}, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=r"expected \[batch, steps, 31\]"):
        ev.evaluate(NextIndex(), other, "valid", progress=False)


def test_users_are_batched_most_events_first_within_a_window(tmp_path, monkeypatch):
    """Rows scored side by side have similar session lengths (less padding); the order
    within a window changes no metric, and no user crosses a window."""
    users = {f"u{k}": ([], [[2 + j % 20 for j in range(n)], [3, 4]])
             for k, n in enumerate([2, 7, 3, 7, 5, 2])}
    data = write_data(tmp_path, {"valid": users})
    by_row = ev.evaluate(NextIndex(), data, "valid", batch_size=1, progress=False)
    scorer = NextIndex()
    monkeypatch.setattr(ev, "SORT_WINDOW", 4)
    out = ev.evaluate(scorer, data, "valid", batch_size=2, progress=False)
    # windows [u0 u1 u2 u3] [u4 u5]; most target events first, ties in file order
    assert [c[1] for c in scorer.calls if c[0] == "init"] == [["u1", "u3"], ["u2", "u0"], ["u4", "u5"]]
    assert out == by_row


def test_cli_empty_or_damaged_split_is_one_line(full_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    empty = write_data(tmp_path / "empty", {"train": {"a": ([], [[5, 6]])}, "test": {}})
    assert ev.main(["--data", empty, "--split", "test", "--model", "popularity"]) == 2
    err = capsys.readouterr().err
    assert f"the test split of {empty} has no users" in err and err.count("\n") == 1
    damaged = tmp_path / "damaged"
    shutil.copytree(full_data, damaged)
    shard = damaged / "test" / "part-00000.tfrecord.gz"
    shard.write_bytes(shard.read_bytes()[:-20])
    assert ev.main(["--data", str(damaged), "--split", "test", "--model", "popularity",
                    "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the test split of {damaged}: " in err and err.count("\n") == 1, err
    # an earlier pair of files stays as it was when the evaluation fails (it used to lose
    # its metrics before the evaluation began)
    out, users = tmp_path / "m.json", tmp_path / "m_users.npz"
    pair = ["--output", str(out), "--per-user-output", str(users), "--no-progress"]
    assert ev.main(["--data", full_data, "--split", "test", "--model", "popularity", *pair]) == 0
    before = (out.read_bytes(), users.read_bytes())
    capsys.readouterr()
    assert ev.main(["--data", str(damaged), "--split", "test", "--model", "popularity",
                    *pair]) == 2
    assert (out.read_bytes(), users.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["damaged", "empty", "m.json", "m_users.npz"]


def test_a_data_file_that_cannot_be_read_is_a_read_error_in_one_line(full_data, tmp_path,
                                                                       capsys):
    """A data file that cannot be read was said as "cannot write the results" (stats.json)
    or as a TensorFlow traceback (a shard this user may not read, one removed meanwhile)."""
    import subprocess
    import sys

    folder = tmp_path / "d"
    shutil.copytree(full_data, folder)
    (folder / "stats.json").rename(tmp_path / "stats.json")
    (folder / "stats.json").mkdir()  # a folder where the file should be
    assert ev.main(["--data", str(folder), "--split", "test", "--model", "popularity",
                    "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m model.evaluate: error: cannot read {folder}/stats.json: Is a "
                   "directory\n"), err
    (folder / "stats.json").rmdir()
    (tmp_path / "stats.json").rename(folder / "stats.json")
    read = schema.user_reader(str(folder), "test")  # (lists the shards)
    shard = folder / "test" / "part-00000.tfrecord.gz"
    shard.rename(tmp_path / "shard")
    with pytest.raises(schema.DataError, match=re.escape(
            f"cannot read the test split of {folder}: ") + r".*\(a file removed while it was "
            r"read: restore the folder or run the pipeline again\)$"):
        list(read())
    (tmp_path / "shard").rename(shard)
    # a shard this user may not read: root reads everything, so where the tests run as
    # root, the command runs without the capabilities that let it
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root without setpriv: no way to be refused a read")
    drop = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
             "-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])
    shard.chmod(0)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([*drop, sys.executable, "-m", "model.evaluate", "--data", str(folder),
                          "--split", "test", "--model", "popularity", "--no-progress"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.splitlines() == [
        f"python -m model.evaluate: error: cannot read the test split of {folder}: {shard}; "
        "Permission denied (this user may not read it)"], res.stderr[-3000:]
    shard.chmod(0o644)
    (folder / "test").chmod(0)  # a split folder it may not list: not "no shards"
    res = subprocess.run([*drop, sys.executable, "-m", "model.evaluate", "--data", str(folder),
                          "--split", "test", "--model", "popularity", "--no-progress"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    (folder / "test").chmod(0o755)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"python -m model.evaluate: error: cannot read {folder}/test: Permission denied"], \
        res.stderr[-3000:]


def test_a_full_disk_is_one_line_and_never_leaves_two_runs_files(full_data, tmp_path):
    """`--output` with `--per-user-output` over an earlier pair, the disk full (here a
    file-size limit) when the new files are written: one line, exit 1, and no metrics file
    is left beside a per-user file of another run."""
    import subprocess
    import sys

    from tiny_logs import file_size_limited

    out, users = tmp_path / "m.json", tmp_path / "m_users.npz"
    cmd = [sys.executable, "-m", "model.evaluate", "--data", full_data, "--split", "test",
           "--model", "popularity", "--output", str(out), "--per-user-output", str(users),
           "--no-progress"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run(cmd, cwd=repo, capture_output=True, timeout=300).returncode == 0
    before = (out.read_bytes(), users.read_bytes())
    res = subprocess.run(file_size_limited(1024, cmd), cwd=repo, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stderr
    # (the last line: TensorFlow's AutoGraph may warn that it cannot write its own files)
    assert res.stderr.splitlines()[-1] == (
        f"python -m model.evaluate: error: cannot write {users} and {out}: File too large; "
        "the metrics are printed above")
    assert json.loads(res.stdout)["events"] > 0
    assert "Traceback" not in res.stderr
    # the new per-user file could not be written: the earlier pair is as it was, and no
    # partial file is left
    assert (out.read_bytes(), users.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m_users.npz"]


def test_an_output_that_cannot_be_written_is_said_before_the_evaluation(full_data, tmp_path,
                                                                         capsys, monkeypatch):
    """A folder that cannot be made (a parent is a file here; a read-only one alike) is
    said before the evaluation, which can take many minutes, not after it."""
    ran = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: ran.append(1) or real(*a, **k))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "m.json"
    assert ev.main(["--data", full_data, "--split", "test", "--model", "popularity",
                              "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m model.evaluate: error: cannot write {out}: ") and not ran
    ok = tmp_path / "new" / "m.json"  # a missing folder is made
    assert ev.main(["--data", full_data, "--split", "test", "--model", "popularity",
                              "--output", str(ok), "--no-progress"]) == 0
    assert ran and json.loads(ok.read_text())["events"] > 0
    assert os.listdir(ok.parent) == ["m.json"]  # the probe left nothing


def test_metrics_that_cannot_be_written_after_the_evaluation_are_printed(full_data, tmp_path):
    import subprocess
    import sys

    from tiny_logs import file_size_limited

    out = tmp_path / "m.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(file_size_limited(256, [
                             sys.executable, "-m", "model.evaluate", "--data", full_data,
                             "--split", "test", "--model", "popularity", "--output", str(out)]),
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    # progress into a pipe (a log file): lines, not a bar redrawn with carriage returns
    assert "\r" not in res.stderr
    assert re.search(r"^evaluate popularity on test: [\d,]+ users of [\d,]+ \(100%\), 0:\d\d "
                     r"elapsed$", res.stderr, re.M), res.stderr
    assert res.stderr.splitlines()[-1] == (f"python -m model.evaluate: error: cannot write {out}: "
                                           "File too large; the metrics are printed above")
    assert json.loads(res.stdout)["events"] > 0 and not out.exists()
    # the per-user file, written first, fails the same way: the metrics were lost with it
    # (failure-injection audit)
    users = tmp_path / "u.npz"
    res = subprocess.run(file_size_limited(256, [
                             sys.executable, "-m", "model.evaluate", "--data", full_data,
                             "--split", "test", "--model", "popularity", "--output", str(out),
                             "--per-user-output", str(users), "--sample-users", "3"]),
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines()[-1] == (
        f"python -m model.evaluate: error: cannot write {users} and {out}: File too large; "
        "the metrics are printed above")
    printed = json.loads(res.stdout)  # as --output would hold them: the sample said (review)
    sample = printed["sample"]
    assert printed["events"] > 0 and sample["users"] == min(3, sample["of_users"])
    assert "code" in printed
    assert not out.exists() and not users.exists()
    assert os.listdir(tmp_path) == []


def test_progress_in_a_log_file_is_a_line_at_a_time():
    out = io.StringIO()
    with ev.LineProgress(10, "evaluate m on test", every=0, out=out) as bar:
        bar.update(4)
        bar.update(6)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"evaluate m on test: 4 users of 10 \(40%\), about 0:\d\d left, 0:\d\d "
                        r"elapsed", lines[0]), lines
    # (the end says the last line again only where it is not the state already said)
    assert lines[1].startswith("evaluate m on test: 10 users of 10 (100%), 0:") and len(lines) == 2


def test_progress_in_a_log_file_goes_on_while_one_batch_takes_long():
    """A heavy user's batch (a 500,000-event crawler: 3 minutes) printed no line until it
    was done, then the same line twice: a log file that should hear every 30 s heard
    nothing for minutes."""
    out = io.StringIO()
    with ev.LineProgress(3, "evaluate m on test", every=0.2, out=out, total_events=90) as bar:
        bar.update(1, 30)
        time.sleep(0.9)  # the next batch, scored for longer than `every`
        beats = out.getvalue().splitlines()
        bar.update(2, 60)
    lines = out.getvalue().splitlines()
    assert len(beats) >= 3, beats
    assert all(re.fullmatch(r"evaluate m on test: 1 users of 3, 30 of 90 target events \(33%\), "
                            r"about 0:0\d left, 0:0\d elapsed", line) for line in lines[:-1])
    assert lines[:len(beats)] == beats and lines[-1].startswith(
        "evaluate m on test: 3 users of 3, 90 of 90 target events (100%), 0:0"), lines


def test_progress_time_left_goes_by_target_events_not_users():
    """Users are taken most events first and differ in size by orders of magnitude (a few
    power users among many light ones): the share done and the time left are the target
    events', where their count of users would say hours for a minute's work."""
    import time

    out = io.StringIO()
    bar = ev.LineProgress(1_001, "evaluate m on valid", every=0, out=out, total_events=11_000)
    bar.start -= 100.0  # 100 s into the evaluation: one power user of 10,000 events done
    bar.update(1, 10_000)
    line = out.getvalue().splitlines()[-1]
    assert re.fullmatch(r"evaluate m on valid: 1 users of 1,001, 10,000 of 11,000 target "
                        r"events \(91%\), about 0:1[01] left, 1:4\d elapsed", line), line
    # without the events' total (a --max-users sample): the users', as before
    out = io.StringIO()
    bar = ev.LineProgress(10, "evaluate m on valid", every=0, out=out)
    bar.start = time.monotonic() - 100.0
    bar.update(5, 50)
    assert re.fullmatch(r"evaluate m on valid: 5 users of 10 \(50%\), about 1:4\d left, "
                        r"1:4\d elapsed", out.getvalue().strip())


def test_evaluation_progress_counts_the_splits_target_events(tmp_path, capsys):
    """The CLI's progress in a log file: the split's target events from stats.json, all
    of them done at the end; a sample of the users (--max-users) falls back to users."""
    heavy = {"power": ([[2, 3] * 50], [[2 + j % 20 for j in range(400)]])}
    light = {f"u{k}": ([], [[3, 4], [5, 6, 7]]) for k in range(30)}
    data = write_data(tmp_path, {"valid": {**heavy, **light}})
    stats_path = os.path.join(data, schema.STATS_FILE)
    with open(stats_path) as f:
        stats = json.load(f)
    stats["splits"]["valid"]["events"] = 400 + 30 * 5
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    ev.evaluate(NextIndex(), data, "valid")
    err = capsys.readouterr().err
    assert re.search(r"^evaluate next-index on valid: 31 users of 31, 550 of 550 target events "
                     r"\(100%\), 0:\d\d elapsed$", err, re.M), err
    ev.evaluate(NextIndex(), data, "valid", max_users=10)
    err = capsys.readouterr().err
    assert re.search(r"^evaluate next-index on valid: 10 users of 10 \(100%\), 0:\d\d elapsed$",
                     err, re.M), err
    # the users read once (as model.train's evaluations pass them): their events counted
    users = ev.load_users(data, "valid")
    ev.evaluate(NextIndex(), data, "valid", users=users[:5])
    err = capsys.readouterr().err
    assert re.search(r"^evaluate next-index on valid: 5 users of 5, (\d+) of \1 target events "
                     r"\(100%\)", err, re.M), err


def test_transient_progress_leaves_nothing_behind(tmp_path, monkeypatch):
    """Training's valid evaluations (`transient`): on a large catalogue one took 34-59 s
    without a word, the training bar frozen. Now a bar once one has taken a while, cleared
    at its end, and in a log file a line every LOG_FILE_SECONDS without a last one (the
    caller's `step N: valid ...` line says the result); a short one prints nothing."""
    from tqdm import tqdm

    data = write_data(tmp_path, {"valid": {f"u{k}": ([], [[3, 4], [5, 6, 7]]) for k in range(30)}})
    # a log file: a short evaluation says nothing, not even its end
    out = io.StringIO()
    ev.evaluate(NextIndex(), data, "valid", batch_size=4, transient=True, progress_out=out)
    assert out.getvalue() == ""
    # ... a long one a line at a time (every 0 s here), without repeating the last at the end
    monkeypatch.setattr(ev, "LOG_FILE_SECONDS", 0.0)
    result = ev.evaluate(NextIndex(), data, "valid", batch_size=4, transient=True,
                         progress_out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 8 and lines[-1].startswith(
        "evaluate next-index on valid: 30 users of 30 (100%)"), lines
    assert result == ev.evaluate(NextIndex(), data, "valid", batch_size=4, progress=False)
    # a terminal's bar: shown once the evaluation has taken TRANSIENT_DELAY_SECONDS (none
    # for a quick one), and cleared at the end (tqdm's leave=False: no line left)
    for delay, shown in ((ev.TRANSIENT_DELAY_SECONDS, False), (0.0, True)):
        monkeypatch.setattr(ev, "TRANSIENT_DELAY_SECONDS", delay)
        out = io.StringIO()
        with ev._BarProgress(tqdm, 30, 150, "evaluate m on valid", disable=False,
                             transient=True, out=out) as bar:
            for _ in range(3):
                bar.update(10, 50)
        text = out.getvalue()
        assert ("evaluate m on valid" in text) == shown, text
        assert "\n" not in text and (not shown or text.endswith("\r")), repr(text)


def test_a_split_without_a_position_to_score_says_its_zeros_are_no_score(tmp_path, capsys):
    """A log of one-item sessions (--min-session-length 1) has nothing at position >= 2:
    the headline metrics are 0 by convention, which read as a score without a note."""
    train = {"a": ([], [[5, 6], [7, 8]]), "b": ([], [[2, 3]])}
    test = {"a": ([[5, 6], [7, 8]], [[9], [5]]), "b": ([[2, 3]], [[4]])}
    data = write_data(tmp_path, {"train": train, "valid": VALID, "test": test})
    assert ev.main(["--data", data, "--split", "test", "--model", "popularity",
                    "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["events"] == 0 and result["recall@20"] == 0.0
    assert result["first_item"]["events"] == 3
    assert ("note: the test split has no event at position >= 2 to score (every target "
            "session holds one item): the headline metrics are 0 by convention") in captured.err
    assert ev.main(["--data", data, "--split", "valid", "--model", "popularity",
                    "--no-progress"]) == 0
    assert "no event at position >= 2" not in capsys.readouterr().err


def test_a_split_whose_targets_are_all_unknown_says_its_zeros_are_no_score(tmp_path, capsys):
    """A vocabulary that keeps none of the split's items (--min-item-count past them all)
    scored every model 0 with exit 0 and no word (extremes audit)."""
    train = {"a": ([], [[5, 6], [7, 8]]), "b": ([], [[2, 3]])}
    test = {"a": ([[5, 6], [7, 8]], [[1, 1, 1]]), "b": ([[2, 3]], [[1, 1]])}
    data = write_data(tmp_path, {"train": train, "valid": VALID, "test": test})
    assert ev.main(["--data", data, "--split", "test", "--model", "popularity",
                    "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["events"] == result["unknown_targets"] == 3
    assert ("note: every one of the test split's 3 targets is outside the training vocabulary "
            "(its items.tsv): the metrics are 0 for any model, not a score") in captured.err
    assert ev.main(["--data", data, "--split", "valid", "--model", "popularity",
                    "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "outside the training vocabulary" not in err
    assert "note: the catalogue holds" not in err  # (29 items)
    # a catalogue of 8 items, no larger than recall@10's and @20's cut-offs: those recalls
    # are 1 whatever the ranking (all bold in compare's table; edge-case audit)
    (tmp_path / "small").mkdir()
    small = write_data(tmp_path / "small", {"train": train, "test": test}, vocab_size=10)
    assert ev.main(["--data", small, "--split", "test", "--model", "popularity",
                    "--no-progress"]) == 0
    assert ("note: the catalogue holds 8 items, no more than the cut-off of recall@10 and "
            "above: every item ranks within it for any model, so those recalls say nothing of "
            "the ranking (the MRRs do)") in capsys.readouterr().err
    # an empty train split: a baseline is refused as model.train refuses the folder (every
    # figure was 0 with exit 0; edge-case audit)
    with open(os.path.join(data, "stats.json")) as f:
        stats = json.load(f)
    stats["splits"]["train"]["events"] = 0
    with open(os.path.join(data, "stats.json"), "w") as f:
        json.dump(stats, f)
    for model in ("popularity", "sknn"):
        assert ev.main(["--data", data, "--split", "test", "--model", model,
                        "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert (f"the train split of {data} has no events (see its stats.json): nothing to fit "
                f"{model} on") in err and err.count("\n") == 1, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_command_says_a_result_it_cannot_print_and_runs_with_its_output_closed(full_data,
                                                                                   tmp_path):
    """The command skips the interpreter's teardown once done: its last flush of stdout
    must still say a full disk (`> metrics.json` on a full disk: exit 1 and one line, not
    0 and nothing), and a closed stdout (`>&-`) is no error (the --output file holds the
    metrics)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = (f"{sys.executable} -m model.evaluate --data {full_data} --split test --model "
           f"popularity --no-progress --output {tmp_path / 'm.json'}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    full = subprocess.run(cmd + " > /dev/full", shell=True, cwd=repo, capture_output=True,
                          text=True, timeout=300, env=env)
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.splitlines()[-1] == ("error: cannot write the output: No space left on "
                                            "device; the command's work is done: only what "
                                            "it printed is lost"), full.stderr[-3000:]
    closed = subprocess.run(cmd + " >&-", shell=True, cwd=repo, capture_output=True, text=True,
                            timeout=300, env=env)
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["model"] == "popularity"


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patched_evaluate(patch: str, *args: str) -> list[str]:
    """The command line of `python -m model.evaluate ARGS` in a process that runs the
    Python code `patch` first (a stand-in for a stall, a signal at a chosen moment)."""
    import sys

    code = (patch + "import runpy, sys\nsys.argv = ['model.evaluate', *sys.argv[1:]]\n"
            "runpy.run_module('model.evaluate', run_name='__main__', alter_sys=True)\n")
    return [sys.executable, "-c", code, *args]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_command_at_once_whatever_the_teardown_would_wait_for(
        full_data, tmp_path, signame):
    """A SIGTERM in a full-catalogue evaluation said "interrupted" at once, but the process
    lived on for 35 to 56 s: its KeyboardInterrupt went up through the interpreter's
    teardown, which waited for the TensorFlow call the stop had cut short (past a
    scheduler's 30 s grace). Here a thread that the teardown would join for two minutes
    stands in for that call; the evaluation stalls in its first batch, where the signal
    lands. A Ctrl-C still ends it as killed by SIGINT (status 130 would let a shell loop
    go on to its next command), a SIGTERM with status 130."""
    import signal
    import subprocess

    patch = ("import signal, sys, threading, time\nfrom model import baselines\n"
             # (pytest-xdist's workers start their children with SIGINT ignored)
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "threading.Thread(target=time.sleep, args=(120,)).start()\n"
             "def stalled(*args, **kwargs):\n    print('scoring', file=sys.stderr, flush=True)\n"
             "    time.sleep(120)\n"
             "fit = baselines.fit\n"
             "def fit_stalling(*args, **kwargs):\n    scorer = fit(*args, **kwargs)\n"
             "    scorer.ranks = stalled\n    return scorer\n"
             "baselines.fit = fit_stalling\n")
    proc = subprocess.Popen(_patched_evaluate(patch, "--data", full_data, "--split", "test",
                                              "--model", "popularity", "--no-progress",
                                              "--output", str(tmp_path / "m.json")),
                            cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while proc.stderr.readline() != "scoring\n":
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(getattr(signal, signame))
        sent = time.monotonic()
        assert proc.wait(timeout=60) == (130 if signame == "SIGTERM" else -signal.SIGINT)
        assert time.monotonic() - sent < 30
        assert proc.stderr.read() == ("interrupted: no metrics were written (an earlier "
                                      "--output is as it was)\n")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert os.listdir(tmp_path) == []


def test_a_stop_signal_once_the_metrics_are_computed_changes_nothing(full_data, tmp_path):
    """Once the metrics are computed the command writes its pair of files and prints them:
    a SIGTERM then (here sent by the command to itself as it writes --output) was an
    interrupt that could leave --output deleted beside this run's per-user file, or say
    "no metrics were written" of written ones. It is ignored now: the run finishes."""
    import subprocess

    patch = ("import os, signal\nfrom model import atomic\nreal = atomic.write_json\n"
             "def stopped_while_writing(*args, **kwargs):\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*args, **kwargs)\n"
             "atomic.write_json = stopped_while_writing\n")
    out, users = tmp_path / "m.json", tmp_path / "u.npz"
    res = subprocess.run(_patched_evaluate(patch, "--data", full_data, "--split", "test",
                                           "--model", "popularity", "--no-progress",
                                           "--output", str(out), "--per-user-output",
                                           str(users)),
                         cwd=_REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "interrupted" not in res.stderr, res.stderr[-3000:]
    assert json.loads(out.read_text()) == json.loads(res.stdout)
    assert sorted(os.listdir(tmp_path)) == ["m.json", "u.npz"]


def test_a_user_holding_most_of_the_evaluated_events_gets_a_note(tmp_path, capsys):
    """The pipeline notes a crawler in its stats; the evaluation says it of the users it
    evaluated too (a folder from elsewhere, a --sample-users draw): the metrics are then
    mostly that user's. Not for a split of few users, nor where no user dominates."""
    users = {f"u{k}": ([], [[2, 3, 4]]) for k in range(25)}  # 3 target events each
    for name, crawler in (("even", [2, 3, 4]), ("crawled", [2 + j % 9 for j in range(200)])):
        (tmp_path / name).mkdir()
        data = write_data(str(tmp_path / name), {"test": dict(users, bot=([], [crawler]))})
        out = tmp_path / f"{name}.json"
        assert ev.main(["--data", data, "--split", "test", "--model", "popularity",
                        "--output", str(out), "--no-progress"]) == 0
        err = capsys.readouterr().err
        heavy = json.loads(out.read_text())["heaviest_user"]
        if name == "even":
            assert "note: one user" not in err and heavy["of_users"] == 26
        else:
            # counted as the headline's `events` (a session's first item is not in it)
            assert heavy == {"user": "bot", "events": 199, "of_users": 26, "of_events": 249}
            assert json.loads(out.read_text())["events"] == 249
            assert ("note: one user (bot) holds 80% of the 249 events the metrics average "
                    "over (26 users): they are mostly that user's; a crawler? the "
                    "pipeline's --exclude leaves a user out") in err, err
