"""`python -m model.train` on tiny logs written with the schema module: learning, resume,
errors, the config contract."""
import errno
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf

from model import cli
from model import config as config_lib
from model import registry
from model import train as train_lib
from tiny_logs import planted_users, write_data

TINY = {"model": {"embedding_dim": 16, "gru_units": 8, "channels": 16},
        "train": {"batch_size": 4, "sessions_per_batch": 3, "max_session_length": 4,
                  "learning_rate": 0.01, "checkpoint_every": 10, "shuffle_buffer": 16}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "data")
    users = planted_users(40)
    return write_data(path, 20, users, valid=[(3, u[:4]) for u in planted_users(6, seed=1)],
                      test=[(3, u[:4]) for u in planted_users(6, seed=2)])


# TINY without the repeat head: the model most tests train, whose subject (resume, signals,
# errors, the bar, the records) does not depend on the head, and whose first step traces in
# about half the time (the head's mixture and its gradient are most of the traced graph:
# 1.8 s against 3.8 s, of a run's 3.0 s against 6.9 s); the tests of the default model, with
# the head, take `head_config_file`.
PLAIN = {"model": {**TINY["model"], "repeat_head": False}, "train": TINY["train"]}


def _config(path, config):
    with open(path, "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture()
def config_file(tmp_path):
    return _config(str(tmp_path / "tiny.json"), PLAIN)


@pytest.fixture()
def head_config_file(tmp_path):
    return _config(str(tmp_path / "tiny-head.json"), TINY)


def _args(data, run, config_file, *extra):
    return ["--data", data, "--model-dir", run, "--config", config_file, "--no-progress", *extra]


def _weights(run):
    model, _, _ = registry.load_model(run)
    return [v.numpy() for v in model.variables]


def test_the_bar_says_when_its_time_left_lacks_the_valid_evaluations(data, config_file, tmp_path,
                                                                     capsys, monkeypatch):
    """Keras's ETA is the time per step so far: until a valid evaluation has run in this
    process it leaves them out (half a run's time on a large catalogue), and says so."""
    monkeypatch.setattr(train_lib, "LOG_FILE_SECONDS", 0.0)  # a line per step
    run = str(tmp_path / "run")
    args = [a for a in _args(data, run, config_file, "--steps", "12", "--eval-every", "6")
            if a != "--no-progress"]
    assert train_lib.main(args) == 0
    bar = {int(line.split("/")[0]): line for line in capsys.readouterr().err.splitlines()
           if re.match(r" ?\d+/12 \[", line)}
    assert all("valid: not in the ETA yet" in bar[step] for step in range(2, 7)), bar
    assert not any("valid:" in bar[step] for step in range(7, 13)), bar
    # a rerun that owes an evaluation first (a full disk stopped the one at step 6): that
    # one runs before the bar starts, so the label stays until one runs among the steps
    real = train_lib._log_valid

    def full_disk_at_6(model, data_dir, user_ids, step, *rest, **named):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, data_dir, user_ids, step, *rest, **named)

    run = str(tmp_path / "owed")
    args = [a for a in _args(data, run, config_file, "--steps", "12", "--eval-every", "6",
                             "--checkpoint-every", "6") if a != "--no-progress"]
    monkeypatch.setattr(train_lib, "_log_valid", full_disk_at_6)
    assert train_lib.main(args) == 1
    capsys.readouterr()
    monkeypatch.setattr(train_lib, "_log_valid", real)
    assert train_lib.main(args) == 0
    bar = {int(line.split("/")[0]): line for line in capsys.readouterr().err.splitlines()
           if re.match(r" ?\d/6 \[", line)}
    assert all("valid: not in the ETA yet" in bar[step] for step in range(2, 6)), bar


def test_a_long_valid_evaluation_shows_its_progress_then_its_line(data, config_file, tmp_path,
                                                                   capsys, monkeypatch):
    """A valid evaluation inside training (34-59 s each on a 164k-item log) showed nothing
    until its result: now its progress (here a line per batch: a log file's line every 0 s
    instead of 30), each line whole, then the result's line after the last of them,
    without a line of its own for the end."""
    from model import evaluate

    monkeypatch.setattr(train_lib, "LOG_FILE_SECONDS", 0.0)
    monkeypatch.setattr(evaluate, "LOG_FILE_SECONDS", 0.0)
    run = str(tmp_path / "run")
    args = [a for a in _args(data, run, config_file, "--steps", "6", "--eval-every", "6")
            if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    at = next(i for i, line in enumerate(err) if line.startswith("step 6: valid recall@20"))
    before = err[:at]
    progress = [line for line in before if line.startswith("evaluate hiertcn on valid: ")]
    assert progress and progress[-1] == before[-1], before
    assert re.match(r"evaluate hiertcn on valid: 6 users of 6, \d+ of \d+ target events "
                    r"\(100%\)", progress[-1]), progress
    assert all(re.match(r"evaluate hiertcn on valid: \d users of 6", line) for line in progress)
    # a quick evaluation with the log file's default 30 s: nothing but the result's line
    monkeypatch.setattr(evaluate, "LOG_FILE_SECONDS", 30.0)
    run = str(tmp_path / "run2")
    args = [a for a in _args(data, run, config_file, "--steps", "6", "--eval-every", "6")
            if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    assert "evaluate hiertcn" not in err and "\nstep 6: valid recall@20" in err


def test_the_bar_and_the_first_line_say_the_time_cap(data, config_file, tmp_path, capsys,
                                                    monkeypatch):
    """--max-minutes: the bar's ETA is the time to the last step, which the cap may cut (an
    audit's bar said "ETA: 24:38" in a run capped at 12 minutes): the first line says the
    cap, and the bar the training time left under it."""
    monkeypatch.setattr(train_lib, "LOG_FILE_SECONDS", 0.0)  # a line per step
    args = [a for a in _args(data, str(tmp_path / "run"), config_file, "--steps", "5",
                             "--eval-every", "0", "--max-minutes", "30") if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert re.search(r": steps 1-5( \([^)]*\))? or --max-minutes 30 of training, whichever "
                     "comes first, batches of ", first), first
    bar = [line for line in err.splitlines() if re.match(r" ?\d/5 \[", line)]
    assert len(bar) == 4, err  # (from the second step on)
    left = [re.search(r"--max-minutes: (\d+):(\d\d) left", line) for line in bar]
    assert all(left), bar
    assert all(29 * 60 <= int(m[1]) * 60 + int(m[2]) <= 30 * 60 for m in left), bar
    assert train_lib._time_left_text(3723.4) == "1:02:03 left"
    assert train_lib._time_left_text(-5) == "0:00 left"
    # without the cap, neither
    args = [a for a in _args(data, str(tmp_path / "plain"), config_file, "--steps", "3",
                             "--eval-every", "0") if a != "--no-progress"]
    assert train_lib.main(args) == 0
    assert "max-minutes" not in capsys.readouterr().err


def test_a_cap_that_ends_the_run_early_is_said_with_the_step_and_epochs_it_reaches(
        data, config_file, tmp_path, capsys, monkeypatch):
    """--max-minutes far short of --steps: a note once the rate is known says near which
    step the cap ends the run and how many epochs that is (an audit's first line said "about
    6.9 epochs" of a run that trained 0.52, with nothing after it saying so)."""
    monkeypatch.setattr(train_lib, "CAP_NOTE_SECONDS", 0.5)
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file, "--steps", "100000",
                                "--eval-every", "0", "--max-minutes", "0.2")) == 0
    err = capsys.readouterr().err
    notes = re.findall(r"^note: at ([\d.e-]+) s a step, --max-minutes 0.2 ends the run near "
                       r"step ([\d,]+) of 100,000 \(about ([\d.,]+) epochs? of the train "
                       r"split\)$", err, re.M)
    assert len(notes) == 1, err
    stop = re.search(r"^stopping at step (\d+): --max-minutes 0.2 reached \(\d+ s of "
                     r"training, about ([\d.,]+) epochs? of the train split\)", err, re.M)
    assert stop, err
    # the projection is of the same order as where the cap did end the run
    reach, stopped = int(notes[0][1].replace(",", "")), int(stop[1])
    assert stopped / 3 <= reach <= stopped * 3, (reach, stopped)
    # a full softmax over a large catalogue names --loss sampled; a sampled one, or a cap
    # that the steps end before, says nothing
    tc = config_lib.TrainConfig(max_minutes=12)
    note = train_lib._cap_note(tc, 116, 2000, 133.0, 4.7, 556_000, 4794.0,
                               data, 41_285)
    assert note.startswith("note: at 4.7 s a step, --max-minutes 12 ends the run near step 144 "
                           "of 2,000 (about ") and "--loss sampled trains faster" in note
    assert "--loss sampled" not in train_lib._cap_note(tc, 116, 2000, 133.0, 4.7, 556_000,
                                                       4794.0, data, None)
    assert train_lib._cap_note(tc, 116, 200, 600.0, 4.7, 556_000, 4794.0, data, 41_285) is None


def test_evaluations_that_take_most_of_the_run_are_said_once_with_an_eval_every(
        data, config_file, tmp_path, capsys, monkeypatch):
    """A large catalogue under the sampled loss: each valid evaluation ranks against every
    item, the steps do not (an audit's 164k items: 58 s an evaluation against 24 s for the
    100 steps between two, 70% of the wall time, and --max-minutes 10 ran 28 minutes). The
    note comes once, after an evaluation that followed a whole interval of steps."""
    tc = config_lib.TrainConfig(eval_every=100)
    assert train_lib._eval_note(tc, 58.0, 0.24, 7_575, 165_302) == (
        "note: a valid evaluation took 58 s (7,575 events ranked against 165,302 items) "
        "against 24 s for the 100 steps between two: evaluations are 71% of this run's time; "
        "--eval-every 1,000 would make them about 20%, and a smaller --eval-events less "
        "(fewer events: a noisier choice of the best step)")
    capped = config_lib.TrainConfig(eval_every=100, max_minutes=10)
    assert ", and --max-minutes does not count them;" in train_lib._eval_note(
        capped, 58.0, 0.24, 7_575, 165_302)
    assert train_lib._eval_note(tc, 58.0, 0.24, 7_575, 165_302, 2_000).endswith(
        "--eval-every 1,000 would make them about 20%, and a smaller --eval-events less "
        "(fewer events: a noisier choice of the best step)")
    assert train_lib._eval_note(tc, 34.0, 0.13, 6_495, 164_192, 2_000).endswith(
        "--eval-every 2,000 would make them about 20% (a run of 2,000 steps then evaluates "
        "at its end alone: more --steps or --epochs go with it), and a smaller --eval-events "
        "less (fewer events: a noisier choice of the best step)")
    assert train_lib._eval_note(tc, 9.0, 0.01, 7_575, 165_302) is None  # quick: no note
    assert train_lib._eval_note(tc, 20.0, 0.5, 7_575, 165_302) is None  # 29% of the time
    # the run's own figures: the tiny run's evaluations count as slow here
    monkeypatch.setattr(train_lib, "EVAL_NOTE_SECONDS", 0.0)
    monkeypatch.setattr(train_lib, "EVAL_NOTE_SHARE", 0.0)
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file, "--steps", "8",
                                "--eval-every", "2")) == 0
    notes = re.findall(r"^note: a valid evaluation took \d+ s \(([\d,]+) events ranked "
                       r"against 20 items\) against \d+ s for the 2 steps between two: "
                       r"evaluations are \d+% of this run's time; --eval-every ([125]0*) would ",
                       capsys.readouterr().err, re.M)
    assert len(notes) == 1 and int(notes[0][0]) > 0 and int(notes[0][1]) > 2, notes


