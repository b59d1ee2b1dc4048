"""The synthetic log generator: determinism and the planted structure."""
import collections
import os
import subprocess
import sys

import pytest

from pipeline import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sessions(rows, gap=1800):
    by_user = collections.defaultdict(list)
    for r in rows:
        by_user[r.user].append(r)
    out = {}
    for user, events in by_user.items():
        sessions = [[events[0].item]]
        for prev, cur in zip(events, events[1:]):
            if cur.time - prev.time > gap:
                sessions.append([])
            sessions[-1].append(cur.item)
        out[user] = sessions
    return out


def test_generate_is_deterministic_and_time_ordered():
    a = synthetic.generate(40, seed=7)
    assert a == synthetic.generate(40, seed=7)
    assert a != synthetic.generate(40, seed=8)
    assert [(r.time, r.user) for r in a] == sorted((r.time, r.user) for r in a)
    assert len(synthetic.generate(40, seed=7, max_events=100)) == 100


def test_cli_writes_identical_files_for_a_seed(tmp_path):
    paths = [tmp_path / "a.csv", tmp_path / "raw" / "b.csv"]  # its folder is created
    for p in paths:
        res = subprocess.run([sys.executable, "-m", "pipeline.synthetic", "--output", str(p),
                              "--users", "30", "--seed", "3"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_text().startswith("user,item,time\n")
    # the command writes the columns `generate_arrays` gives (24 bytes an event, where the
    # rows took about 200: 814 MB for 3M events), the rows `generate` gives, in blocks
    rows = synthetic.generate(30, seed=3)
    assert paths[0].read_text() == "user,item,time\n" + "".join(
        f"{r.user},{r.item},{r.time}\n" for r in rows)
    columns = synthetic.generate_arrays(30, seed=3)
    assert [c.tolist() for c in columns] == [list(c) for c in zip(*rows)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(synthetic, "WRITE_BLOCK", 7)  # a last block cut short
        synthetic.write_csv(str(tmp_path / "c.csv"), columns)
    assert (tmp_path / "c.csv").read_bytes() == paths[0].read_bytes()
    assert sorted(os.listdir(tmp_path / "raw")) == ["b.csv"]  # no temporary left
    res = subprocess.run([sys.executable, "-m", "pipeline.synthetic", "--output",
                          str(tmp_path / "raw")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--output" in res.stderr and "is a folder" in res.stderr


def test_planted_structure():
    rows = synthetic.generate(150, seed=1)
    sessions = _sessions(rows)
    counts = [len(s) for s in sessions.values()]
    assert 5 <= min(counts) and max(counts) <= 31 and sum(counts) / len(counts) > 10
    # Cross-session signal: a session's first item was seen in the user's earlier sessions.
    firsts = [s[0] in {i for earlier in user[:k] for i in earlier}
              for user in sessions.values() for k, s in enumerate(user) if k >= 3]
    assert sum(firsts) / len(firsts) > 0.5
    # Popularity skew: the top 1% of items take a large share of events.
    freq = sorted(collections.Counter(r.item for r in rows).values(), reverse=True)
    assert sum(freq[:len(freq) // 100]) / len(rows) > 0.05


def test_repeat_knob():
    def repeat_share(p):
        seen, hits = collections.defaultdict(set), 0
        rows = synthetic.generate(80, seed=2, repeat_prob=p)
        for r in rows:
            hits += r.item in seen[r.user]
            seen[r.user].add(r.item)
        return hits / len(rows)

    assert repeat_share(0.6) > repeat_share(0.3) > repeat_share(0.0) + 0.1


def test_sessions_knob_and_its_errors(tmp_path):
    counts = [len(s) for s in _sessions(synthetic.generate(20, seed=4, sessions=(40, 50))).values()]
    assert 40 <= min(counts) and max(counts) <= 51
    res = subprocess.run([sys.executable, "-m", "pipeline.synthetic", "--output",
                          str(tmp_path / "x.csv"), "--sessions", "9"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--sessions must be MIN,MAX" in res.stderr
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("options, message", [
    (dict(topics=3), "topics >= 4 (3 with drift 0)"),
    (dict(topics=2, drift=0.0), "topics >= 3 and items >= 3 x topics"),
    (dict(items=50, topics=50), "got 20 users, 50 topics, 50 items"),
    (dict(max_events=0), "max_events must be >= 1"),
])
def test_out_of_range_options_are_said_not_numpy_errors(options, message):
    """Each user likes up to three topics and three items of each, and may drift to a
    fourth topic: fewer topics or items than that is refused up front (these were numpy's
    "Cannot take a larger sample than population" and the like)."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        synthetic.generate(20, seed=0, **options)
    assert len({r.item for r in synthetic.generate(20, seed=0, topics=3, drift=0.0, items=9)}) <= 9


@pytest.mark.parametrize("args, message", [
    # (--users 10**30 hung building the log in memory; the others were numpy's words)
    (["--users", str(10**30)], "argument --users: must be from 1 to 10000000, got 1" + "0" * 30),
    (["--users", "10000000"], "--users 10000000 with --sessions 5,30 make about 1,225,000,000 "
                              "events, over the 1,000,000,000 this command holds in memory"),
    (["--users", "10000", "--sessions", "1,100000"],
     "--users 10000 with --sessions 1,100000 make about 3,500,035,000 events"),
    (["--zipf", "nan"], "argument --zipf: must be from -10.0 to 10.0, got nan"),
    (["--zipf", "inf"], "argument --zipf: must be from -10.0 to 10.0, got inf"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--sessions", f"1,{10**20}"], "--sessions must be MIN,MAX with 1 <= MIN <= MAX <= 100,000"),
    (["--sessions", "0,3"], "--sessions must be MIN,MAX with 1 <= MIN <= MAX"),
    (["--items", str(10**20)], "argument --items: must be from 1 to 10000000"),
    (["--output", ""], "--output is empty: name the CSV file to write"),
])
def test_out_of_range_command_options_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    """Each bad value is one usage error naming its option, before any work; an empty
    --output wrote its temporary file in the parent of the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--output", "x.csv", "--users", "2", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["work"] and not os.listdir(work)


def test_many_users_with_max_events_are_accepted(tmp_path):
    """--max-events bounds the log: the users' bound on the expected size does not apply."""
    assert synthetic.main(["--output", str(tmp_path / "x.csv"), "--users", "10000000",
                           "--max-events", "5"]) == 0
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 6


def test_write_csv_never_writes_through_a_planted_link(tmp_path):
    """The hidden file's name was predictable (the pid): a link planted there in a shared
    folder made write_csv overwrite the link's target (security review)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / f".tmp-{os.getpid()}-log.csv")
    synthetic.write_csv(str(tmp_path / "log.csv"), synthetic.generate(3, seed=0))
    assert victim.read_text() == "keep"
    assert not os.path.islink(tmp_path / "log.csv")
    assert (tmp_path / "log.csv").read_text().startswith("user,item,time\n")
    assert sorted(os.listdir(tmp_path)) == sorted(["victim.txt", f".tmp-{os.getpid()}-log.csv",
                                                   "log.csv"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path):
    """A Ctrl-C while the log is generated printed a traceback of 14-22 lines (audit): one
    line as the pipeline's, the process ended as killed by SIGINT, and no file."""
    import signal
    import time

    out = tmp_path / "log.csv"
    # (pytest-xdist's workers start their children with SIGINT ignored: a terminal's own)
    code = ("import runpy, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "sys.argv = ['pipeline.synthetic', *sys.argv[1:]]\n"
            "runpy.run_module('pipeline.synthetic', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "--users", "200000", "--output",
                             str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # past its start (1.5 s of CPU): generating
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[11]) + int(fields[12]) >= 1.5 * os.sysconf("SC_CLK_TCK"):
                break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT, err
    assert err.strip() == f"interrupted: nothing was written to {out}", err
    assert os.listdir(tmp_path) == []
