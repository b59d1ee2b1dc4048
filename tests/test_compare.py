"""model.compare: seed aggregation, relative gain, the Markdown table, and a whole run
with the paired significance test of HierTCN against the best baseline."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from model import compare, processes
from model import evaluate as evaluate_lib
from model import metrics as metrics_lib
from tiny_logs import planted_users, write_data

# (without the repeat head, whose graph takes half of each child's start-up to trace; the
# comparison's bookkeeping is the subject here)
TINY = {"model": {"embedding_dim": 16, "gru_units": 8, "channels": 16, "repeat_head": False},
        "train": {"batch_size": 4, "sessions_per_batch": 3, "max_session_length": 4,
                  "learning_rate": 0.05, "lr_schedule": "constant", "checkpoint_every": 5,
                  "shuffle_buffer": 16, "eval_users": 0}}


def _small_data(tmp_path):
    """A pipeline folder of 30 planted train users, 6 valid and 9 test ones, 20 items."""
    return write_data(str(tmp_path / "data"), 20, planted_users(30),
                      valid=[(3, u[:4]) for u in planted_users(6, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(9, seed=2)])


def _metrics(r20, m20, first=0.1):
    keys = {k: 0.0 for k in compare.METRIC_KEYS}
    keys.update({"recall@20": r20, "mrr@20": m20, "events": 100, "unknown_targets": 2})
    out = dict(keys, model="x", split="test", data="/d")
    for g in compare.GROUPS:
        out[g] = dict(keys, **({"recall@20": first} if g == "first_item" else {}))
    return out


def test_aggregate_means_and_population_std_over_seeds():
    agg = compare.aggregate([_metrics(0.2, 0.1), _metrics(0.4, 0.3)])
    assert agg["recall@20"] == pytest.approx(0.3)
    assert agg["std"]["recall@20"] == pytest.approx(0.1)
    assert agg["first_item"]["recall@20"] == pytest.approx(0.1)
    assert agg["std"]["first_item"]["recall@20"] == pytest.approx(0.0)
    assert agg["events"] == 100 and agg["seeds"] == 2 and agg["model"] == "x"
    agg.update(train_seconds=1.0, events_per_s=10.0, parameters=5)
    md = compare.markdown_table({"models": {"x": agg}})
    assert "0.3000 ± 0.1000" in md and "0.1000 ± 0.0000" in md  # seeds that agree say so too
    assert "outside the training vocabulary" not in md
    # every target unknown: bold zeros said to be no score (the note reached compare.log only)
    agg.update({key: 0.0 for key in ("recall@20", "mrr@20")}, unknown_targets=100)
    assert ("Every one of the 100 targets is outside the training vocabulary (the run folders' "
            "items.tsv): every figure is 0 for any model, not a score.") in \
        compare.markdown_table({"models": {"x": agg}})


def test_relative_gain_and_table_mark_the_best_value():
    results = {"models": {"hiertcn": compare.aggregate([_metrics(0.33, 0.1)]),
                          "sknn": compare.aggregate([_metrics(0.30, 0.12)])}}
    for m in results["models"].values():
        m.update(train_seconds=1.0, events_per_s=10.0, parameters=5)
    gain = compare.relative_gain(results)
    assert gain["recall@20"]["relative_gain"] == pytest.approx(0.1)
    assert gain["mrr@20"]["best_baseline"] == "sknn"
    assert gain["mrr@20"]["relative_gain"] == pytest.approx(-1 / 6)
    md = compare.markdown_table(results)
    hier = next(line for line in md.splitlines() if line.startswith("| hiertcn"))
    sknn = next(line for line in md.splitlines() if line.startswith("| sknn"))
    assert "**0.3300**" in hier and "**0.1200**" in sknn and "0.1000 |" in hier
    assert "+10.0%" in md
    json.dumps(results)
    # what prints alike is bold alike; what prints apart is not

    def column(name):
        lines = compare.markdown_table(results).splitlines()
        at = [c.strip() for c in lines[0].strip("|").split("|")].index(name)
        return [[c.strip() for c in line.strip("|").split("|")][at] for line in lines[2:4]]

    results["models"]["sknn"]["recall@20"] = 0.33004
    results["models"]["hiertcn"]["mrr@20"] = 0.11996
    assert column("R@20") == ["**0.3300**", "**0.3300**"]
    assert column("MRR@20") == ["**0.1200**", "**0.1200**"]
    results["models"]["sknn"]["recall@20"] = 0.32994
    assert column("R@20") == ["**0.3300**", "0.3299"]


def test_table_has_user_group_columns_and_counts_cold_events():
    ours, old = _metrics(0.33, 0.1), _metrics(0.30, 0.12)
    ours["returning_users"]["recall@20"], ours["cold_users"]["events"] = 0.41, 60
    ours["repeat"]["events"] = 0  # a group without events has no figures, not zeros
    for g in metrics_lib.USER_GROUPS:  # a run evaluated before the user groups existed
        del old[g]
    results = {"models": {"hiertcn": compare.aggregate([ours]), "sknn": compare.aggregate([old])}}
    md = compare.markdown_table(results).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    at = header.index("returning R@20")
    assert header[at:at + 4] == ["returning R@20", "returning MRR@20", "cold R@20", "cold MRR@20"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in md[2:4]}
    assert cells["hiertcn"][at] == "**0.4100**" and cells["sknn"][at:at + 4] == ["–"] * 4
    rep = header.index("repeat R@20")
    assert cells["hiertcn"][rep:rep + 2] == ["–", "–"] and cells["sknn"][rep] == "**0.3000**"
    assert "100 scored events (positions >= 2), 60 of them of cold users" in md[-1]


def test_a_split_without_scored_events_has_no_headline_figures_to_bold():
    """A split of one-item sessions scores nothing at position >= 2: its 0.0000 (a
    convention) was bolded as every model's best (extremes audit); the first-item figures
    stay, and the train figures."""
    empty = [_metrics(0.0, 0.0), _metrics(0.0, 0.0)]
    for m in empty:
        m["events"], m["first_item"]["recall@20"] = 0, 0.25
        for g in ("repeat", "new", "returning_users", "cold_users"):
            m[g]["events"] = 0
    results = {"models": {"hiertcn": compare.aggregate([empty[0]]),
                          "popularity": compare.aggregate([empty[1]])}}
    results["models"]["hiertcn"].update(train_seconds=2.0, events_per_s=10.0, parameters=5)
    md = compare.markdown_table(results).splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in md[2:4]}
    assert cells["hiertcn"][header.index("R@20")] == "–"
    assert cells["popularity"][header.index("MRR@20")] == "–"
    labels = [k.replace("recall", "R").replace("mrr", "MRR") for k in compare.METRIC_KEYS]
    assert [cells[m][header.index(label)] for m in cells for label in labels] == ["–"] * (
        2 * len(labels))
    assert cells["hiertcn"][header.index("first R@20")] == "**0.2500**"
    assert cells["hiertcn"][header.index("train s")] == "2"


def test_a_failed_write_of_the_results_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys):
    """A full disk while the results are written: the earlier run's table, chart and
    results.json stay as they were (they were removed first, then lost), and no temporary
    file is left; with room, the next run replaces them. stdout on a full disk: the results
    are written, and one line says that only the printed table is lost (it said that the
    results could not be written under --output)."""
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "popularity", "--output", str(out)]
    assert compare.main(argv) == 0
    names = ("results.md", "results.png", "results.json")
    before = {name: (out / name).read_bytes() for name in names}

    def full(results, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compare, "bar_chart", full)
    capsys.readouterr()
    assert compare.main(["--data", data, "--models", "popularity,sknn",
                         "--output", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in names} == before
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]
    monkeypatch.undo()
    os.remove(out / "results.json")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as stdout:
            res = subprocess.run([sys.executable, "-m", "model.compare", *argv],
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.splitlines()[-1] == (
            "error: cannot write the output: No space left on device; the command's work is "
            "done: only what it printed is lost"), res.stderr
        assert json.loads((out / "results.json").read_text())["models"]["popularity"]


def test_a_damaged_metrics_file_is_evaluated_again(tmp_path, capsys):
    """A run's test.json that is not JSON (or not a record) under --output: the rerun gave a
    JSONDecodeError traceback; it is evaluated again, with a note, to the same results."""
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "popularity", "--output", str(out)]
    assert compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = out / "runs" / "popularity" / "test.json"
    for content, said in (('{"recall@20": 0.', "Expecting ',' delimiter: line 1"),
                          ("[]", "not a record of metrics)")):
        metrics.write_text(content)
        capsys.readouterr()
        assert compare.main(argv) == 0
        assert f"note: {metrics} cannot be read ({said}" in capsys.readouterr().err
        assert json.loads((out / "results.json").read_text())["models"] == results["models"]
        assert json.loads(metrics.read_text())["events"] == \
            results["models"]["popularity"]["events"]


def test_results_are_kept_per_split_and_options_name_compared_models(tmp_path, capsys):
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    for split, users in (("valid", 6), ("test", 9)):
        assert compare.main(["--data", data, "--models", "popularity", "--output", str(out),
                             "--split", split]) == 0
        name = "results.json" if split == "test" else f"results_{split}.json"
        results = json.loads((out / name).read_text())
        metrics = json.loads((out / "runs" / "popularity" / f"{split}.json").read_text())
        assert results["split"] == split == metrics["split"]
        assert results["models"]["popularity"]["events"] == metrics["events"]
        # a fitted baseline has no training time: null and "–", not a measured 0
        assert results["models"]["popularity"]["train_seconds"] is None
        row = next(line for line in (out / name.replace(".json", ".md")).read_text().splitlines()
                   if line.startswith("| popularity |"))
        assert row.endswith("| – | – | 0 |"), row
        assert len(evaluate_lib.read_per_user(
            str(out / "runs" / "popularity" / f"{split}_users.npz"))["user_id"]) == users
    assert json.loads((out / "runs" / "popularity" / "valid.json").read_text())["split"] == "valid"
    # looking at valid never replaces the test table: each split has its own results files
    assert json.loads((out / "results_valid.json").read_text())["split"] == "valid"
    assert "Split `valid`" in (out / "results_valid.md").read_text()
    # (no trained model among them: nothing was chosen on valid)
    assert "checkpoints were chosen" not in (out / "results_valid.md").read_text()
    assert "Split `test`" in (out / "results.md").read_text() and (out / "results_valid.png").exists()
    # other data in the same folder: the fitted model is evaluated again, and its
    # evaluation of the other split, made on the old data, is gone
    before = json.loads((out / "runs" / "popularity" / "test.json").read_text())
    data = write_data(data, 20, planted_users(30, seed=5),
                      valid=[(3, u[:4]) for u in planted_users(6, seed=6)],
                      test=[(3, u[:4]) for u in planted_users(12, seed=7)])
    assert compare.main(["--data", data, "--models", "popularity", "--output", str(out)]) == 0
    after = json.loads((out / "runs" / "popularity" / "test.json").read_text())
    assert after["events"] != before["events"]
    assert not (out / "runs" / "popularity" / "valid.json").exists()
    capsys.readouterr()
    for option in (["--train-args", "hiertcn:plian=--no-repeat-head"], ["--config", "sknn=x.json"]):
        assert compare.main(["--data", data, "--models", "hiertcn,hiertcn:plain,sknn",
                             "--output", str(out), *option]) == 2
        assert "which is not a trained model of --models (hiertcn, hiertcn:plain)" in capsys.readouterr().err
    # an option compare sets for every run (argparse's last value would win, silently: a
    # --seed there made every seed one run), and one file named twice: one line each
    for option, message in (
            (["--train-args", "hiertcn=--dropout 0.3 --seed 7"],
             "--train-args hiertcn: --seed is set by model.compare for every run alike"),
            (["--train-args", "hiertcn=--patience=2"], "--patience is set by model.compare"),
            (["--train-args", "hiertcn=--pat 2"], "--pat is set by model.compare"),
            # steps under --budget-steps (audit: the last --steps won, results.json said
            # the budget); under --budget-minutes they size the learning-rate decay
            (["--budget-steps", "6", "--train-args", "hiertcn=--steps 3"],
             "--train-args hiertcn: --steps is set by --budget-steps 6 for every model alike"),
            (["--budget-steps", "6", "--train-args", "hiertcn=--epochs=2"],
             "--train-args hiertcn: --epochs is set by --budget-steps 6"),
            # another split or other users for one model, in one table (audit: the table
            # compared popularity's valid figures with the others' test ones)
            (["--eval-args", "popularity=--split=valid"],
             "--eval-args popularity: --split would evaluate one model otherwise than the rest"),
            (["--eval-args", "popularity=--sample-users 5"], "--sample-users would evaluate"),
            (["--eval-args", "popularity=--spl valid"], "--spl would evaluate one model"),
            (["--config", "hiertcn=a.json", "--config", "hiertcn=b.json"],
             "--config names 'hiertcn' twice ('a.json' and 'b.json'): give one")):
        assert compare.main(["--data", data, "--models", "hiertcn,popularity", "--output",
                             str(tmp_path / "never"), *option]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()
    # --train-args given twice for one model: both kept, in order
    args = compare.argparse.Namespace(budget_steps=3, budget_minutes=None, eval_every=0,
                                      config={}, train_args={"hiertcn": ["--dropout", "0.3",
                                                                          "--lr", "1"]})
    assert compare._parse_pairs(["hiertcn=--dropout 0.3", "hiertcn=--lr 1"], "--train-args",
                                join=True) == {"hiertcn": "--dropout 0.3 --lr 1"}
    assert compare._train_options("hiertcn", 1, args)[-4:] == ["--dropout", "0.3", "--lr", "1"]
    assert compare.main(["--data", data, "--models", "popularity", "--output",
                         str(out / "results.json")]) == 2
    assert f"--output {out}/results.json is a file: pass a folder" in capsys.readouterr().err


def test_the_command_ignores_stop_signals_once_its_results_are_written(tmp_path):
    """A SIGTERM just after results.json was written killed the finished command with no
    word (exit 143) or raised a traceback: `python -m model.compare` ignores them then."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(10),
                      test=[(3, u[:4]) for u in planted_users(4, seed=2)])
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert compare.main(["--data", data, "--models", "popularity", "--output",
                             str(tmp_path / "cmp")], command=True) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_eval_args_make_a_fitted_variant_that_equals_model_evaluate(tmp_path, capsys):
    """`--eval-args 'sknn:noremind=--no-remind'`: the variant is model.evaluate with that
    option, beside the default sknn; a change of its arguments evaluates it again."""
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "sknn,sknn:noremind", "--output", str(out)]
    assert compare.main(argv + ["--eval-args", "sknn:noremind=--no-remind"]) == 0
    results = json.loads((out / "results.json").read_text())["models"]
    direct = tmp_path / "direct.json"
    assert evaluate_lib.main(["--data", data, "--split", "test", "--model", "sknn",
                              "--no-remind", "--output", str(direct), "--no-progress"]) == 0
    direct = json.loads(direct.read_text())
    assert results["sknn:noremind"]["mrr@20"] == pytest.approx(direct["mrr@20"])
    assert json.loads((out / "runs" / "sknn:noremind" / "test.json").read_text())["model"] \
        == "sknn:noremind"
    assert results["sknn"]["mrr@20"] != pytest.approx(direct["mrr@20"])
    # the same name without the option: evaluated again, now equal to sknn
    assert compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())["models"]
    assert results["sknn:noremind"]["mrr@20"] == pytest.approx(results["sknn"]["mrr@20"])
    capsys.readouterr()
    assert compare.main(argv + ["--eval-args", "popularity=--no-remind"]) == 2
    assert "which is not a fitted baseline of --models (sknn, sknn:noremind)" in \
        capsys.readouterr().err


