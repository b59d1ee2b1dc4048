"""An independent check of DESIGN.md §6, end to end: a raw log in two files goes through
`python -m pipeline` and `model.evaluate`, and every metric is recomputed here by brute
force from the raw rows and the protocol's text alone (raw item ids throughout: neither
the records nor `items.tsv` nor `model.metrics` are read for it).

The log has what the protocol's steps turn on: equal times across the two files (input
order = files in name order, then lines), gaps of exactly 1,800 s (same session) and
1,801 s (a new one), immediate repeats, items below the vocabulary threshold in train
(dropped there) and items never seen in train (unknown targets in valid/test, raw repeats
among them), items of equal counts (conservative ties), and a user with test sessions
only (cold).
"""
import collections
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model import evaluate as ev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_MEMORY = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
GAP, MIN_LENGTH, MIN_COUNT = 1800, 2, 5
KS = (1, 5, 10, 20)
UNK = object()  # an item outside the vocabulary, as the records keep it (no raw id)


def write_log(folder):
    """Two CSV files (b.csv written first, a.csv read first) of one seeded log."""
    rng = np.random.default_rng(3)
    items = [f"i{j}" for j in range(40)]
    p = 1.0 / np.arange(1, 41)
    p /= p.sum()
    day = 86_400
    rows = []  # (file, user, item, time)

    def session(user, t, n, rare=()):
        last = None
        for _ in range(n):
            if rare and rng.random() < 0.2:
                item = rare[rng.integers(len(rare))]
            elif last is not None and rng.random() < 0.1:
                item = last  # an immediate repeat
            else:
                item = items[rng.choice(len(items), p=p)]
            rows.append(("ab"[rng.integers(2)], user, item, t))
            other = items[rng.integers(len(items))]
            # another item at the same second, in the other file (not the same item: the
            # same user, item and time in two files is one event read twice, read once)
            if rng.random() < 0.15 and other != item:
                rows.append(("ba"["ab".index(rows[-1][0])], user, other, t))
            t += int(rng.choice([30, 600, GAP, GAP + 1]))
            last = item
        return t

    for u in range(14):
        t = 1_600_000_000 + int(rng.integers(0, 3 * day))
        for _ in range(int(rng.integers(4, 9))):
            late = t > 1_600_000_000 + 12 * day
            t = session(f"u{u}", t, int(rng.integers(1, 8)), ("r1", "r2") if late else ())
            t += int(rng.integers(1, 3)) * day
    for c in range(2):  # cold users: everything after the others
        t = 1_600_000_000 + 40 * day + c * 7_200
        for _ in range(2):
            t = session(f"cold{c}", t, 5, ("r1", "r3")) + day
    for name in ("b.csv", "a.csv"):
        with open(os.path.join(folder, name), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "item", "time"])
            w.writerows((u, i, t) for file, u, i, t in rows if file + ".csv" == name)


def protocol(folder):
    """DESIGN §6 data preparation from the raw files: {user: [(split, items)]} in time
    order (train sessions as the vocabulary leaves them, valid/test ones with UNK), the
    vocabulary and the train counts it was chosen by."""
    events = collections.defaultdict(list)
    order = 0
    for name in sorted(os.listdir(folder)):  # input order: files by name, then lines
        with open(os.path.join(folder, name)) as f:
            for row in csv.DictReader(f):
                events[row["user"]].append((int(row["time"]), order, row["item"]))
                order += 1
    sessions = []  # (user, start, items)
    for user, evs in events.items():
        evs.sort()
        cut = [[]]
        for k, (t, _, item) in enumerate(evs):
            if k and t - evs[k - 1][0] > GAP:
                cut.append([])
            cut[-1].append((t, item))
        for s in cut:
            kept = [e for k, e in enumerate(s) if k == 0 or e[1] != s[k - 1][1]]
            if len(kept) >= MIN_LENGTH:
                sessions.append((user, kept[0][0], [item for _, item in kept]))
    starts = np.array([start for _, start, _ in sessions])
    t_valid = np.percentile(starts, 80, method="lower")
    t_test = np.percentile(starts, 90, method="lower")
    split = lambda start: "train" if start < t_valid else "valid" if start < t_test else "test"
    counts = collections.Counter(i for u, st, s in sessions if split(st) == "train" for i in s)
    vocab = {i for i, n in counts.items() if n >= MIN_COUNT}
    users = collections.defaultdict(list)
    for user, start, s in sorted(sessions, key=lambda x: x[1]):
        if split(start) == "train":
            s = [i for i in s if i in vocab]
            s = [i for k, i in enumerate(s) if k == 0 or i != s[k - 1]]
            if len(s) < MIN_LENGTH:
                continue
        else:
            s = [i if i in vocab else UNK for i in s]
        users[user].append((split(start), s))
    return users, vocab, counts


