"""Best-on-valid model selection in `python -m model.train`: the `best/` checkpoint, its
record, resume, and what `model.registry.load_model` / `model.evaluate` load."""
import json
import os
import re

import numpy as np
import pytest

from model import config as config_lib
from model import evaluate as evaluate_lib
from model import registry
from model import train as train_lib
from pipeline import schema
from tiny_logs import planted_users, write_data

TINY = {"model": {"embedding_dim": 16, "gru_units": 8, "channels": 16},
        "train": {"batch_size": 4, "sessions_per_batch": 3, "max_session_length": 4,
                  "learning_rate": 0.05, "lr_schedule": "constant", "checkpoint_every": 5,
                  "shuffle_buffer": 16, "eval_users": 0}}
STEP_LINE = re.compile(r"step (\d+): valid recall@20 ([0-9.]+) mrr@20 ([0-9.]+)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sel") / "data")
    return write_data(path, 20, planted_users(40),
                      valid=[(3, u[:4]) for u in planted_users(6, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(6, seed=2)])


# without the repeat head (as test_train's `config_file`: selection does not depend on it,
# and the head's graph takes half of a run's time to trace); the first test has it
PLAIN = {"model": {**TINY["model"], "repeat_head": False}, "train": TINY["train"]}


def _config_file(factory, name, config):
    path = str(factory.mktemp("selcfg") / name)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return _config_file(tmp_path_factory, "tiny.json", PLAIN)


@pytest.fixture(scope="module")
def head_config_file(tmp_path_factory):
    return _config_file(tmp_path_factory, "tiny-head.json", TINY)


def _train(data, run, config_file, *extra):
    return train_lib.main(["--data", data, "--model-dir", run, "--config", config_file,
                           "--no-progress", *extra])


def _weights(run, which):
    model, _, _ = registry.load_model(run, which)
    return [v.numpy() for v in model.variables]


def _valid_recall(run, data, which):
    scorer = registry.load_scorer(run, data, which)
    return evaluate_lib.evaluate(scorer, data, "valid", progress=False)


def test_is_better_orders_by_recall_then_mrr():
    best = {"recall@20": 0.5, "mrr@20": 0.2}
    assert train_lib.is_better({"recall@20": 0.1, "mrr@20": 0.0}, None)
    assert train_lib.is_better({"recall@20": 0.6, "mrr@20": 0.0}, best)
    assert train_lib.is_better({"recall@20": 0.5, "mrr@20": 0.3}, best)
    assert not train_lib.is_better({"recall@20": 0.5, "mrr@20": 0.2}, best)  # a tie keeps the earlier
    assert not train_lib.is_better({"recall@20": 0.4, "mrr@20": 0.9}, best)


def test_best_checkpoint_is_the_argmax_of_valid_and_is_loaded(data, head_config_file, tmp_path,
                                                              capsys):
    """The default model, with the repeat head."""
    config_file = head_config_file
    run = str(tmp_path / "run")
    # 30 steps, evaluated every 4 and at the end. Recall@20 is 1 throughout (20 items), so
    # the MRR@20 decides; here (x86 CPU) it peaks at step 16, dips, comes back to the same
    # value at 24 and ends lower: the record must be the first maximum, neither the latest
    # nor a later tie.
    assert _train(data, run, config_file, "--steps", "30", "--eval-every", "4") == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    evals = [(int(s), float(r), float(m)) for s, r, m in STEP_LINE.findall(out.err)]
    assert [e[0] for e in evals] == [4, 8, 12, 16, 20, 24, 28, 30]  # every interval and the end
    record = registry.read_best(run)
    assert record == summary["best"]
    # The printed values are rounded to 4 digits; the record is the first (recall, mrr)
    # maximum among them, and every evaluation after it is no better.
    best = (round(record["recall@20"], 4), round(record["mrr@20"], 4))
    assert all((e[1], e[2]) <= best for e in evals)
    assert record["step"] == next(e[0] for e in evals if (e[1], e[2]) == best)
    assert record["checkpoint"] == f"ckpt-{record['step']}"
    assert os.path.exists(os.path.join(run, "best", record["checkpoint"] + ".index"))
    # The loaded best weights reproduce the recorded valid metrics; latest = the final ones.
    loaded = _valid_recall(run, data, "best")
    assert loaded["recall@20"] == pytest.approx(record["recall@20"], abs=1e-9)
    assert loaded["mrr@20"] == pytest.approx(record["mrr@20"], abs=1e-9)
    latest = _valid_recall(run, data, "latest")
    assert latest["recall@20"] == pytest.approx(evals[-1][1], abs=1e-4)
    assert latest["mrr@20"] == pytest.approx(evals[-1][2], abs=1e-4)
    assert latest["recall@20"] == pytest.approx(summary["valid"]["recall@20"], abs=1e-9)


def test_selection_reads_the_valid_split_when_it_is_not_kept_in_memory(data, tmp_path):
    """A valid split over `train.cache_events` is not preloaded: each evaluation reads it
    from disk by name, and that must be the valid split's (the test split is touched
    once, by model.evaluate): the recorded metrics are the best weights' on valid."""
    config = str(tmp_path / "streamed.json")
    with open(config, "w") as f:
        json.dump({"model": PLAIN["model"], "train": dict(TINY["train"], cache_events=1)}, f)
    run = str(tmp_path / "run")
    assert _train(data, run, config, "--steps", "10", "--eval-every", "5") == 0
    record = registry.read_best(run)
    valid = _valid_recall(run, data, "best")
    test = evaluate_lib.evaluate(registry.load_scorer(run, data, "best"), data, "test",
                                 progress=False)
    assert record["recall@20"] == pytest.approx(valid["recall@20"], abs=1e-9)
    assert record["mrr@20"] == pytest.approx(valid["mrr@20"], abs=1e-9)
    assert abs(record["mrr@20"] - test["mrr@20"]) > 1e-3  # (the two splits tell apart here)


def test_resume_keeps_an_unbeaten_best_and_latest_is_an_option(data, config_file, tmp_path, capsys):
    run = str(tmp_path / "resume")
    assert _train(data, run, config_file, "--steps", "10", "--eval-every", "5") == 0
    record = registry.read_best(run)
    # A best that no evaluation can beat (recall > 1) must survive the resumed process.
    unbeatable = {**record, "recall@20": 2.0}
    with open(os.path.join(run, "best", "best.json"), "w") as f:
        json.dump(unbeatable, f)
    before = _weights(run, "best")
    assert _train(data, run, config_file, "--steps", "20", "--eval-every", "5") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["best"] == unbeatable
    for a, b in zip(before, _weights(run, "best")):
        np.testing.assert_array_equal(a, b)
    latest = _weights(run, "latest")
    assert any(not np.array_equal(a, b) for a, b in zip(before, latest))
    # model.evaluate's --checkpoint chooses between them.
    outs = {}
    for which in ("best", "latest"):
        path = str(tmp_path / f"{which}.json")
        assert evaluate_lib.main(["--data", data, "--split", "valid", "--model-dir", run,
                                  "--checkpoint", which, "--output", path, "--no-progress"]) == 0
        with open(path) as f:
            outs[which] = json.load(f)
    capsys.readouterr()
    assert outs["latest"]["recall@20"] == pytest.approx(summary["valid"]["recall@20"], abs=1e-9)
    assert outs["best"]["recall@20"] == pytest.approx(record["recall@20"], abs=1e-9)
    # the metrics say which model they are of (scheduler audit: nothing tied them to a
    # checkpoint, or said that its training had not finished)
    assert outs["best"]["run"] == {
        "model_dir": os.path.abspath(run), "step": record["step"], "training_finished": True,
        "checkpoint": os.path.abspath(registry.checkpoint_path(run, "best"))}
    assert (outs["latest"]["run"]["step"], outs["latest"]["run"]["checkpoint"]) == (
        20, os.path.abspath(os.path.join(run, "checkpoints", "ckpt-20")))
    os.remove(os.path.join(run, registry.SUMMARY_FILE))  # (killed, or still training)
    assert evaluate_lib.main(["--data", data, "--split", "valid", "--model-dir", run,
                              "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["training_finished"] is False


def test_without_valid_evaluation_the_latest_is_loaded(data, config_file, tmp_path):
    run = str(tmp_path / "noeval")
    assert _train(data, run, config_file, "--steps", "5", "--eval-every", "0") == 0
    assert registry.read_best(run) is None and not os.path.exists(os.path.join(run, "best"))
    assert registry.checkpoint_path(run) == registry.checkpoint_path(run, "latest")
    assert registry.checkpoint_path(run).endswith("ckpt-5")
    with pytest.raises(registry.RunError, match="unknown checkpoint 'newest'"):
        registry.load_model(run, "newest")


def test_hiertcn_variants_are_not_baselines_in_the_relative_gain():
    from model import compare

    models = {"hiertcn": {"recall@20": 0.30, "mrr@20": 0.10},
              "hiertcn:solo": {"recall@20": 0.40, "mrr@20": 0.20},
              "sknn": {"recall@20": 0.25, "mrr@20": 0.05}}
    gains = compare.relative_gain({"models": models})
    assert gains["recall@20"]["best_baseline"] == "sknn"
    assert gains["recall@20"]["relative_gain"] == pytest.approx(0.2)
    assert gains["mrr@20"]["relative_gain"] == pytest.approx(1.0)


def test_selection_on_valid_is_the_default(data, config_file, tmp_path, capsys):
    """Without --eval-every, training evaluates on valid every 100 steps and at the end, and
    keeps the best: on a small log the last weights can be far behind the best ones."""
    run = str(tmp_path / "default")
    assert _train(data, run, config_file, "--steps", "7") == 0
    out = capsys.readouterr()
    assert [int(s) for s, _, _ in STEP_LINE.findall(out.err)] == [7]  # the end of the run
    # 240 train sessions of 5 items, 4 per slot: 300 to 540 slots (midpoint 420), 84 per 7 steps
    assert ("steps 1-7 (about 0.2 epochs of the train split; --epochs 1 for one pass), "
            "batches of 4 x 3 x 4") in out.err
    record = registry.read_best(run)
    assert record["step"] == 7 and record["events"] > record["unknown_targets"]
    # where the longest session fits one slot (the pipeline's stats say 5, L = 5), a pass
    # is the sessions exactly (the midpoint said 0.67 epochs for a whole one)
    with open(os.path.join(data, "stats.json")) as f:
        stats = json.load(f)
    exact = tmp_path / "exact"
    exact.mkdir()
    (exact / "stats.json").write_text(json.dumps(dict(stats, max_session_events={"train": 5})))
    one_slot = config_lib.TrainConfig(batch_size=4, sessions_per_batch=3, max_session_length=5,
                                      steps=20)
    assert train_lib._passes_text(str(exact), one_slot, 20) == " (about 1 epoch of the train split)"
    # a pass over every user lasts at least as long as the heaviest user's row: 600 events
    # in sessions of at most 5 are 120 slots or more, 3 a step; the epochs are still the
    # events trained on, as the run's summary counts them (extremes audit: a pass of 242
    # steps was "about 0.24 epochs" after 2; a later audit: one user's 100 steps were
    # "about 6.3 epochs" where the summary counted 201)
    (exact / "stats.json").write_text(json.dumps(dict(
        stats, max_session_events={"train": 5}, max_user_events={"train": 600})))
    assert train_lib._passes_text(str(exact), one_slot, 20) == (
        " (about 1 epoch of the train split; a pass over every user takes about 40 steps, the "
        "heaviest user's 600 events filling one row; --epochs 1 for one pass)")
    assert train_lib._passes_text(str(exact), one_slot, 80) == (
        " (about 4 epochs of the train split; a pass over every user takes about 40 steps, the "
        "heaviest user's 600 events filling one row)")
    # a resumed run's steps 41-80: the epochs they add, not the whole run's
    assert train_lib._passes_text(str(exact), one_slot, 80, 40).startswith(
        " (about 2 more epochs of the train split; ")
    assert json.loads(out.out.strip().splitlines()[-1])["best"] == record
    with open(os.path.join(run, "config.json")) as f:
        train = json.load(f)["train"]
    assert (train["eval_every"], train["patience"], train["eval_events"]) == (100, 5, None)
    assert "valid evaluations:" not in out.err  # every valid user: nothing to say


def test_the_default_valid_event_budget_shrinks_with_the_catalogue():
    """An evaluation ranks each event against every item: 50,000 events up to 25,000
    items, then 1.25 billion (event, item) pairs, never fewer than 1,000 events."""
    from model.config import eval_event_budget

    assert [eval_event_budget(None, n) for n in (20, 25_000, 25_001, 100_000, 128_428,
                                                 1_250_000, 5_000_000)] == [
        50_000, 50_000, 49_998, 12_500, 9_733, 1_000, 1_000]
    assert eval_event_budget(0, 100_000) == 0 and eval_event_budget(7, 5_000_000) == 7


def test_eval_events_bounds_the_valid_users(data, config_file, tmp_path, capsys):
    """--eval-events: users in hash order up to that many valid events, the same users at
    every evaluation, and the run says so (a log of heavy users would otherwise spend
    most of its time ranking valid events)."""
    sample = evaluate_lib.sample_users(data, "valid", 0, 12)
    assert (sample.users, sample.all_users, sample.all_events) == (2, 6, 30)  # 5 events each
    run = str(tmp_path / "capped")
    assert _train(data, run, config_file, "--steps", "4", "--eval-every", "2",
                  "--eval-events", "12") == 0
    out = capsys.readouterr()
    assert "valid evaluations: 2 of 6 users, 10 of 30 target events (--eval-events 12;" in out.err
    record = registry.read_best(run)
    scorer = registry.load_scorer(run, data, "best")
    expected = evaluate_lib.evaluate(scorer, data, "valid", user_ids=sample.ids, progress=False)
    assert record["events"] == expected["events"] == 8  # positions >= 2 of 2 users
    assert record["recall@20"] == pytest.approx(expected["recall@20"])
    assert record["mrr@20"] == pytest.approx(expected["mrr@20"])
    # the user limit binding says so too, naming it (a log of one-session users holds few
    # events per user: 1,000 of them held 5,022 of a session log's 124,332 valid events)
    assert _train(data, str(tmp_path / "users"), config_file, "--steps", "2", "--eval-every",
                  "2", "--eval-users", "3") == 0
    assert ("valid evaluations: 3 of 6 users, 15 of 30 target events (--eval-users 3;"
            in capsys.readouterr().err)


def test_a_crawler_over_the_event_budget_is_left_out_of_the_valid_evaluations(
        tmp_path, config_file, capsys):
    """A valid user with more events than --eval-events alone is passed over (it made
    every evaluation its own, or stopped the sample where it stood), and the run says so."""
    valid = [(3, u[:4]) for u in planted_users(6, seed=1)]  # 5 target events each
    valid.append((0, [[2 + j % 19 for j in range(300)]]))  # the crawler: 300
    data = write_data(str(tmp_path / "d"), 20, planted_users(40), valid=valid)
    assert _train(data, str(tmp_path / "run"), config_file, "--steps", "2", "--eval-every",
                  "2", "--eval-events", "100") == 0
    assert ("valid evaluations: 6 of 7 users, 30 of 330 target events (--eval-events 100; 1 user "
            "holding over 100 valid events alone left out: a crawler?;"
            ) in capsys.readouterr().err
    # a budget below every user's events: the smallest user, and the run says so
    assert _train(data, str(tmp_path / "tiny"), config_file, "--steps", "2", "--eval-every",
                  "2", "--eval-events", "2") == 0
    assert ("valid evaluations: 1 of 7 users, 5 of 330 target events (--eval-events 2; every valid "
            "user holds over 2 events: the one with the fewest is evaluated;"
            ) in capsys.readouterr().err


def test_training_stops_once_valid_has_not_improved_for_patience_evaluations(
        data, config_file, tmp_path, capsys):
    """--patience 1 with an evaluation every 2 steps: the run stops at the first evaluation
    that does not beat the best (a tie does not: the valid MRR@20 reaches 1 within 30
    steps here), and keeps the best. The same command then has nothing to do; --patience
    0 trains on."""
    run = str(tmp_path / "patience")
    args = ("--steps", "30", "--eval-every", "2", "--patience", "1")
    assert _train(data, run, config_file, *args) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    best = summary["best"]["step"]
    evals = [(int(s), float(r), float(m)) for s, r, m in STEP_LINE.findall(out.err)]
    assert summary["stopped_by"] == "no_improvement" and summary["steps"] == best + 2 < 30
    assert [e[0] for e in evals] == list(range(2, best + 3, 2))
    # every evaluation up to the best improved on the one before (as printed, to 4 digits:
    # or kept its value); the last one did not
    assert all((a[1], a[2]) <= (b[1], b[2]) for a, b in zip(evals[:-1], evals[1:-1]))
    assert (evals[-1][1], evals[-1][2]) <= (evals[-2][1], evals[-2][2])
    assert (f"stopping at step {best + 2}: valid has not improved (recall@20, then mrr@20) "
            f"for 1 evaluation 2 steps apart since its best, at step {best} (recall@20 ") in out.err
    assert registry.read_best(run)["step"] == best
    assert _train(data, run, config_file, *args) == 0
    err = capsys.readouterr().err
    assert f"already holds {best + 2} steps, valid has not improved" in err
    assert "nothing to do" in err
    assert _train(data, run, config_file, "--steps", "30", "--eval-every", "2",
                  "--patience", "0") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 30


def test_no_selection_on_a_valid_split_without_known_targets(config_file, tmp_path, capsys):
    """Valid targets that are all unknown carry no information: every evaluation ties, and
    the first one must not be kept as the best; the last weights are used."""
    unknown = [[[1, 1, 1, 1]] * 2] * 3  # sessions of unknown items only (index 1)
    data = write_data(str(tmp_path / "data"), 20, planted_users(20), valid=[(1, u) for u in unknown])
    run = str(tmp_path / "run")
    assert _train(data, run, config_file, "--steps", "10", "--eval-every", "5") == 0
    out = capsys.readouterr()
    assert [int(s) for s, _, _ in STEP_LINE.findall(out.err)] == [5, 10]
    assert "no known valid targets" in out.err
    assert registry.read_best(run) is None and not os.path.exists(os.path.join(run, "best"))
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["best"] is None and summary["valid"]["events"] > 0
    assert summary["valid"]["events"] == summary["valid"]["unknown_targets"]
    assert registry.checkpoint_path(run).endswith("ckpt-10")


def test_a_valid_split_of_one_item_sessions_is_said_as_such(config_file, tmp_path, capsys):
    """One-item valid sessions (a purchases log through --min-session-length 1) have no
    position to score: said so, not blamed on unknown targets (there are none)."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(20),
                      valid=[(1, [[3, 4, 5], [6]]), (1, [[2, 3], [7]])])
    run = str(tmp_path / "run")
    assert _train(data, run, config_file, "--steps", "5", "--eval-every", "5") == 0
    out = capsys.readouterr()
    assert f"no valid position to score in {data} (every valid session holds one item" in out.err
    assert "no known valid targets" not in out.err
    assert registry.read_best(run) is None
    assert json.loads(out.out.strip().splitlines()[-1])["valid"]["events"] == 0
    assert "valid recall@20" not in out.err  # (no figures of nothing scored)


def test_a_pipeline_output_without_a_valid_split_is_said_as_such(config_file, tmp_path, capsys):
    """--valid-fraction 0: no users to select on, said once (it was blamed on one-item
    sessions), and no `valid recall@20 0.0000` line at each evaluation (audit)."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(20))
    assert schema.read_stats(data)["splits"]["valid"]["users"] == 0
    run = str(tmp_path / "run")
    assert _train(data, run, config_file, "--steps", "6", "--eval-every", "3") == 0
    out = capsys.readouterr()
    assert out.err.count(f"the valid split of {data} has no users (the pipeline's "
                         "--valid-fraction 0?): no model selection, the last weights are "
                         "used") == 1, out.err
    assert "valid recall@20" not in out.err and "no valid position" not in out.err
    assert registry.read_best(run) is None
    steps, _ = train_lib.read_scalars(run, "valid/recall@20")
    assert len(steps) == 0  # (nor a curve of zeros)


def test_a_vocabulary_of_the_same_size_names_the_first_entry_that_differs():
    """Two vocabularies of 42 entries read "(42 entries) does not match ... (42)" (extremes
    audit): the entry where they part is named."""
    import numpy as np

    from pipeline import schema

    def vocab(ids):
        return schema.Vocabulary(ids=("[PAD]", "[UNK]", *ids),
                                 counts=np.zeros(len(ids) + 2, np.int64))

    with pytest.raises(registry.RunError, match=r"does not match the one run was trained on: "
                       r"as many entries \(5\), but entry 3 is 'c' there and 'x' in the run"):
        registry.check_vocabulary(vocab(["a", "x", "b"]), vocab(["a", "c", "b"]), "run", "data")
    with pytest.raises(registry.RunError, match=r"\(4 entries\) does not match .* \(5\)"):
        registry.check_vocabulary(vocab(["a", "x", "b"]), vocab(["a", "c"]), "run", "data")
    registry.check_vocabulary(vocab(["a"]), vocab(["a"]), "run", "data")


def test_a_checkpoint_training_removed_meanwhile_is_chosen_again_or_said(data, config_file,
                                                                          tmp_path, monkeypatch):
    """evaluate and export --checkpoint latest beside a training run that keeps its newest
    checkpoints: the one chosen was removed before it was read, a NotFoundError traceback
    (concurrency audit). The newest is chosen again; gone at every try, it is one line."""
    run = str(tmp_path / "run")
    assert _train(data, run, config_file, "--steps", "5", "--eval-every", "0") == 0
    real = registry.checkpoint_path
    latest = real(run, "latest")
    gone = latest.replace("ckpt-5", "ckpt-4")  # (kept 3: removed by the next save, as here)
    for suffix in (".index", ".data-00000-of-00001"):
        if os.path.exists(gone + suffix):
            os.remove(gone + suffix)
    chosen = iter([gone])
    monkeypatch.setattr(registry, "checkpoint_path",
                        lambda run_dir, which="best": next(chosen, None) or real(run_dir, which))
    model, _, _ = registry.load_model(run, "latest")
    assert model.restored_checkpoint == latest
    # another one chosen at each try, each gone when read (a run saving faster than the
    # reads): one line after LOAD_TRIES tries
    others = iter(latest.replace("ckpt-5", f"ckpt-{step}") for step in (101, 102, 103))
    monkeypatch.setattr(registry, "checkpoint_path", lambda run_dir, which="best": next(others))
    with pytest.raises(registry.CheckpointGone, match=r"ckpt-103 was removed while it was read "
                       r"\(a training run still writing .* keeps only its newest checkpoints\)"):
        registry.load_model(run, "latest")
    # the same one at every try: the folder names it but its files are missing (a training
    # run names its new checkpoint before it removes the old), not a run removing it
    monkeypatch.setattr(registry, "checkpoint_path", lambda run_dir, which="best": gone)
    with pytest.raises(registry.RunError, match=r"ckpt-4, the checkpoint .* names, has no files"):
        registry.load_model(run, "latest")