def test_loss_decreases_and_run_folder_is_complete(data, config_file, tmp_path, capsys):
    run = str(tmp_path / "run")
    args = [a for a in _args(data, run, config_file, "--steps", "60", "--eval-every", "60")
            if a != "--no-progress"]
    assert train_lib.main(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    # the progress bar (a line, stderr not being a terminal) ends with the speed in events
    bar = [line for line in err.splitlines() if line.startswith("60/60 [")]
    assert len(bar) == 1 and re.search(r" - loss: \d+\.\d{4} - events/s: [\d,]+$",
                                       bar[0].rstrip()), err
    assert summary["steps"] == 60 and summary["events"] > 0 and summary["parameters"] > 0
    assert summary["final_loss"] < np.log(20) - 0.5  # well below uniform over 20 items
    assert 0.0 <= summary["valid"]["recall@20"] <= 1.0
    # the TensorBoard logs hold the loss every 10 steps and the valid evaluation
    steps, losses = train_lib.read_scalars(run, "loss")
    assert steps.tolist() == list(range(10, 61, 10))
    assert losses[-1] == pytest.approx(summary["final_loss"], rel=1e-6) and losses[-1] < losses[0]
    steps, recall = train_lib.read_scalars(run, "valid/recall@20")
    assert steps.tolist() == [60] and recall[0] == pytest.approx(summary["valid"]["recall@20"])
    for name in ("config.json", "items.tsv", "train_summary.json", "checkpoints", "logs"):
        assert os.path.exists(os.path.join(run, name))
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"]["embedding_dim"] == 16 and saved["train"]["steps"] == 60
    assert saved["model"]["loss"] == "softmax"  # what `auto` means for 20 items, recorded
    scorer = registry.load_scorer(run, data)
    state = scorer.update(scorer.initial_state(["u"]), np.array([[2, 3, 4]]))
    assert scorer.score(state, np.array([[2, 3, 4]])).shape == (1, 3, 22)


def test_progress_starts_after_the_traced_first_step(data, config_file, tmp_path, capsys,
                                                    monkeypatch):
    """stderr not a terminal: the first line is the second step's, whose time left comes
    from the steps after the first (the first, traced, takes 100 times a step: a line "1/2000
    ... ETA: 5:33:07" opened a log of a 3-minute run); a run of one step still ends with it."""
    args = [a for a in _args(data, str(tmp_path / "run"), config_file, "--steps", "4",
                             "--eval-every", "0") if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    bars = [line.strip() for line in err.splitlines() if re.match(r"\s*\d+/4 \[", line)]
    assert bars[0].startswith("2/4 [") and bars[-1].startswith("4/4 ["), err
    # two steps left of a tiny model: seconds (Keras writes "ETA: 5s", or "1:05" from a
    # minute on, which a starved machine could reach; the traced first step made hours)
    eta = re.search(r"ETA: (?:(\d+)s|(\d+):(\d\d)\b)", bars[0])
    assert eta and (int(eta[1]) if eta[1] else 60 * int(eta[2]) + int(eta[3])) <= 120, bars[0]
    args = [a for a in _args(data, str(tmp_path / "one"), config_file, "--steps", "1",
                             "--eval-every", "0") if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    assert [line.strip()[:6] for line in err.splitlines() if re.match(r"\s*\d+/1 \[", line)] \
        == ["1/1 [="], err
    # a terminal's (or a notebook's) bar, redrawn in place, waits for the second step too:
    # a resumed run showed "1/80 ... ETA: 8:15 ... events/s: 0" for a step
    monkeypatch.setattr(train_lib.argtypes, "in_notebook", lambda: True)
    args = [a for a in _args(data, str(tmp_path / "tty"), config_file, "--steps", "4",
                             "--eval-every", "0") if a != "--no-progress"]
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    assert "\r" in err or "\b" in err, err  # (redrawn: the terminal's display)
    drawn = [part.strip() for part in re.split(r"[\r\b\n]+", err)
             if re.match(r"\s*\d+/4 \[", part)]
    assert drawn and drawn[0].startswith("2/4 [") and drawn[-1].startswith("4/4 ["), drawn


def test_more_negatives_than_items_are_said_in_the_start_line(data, config_file, tmp_path,
                                                              capsys):
    """The sampler draws at most the other items with a train count: --num-negatives above
    that was cut back with only the drawn number in the start line (audit); it is now the
    exact softmax over every item, and says so."""
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file, "--steps", "1",
                                "--eval-every", "0", "--loss", "sampled",
                                "--num-negatives", "5000")) == 0
    start = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("training ")]
    assert re.search(r"sampled softmax: --num-negatives 5,000 is every item, so the exact "
                     r"softmax over 20 items", start[0]), start


def test_read_scalars_keeps_the_latest_value_of_a_step_logged_twice(tmp_path):
    # A process that died after logging steps it had not checkpointed: the resumed
    # process logs them again (another event file), and its values are the ones read.
    logs = str(tmp_path / "run" / "logs")
    for i, values in enumerate(({10: 3.0, 20: 2.5}, {20: 2.0, 30: 1.5})):
        writer = tf.summary.create_file_writer(logs, filename_suffix=f".process{i}")
        with writer.as_default():
            for step, value in values.items():
                train_lib._scalar("loss", value, step=step)
        writer.close()
        time.sleep(0.01)
    steps, losses = train_lib.read_scalars(str(tmp_path / "run"), "loss")
    assert steps.tolist() == [10, 20, 30] and losses.tolist() == [3.0, 2.0, 1.5]
    assert train_lib.read_scalars(str(tmp_path / "run"), "valid/mrr@20")[0].size == 0
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        train_lib.read_scalars(str(tmp_path / "elsewhere"), "loss")


def _gru4rec_file(tmp_path):
    path = tmp_path / "gru4rec.json"
    path.write_text(json.dumps({"model_name": "gru4rec",
                                "model": {"embedding_dim": 16, "units": 8},
                                "train": TINY["train"]}))
    return str(path)