def test_rule_out_current_has_its_own_files_beside_the_plain_evaluation(tmp_path):
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "popularity,mv", "--output", str(out)]
    assert compare.main(argv) == 0
    plain = (out / "results.json").read_text()
    assert compare.main(argv + ["--rule-out-current"]) == 0
    assert (out / "results.json").read_text() == plain  # the plain table is kept
    ruled = json.loads((out / "results_test_ruled_out.json").read_text())
    assert ruled["rule_out_current"] is True and not json.loads(plain)["rule_out_current"]
    run = json.loads((out / "runs" / "mv" / "test_ruled_out.json").read_text())
    assert run["rule_out_current"] is True
    assert (out / "runs" / "mv" / "test_ruled_out_users.npz").exists()
    assert "without the item the session is on" in (out / "results_test_ruled_out.md").read_text()
    # mv scores the user's recent items, the current one among them: ruled out, the
    # targets it outranked move up
    assert ruled["models"]["mv"]["mrr@20"] > json.loads(plain)["models"]["mv"]["mrr@20"]


def test_an_output_that_is_another_commands_folder_is_refused_before_anything_runs(
        tmp_path, capsys):
    """--output inside --data (the runs would be deleted with the next pipeline
    --overwrite), or a model.train run folder: one line, nothing written."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(30),
                      test=[(3, u[:4]) for u in planted_users(9, seed=2)])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    before = sorted(os.listdir(data))
    for output, said in ((data, f"--output {data} is the --data folder or inside it"),
                         (os.path.join(data, "cmp"), "is the --data folder or inside it"),
                         (run, f"--output {run} is a model.train run folder")):
        assert compare.main(["--data", data, "--models", "popularity",
                             "--output", str(output)]) == 2
        assert said in capsys.readouterr().err
    assert sorted(os.listdir(data)) == before and sorted(os.listdir(run)) == [
        "checkpoints", "config.json"]


def test_a_ruled_out_chart_says_so(tmp_path):
    """The ruled-out evaluations' charts had the plain chart's labels: one seen alone could
    not be told from it (analyst audit)."""
    models = {"a": {"recall@20": 0.3, "mrr@20": 0.1}, "b": {"recall@20": 0.2, "mrr@20": 0.05}}
    charts = {}
    for name, flags in (("plain", {}), ("current", {"rule_out_current": True}),
                        ("seen", {"rule_out_seen": True})):
        compare.bar_chart({"split": "test", "models": models, **flags}, str(tmp_path / name))
        charts[name] = (tmp_path / name).read_bytes()
    assert len(set(charts.values())) == 3


def test_rule_out_seen_has_its_own_files_and_excludes_the_other_rule(tmp_path, capsys):
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "popularity,mv", "--output", str(out)]
    with pytest.raises(SystemExit):
        compare.main(argv + ["--rule-out-seen", "--rule-out-current"])
    assert "pass one of --rule-out-seen and --rule-out-current" in capsys.readouterr().err
    assert not out.exists()
    assert compare.main(argv + ["--rule-out-seen"]) == 0
    seen = json.loads((out / "results_test_seen_ruled_out.json").read_text())
    assert seen["rule_out_seen"] is True and not (out / "results.json").exists()
    run = json.loads((out / "runs" / "mv" / "test_seen_ruled_out.json").read_text())
    assert run["rule_out_seen"] is True and run["unknown_targets"] == 0
    assert "without the items the user has had before" in (
        out / "results_test_seen_ruled_out.md").read_text()
    # mv ranks the user's earlier items first: every repeat target a miss now
    assert run["repeat"]["events"] > 0 and run["repeat"]["recall@20"] == 0


def test_a_run_folder_without_a_checkpoint_takes_the_new_options(tmp_path):
    """An attempt that failed before its first checkpoint (a mistyped option) does not block
    the corrected command; once a checkpoint exists, other options are refused."""
    run = tmp_path / "seed0"
    first = {"data": "d", "train": ["--model", "hiertcn", "--dropuot", "0.1"], "config": None}
    fixed = {"data": "d", "train": ["--model", "hiertcn", "--dropout", "0.1"], "config": None}
    compare._check_or_write_record(str(run), first)
    compare._check_or_write_record(str(run), fixed)
    assert json.loads((run / compare.RECORD).read_text()) == fixed
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    compare._check_or_write_record(str(run), fixed)
    with pytest.raises(compare.CompareError, match="--dropout 0.1 then, not given now; "
                                                   "--dropuot not given then, 0.1 now"):
        compare._check_or_write_record(str(run), first)


def test_runs_recorded_by_an_older_version_match_the_same_data_rebuilt(tmp_path):
    """A run record made before stats.json gained keys the input decides (heaviest_user,
    max_session_events, the gap_by_default option, ...) holds a digest without them: the
    same log rebuilt by this version's pipeline is the same data (its runs were refused as
    "trained on other data"); other counts are still other data."""
    older = {"rows_read": 10, "rows_malformed": 0, "rows_written": 10, "items": 4,
             "splits": {"train": {"users": 2, "events": 8}}, "cutoffs": {},
             "options": {"input": ["a.csv"], "gap_minutes": 30}}
    rebuilt = dict(older, heaviest_user={"train": "u1"}, max_session_events={"train": 5},
                   options=dict(older["options"], gap_by_default=True, filter=None))
    other = dict(rebuilt, rows_written=9)
    folders = {}
    for name, stats in (("older", older), ("rebuilt", rebuilt), ("other", other)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "stats.json").write_text(json.dumps(stats))
    run = tmp_path / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    train = ["--model", "hiertcn", "--steps", "5"]
    (run / compare.RECORD).write_text(json.dumps(
        {"data": compare.data_fingerprint(str(folders["older"])), "train": train,
         "config": None}))
    for name in ("rebuilt", "other"):
        record = {"data": compare.data_fingerprint(str(folders[name])), "train": train,
                  "config": None}
        conflict = compare._record_conflict(str(run), record,
                                            compare.data_fingerprints(str(folders[name])))
        assert (conflict is None) == (name == "rebuilt"), conflict
    assert "trained on other data" in conflict
    # this version's digest is as it was (records made by it stay valid)
    assert compare.data_fingerprint(str(folders["rebuilt"])) != compare.data_fingerprint(
        str(folders["older"]))


def test_every_stats_key_the_pipeline_writes_is_in_the_digest_or_dated(tmp_path):
    """A key the pipeline writes into stats.json (or an option it records) that runs'
    records from 2026-12-01 did not digest must be in LATER_KEYS (newest first), or
    NOT_DATA(_STATS): else the same log rebuilt after the key came would not match
    those runs' records."""
    from pipeline import sessions
    from pipeline.__main__ import main as pipeline_main

    log = tmp_path / "log.csv"
    log.write_text("user,item,time\n" + "".join(
        f"u{u},i{(u + k) % 7},{1_700_000_000 + 100_000 * u + 60 * k}\n"
        for u in range(12) for k in range(6)))
    assert pipeline_main(["--input", str(log), "--output", str(tmp_path / "out"),
                          "--direct_running_mode", "in_memory", "--direct_num_workers", "1"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    first_stats = {"rows_read", "rows_malformed", "rows_filtered", "rows_written", "splits",
                   "items", "cutoffs", "options"}
    first_options = {"input", "output", "format", "header", "columns", "user_col", "item_col",
                     "time_col", "time_unit", "session_gap", "min_item_count",
                     "min_session_length", "split", "valid_fraction", "test_fraction",
                     "max_events_per_user", "seed", "runner"}
    later = {kind: {key for k, key in compare.LATER_KEYS if k == kind}
             for kind in ("stats", "options")}
    assert set(stats) - first_stats - set(compare.NOT_DATA_STATS) <= later["stats"], stats
    assert set(stats["options"]) - first_options - set(compare.NOT_DATA) <= later["options"]
    assert sessions.OVERLAPPING in later["stats"]  # (with --session-col only)


def test_a_refused_command_changes_nothing_under_its_output(tmp_path, capsys):
    """What refuses a command is found before any model runs: a neural run trained on
    other data (listed after a baseline, which was refitted on the new data first), a
    missing --config file, an empty split."""
    data = _small_data(tmp_path)
    out = tmp_path / "cmp"
    assert compare.main(["--data", data, "--models", "popularity", "--output", str(out)]) == 0
    run = out / "runs" / "hiertcn" / "seed0"  # a checkpoint trained on other data
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-5.index").write_bytes(b"")
    (run / compare.RECORD).write_text(json.dumps({"data": "other", "train": [], "config": None}))

    def snapshot():
        return {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    capsys.readouterr()
    new = write_data(str(tmp_path / "new"), 20, planted_users(30, seed=5),
                     valid=[(3, u[:4]) for u in planted_users(6, seed=6)],
                     test=[(3, u[:4]) for u in planted_users(12, seed=7)])
    assert compare.main(["--data", new, "--models", "popularity,hiertcn", "--output", str(out),
                         "--budget-steps", "5"]) == 2
    assert "was trained on other data" in capsys.readouterr().err
    assert compare.main(["--data", data, "--models", "popularity,hiertcn", "--output", str(out),
                         "--config", f"hiertcn={tmp_path / 'nope.json'}"]) == 2
    assert "nope.json: [Errno 2]" in capsys.readouterr().err
    empty = write_data(str(tmp_path / "empty"), 20, planted_users(30),
                       valid=[(3, u[:4]) for u in planted_users(6, seed=1)], test=[])
    assert compare.main(["--data", empty, "--models", "popularity", "--output", str(out)]) == 2
    assert "the test split of" in capsys.readouterr().err
    assert snapshot() == before
    # another compare writing into the folder (its flock, on a descriptor of its own as
    # another process's is): refused before anything runs (audit: it evaluated the
    # baselines beside the first)
    from pipeline import storage

    held = storage.lock_folder(str(out))
    try:
        os.remove(out / "runs" / "popularity" / "test.json")  # (popularity would run again)
        before = snapshot()
        assert compare.main(["--data", data, "--models", "popularity", "--output",
                             str(out)]) == 2
        assert capsys.readouterr().err == (
            f"error: --output {out} is being written by another model.compare (process "
            f"{os.getpid()}): wait for it to end, or pass another --output\n")  # (its holder)
        assert snapshot() == before
    finally:
        os.close(held)
    assert compare.main(["--data", data, "--models", "popularity", "--output", str(out)]) == 0


def _stand_in(tmp_path, name: str, saving_seconds: float):
    """A parent running `compare._run` on a stand-in for model.train (which saves a
    checkpoint on SIGTERM, here taking `saving_seconds`), once the child has started and
    written its pid to NAME.txt.pid."""
    record = tmp_path / f"{name}.txt"
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n"
             f"    open(sys.argv[1], 'a').write(f'signal {{signum}}\\n'); time.sleep({saving_seconds})\n"
             "    open(sys.argv[1], 'a').write('saved\\n'); sys.exit(130)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "open(sys.argv[1] + '.pid', 'w').write(str(os.getpid()))\n"
             "open(sys.argv[1], 'a').write('started\\n'); time.sleep(60)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys; from model import compare; from pipeline import argtypes; "
         "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
         "with argtypes.sigterm_as_interrupt():\n"
         f"    compare._run([sys.executable, '-c', {child!r}, {str(record)!r}], {str(tmp_path / 'log')!r})"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stderr=subprocess.PIPE, text=True)
    _wait_for(record, "started")
    return parent, record


def _wait_for(path, text):
    deadline = time.monotonic() + 60
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {path} within 60 s")
        time.sleep(0.05)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited: gone, or (Linux) a zombie not reaped yet."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(") ", 1)[1].startswith("Z")
        except FileNotFoundError:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_gone(pid: int) -> None:
    """`pid` has exited, within a grace period for the exit to complete (well within the
    stuck stand-in's 30 s of saving); otherwise it is killed and the test fails."""
    deadline = time.monotonic() + 10
    while not _exited(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the child {pid} is still running after its parent returned")
        time.sleep(0.05)


def test_an_interrupted_command_is_stopped_once_and_waited_for(tmp_path):
    """Ctrl-C or SIGTERM to model.compare: the running child gets one SIGTERM and is waited
    for, also where SIGINT is ignored (a background job: the child inherits that); a second
    Ctrl-C kills it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        parent, record = _stand_in(tmp_path, f"child{int(signum)}", 1.0)
        parent.send_signal(signum)
        _, err = parent.communicate(timeout=60)
        assert record.read_text() == f"started\nsignal {int(signal.SIGTERM)}\nsaved\n"
        assert parent.returncode != 0 and "KeyboardInterrupt" in err
        assert "waiting for the running command to save its work" in err
        _assert_gone(int((tmp_path / f"child{int(signum)}.txt.pid").read_text()))
    # a child stuck saving: the second Ctrl-C kills it, before it saves
    parent, record = _stand_in(tmp_path, "stuck", 30.0)
    parent.send_signal(signal.SIGINT)
    _wait_for(record, "signal")
    parent.send_signal(signal.SIGINT)
    parent.communicate(timeout=60)
    _assert_gone(int((tmp_path / "stuck.txt.pid").read_text()))
    assert "saved" not in record.read_text()


def test_model_names_are_validated():
    assert compare.parse_model_names("hiertcn, sknn,hiertcn:solo") == ["hiertcn", "sknn", "hiertcn:solo"]
    with pytest.raises(compare.CompareError, match="unknown model 'bert4rec'"):
        compare.parse_model_names("hiertcn,bert4rec")
    with pytest.raises(compare.CompareError, match="twice"):
        compare.parse_model_names("sknn,sknn")
    # (an empty name was dropped, an empty label or a second colon accepted; fuzzing audit)
    for text, said in (("popularity,,sknn", "holds an empty name"),
                       ("popularity,", "holds an empty name"),
                       ("hiertcn:", "'hiertcn:': a variant is MODEL:LABEL"),
                       ("popularity:a:b", "'popularity:a:b': a variant is MODEL:LABEL")):
        with pytest.raises(compare.CompareError, match=said):
            compare.parse_model_names(text)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    """/proc takes no new folders: --output under it was a FileNotFoundError traceback."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(8),
                      valid=[(3, u[:4]) for u in planted_users(3, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(3, seed=2)])
    assert compare.main(["--data", data, "--models", "popularity",
                         "--output", "/proc/hiertcn-nope/x"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: cannot make --output /proc/hiertcn-nope/x: No such file or "
                   "directory: /proc/hiertcn-nope\n"), err


def test_compare_run_reports_a_paired_bootstrap_against_the_best_baseline(tmp_path, capsys):
    data = write_data(str(tmp_path / "data"), 20, planted_users(40),
                      valid=[(3, u[:4]) for u in planted_users(8, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(12, seed=2)])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "cmp"
    argv = ["--data", data, "--models", "hiertcn,sknn", "--output", str(out),
            "--budget-steps", "6", "--eval-every", "3", "--seeds", "2",
            "--config", f"hiertcn={config}"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr()
    # the progress goes to stderr; stdout is the table alone (`> table.md` holds it)
    assert printed.out == (out / "results.md").read_text() + "\n"
    said = printed.err.splitlines()
    # not a terminal: each valid evaluation of a training run, one line each
    evaluations = [line.split(" recall@20 ")[0] for line in said if ": valid recall@20 " in line]
    assert evaluations == [f"[1/2] hiertcn seed {seed}/2 training: step {step}: valid"
                           for seed in (1, 2) for step in (3, 6)], said
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    # each test evaluation wrote its users' sums, and they add up to its metrics
    for run in ("hiertcn/seed0", "hiertcn/seed1", "sknn"):
        sums = evaluate_lib.read_per_user(str(out / "runs" / run / "test_users.npz"))
        metrics = json.loads((out / "runs" / run / "test.json").read_text())
        assert len(sums["user_id"]) == 12 and list(sums["user_id"]) == sorted(sums["user_id"])
        assert sums["events"].sum() == metrics["events"]
        for key in ("recall@20", "mrr@20", "recall@5"):
            assert sums[key].sum() / sums["events"].sum() == pytest.approx(metrics[key])
    for key in ("recall@20", "mrr@20"):
        gain = results["relative_gain"][key]
        paired = gain["paired"]
        best = gain["best_baseline"]
        # the difference of the means over seeds, on the same 12 users
        assert paired["difference"] == pytest.approx(models["hiertcn"][key] - models[best][key])
        assert paired["users"] == 12 and paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
        assert 0.0 <= paired["p_value"] <= 1.0
    md = (out / "results.md").read_text()
    assert md.count("paired bootstrap over 12 users") == 2
    # (HierTCN without its head ranks the item each event is on, as V-SKNN does: no note)
    assert models["hiertcn"]["rules_out_current"] is False and "rules out the item" not in md
    # the same command again reuses every run: no command is run, the same results
    log = (out / "compare.log").read_text()
    assert log.count("$ ") == 5  # two seeds trained and evaluated, V-SKNN evaluated
    assert compare.main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "compare.log").read_text() == log
    # a test.json made by other code (before a change to model/) is evaluated again: its
    # checkpoint as it is, not trained again
    stale = out / "runs" / "hiertcn" / "seed0" / "test.json"
    stale.write_text(json.dumps(dict(json.loads(stale.read_text()), code="0" * 16)))
    capsys.readouterr()
    assert compare.main(argv) == 0
    assert "seed0/test.json was evaluated by other code" in capsys.readouterr().err
    new = (out / "compare.log").read_text()[len(log):]
    assert new.count("$ ") == 1 and "model.evaluate" in new and "seed0" in new, new
    assert json.loads(stale.read_text())["code"] == evaluate_lib.code_digest()
    assert json.loads((out / "results.json").read_text()) == results
    log = (out / "compare.log").read_text()
    # a rerun with another budget or another config does not reuse the runs trained before
    record = json.loads((out / "runs" / "hiertcn" / "seed0" / compare.RECORD).read_text())
    assert record["config"] == TINY and "--steps" in record["train"]
    assert compare.main([*argv[:-4], "--budget-steps", "7", *argv[-4:]]) == 2
    err = capsys.readouterr().err
    assert "seed0 was trained with other options: --steps 6 then, 7 now; use another --output" in err
    config.write_text(json.dumps(dict(TINY, model=dict(TINY["model"], channels=8))))
    assert compare.main(argv) == 2
    assert "with another --config content" in capsys.readouterr().err
    config.write_text(json.dumps(TINY))
    # the finished runs on valid: evaluated as they are, not trained further
    assert compare.main([*argv[:3], "hiertcn", *argv[4:], "--split", "valid"]) == 0
    new = (out / "compare.log").read_text()[len(log):]
    assert new.count("$ ") == 2 and "model.train" not in new and new.count("--split valid") == 2
    assert json.loads((out / "runs" / "hiertcn" / "seed0" / "valid.json").read_text())["split"] == "valid"
    # the table says its checkpoints were chosen on the split it reports; the test table not
    assert "checkpoints were chosen on this split" in (out / "results_valid.md").read_text()
    assert "checkpoints were chosen" not in (out / "results.md").read_text()
    capsys.readouterr()


def test_a_table_where_only_hiertcn_rules_out_the_current_item_says_so(tmp_path):
    """HierTCN's default head rules out the item each event is on (never next: the
    pipeline collapses immediate repeats) and the baselines as published rank it: on a
    Diginetica-like log that was a +47% MRR@20 lead over V-SKNN by default and +5% with
    --rule-out-current. The table says which models rule it out and names the option."""
    def run(name, **model):
        folder = tmp_path / name
        folder.mkdir()
        (folder / compare.RUN_CONFIG).write_text(json.dumps({"model_name": name.split("-")[0],
                                                             "model": model}))
        return compare._rules_out_current(str(folder))

    assert run("hiertcn-default", repeat_head=True, exclude_current=True, loss="softmax")
    assert run("hiertcn-auto", repeat_head=None, exclude_current=True, loss="softmax")
    assert not run("hiertcn-sampled-auto", repeat_head=None, exclude_current=True, loss="sampled")
    assert not run("hiertcn-plain", repeat_head=False, exclude_current=True)
    assert not run("hiertcn-old", repeat_head=True)  # (saved before the option: without it)
    assert not run("hrnn-x", repeat_head=True, exclude_current=True)
    agg = compare.aggregate([{"recall@20": 0.5, "mrr@20": 0.2, "events": 10}])
    results = {"models": {"hiertcn": dict(agg, rules_out_current=True), "sknn": agg,
                          "hiertcn:plain": dict(agg, rules_out_current=False)}}
    md = compare.markdown_table(results)
    assert ("\n`hiertcn` rules out the item each event is on (HierTCN's head: the pipeline "
            "collapses immediate repeats, so that item is never next); the other models rank "
            "it as published. `--rule-out-current` gives every model that rule: the "
            "like-for-like comparison (README § Repeat consumption).") in md
    # every model told the rule, or every model ruling it out by itself: nothing to say
    for other in (dict(results, rule_out_current=True), dict(results, rule_out_seen=True),
                  {"models": {"hiertcn": results["models"]["hiertcn"]}}):
        assert "rules out the item" not in compare.markdown_table(other)


def test_seeds_per_user_averages_the_seeds_and_refuses_other_users(tmp_path):
    def write(name, ids, events, hits):
        sums = {"events": np.array(events)}
        for key in compare.METRIC_KEYS:
            sums[key] = np.array(hits, dtype=float)
        path = str(tmp_path / name)
        evaluate_lib.write_per_user(path, ids, sums)
        return path

    a = write("a.npz", ["u2", "u1"], [3, 2], [1, 2])
    b = write("b.npz", ["u1", "u2"], [2, 3], [0, 3])
    avg = compare.seeds_per_user([a, b])
    assert list(avg["user_id"]) == ["u1", "u2"]  # sorted by id when written
    np.testing.assert_allclose(avg["recall@20"], [1.0, 2.0])
    assert compare.seeds_per_user([a, write("c.npz", ["u1", "u3"], [2, 3], [0, 3])]) is None
    assert compare.seeds_per_user([a, str(tmp_path / "missing.npz")]) is None


def test_significance_in_words():
    paired = {"difference": 0.0613, "ci95": [0.0494, 0.0734], "p_value": 0.0, "users": 187,
              "rounds": 2000}
    text = compare._significance({"paired": paired})
    assert "95% CI [+0.0494, +0.0734], p < 0.001 " in text and text.endswith(": significant")
    text = compare._significance({"paired": dict(paired, ci95=[-0.01, 0.02], p_value=0.31)})
    assert "p = 0.310" in text and text.endswith(": not significant")
    # one user (a log of one user), every resample the same: no test of one user can say
    text = compare._significance({"paired": dict(paired, ci95=[0.05, 0.05], p_value=1.0,
                                                 users=1)})
    assert text.endswith("p = 1.000 (the least a paired test over 1 user can give) by a "
                         "paired bootstrap over 1 user: not significant"), text


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_follows_the_running_command_in_place_on_a_terminal(monkeypatch):
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: os.terminal_size((61, 24)))
    out = _Terminal()
    status = compare.Status(out)
    status.start("[1/2] hiertcn seed 1/2 training")
    for line in ("training hiertcn (...)", " 34/400 [=>....] - ETA: 5:41 - loss: 5.8780",
                 "step 50: valid recall@20 0.2814 mrr@20 0.0717",
                 "evaluate hiertcn on test:  45%|####5     | 64/141 [00:10<00:12, 6.1user/s]"):
        status.on_line(line)
    status.done()
    # one line, rewritten: cut to the terminal's width, cleared at the end
    assert out.getvalue().split("\r")[1:] == [
        "[1/2] hiertcn seed 1/2 training 34/400\x1b[K",
        "[1/2] hiertcn seed 1/2 training 34/400, valid@50 R@20 0.2814\x1b[K",
        "[1/2] hiertcn seed 1/2 training 64/141, valid@50 R@20 0.2814\x1b[K",
        "\x1b[K"]


def test_children_start_without_forking_a_process_that_runs_grpc(tmp_path):
    """`model.compare`'s and the demo's children start without a `preexec_fn`: one makes
    subprocess fork this process, and with gRPC running in it (the demo's client) gRPC's
    fork handlers write a line to its stderr at every child ("Other threads are currently
    calling into gRPC, skipping fork() handlers") and can write "epoll_wait error: Bad file
    descriptor" into the child's output. The children still die with the parent (test_demo)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import concurrent.futures, sys, grpc\n"
            "from model import processes\n"
            "server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))\n"
            "port = server.add_insecure_port('127.0.0.1:0')\n"
            "server.start()\n"
            "channel = grpc.insecure_channel(f'127.0.0.1:{port}')\n"
            "grpc.channel_ready_future(channel).result(timeout=60)\n"
            "for _ in range(5):\n"
            "    assert processes.run_stoppable([sys.executable, '-c', 'print(1)'], sys.stdout) == 0\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 0 and proc.stdout == "1\n" * 5 and proc.stderr == "", proc.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the wrapper is Linux's")
def test_children_start_with_default_signals_and_a_missing_command_exits_127(tmp_path):
    """The wrapper that asks for the parent-death signal is Python, which ignores SIGPIPE
    and SIGXFSZ; an exec keeps ignored signals, so it restores them (`yes | head` would
    otherwise end with an error instead of quietly)."""
    done = subprocess.run(processes.dying_with_parent(
        ["sh", "-c", "grep SigIgn /proc/self/status"]), capture_output=True, text=True)
    ignored = int(done.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
    missing = subprocess.run(processes.dying_with_parent(["no-such-command-here"]),
                             capture_output=True, text=True)
    assert missing.returncode == 127
    assert missing.stderr == "error: cannot run no-such-command-here: No such file or directory\n"


def test_a_childs_output_reaches_the_log_whole_and_the_display_line_by_line(tmp_path):
    """Progress bars end their lines with a carriage return; a character cut between two
    reads reaches the log whole; a log that cannot be written (a full disk) is raised
    once the child has ended, and the child never blocks on its pipe meanwhile."""
    script = ("import sys, time\n"
              "out = sys.stdout.buffer\n"
              "out.write(b'step 1\\rstep 2\\r'); out.flush(); time.sleep(0.2)\n"
              "bar = '\\u2588'.encode(); out.write(bar[:1]); out.flush(); time.sleep(0.2)\n"
              "out.write(bar[1:] + b' done\\n' + b'x' * 300000 + b'\\nlast'); out.flush()\n")
    lines = []
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        assert processes.run_stoppable([sys.executable, "-c", script], log, lines.append) == 0
    assert (tmp_path / "log").read_bytes().decode("utf-8") == (
        "step 1\rstep 2\r\u2588 done\n" + "x" * 300000 + "\nlast")
    assert lines == ["step 1", "step 2", "\u2588 done", "x" * 300000]

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    raised = []

    def run_on_a_full_disk():
        try:
            processes.run_stoppable([sys.executable, "-c", script], FullDisk(), lines.append)
        except OSError as e:
            raised.append(e)

    runner = threading.Thread(target=run_on_a_full_disk, daemon=True)
    runner.start()
    runner.join(timeout=60)  # a relay that stopped reading would leave the child blocked
    assert not runner.is_alive() and len(raised) == 1 and raised[0].errno == errno.ENOSPC


def test_each_command_in_the_log_says_when_it_began_on_a_line_of_its_own(tmp_path):
    """compare.log said nothing of when each attempt ran, and after a kill -9 the next
    command's line was stuck to the cut progress line (scheduler audit)."""
    import re

    log = tmp_path / "compare.log"
    log.write_text("$ first\nstep 40/100, valid: not in the ETA yet")  # (killed mid-line)
    compare._run([sys.executable, "-c", "print('done')"], str(log))
    lines = log.read_text().splitlines()
    assert lines[:2] == ["$ first", "step 40/100, valid: not in the ETA yet"], lines
    assert re.fullmatch(r"# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", lines[2]), lines
    assert lines[3] == f"$ {sys.executable} -c print('done')" and lines[4:] == ["done"], lines
    fresh = tmp_path / "fresh.log"
    compare._run([sys.executable, "-c", "pass"], str(fresh))
    assert fresh.read_text().startswith("# ")


@pytest.mark.parametrize("code", [1, 2])
def test_a_failed_command_keeps_its_kind_of_exit_code(tmp_path, code):
    """A command that failed for want of room (exit 1) made compare exit 2, its code for a
    bad option; now 2 stays a usage or data error and anything else is 1."""
    log = str(tmp_path / "compare.log")
    cmd = [sys.executable, "-c",
           f"import sys; print('error: cannot write to run: File too large', file=sys.stderr); "
           f"sys.exit({code})"]
    with pytest.raises(compare.CompareError, match=r"failed with exit code \d \(error: cannot "
                                                   r"write to run: File too large\)") as e:
        compare._run(cmd, log)
    assert e.value.exit_code == code


def test_the_data_fingerprint_leaves_out_the_rejected_rows_kinds(tmp_path):
    """stats.json's malformed_reasons (new in a later version) describes the input's
    rejected rows, not the data written: a folder rebuilt with it keeps its fingerprint, so
    that compare reuses the runs trained on it; its counts still count."""
    stats = {"rows_read": 10, "rows_malformed": 2, "splits": {}, "options": {"input": ["a"]}}
    fingerprints = []
    for extra in ({}, {"malformed_reasons": {"empty user": 2}},
                  # (the tied-times counts of 2026-12-05 too, and the late events)
                  {"session_event_pairs": 7, "same_time_pairs": 3},
                  {"late_events": {"train_after_t_valid": 4},
                   # (and users written as N and N.0, of 2026-12-05 evening)
                   "float_user_pairs": {"count": 2, "examples": [["1", "1.0"], ["2", "2.0"]]}},
                  {"rows_malformed": 3}):
        folder = tmp_path / str(len(fingerprints))
        folder.mkdir()
        (folder / "stats.json").write_text(json.dumps(dict(stats, **extra)))
        fingerprints.append(compare.data_fingerprint(str(folder)))
    assert fingerprints[0] == fingerprints[1] == fingerprints[2] == fingerprints[3] \
        != fingerprints[4]
    # the keys the pipeline writes
    from pipeline import sessions
    from pipeline.__main__ import SAME_TIME_BY_SPLIT
    assert {sessions.PAIRS, sessions.SAME_TIME_PAIRS, sessions.ID_ORDER, sessions.INPUT_ORDER,
            SAME_TIME_BY_SPLIT} <= set(compare.NOT_DATA_STATS)