def brute_force(users, vocab, target_split, score, rule_out=""):
    """The metrics JSON of §6 by looping over every event and every candidate (`rule_out`
    "current": without the item the session is on, "seen": without every item of the
    user's history and of the session so far)."""
    sums = collections.defaultdict(lambda: collections.Counter())

    def add(group, rank, unknown):
        c = sums[group]
        c["events"] += 1
        c["unknown_targets"] += unknown
        for k in KS:
            if rank is not None and rank <= k:
                c[f"recall@{k}"] += 1
                c[f"mrr@{k}"] += 1.0 / rank

    for user, sessions in users.items():
        first = next((n for n, (sp, _) in enumerate(sessions) if sp == target_split), None)
        if first is None:
            continue
        # the user's record: earlier sessions (any split), then the split's own sessions
        record = [s for sp, s in sessions[:first]] + [s for sp, s in sessions[first:]
                                                       if sp == target_split]
        for n in range(first, len(record)):
            history = [i for s in record[:n] for i in s]
            for p, target in enumerate(record[n]):
                prefix = record[n][:p]
                excluded = ({prefix[-1]} if rule_out == "current" and prefix else
                            set(history) | set(prefix) if rule_out == "seen" else set())
                rank = None
                if target is not UNK and target not in excluded:
                    s = score(history, prefix)
                    rank = 1 + sum(s[c] >= s[target] for c in vocab
                                   if c != target and c not in excluded)
                if p == 0:
                    add("first_item", rank, target is UNK)
                    continue
                add("all", rank, target is UNK)
                seen = target is not UNK and (target in history or target in prefix)
                add("repeat" if seen else "new", rank, target is UNK)
                add("returning_users" if first else "cold_users", rank, target is UNK)

    def summary(c):
        n = c["events"]
        out = {f"{m}@{k}": c[f"{m}@{k}"] / n if n else 0.0 for m in ("recall", "mrr") for k in KS}
        return {**out, "events": n, "unknown_targets": c["unknown_targets"]}

    out = summary(sums["all"])
    for group in ("first_item", "repeat", "new", "returning_users", "cold_users"):
        out[group] = summary(sums[group])
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crosscheck")
    raw = root / "raw"
    raw.mkdir()
    write_log(str(raw))
    out = str(root / "data")
    res = subprocess.run([sys.executable, "-m", "pipeline", "--input", str(raw / "*.csv"),
                          "--output", out, *IN_MEMORY], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return str(raw), out


def model_evaluate(out, tmp_path, split, model, *extra):
    path = tmp_path / f"{model}.json"
    assert ev.main(["--data", out, "--split", split, "--model", model, "--output", str(path),
                    "--no-progress", *extra]) == 0
    return json.loads(path.read_text())


def assert_same(mine, theirs):
    for key, value in mine.items():
        if isinstance(value, dict):
            assert_same(value, theirs[key])
        else:
            assert theirs[key] == pytest.approx(value, abs=1e-12), key


def test_the_log_has_what_the_protocol_turns_on(data):
    raw, out = data
    users, vocab, counts = protocol(raw)
    targets = [i for u in users.values() for sp, s in u if sp == "test" for i in s]
    assert UNK in targets and "cold0" in users and all(sp == "test" for sp, _ in users["cold0"])
    assert len({counts[i] for i in vocab}) < len(vocab)  # equal counts: ties
    assert len(set(counts) - vocab) > 0  # rare train items, dropped there


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("rule_out", ["", "current", "seen"])
def test_popularity_equals_brute_force(data, tmp_path, split, rule_out):
    raw, out = data
    users, vocab, counts = protocol(raw)
    mine = brute_force(users, vocab, split, lambda history, prefix: counts, rule_out)
    theirs = model_evaluate(out, tmp_path, split, "popularity",
                            *([f"--rule-out-{rule_out}"] if rule_out else []))
    assert mine["events"] > 0 and mine["cold_users"]["events"] + mine["returning_users"][
        "events"] == mine["events"]
    assert_same(mine, theirs)
    if rule_out == "seen":  # every repeat target ruled out: a miss, not an unknown target
        assert mine["repeat"]["events"] > 0 and mine["repeat"]["recall@20"] == 0
        assert theirs["repeat"]["unknown_targets"] == 0 and theirs["rule_out_seen"] is True


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("rule_out", ["", "seen"])
def test_upop_equals_brute_force(data, tmp_path, split, rule_out):
    """`upop` as model/baselines.py's docstring defines it: the user's last 200 known
    events of earlier sessions and the known events of the session so far weigh 0.95 ** age
    (age 0: the latest; unknown items take no place), those of the session 2 × more; an item of weight r > 0 scores 1 + r, any other
    0.5 · rank / (max rank + 1), the rank of its count among the distinct counts (0 for
    0). History walks every earlier session of the user in time order, the split's earlier
    target sessions included."""
    raw, out = data
    users, vocab, counts = protocol(raw)
    distinct = sorted({0} | {counts[i] for i in vocab})
    rank = {c: k for k, c in enumerate(distinct)}

    def score(history, prefix):
        events = ([(i, 1.0) for i in [i for i in history if i is not UNK][-200:]]
                  + [(i, 2.0) for i in prefix if i is not UNK])
        r = collections.Counter()
        for age, (item, weight) in enumerate(reversed(events)):
            r[item] += weight * 0.95 ** age
        return {i: float(np.float32(1.0 + r[i] if r[i] > 0
                                    else 0.5 * rank[counts[i]] / len(distinct)))
                for i in vocab}

    assert_same(brute_force(users, vocab, split, score, rule_out),
                model_evaluate(out, tmp_path, split, "upop",
                               *([f"--rule-out-{rule_out}"] if rule_out else [])))