def test_one_line_errors(data, config_file, tmp_path, capsys):
    run = str(tmp_path / "err")
    gru4rec_file = _gru4rec_file(tmp_path)
    cases = [
        (["--data", str(tmp_path / "missing"), "--model-dir", run], "data folder"),
        (_args(data, run, config_file, "--batch-size", "0"), "train.batch_size must be >= 1, got 0"),
        (_args(data, run, config_file, "--model", "nope"), "unknown model 'nope'"),
        # their recurrent loops (the flat TCN: its ragged packing) fail in XLA's conversion
        (["--data", data, "--model-dir", run, "--model", "hrnn", "--jit-compile"],
         "model 'hrnn' does not compile with XLA; only hiertcn does"),
        # a model option the chosen model does not have: the option, not a config key
        (["--data", data, "--model-dir", run, "--model", "gru4rec", "--no-repeat-head"],
         "--repeat-head/--no-repeat-head applies to hiertcn, not to --model gru4rec"),
        (["--data", data, "--model-dir", run, "--model", "hrnn", "--preset", "deep"],
         "--preset deep applies to hiertcn, not to --model hrnn"),
        (["--data", data, "--model-dir", run, "--config", gru4rec_file, "--model", "hrnn"],
         f"{gru4rec_file} is for model 'gru4rec', but --model is 'hrnn'"),
    ]
    for argv, message in cases:
        assert train_lib.main(argv) == 2
        # (one line besides the run's first, when the error comes once training started)
        err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                        if not line.startswith("training "))
        assert message in err and len(err.splitlines()) == 1, err
    assert train_lib.main(_args(data, run, config_file, "--steps", "2")) == 0
    other = write_data(str(tmp_path / "other"), 21, planted_users(8, num_items=21))
    capsys.readouterr()
    assert train_lib.main(_args(other, run, config_file, "--steps", "4")) == 2
    assert "does not match" in capsys.readouterr().err
    assert train_lib.main(_args(data, run, config_file, "--steps", "4", "--no-high-level")) == 2
    assert ("another model config or batch geometry (model.high_level True -> False "
            "(--no-high-level); see its config.json)") in capsys.readouterr().err
    assert train_lib.main(_args(data, run, config_file, "--steps", "4", "--batch-size", "3",
                                "--dropout", "0.25")) == 2
    err = capsys.readouterr().err
    assert ("(model.dropout 0.3 -> 0.25 (--dropout); train.batch_size 4 -> 3 (--batch-size); "
            "see") in err, err


def test_a_run_folder_removed_while_it_trains_is_an_error_not_a_finished_run(
        data, config_file, tmp_path, capsys, monkeypatch):
    """Its folder removed mid-run, TensorFlow made a new one for the later checkpoints,
    without config.json: the run and its rerun ("nothing to do") ended with status 0 and a
    run that neither evaluation nor export could read (failure-injection audit)."""
    import shutil

    run = str(tmp_path / "run")
    scalar = train_lib._scalar

    def remove_the_folder_once(name, value, step):
        scalar(name, value, step)
        if step == 10 and os.path.exists(os.path.join(run, "config.json")):
            shutil.rmtree(run)

    monkeypatch.setattr(train_lib, "_scalar", remove_the_folder_once)
    assert train_lib.main(_args(data, run, config_file, "--steps", "12")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {run} was removed while this run trained (its config.json is "
                       "gone, and evaluation and export need it): train again into a new "
                       "--model-dir"), err
    assert train_lib.main(_args(data, run, config_file, "--steps", "12")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {run} holds checkpoints but no config.json (was it removed while the run "
        "trained?): the config they were trained with is unknown; train into a new "
        "--model-dir")


def test_the_run_folders_follow_the_umask(data, config_file, tmp_path):
    """TensorFlow made checkpoints/, best/ and logs/ 0755 whatever the umask: a group
    sharing the run with umask 002 could not resume it (unprivileged-user audit)."""
    run = tmp_path / "run"
    old = os.umask(0o002)
    try:
        assert train_lib.main(_args(data, str(run), config_file, "--steps", "10",
                                    "--eval-every", "5")) == 0
    finally:
        os.umask(old)
    for folder in ("checkpoints", "best", "logs"):
        assert (run / folder).stat().st_mode & 0o777 == 0o775, folder


def test_a_run_folder_without_a_checkpoint_takes_new_data_and_options(data, config_file,
                                                                       tmp_path, capsys):
    """A command refused or killed before its first checkpoint (a damaged train shard found
    while reading the split, a kill at start-up) leaves items.tsv and config.json in RUN:
    the next command, on the rebuilt data (another vocabulary) or with other options,
    trains there as in a new folder; it was refused as if a model had been trained."""
    run = tmp_path / "run"
    run.mkdir()
    other = write_data(str(tmp_path / "other"), 21, planted_users(8, num_items=21))
    shutil.copy(os.path.join(other, "items.tsv"), run / "items.tsv")
    gru4rec = config_lib.RunConfig.from_dict(json.loads(open(_gru4rec_file(tmp_path)).read()),
                                             registry.config_classes())
    config_lib.save_json(gru4rec, str(run / "config.json"))
    assert train_lib.main(_args(data, str(run), config_file, "--steps", "2")) == 0, \
        capsys.readouterr().err
    assert (run / "items.tsv").read_text() == open(os.path.join(data, "items.tsv")).read()
    assert json.loads((run / "config.json").read_text())["model_name"] == "hiertcn"
    # once it holds a checkpoint, RUN is held to them; another model is said first
    capsys.readouterr()
    assert train_lib.main(["--data", data, "--model-dir", str(run), "--config",
                           _gru4rec_file(tmp_path), "--no-progress", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    # (alone: the other model's config keys all differ, and are not the point)
    assert "another model config or batch geometry (model_name 'hiertcn' -> 'gru4rec'; see " \
        in err, err
    # and so is a folder of a best checkpoint alone (checkpoints/ deleted to save room:
    # evaluation and export load best/), which a new run would have discarded
    assert train_lib.main(_args(data, str(run), config_file, "--steps", "4", "--eval-every",
                                "2")) == 0
    shutil.rmtree(run / "checkpoints")
    best = sorted(os.listdir(run / "best"))
    capsys.readouterr()
    assert train_lib.main(_args(other, str(run), config_file, "--steps", "4")) == 2
    assert "does not match" in capsys.readouterr().err
    assert sorted(os.listdir(run / "best")) == best
    assert (run / "items.tsv").read_text() == open(os.path.join(data, "items.tsv")).read()


def test_config_is_strict_and_round_trips(tmp_path):
    classes = registry.config_classes()
    cfg = config_lib.RunConfig.from_dict(TINY, classes)
    assert config_lib.RunConfig.from_dict(cfg.to_dict(), classes) == cfg
    with pytest.raises(config_lib.ConfigError, match="unknown HierTCNConfig key 'embeding_dim'"):
        cfg.replace({"model": {"embeding_dim": 3}})
    with pytest.raises(config_lib.ConfigError, match="'batch_size' must be int, got 'x'"):
        cfg.replace({"train": {"batch_size": "x"}})
    with pytest.raises(config_lib.ConfigError, match="tied_output needs embedding_dim == channels"):
        cfg.replace({"model": {"tied_output": True, "channels": 8}})
    # a config built directly is checked as from_dict checks it (numpy numbers are numbers)
    with pytest.raises(config_lib.ConfigError, match="model.num_blocks must be >= 1, got 0"):
        config_lib.HierTCNConfig(num_blocks=0)
    with pytest.raises(config_lib.ConfigError, match="'channels' must be int, got '64'"):
        config_lib.HierTCNConfig(channels="64")
    with pytest.raises(config_lib.ConfigError, match="'dropout' must be float, got True"):
        config_lib.HierTCNConfig(dropout=True)
    with pytest.raises(config_lib.ConfigError, match="learning_rate"):
        config_lib.TrainConfig(learning_rate=-1.0)
    assert config_lib.HierTCNConfig(high_level=np.bool_(False)).high_level is False
    direct = config_lib.TrainConfig(batch_size=np.int64(8), lr_decay_at=[0.5])
    assert direct == config_lib.TrainConfig().replace({"batch_size": 8, "lr_decay_at": [0.5]})
    assert type(direct.batch_size) is int and direct.lr_decay_at == (0.5,)
    assert config_lib.HierTCNConfig().receptive_field == 13
    assert config_lib.HierTCNConfig().replace(config_lib.DEEP_PRESET).receptive_field == 25
    path = str(tmp_path / "c.json")
    config_lib.save_json(cfg, path)
    assert config_lib.load_json(path) == cfg.to_dict()


def test_the_step_decay_falls_at_its_fractions_of_the_run():
    """`--lr-schedule step` divides the rate by lr_decay_factor after each fraction of the
    steps: with decay at 0.5 and 0.75 of 100 steps, steps 1-50, 51-75, 76-100. The optimizer
    reads the schedule at its iteration count, the steps done before (step 51 read 50, and
    the decay began a step late, at 52)."""
    tc = config_lib.TrainConfig(learning_rate=0.1, lr_schedule="step", lr_decay_at=(0.5, 0.75),
                                lr_decay_factor=5.0)
    import tensorflow as tf

    optimizer = train_lib.make_optimizer(tc, 100)
    weight = tf.Variable([0.0])
    rates = {}
    for step in range(1, 101):  # the rate each step's update took
        optimizer.apply_gradients([(tf.constant([1.0]), weight)])
        rates[step] = float(optimizer.learning_rate)
    np.testing.assert_allclose([rates[s] for s in (1, 50, 51, 75, 76, 100)],
                               [0.1, 0.1, 0.02, 0.02, 0.004, 0.004], rtol=1e-6)
    assert train_lib.learning_rate(tc.replace({"lr_schedule": "constant"}), 100) == 0.1


def _small_steps(name: str, count: int = 2) -> list:
    """`count` identical small models of `name` (20 items, 2 rows), each with its state,
    optimizer and compiled training step (`make_train_step`)."""
    small = {"embedding_dim": 8, "dropout": 0.0}
    if name == "hiertcn":
        small.update(gru_units=4, channels=8, repeat_head=False)
    tc = config_lib.TrainConfig().replace({"learning_rate": 0.05, "lr_schedule": "constant"})
    runs = []
    for _ in range(count):
        tf.keras.utils.set_random_seed(0)
        model = registry.build_model(name, registry.config_classes()[name]().replace(small), 20)
        model.build_weights()
        state = train_lib.TrainState(model.train_cache(2))
        optimizer = train_lib.make_optimizer(tc, 10)
        step = train_lib.make_train_step(model, optimizer, state, tf.distribute.get_strategy(), False)
        runs.append((model, state, optimizer, step))
    return runs


@pytest.mark.parametrize("name", ["hiertcn", "hrnn"])
def test_the_training_step_is_traced_once_and_equals_the_eager_step(name):
    """Adam's moments exist before the first call, so the compiled step is traced once (a
    variable made during a trace makes TensorFlow trace the function again: seconds of
    start-up); batch after batch it updates the weights and the state cache as the same
    step run eagerly does."""
    from model import batching

    rng = np.random.default_rng(0)
    users = [[rng.integers(2, 20, size=rng.integers(1, 6)) for _ in range(3)] for _ in range(6)]
    batches = [{k: tf.constant(v) for k, v in b.items()}
               for b in batching.QueueBatcher(lambda: users, 2, 3, 4, epochs=1)][:3]
    ((compiled_model, compiled_state, _, compiled),
     (eager_model, eager_state, _, eager)) = _small_steps(name)
    for batch in batches:
        loss, n = compiled(batch)
        eager_loss, eager_n = eager.python_function(batch)
        assert int(n) == int(eager_n) > 0
        np.testing.assert_allclose(loss.numpy(), eager_loss.numpy(), rtol=1e-5)
    assert compiled.experimental_get_tracing_count() == 1
    for a, b in zip(compiled_model.trainable_variables, eager_model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, err_msg=a.name)  # (Adam)
    for a, b in zip(compiled_state.cache, eager_state.cache):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert int(compiled_state.step.numpy()) == int(eager_state.step.numpy()) == len(batches)


def test_the_step_fed_the_dataset_iterator_fetches_its_batch_and_stops_cleanly():
    """`model.train` passes the dataset's iterator to the compiled step, which fetches the
    batch itself: the same updates as the step fed the batches, and at the end of the data
    OutOfRangeError with nothing changed (no step counted, no optimizer iteration)."""
    from model import batching

    rng = np.random.default_rng(1)
    users = [[rng.integers(2, 20, size=rng.integers(1, 6)) for _ in range(3)] for _ in range(6)]
    runs = _small_steps("hiertcn")
    batches = [{k: tf.constant(v) for k, v in b.items()}
               for b in batching.QueueBatcher(lambda: users, 2, 3, 4, epochs=1)]
    assert len(batches) >= 3
    fed = runs[0]
    for batch in batches:
        fed[3](batch)
    model, state, optimizer, step = runs[1]
    iterator = iter(batching.make_dataset(batching.QueueBatcher(lambda: users, 2, 3, 4, epochs=1)))
    for _ in batches:
        step(iterator)
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(tf.errors.OutOfRangeError):
        step(iterator)
    assert int(state.step.numpy()) == int(optimizer.iterations.numpy()) == len(batches)
    for a, b, c in zip(model.trainable_variables, before, fed[0].trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b)
        np.testing.assert_allclose(a.numpy(), c.numpy(), atol=1e-6, err_msg=a.name)
    for a, b in zip(state.cache, fed[1].cache):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert int(fed[2].iterations.numpy()) == len(batches)


def test_the_command_line_names_the_registered_models():
    """`model.cli` reads --model's names without importing the models (TensorFlow)."""
    assert tuple(registry.MODELS) == config_lib.MODEL_NAMES


def test_lazy_adam_updates_only_the_rows_in_the_gradient():
    """The default optimizer: a table's sparse gradient moves exactly its rows, each by
    Adam's update from its own moments (a NumPy replay over two steps); the other rows and
    their moments stay; dense variables get Keras's Adam; `adam` is Keras's Adam."""
    import tensorflow as tf

    base = config_lib.TrainConfig().replace({"learning_rate": 0.1, "lr_schedule": "constant"})
    # (row 1 twice in step 1: an item that occurs twice in the batch; Keras sums them)
    steps = [([1, 3, 1], [[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]], [0.5, -0.5]),
             ([3, 4], [[-1.0, 0.5], [2.0, 2.0]], [0.25, 1.0])]

    def run(optimizer):
        opt = train_lib.make_optimizer(base.replace({"optimizer": optimizer}), 10)
        table, dense = tf.Variable(np.ones([5, 2], np.float32)), tf.Variable([1.0, 2.0])
        for rows, g, d in steps:
            sparse = tf.IndexedSlices(tf.constant(g), tf.constant(rows), tf.constant([5, 2]))
            opt.apply_gradients([(sparse, table), (tf.constant(d), dense)])
        return opt, table.numpy(), dense.numpy()

    opt, table, dense = run("lazy_adam")
    assert isinstance(opt, train_lib.LazyAdam)
    b1, b2, eps, lr = 0.9, 0.999, 1e-7, 0.1
    want, m, v = np.ones([5, 2]), np.zeros([5, 2]), np.zeros([5, 2])
    want_dense, md, vd = np.array([1.0, 2.0]), np.zeros(2), np.zeros(2)
    for t, (rows, g, d) in enumerate(steps, 1):
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        summed = np.zeros([5, 2])
        np.add.at(summed, rows, np.array(g))
        rows = sorted(set(rows))
        m[rows] = b1 * m[rows] + (1 - b1) * summed[rows]
        v[rows] = b2 * v[rows] + (1 - b2) * np.square(summed[rows])
        want[rows] -= alpha * m[rows] / (np.sqrt(v[rows]) + eps)
        md, vd = b1 * md + (1 - b1) * np.array(d), b2 * vd + (1 - b2) * np.square(d)
        want_dense -= alpha * md / (np.sqrt(vd) + eps)
    np.testing.assert_allclose(table, want, rtol=1e-5)
    np.testing.assert_allclose(dense, want_dense, rtol=1e-5)
    assert table[0].tolist() == [1.0, 1.0] and table[2].tolist() == [1.0, 1.0]
    assert table[1].tolist() == pytest.approx(want[1]) and want[1][0] < 1.0  # step 1 only
    # Keras's Adam also moves row 1 at step 2 (its decayed momentum); dense: the same
    _, keras_table, keras_dense = run("adam")
    assert keras_table[1][0] < table[1][0] - 1e-3
    np.testing.assert_allclose(keras_table[[0, 2]], 1.0)
    np.testing.assert_allclose(keras_dense, dense, rtol=1e-5)  # (float32 rounding order)
    with pytest.raises(config_lib.ConfigError, match="train.optimizer must be 'lazy_adam' or 'adam'"):
        base.replace({"optimizer": "sgd"})


@pytest.mark.parametrize("optimizer", ["lazy_adam", "adam"])
def test_clipnorm_scales_every_gradient_by_their_global_norm(optimizer):
    """`train.clipnorm` is one scale for all gradients, from the norm of the gradients as
    applied: a table row that appears twice in a batch counts once, with its summed
    gradient (Keras's own clipnorm clipped each tensor alone; its global clip took the norm
    before summing the duplicates: sqrt(9 + 16 + 9) here instead of sqrt(9 + 49))."""
    train = config_lib.TrainConfig(clipnorm=1.0, optimizer=optimizer)
    opt = train_lib.make_optimizer(train, 10)
    dense = tf.constant([3.0, 0.0])
    sparse = tf.IndexedSlices(tf.constant([[0.0, 3.0], [0.0, 4.0]]), tf.constant([1, 1]),
                              tf.constant([5, 2]))
    clipped_dense, clipped_sparse = opt._clip_gradients([dense, sparse])
    norm = np.sqrt(9 + 49)
    np.testing.assert_allclose(clipped_dense.numpy(), [3 / norm, 0], rtol=1e-6)
    assert clipped_sparse.indices.numpy().tolist() == [1]
    np.testing.assert_allclose(clipped_sparse.values.numpy(), [[0, 7 / norm]], rtol=1e-6)
    assert opt.global_clipnorm == 1.0 and not opt.clipnorm


def test_lazy_adam_decays_only_the_rows_in_the_gradient():
    import tensorflow as tf

    base = config_lib.TrainConfig().replace({"learning_rate": 0.1, "lr_schedule": "constant",
                                             "weight_decay": 0.5})
    for optimizer, untouched in (("lazy_adam", 2.0), ("adam", 2.0 * (1 - 0.1 * 0.5))):
        opt = train_lib.make_optimizer(base.replace({"optimizer": optimizer}), 10)
        table, dense = tf.Variable(np.full([3, 1], 2.0, np.float32)), tf.Variable([2.0])
        zero = tf.IndexedSlices(tf.zeros([1, 1]), tf.constant([1]), tf.constant([3, 1]))
        opt.apply_gradients([(zero, table), (tf.zeros([1]), dense)])  # only the decay acts
        np.testing.assert_allclose(table.numpy()[:, 0], [untouched, 2.0 * (1 - 0.05), untouched],
                                   rtol=1e-6)
        np.testing.assert_allclose(dense.numpy(), [2.0 * (1 - 0.05)], rtol=1e-6)


def test_weight_decay_is_decoupled_and_validated():
    import tensorflow as tf

    base = config_lib.TrainConfig().replace({"learning_rate": 0.1, "lr_schedule": "constant"})
    for decay, expected in ((0.0, 2.0), (0.5, 2.0 * (1 - 0.1 * 0.5))):
        weight = tf.Variable([2.0])
        optimizer = train_lib.make_optimizer(base.replace({"weight_decay": decay}), 10)
        optimizer.apply_gradients([(tf.zeros([1]), weight)])  # a zero gradient: only the decay acts
        np.testing.assert_allclose(weight.numpy(), [expected], rtol=1e-6)
    with pytest.raises(config_lib.ConfigError, match="train.weight_decay must be >= 0"):
        base.replace({"weight_decay": -0.1})


def test_auto_loss_is_the_full_softmax_up_to_the_threshold(monkeypatch):
    from model import losses

    top = losses.AUTO_SOFTMAX_MAX_ITEMS + 2  # V with the two reserved indices
    assert losses.resolve_loss("auto", top) == "softmax"
    assert losses.resolve_loss("auto", top + 1) == "sampled"
    assert losses.resolve_loss("softmax", top + 1) == "softmax"
    assert losses.resolve_loss("sampled", 3) == "sampled"
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.resolve_loss("hinge", 3)
    with pytest.raises(config_lib.ConfigError, match="'auto', 'softmax' or 'sampled'"):
        config_lib.HierTCNConfig(loss="hinge")
    # a model built with `auto` over a large catalogue samples (and needs the counts; here
    # the default 256 negatives are every one of its 11 items: the exact softmax)
    monkeypatch.setattr(losses, "AUTO_SOFTMAX_MAX_ITEMS", 10)
    tiny = {"embedding_dim": 8, "gru_units": 4, "channels": 8}
    config = config_lib.HierTCNConfig().replace(tiny)
    assert registry.build_model("hiertcn", config, 12).sampler is None
    big = registry.build_model("hiertcn", config, 13, item_counts=np.ones(13, np.int64))
    assert big.sampler is not None and big.sampler.exact and big.sampler.num_sampled == 11
    assert not registry.build_model("hiertcn", config.replace({"num_negatives": 9}), 13,
                                    item_counts=np.ones(13, np.int64)).sampler.exact
    flags = train_lib.resolve_config(train_lib.parse_args(
        ["--data", "d", "--model-dir", "r", "--model", "hrnn", "--loss", "sampled",
         "--num-negatives", "64", "--negative-exponent", "0.75"])).model
    assert (flags.loss, flags.num_negatives, flags.negative_exponent) == ("sampled", 64, 0.75)
    with pytest.raises(config_lib.ConfigError, match="negative_exponent must be in"):
        train_lib.resolve_config(train_lib.parse_args(
            ["--data", "d", "--model-dir", "r", "--negative-exponent", "2"]))
    run = config_lib.RunConfig("gru4rec", registry.config_classes()["gru4rec"]())
    assert train_lib.resolve_loss(run, 13).model.loss == "sampled"
    assert train_lib.resolve_loss(run, 12).model.loss == "softmax"


def test_dropout_flag_reaches_every_model_and_is_checked():
    def model_config(*argv):
        return train_lib.resolve_config(train_lib.parse_args(
            ["--data", "d", "--model-dir", "r", *argv])).model

    assert model_config().dropout == 0.3  # hiertcn's default
    assert model_config("--model", "hrnn").dropout == 0.0
    assert model_config("--dropout", "0").dropout == 0.0
    assert model_config("--model", "gru4rec", "--dropout", "0.25").dropout == 0.25
    with pytest.raises(config_lib.ConfigError, match=r"model.dropout must be in \[0, 1\), got 1.0"):
        model_config("--model", "tcn", "--dropout", "1")


def test_a_remote_data_folder_trains_and_evaluates_like_the_local_one(data, config_file,
                                                                       tmp_path, capsys):
    """--data on a TensorFlow file system (gs://, s3://...: here `ram://`, TensorFlow's
    in-memory one): the same training and evaluation as from the local copy."""
    import tensorflow as tf

    from model import evaluate

    remote = f"ram://bucket-{os.getpid()}/data"
    for folder, _, files in os.walk(data):
        for name in files:
            dst = remote + "/" + os.path.relpath(os.path.join(folder, name), data)
            tf.io.gfile.makedirs(dst.rsplit("/", 1)[0])
            tf.io.gfile.copy(os.path.join(folder, name), dst)
    exact = ("--steps", "15", "--dropout", "0", "--eval-every", "0")
    local_run, remote_run = str(tmp_path / "local"), str(tmp_path / "remote")
    assert train_lib.main(_args(data, local_run, config_file, *exact)) == 0
    assert train_lib.main(_args(remote, remote_run, config_file, *exact)) == 0
    for a, b in zip(_weights(local_run), _weights(remote_run)):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(remote_run, "items.tsv")) as f, open(os.path.join(data, "items.tsv")) as g:
        assert f.read() == g.read()
    results = []
    for folder in (data, remote):
        out = str(tmp_path / f"sknn-{len(results)}.json")
        assert evaluate.main(["--data", folder, "--split", "test", "--model", "sknn",
                              "--output", out, "--no-progress"]) == 0
        with open(out) as f:
            results.append({k: v for k, v in json.load(f).items() if k != "data"})
    assert results[0] == results[1] and results[0]["events"] > 0
    assert train_lib.main(_args(remote + "-missing", str(tmp_path / "x"), config_file)) == 2
    assert "data folder ram://" in capsys.readouterr().err
    assert train_lib.main(_args("nosuchfs://b/data", str(tmp_path / "y"), config_file)) == 2
    err = capsys.readouterr().err
    assert "TensorFlow has no file system for this scheme" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", str(10**30), f"argument --steps: must be <= {2**63 - 1}, got 1{'0' * 30}"),
    ("--epochs", str(2**31), f"argument --epochs: must be <= {2**31 - 1}, got {2**31}"),
    ("--batch-size", str(10**30),
     f"argument --batch-size: must be <= {2**31 - 1}, got 1{'0' * 30}"),
    ("--sessions-per-batch", str(2**31), "argument --sessions-per-batch: must be <= 2147483647"),
    ("--max-session-length", str(10**30), "argument --max-session-length: must be <= 2147483647"),
    ("--start-items", str(10**30), "argument --start-items: must be <= 2147483647"),
    ("--num-negatives", str(2**31), "argument --num-negatives: must be <= 2147483647"),
    ("--eval-users", str(2**63), f"argument --eval-users: must be <= {2**63 - 1}, got {2**63}"),
    ("--batch-size", "x", "argument --batch-size: 'x' is not an integer"),
])
def test_sizes_and_counts_past_what_tensorflow_holds_are_usage_errors(flag, value, message,
                                                                      capsys):
    """An integer past TensorFlow's int32 sizes or int64 step counter was a traceback after
    TensorFlow's start ("Can't convert Python sequence with out-of-range integer to
    Tensor"): now one usage line when the command line is read (before TensorFlow loads)."""
    with pytest.raises(SystemExit) as exit_:
        cli.train_args(["--data", "d", "--model-dir", "r", flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    if flag in ("--batch-size", "--start-items"):  # (the lower bound: the config's, by key)
        assert cli.train_args(["--data", "d", "--model-dir", "r", flag, "-1"])


@pytest.mark.parametrize("rate", ["inf", "1e30", "nan", "1.5"])
def test_a_learning_rate_that_cannot_train_is_refused(rate):
    """Adam moves each weight by about the rate each step: inf and 1e30 were accepted (and
    trained to a nan loss); the rate is at most 1, ten times the largest one tried."""
    args = train_lib.parse_args(["--data", "d", "--model-dir", "r", "--learning-rate", rate])
    said = f"train.learning_rate must be > 0 and <= 1, got {float(rate)}"
    with pytest.raises(config_lib.ConfigError, match=re.escape(said)):
        train_lib.resolve_config(args)
    assert config_lib.TrainConfig(learning_rate=1.0).learning_rate == 1.0


@pytest.mark.parametrize("key", ["clipnorm", "weight_decay", "lr_decay_factor", "max_minutes"])
def test_an_infinite_training_option_is_refused(key):
    """inf passed `>= 0` (`>= 1`): a weight decay of inf trained to nan, a decay factor of
    inf set the rate to 0 at its first decay point (fuzzing audit's leftovers), a
    --max-minutes of inf went into config.json as Infinity, which strict JSON refuses."""
    with pytest.raises(config_lib.ConfigError, match=f"train.{key} must be .* and finite, "
                                                     "got inf"):
        config_lib.TrainConfig().replace({key: float("inf")})
    config_lib.TrainConfig().replace({key: 2.0})


@pytest.mark.parametrize("flag", ["--model", "--config"])
def test_an_empty_model_or_config_is_refused(flag, capsys):
    """--model '' trained hiertcn and --config '' ran without a config file (an unset
    variable in a script): an empty value is refused, not taken as the option left out."""
    for value in ("", " "):
        with pytest.raises(SystemExit) as exit_:
            cli.train_args(["--data", "d", "--model-dir", "r", flag, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}: must not be empty" in err, err
        assert err.count("\n") == 1


def test_config_files_are_held_to_the_same_bounds():
    """A --config file's integers are held to the same bounds as the options."""
    classes = registry.config_classes()
    for values, message in (
            ({"train": {"steps": 2**63}}, f"train.steps must be < 2\\*\\*63, got {2**63}"),
            ({"train": {"epochs": 2**31}}, "train.epochs must be < 2\\*\\*31"),
            ({"train": {"batch_size": 10**30}}, "train.batch_size must be < 2\\*\\*31"),
            ({"train": {"eval_events": 2**63}}, "train.eval_events must be < 2\\*\\*63"),
            ({"model": {"start_items": 2**31}}, "model.start_items must be < 2\\*\\*31"),
            ({"model_name": "tcn", "model": {"history_length": 2**31}},
             "model.history_length must be < 2\\*\\*31")):
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.RunConfig.from_dict(values, classes)
    most = config_lib.RunConfig.from_dict(
        {"train": {"steps": 2**63 - 1, "batch_size": 2**30, "sessions_per_batch": 1,
                   "max_session_length": 1}, "model": {"start_items": 2**31 - 1}}, classes)
    assert most.train.steps == 2**63 - 1 and most.model.start_items == 2**31 - 1
    # (each size fits, their product not: TensorFlow's 32-bit shapes, "Dimension size must
    # be non-negative but is -32" after TensorFlow's start)
    for sizes in ({"sessions_per_batch": 2**31 - 1}, {"max_session_length": 2**31 - 1},
                  {"batch_size": 2**16, "sessions_per_batch": 2**10, "max_session_length": 20}):
        with pytest.raises(config_lib.ConfigError, match="train.batch_size x sessions_per_batch "
                           "x max_session_length must be at most 2\\*\\*30 positions a batch"):
            config_lib.RunConfig.from_dict({"train": sizes}, classes)


def test_more_one_line_errors(data, config_file, tmp_path, capsys):
    run = str(tmp_path / "err")
    for flag in ("--steps", "--epochs"):
        with pytest.raises(SystemExit) as exit_:
            train_lib.main(_args(data, run, config_file, flag, "0"))
        assert exit_.value.code == 2
        assert f"{flag}: must be >= 1, got 0" in capsys.readouterr().err
    empty = write_data(str(tmp_path / "empty"), 20, [], valid=[(1, [[2, 3], [4, 5]])])
    damaged = str(tmp_path / "damaged")
    write_data(damaged, 20, planted_users(40))
    shard = os.path.join(damaged, "train", os.listdir(os.path.join(damaged, "train"))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("")  # a file where the run writes a folder
    no_counts = str(tmp_path / "no_counts")
    write_data(no_counts, 20, planted_users(10))
    with open(os.path.join(no_counts, "stats.json"), "w") as f:
        json.dump({"items": 20}, f)  # an edited or foreign stats.json
    stats_folder = str(tmp_path / "stats_folder")  # a data file that cannot be read
    write_data(stats_folder, 20, planted_users(10))
    os.remove(os.path.join(stats_folder, "stats.json"))
    os.mkdir(os.path.join(stats_folder, "stats.json"))
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes(b'{"train": "\xe9"}')
    exports, compared = tmp_path / "exports", tmp_path / "compared"  # (other commands' folders)
    (exports / "1").mkdir(parents=True)
    (exports / "1" / "saved_model.pb").write_bytes(b"")
    (compared / "runs").mkdir(parents=True)
    (compared / "compare.log").write_text("")
    cases = [
        (_args(data, run, config_file, "--strategy", "one_device:bogus"),
         "strategy 'one_device:bogus': 'bogus' is not a device"),
        # (a device it lacks was the CPU without a word)
        (_args(data, run + "7", config_file, "--strategy", "one_device:/gpu:7"),
         "strategy 'one_device:/gpu:7': this machine has no /gpu:7 (TensorFlow sees /cpu:0"),
        (_args(no_counts, run + "5", config_file, "--steps", "2"),
         f"{no_counts}/stats.json has no counts of the train split (splits.train: users, "
         "sessions, events)"),
        (_args(data, run + "8", config_file, "--patience", "3", "--eval-every", "0"),
         "--patience 3 stops on valid evaluations, which --eval-every 0 turns off: leave one "
         "of them out"),
        (_args(data, run + "4", config_file, "--seed", str(2**32)),
         "train.seed must be < 2**32 (TensorFlow's and numpy's seeds are 32-bit), got 4294967296"),
        (_args(data, str(a_file), config_file), f"--model-dir {a_file} is a file: pass a run folder"),
        (_args(data, data, config_file), f"--model-dir {data} is the --data folder or inside it"),
        (_args(data, os.path.join(data, "run"), config_file), "is the --data folder or inside it"),
        # a --data that is no pipeline output (a folder of runs): that is what is wrong
        (_args(str(tmp_path), os.path.join(str(tmp_path), "runs", "x"), config_file),
         f"{tmp_path}/items.tsv not found: is this a folder written by `python -m pipeline`?"),
        (_args(data, str(exports), config_file),
         f"--model-dir {exports} is an export base (SavedModel versions): pass a run folder"),
        (_args(data, str(compared), config_file),
         f"--model-dir {compared} is a model.compare output: pass a run folder"),
        (_args(data, str(blocked), config_file, "--steps", "2", "--eval-every", "0"),
         f"cannot write to {blocked}: {blocked}/checkpoints is a file where a folder is "
         "needed"),
        (_args(data, run, str(tmp_path)), f"cannot read config file {tmp_path}: Is a directory"),
        (_args(data, run, str(not_utf8)), f"config file {not_utf8} is not valid JSON: 'utf-8'"),
        (_args(empty, run + "2", config_file), "the train split of " + empty + " has no events"),
        # (said as "cannot write to RUN: Is a directory: DATA/stats.json" before)
        (_args(stats_folder, run + "6", config_file),
         f"error: cannot read {stats_folder}/stats.json: Is a directory"),
        (_args(damaged, run + "3", config_file, "--steps", "5"),
         f"cannot read the train split of {damaged}: truncated record"),
    ]
    for argv, message in cases:
        assert train_lib.main(argv) == 2
        # (one line besides the run's first, when the error comes once training started)
        err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                        if not line.startswith("training "))
        assert message in err and len(err.splitlines()) == 1, err
        assert "' failed with" not in err, err  # (TensorFlow's stray quote, left out)
    assert not os.path.exists(run + "4")  # a bad option leaves no run folder
    assert not os.path.exists(run + "7")


def test_epochs_are_counted_in_the_batches_the_generator_makes(tmp_path, monkeypatch):
    """`--epochs`: the learning-rate decay points and the progress bar's end come from the
    steps the run will take. Sessions longer than L are several slots, and a heavy user's
    slots all go to one row, which drains last: the count from stats.json alone (one slot
    per session) said 6 steps where an epoch takes 12 here. Over several passes the next
    pass's users fill the rows the last one drains: one pass counted and the others in
    full batches said 65 steps for the demo's 2 epochs, which took 63."""
    from model import batching

    rng = np.random.default_rng(0)
    users = [[list(rng.integers(2, 12, size=7)) for _ in range(3)] for _ in range(12)]
    users.append([list(rng.integers(2, 12, size=45)) for _ in range(8)])  # heavy, long sessions
    data = write_data(str(tmp_path / "d"), 10, users)
    for epochs in (1, 3, 5):
        train = config_lib.TrainConfig(epochs=epochs, steps=0, batch_size=4,
                                       sessions_per_batch=2, max_session_length=20,
                                       seed=3, shuffle_buffer=4)
        cached = batching.CachedUsers(data, "train", train.cache_events)
        estimate = train_lib.estimate_steps(data, train, cached)
        actual = sum(1 for _ in batching.QueueBatcher(cached, 4, 2, 20, seed=3,
                                                      shuffle_buffer=4, epochs=epochs))
        assert estimate == actual, (epochs, estimate, actual)
        if epochs == 1:
            assert train_lib.estimate_steps(data, train) <= actual / 2  # stats.json alone
        else:  # over the bound on replayed users: two passes, the rest in full batches
            monkeypatch.setattr(train_lib, "COUNTED_USERS", 2 * len(users))
            bounded = train_lib.estimate_steps(data, train, cached)
            monkeypatch.undo()
            assert abs(bounded - actual) <= 0.1 * actual, (bounded, actual)


def test_the_longest_train_session_comes_from_stats_json_else_from_a_split_in_memory(tmp_path):
    """HierTCN skips the chunk context's work when no train session is longer than L:
    `stats.json`'s `max_session_events` says so for a split of any size; a folder without
    it (an older pipeline's) is read when the split is kept in memory, else not known."""
    from model import batching

    rng = np.random.default_rng(0)
    users = [[list(rng.integers(2, 12, size=n)) for n in (3, 7, 5)] for _ in range(6)]
    users.append([list(rng.integers(2, 12, size=n)) for n in (4, 23)])
    data = write_data(str(tmp_path / "d"), 10, users)
    stats_path = os.path.join(data, "stats.json")
    with open(stats_path) as f:
        stats = json.load(f)
    assert "max_session_events" not in stats
    big, small = config_lib.TrainConfig(), config_lib.TrainConfig(cache_events=10)
    cached = batching.CachedUsers(data, "train", big.cache_events)
    assert train_lib.longest_train_session(data, big, cached) == 23
    streamed = batching.CachedUsers(data, "train", small.cache_events)
    assert train_lib.longest_train_session(data, small, streamed) is None
    assert streamed.cached is None and not streamed._too_big   # not read for it
    stats["max_session_events"] = {"train": 23, "valid": 0, "test": 0}
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    streamed = batching.CachedUsers(data, "train", small.cache_events)
    assert train_lib.longest_train_session(data, small, streamed) == 23
    assert streamed.cached is None and not streamed._too_big   # not read for it


def test_the_epoch_estimate_is_in_plain_notation():
    """A 1,000-step run said `(about 1e+02 epochs ...)`: `{:.2g}` of 104."""
    assert [train_lib._about(x) for x in (0.00042, 0.35, 4.2, 9.96, 42.4, 104, 4249, 123456)] == [
        "0.00042", "0.35", "4.2", "10", "42", "100", "4,200", "120,000"]


def test_the_config_file_names_the_model_when_the_command_line_does_not(data, tmp_path):
    """`--config FILE` with FILE's model_name (a run's config.json) and no --model: that
    model (it used to be refused: "is for model 'gru4rec', but --model is 'hiertcn'")."""
    run = str(tmp_path / "run")
    summary = train_lib.train(data, run, train_lib.resolve_config(cli.train_args(
        ["--data", data, "--model-dir", run, "--config", _gru4rec_file(tmp_path),
         "--steps", "2", "--eval-every", "0"])), progress=False)
    assert summary["model"] == "gru4rec" and summary["steps"] == 2
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model"]["units"] == 8


def test_the_python_api_trains_the_default_steps_and_gives_the_signal_handlers_back(
        data, tmp_path, monkeypatch):
    """`train.train` with neither steps nor epochs trains DEFAULT_STEPS steps as the
    command line does (it sized its schedule for 2 steps and ran a whole pass); `main`
    returns the caller's SIGTERM and SIGINT handlers (a notebook's first SIGTERM raised
    KeyboardInterrupt and the next ones were ignored)."""
    import signal

    monkeypatch.setattr(config_lib, "DEFAULT_STEPS", 3)
    classes = registry.config_classes()
    config = config_lib.RunConfig.from_dict(
        {**PLAIN, "train": {**PLAIN["train"], "eval_every": 0}}, classes)
    assert (config.train.steps, config.train.epochs) == (0, 0)
    summary = train_lib.train(data, str(tmp_path / "run"), config, progress=False)
    assert summary["steps"] == 3 and summary["stopped_by"] == "steps"
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert train_lib.main(["--data", str(tmp_path / "none"), "--model-dir",
                           str(tmp_path / "r2")]) == 2
    assert {s: signal.getsignal(s) for s in before} == before


def test_tf_keras_bound_to_keras_3_before_the_import_is_refused():
    """A notebook that used tf.keras before `import model` has Keras 3 there: a checkpoint
    would restore into a Keras 3 model in part, leaving the item embeddings random."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import tensorflow as tf; tf.keras.layers; import model; "
            "from model import config, registry; "
            "registry.build_model('hiertcn', config.HierTCNConfig(), 10)")
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items()
                                           if k != "TF_USE_LEGACY_KERAS"})
    assert res.returncode == 1
    assert ("RuntimeError: tf.keras is Keras 3" in res.stderr and "`import model` (or set "
            "TF_USE_LEGACY_KERAS=1) before tf.keras is first used" in res.stderr), res.stderr


@pytest.mark.parametrize("command", [
    ["model.train", "--data", "DATA", "--model-dir", "run"],
    ["serving.export", "--model-dir", "run", "--export-base", "models"],
])
def test_a_users_tf_use_legacy_keras_that_means_keras_3_is_one_line(tmp_path, command):
    """`import model` sets TF_USE_LEGACY_KERAS=1 only where it is not set: a user's own 0
    was an 11-frame traceback that blamed the import order, after the run folder was made."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "DATA").mkdir()
    (tmp_path / "run").mkdir()
    res = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "TF_USE_LEGACY_KERAS": "0", "PYTHONPATH": repo})
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: TF_USE_LEGACY_KERAS=0 is set in this environment, which makes tf.keras Keras 3; "
        "these models need tf-keras (Keras 2): unset it, or set it to 1"], res.stderr
    assert sorted(os.listdir(tmp_path)) == ["DATA", "run"] and not os.listdir(tmp_path / "run")


def test_a_log_of_one_session_users_is_named_as_such_not_as_long_sessions(
        tmp_path, config_file, capsys):
    """Where nearly every train event is in its user's first session (a session log, the
    session id as the user) the GRU over sessions has nothing to learn whatever S: the note
    says so, and does not send the user to a larger --sessions-per-batch."""
    users = planted_users(40, sessions=1) + planted_users(1, sessions=2, seed=3)
    data = write_data(str(tmp_path / "one"), 20, users,
                      valid=[(0, u) for u in planted_users(4, sessions=1, seed=1)])
    for s_per_batch in ("10", "40"):
        assert train_lib.main(_args(data, str(tmp_path / f"r{s_per_batch}"), config_file,
                                    "--sessions-per-batch", s_per_batch, "--steps", "1",
                                    "--eval-every", "0")) == 0
        err = capsys.readouterr().err
        assert ("note: about 2.4% of the train split's session chunks belong to a session after "
                "an earlier one of the same user, the only ones the hiertcn GRU over sessions "
                "can learn from, whatever --sessions-per-batch: most train events are in their "
                "user's first session") in err, err
        assert "a larger --sessions-per-batch" not in err
    # a log of one-session users only: none (not "about 0.0%")
    data = write_data(str(tmp_path / "none"), 20, planted_users(40, sessions=1),
                      valid=[(0, u) for u in planted_users(4, sessions=1, seed=1)])
    assert train_lib.main(_args(data, str(tmp_path / "r-none"), config_file, "--steps", "1",
                                "--eval-every", "0")) == 0
    assert ("note: none of the train split's session chunks belong to a session after an "
            "earlier one") in capsys.readouterr().err


def test_a_flat_tcn_history_shorter_than_its_receptive_field_is_refused(data, tmp_path, capsys):
    """The flat TCN trains over its cached last N tokens and then the batch; a session
    chunk continued at a batch's first slot is predicted from the output at the cache's
    last token, which sees N - 1 tokens before it where evaluation sees the receptive
    field's: with N = receptive field - 1 a training vector differed from evaluation's."""
    config = str(tmp_path / "tcn.json")
    tcn = {"embedding_dim": 8, "channels": [8, 8, 8], "kernel_size": 2}  # receptive field 8
    for n, code in ((7, 2), (8, 0)):
        with open(config, "w") as f:
            json.dump({"model_name": "tcn", "model": dict(tcn, history_length=n),
                       "train": TINY["train"]}, f)
        run = str(tmp_path / f"tcn-{n}")
        assert train_lib.main(_args(data, run, config, "--steps", "1", "--eval-every", "0")) == code
        err = capsys.readouterr().err.strip()
        if code:
            assert err == ("error: model.history_length 7 is below the flat TCN's receptive "
                           "field (8: kernel_size 2, 1 conv(s) per block, 3 blocks of "
                           "dilations 1 to 4): training would not compute what evaluation "
                           "and serving compute; raise history_length, or lower kernel_size, "
                           "convs_per_block or the number of blocks (entries in channels)"), err
            assert not os.path.exists(run)


def test_one_session_per_row_is_refused_where_a_gru_over_sessions_would_not_train(
        data, config_file, tmp_path, capsys):
    """The state cache carries the high-level state between batches without gradient, so
    with one session per row per batch the GRU over sessions never learned (its weights
    stayed at their initial values while the rest trained). With two it learns."""
    train_only = str(tmp_path / "train_only.json")  # (TINY's model keys are HierTCN's)
    with open(train_only, "w") as f:
        json.dump({"train": TINY["train"]}, f)
    configs = {"hiertcn": config_file, "hrnn": train_only, "gru4rec": train_only}
    for model, ablation in (("hiertcn", True), ("hrnn", False)):
        run = str(tmp_path / f"s1-{model}")
        assert train_lib.main(_args(data, run, configs[model], "--model", model,
                                    "--sessions-per-batch", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --sessions-per-batch 1 never trains {model}'s GRU over "
                              "sessions") and len(err.splitlines()) == 1, err
        assert ("--no-high-level" in err) == ablation
        assert not os.path.exists(run)
    # without a GRU over sessions one session per row is fine
    for model, extra in (("gru4rec", ()), ("hiertcn", ("--no-high-level",))):
        assert train_lib.main(_args(data, str(tmp_path / f"ok-{model}"), configs[model], "--model",
                                    model, "--sessions-per-batch", "1", "--steps", "2",
                                    "--eval-every", "0", *extra)) == 0
    # two sessions per row with sessions of two chunks (L = 4 here): each session ends its
    # batch, few chunks train the GRU, and the run says so
    capsys.readouterr()
    assert train_lib.main(_args(data, str(tmp_path / "s2"), config_file, "--sessions-per-batch",
                                "2", "--steps", "1", "--eval-every", "0")) == 0
    assert ("of the train split's session chunks follow a session end in their batch, the "
            "only ones the hiertcn GRU over sessions learns from (S = 2 chunks of L = 4 items"
            ) in capsys.readouterr().err
    # and with more sessions per row than a session has chunks the high-level GRU's
    # weights move
    runs = {}
    for steps in ("1", "8"):
        runs[steps] = str(tmp_path / f"s2-{steps}")
        assert train_lib.main(_args(data, runs[steps], config_file, "--sessions-per-batch", "3",
                                    "--steps", steps, "--eval-every", "0")) == 0
    model_1, _, _ = registry.load_model(runs["1"])
    model_8, _, _ = registry.load_model(runs["8"])
    gru = [(a.numpy(), b.numpy()) for a, b in zip(model_1.variables, model_8.variables)
           if a.name.startswith("high_gru/")]
    assert gru and all(np.abs(a - b).max() > 1e-4 for a, b in gru)


def test_negatives_under_an_auto_loss_that_chose_the_full_softmax_get_a_note(
        data, config_file, tmp_path, capsys):
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file, "--num-negatives", "10",
                                "--steps", "1", "--eval-every", "0")) == 0
    err = capsys.readouterr().err
    assert ("note: --num-negatives unused: the loss is the full softmax (--loss auto samples "
            "above 50,000 items; this catalogue has 20)") in err, err
    assert train_lib.main(_args(data, str(tmp_path / "run2"), config_file, "--steps", "1",
                                "--eval-every", "0")) == 0
    assert "unused" not in capsys.readouterr().err


def test_a_run_resumed_with_eval_every_0_uses_its_last_weights_not_an_earlier_best(
        data, config_file, tmp_path, capsys):
    """--eval-every 0 says the last weights are used; resumed so, the run kept serving the
    best of its earlier evaluations, the steps trained after it ignored by evaluate and
    export. That best is now set aside (kept, not deleted)."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", "--eval-every", "3",
                                "--checkpoint-every", "3")) == 0
    best_step = registry.read_best(run)["step"]
    assert registry.checkpoint_path(run, "best").endswith(f"best/ckpt-{best_step}")
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "10", "--eval-every", "0",
                                "--checkpoint-every", "3")) == 0
    out, err = capsys.readouterr()
    kept = os.path.join(run, "best-until-step-6")
    assert (f"note: --eval-every 0: the last weights are used from now on, not the best on "
            f"valid of the earlier steps (step {best_step}), which is kept in {kept}") in err
    assert json.loads(out.strip().splitlines()[-1])["best"] is None
    assert registry.read_best(run) is None and os.path.isfile(os.path.join(kept, "best.json"))
    assert registry.checkpoint_path(run, "best").endswith("checkpoints/ckpt-10")


@pytest.mark.parametrize("min_count", [5, 1])
def test_unknown_targets_note_names_the_threshold_only_where_it_can_help(
        tmp_path, monkeypatch, capsys, min_count):
    """Most valid targets outside the vocabulary: the note says how high recall@20 can
    reach, and points at the pipeline's --min-item-count only when it is above 1 (at 1 the
    unknown items are ones train never holds)."""
    data = write_data(str(tmp_path / "data"), 20, planted_users(8))
    path = os.path.join(data, "stats.json")
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    stats.setdefault("options", {})["min_item_count"] = min_count
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stats, f)
    monkeypatch.setattr(train_lib, "evaluate_valid", lambda *a: {
        "recall@20": 0.1, "mrr@20": 0.05, "events": 1000, "unknown_targets": 600})
    train_lib._log_valid(None, data, None, 50)
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 50: valid recall@20 0.1000 mrr@20 0.0500 (600 of 1,000 targets "
                           "are items outside the vocabulary, misses for every model: "
                           "recall@20 can reach 0.4000 at most; ")
    assert line.endswith("see the pipeline's --min-item-count)" if min_count > 1 else
                         "items that train never holds, --min-item-count is 1)")


def test_a_slow_run_checkpoints_every_so_often_besides_every_n_steps(
        data, config_file, tmp_path, monkeypatch):
    """Besides every --checkpoint-every steps, a checkpoint at least every
    CHECKPOINT_SECONDS: a run killed before its 500th step lost every step until then.
    Here every step is over that time, so each step checkpoints (the newest 3 kept)."""
    monkeypatch.setattr(train_lib, "CHECKPOINT_SECONDS", 0.0)
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "5", "--eval-every", "0",
                                "--checkpoint-every", "100")) == 0
    names = sorted(f for f in os.listdir(os.path.join(run, "checkpoints")) if f.endswith(".index"))
    assert names == ["ckpt-3.index", "ckpt-4.index", "ckpt-5.index"]
    monkeypatch.setattr(train_lib, "CHECKPOINT_SECONDS", 600.0)
    run = str(tmp_path / "steps")  # (a quick run: the steps alone, and the end)
    assert train_lib.main(_args(data, run, config_file, "--steps", "5", "--eval-every", "0",
                                "--checkpoint-every", "2")) == 0
    names = sorted(f for f in os.listdir(os.path.join(run, "checkpoints")) if f.endswith(".index"))
    assert names == ["ckpt-2.index", "ckpt-4.index", "ckpt-5.index"]


def test_keep_checkpoints_bounds_the_periodic_checkpoints_on_disk(data, config_file, tmp_path,
                                                                  capsys):
    """Each periodic checkpoint is three times the weights (Adam's two slots): on a large
    catalogue users bound their number with `--keep-checkpoints N` (a config file was the
    only way); the newest are kept and the run resumes from the last."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "8", "--eval-every", "0",
                                "--checkpoint-every", "2", "--keep-checkpoints", "2")) == 0
    names = sorted(f for f in os.listdir(os.path.join(run, "checkpoints")) if f.endswith(".index"))
    assert names == ["ckpt-6.index", "ckpt-8.index"]
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["keep_checkpoints"] == 2
    with pytest.raises(SystemExit) as exit_:
        train_lib.main(_args(data, str(tmp_path / "x"), config_file, "--keep-checkpoints", "0"))
    assert exit_.value.code == 2
    assert "argument --keep-checkpoints: must be >= 1, got 0" in capsys.readouterr().err


def test_out_of_memory_is_one_line_that_names_the_options(data, config_file, tmp_path, capsys,
                                                           monkeypatch):
    """TensorFlow's OOM (a batch too large for the memory: B x S x L positions each scoring
    the catalogue) was forty lines of traceback; it cannot be caused safely here, so the
    training is made to raise TensorFlow's error as a step does."""
    def oom(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(
            None, None, "OOM when allocating tensor with shape[30123,28369] and type float on "
            "/job:localhost/replica:0/task:0/device:CPU:0 by allocator cpu")

    monkeypatch.setattr(train_lib, "train", oom)
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file, "--steps", "2")) == 1
    err = capsys.readouterr().err
    assert err == ("error: out of memory in training (a tensor of shape[30123,28369]): lower "
                   "--batch-size (or --sessions-per-batch, --max-session-length); with the full "
                   "softmax each of the B x S x L positions scores the whole catalogue, --loss "
                   "sampled needs far less\n"), err
    # a full disk is TensorFlow's same class of error: said as a full disk, not memory
    def full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(
            None, None, "run/checkpoints/ckpt-1_temp/part-00000-of-00001.data-00000-of-00001."
            "tempstate1; No space left on device")

    monkeypatch.setattr(train_lib, "train", full)
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "2")) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write to {run}: No space left on device; no checkpoint was complete, so "
        "any steps trained are lost: make room and rerun the same command to start again\n")


def test_dilations_far_past_the_longest_session_are_noted():
    """num_blocks 16 on 5-event sessions took 6 GB to evaluate 25 users, and 40 ran out of
    memory with a message that named the batch size (extremes audit): the run notes the
    blocks that read only padding; a block more than needed is a fair choice, unnoted."""
    base = config_lib.HierTCNConfig(kernel_size=3, convs_per_block=1)
    note = train_lib.deep_dilations_note(base.replace({"num_blocks": 16}), 5)
    assert note == ("note: model.num_blocks 16 gives the TCN a receptive field of 131,071 "
                    "positions, and the longest train session has 5 events: 2 blocks see all "
                    "of it, and each further one reads only padding at a memory cost that "
                    "doubles with every block")
    # (and none for a receptive field short of the longest session: the quickstart's)
    for blocks, longest in ((3, 5), (2, 5), (1, 5), (16, None), (12, 4096), (2, 100)):
        assert train_lib.deep_dilations_note(base.replace({"num_blocks": blocks}), longest) \
            is None, (blocks, longest)


def test_a_run_notes_its_deep_dilations(data, tmp_path, capsys):
    """(the note of `deep_dilations_note`, said by model.train)"""
    path = tmp_path / "deep.json"
    path.write_text(json.dumps({**PLAIN, "model": {**PLAIN["model"], "num_blocks": 8}}))
    assert train_lib.main(["--data", data, "--model-dir", str(tmp_path / "run"), "--config",
                           str(path), "--steps", "1", "--eval-every", "0"]) == 0
    out = capsys.readouterr()
    assert "note: model.num_blocks 8 gives the TCN a receptive field of" in out.err
    # one step, which traces the graph, is not timed: no rate (it read 0.0; extremes audit)
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["events_per_s"] is None


def test_long_chunks_with_the_repeat_head_are_noted():
    """The repeat head's memory grows with L^2: L = 1,000 took 17 GB for one step, 30,000
    was killed at 24 GB without a word (extremes audit)."""
    base = config_lib.HierTCNConfig()
    assert base.uses_repeat_head
    note = train_lib.long_chunks_note(base, 1000)
    assert note.startswith("note: --max-session-length 1,000 with the repeat head: it attends")
    assert train_lib.long_chunks_note(base, train_lib.LONG_CHUNKS) is None
    assert train_lib.long_chunks_note(base.replace({"repeat_head": False}), 1000) is None
