"""`python -m model.train` stopped and resumed: time limits, NaN losses, interrupts, kills,
changed options, finished runs (the fixtures and helpers of test_train)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from model import batching
from model import config as config_lib
from model import registry
from model import train as train_lib
from test_train import PLAIN, TINY, _args, _weights, config_file, data, head_config_file  # noqa: F401 - fixtures


# Without dropout (whose masks a new process draws afresh) a resumed run is exact.
EXACT = ("--dropout", "0", "--eval-every", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted 25-step run that the stopped-and-resumed runs must equal."""
    folder = tmp_path_factory.mktemp("straight")
    config = str(folder / "tiny.json")
    with open(config, "w") as f:
        json.dump(TINY, f)
    run = str(folder / "run")
    assert train_lib.main(_args(data, run, config, "--steps", "25", *EXACT)) == 0
    return run


def test_resume_equals_uninterrupted_run(data, head_config_file, straight, tmp_path):
    """The default model, with the repeat head (whose history, session starts and chunk
    context ride in the state cache): resumed, it equals the uninterrupted run."""
    config_file = head_config_file
    resumed = str(tmp_path / "resumed")
    exact = EXACT
    # an interrupted run (stopped by the time limit right after its first steps) ...
    assert train_lib.main(_args(data, resumed, config_file, "--steps", "25", "--max-minutes",
                                "0.0001", *exact)) == 0
    with open(os.path.join(resumed, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped_by"] == "time" and 0 < summary["steps"] < 25
    # ... rerun with the same command continues with the next batch, cache and Adam state.
    assert train_lib.main(_args(data, resumed, config_file, "--steps", "25", *exact)) == 0
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # and the two processes' logs read as the one curve of the uninterrupted run
    for x, y in zip(train_lib.read_scalars(straight, "loss"), train_lib.read_scalars(resumed, "loss")):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    # the summary's events are every step's, however many processes trained them (each
    # process's first step, which traces, is left out of the rate only; audit)
    summaries = []
    for run in (straight, resumed):
        with open(os.path.join(run, "train_summary.json")) as f:
            summaries.append(json.load(f))
    assert summaries[0]["events"] == summaries[1]["events"] > 0


def test_progress_goes_to_stderr_and_counts_this_processes_steps(data, config_file, tmp_path,
                                                                 capsys):
    """The bar (here a log file's: a line now and then) is on stderr, stdout holds the
    summary JSON alone; a resumed run's bar counts its own steps, so its time estimate
    (elapsed / steps done x steps left) is not diluted by the steps of earlier processes."""
    run = str(tmp_path / "bar")
    args = ["--data", data, "--model-dir", run, "--config", config_file, "--eval-every", "0"]
    assert train_lib.main(args + ["--steps", "10"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and json.loads(out)["steps"] == 10
    assert re.search(r"\b10/10 \[", err)
    assert train_lib.main(args + ["--steps", "25"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and json.loads(out)["steps"] == 25
    assert re.search(r"\b15/15 \[", err) and not re.search(r"/25 \[", err)


def test_nan_loss_stops_and_keeps_last_checkpoint(data, config_file, tmp_path, capsys,
                                                  monkeypatch):
    run = str(tmp_path / "nan")
    # (a rate that diverges: refused by the config's check, lifted here)
    monkeypatch.setattr(config_lib, "MAX_LEARNING_RATE", float("inf"))
    assert train_lib.main(_args(data, run, config_file, "--steps", "10")) == 0
    before = _weights(run)
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "40", "--learning-rate", "1e30")) == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "the last good checkpoint in" in err
    for a, b in zip(before, _weights(run)):
        np.testing.assert_array_equal(a, b)
    # a run that diverges before its first checkpoint does not claim one
    fresh = str(tmp_path / "nan-fresh")
    assert train_lib.main(_args(data, fresh, config_file, "--steps", "40", "--learning-rate",
                                "1e30")) == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "no checkpoint was written yet" in err


def _interrupt_at(monkeypatch, at: int):
    """A Ctrl-C that lands at step `at`, after the step and before its bookkeeping (the
    loss is logged every 10 steps); returns the real `_scalar`."""
    real = train_lib._scalar

    def interrupted(name, value, step):
        if step == at:
            raise KeyboardInterrupt
        real(name, value, step)

    monkeypatch.setattr(train_lib, "_scalar", interrupted)
    return real


def test_an_interrupt_saves_a_checkpoint_and_the_rerun_is_exact(data, head_config_file, straight,
                                                                tmp_path, monkeypatch, capsys):
    """The default model, with the repeat head. Ctrl-C (or SIGTERM, which `main` turns into
    the same) lands at step 10 between the step and its bookkeeping: the checkpoint still
    holds the position after batch 10."""
    config_file = head_config_file
    resumed = str(tmp_path / "resumed")
    exact = EXACT
    real = _interrupt_at(monkeypatch, 10)
    assert train_lib.main(_args(data, resumed, config_file, "--steps", "25", *exact)) == 130
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "interrupted"
    assert "interrupted at step 10: saving a checkpoint" in err
    assert tf.train.latest_checkpoint(os.path.join(resumed, "checkpoints")).endswith("ckpt-10")
    # evaluating or exporting it meanwhile says that its training did not finish
    from model import registry
    note = registry.training_note(resumed)
    assert "its training was interrupted at step 10" in note and "no best-on-valid" in note
    # a finished run that never evaluates on valid (--eval-every 0) uses its last weights
    assert registry.training_note(straight) is None
    monkeypatch.setattr(train_lib, "_scalar", real)
    assert train_lib.main(_args(data, resumed, config_file, "--steps", "25", *exact)) == 0
    assert registry.training_note(resumed) is None
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_stop_signal_as_a_step_returns_counts_that_step(data, config_file, tmp_path,
                                                        monkeypatch, capsys):
    """SIGTERM (or Ctrl-C) handled as a traced step returns, before the loop has its
    results: the run stops after counting it, its events, loss and logged scalar in the
    summary (training soak: the KeyboardInterrupt raised there lost them, and an
    interrupted run's events came out a batch short for good)."""
    real = train_lib.make_train_step
    returned = []

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def stepped(batches):
            loss, n = step(batches)
            returned.append((float(loss.numpy()), int(n.numpy())))
            if len(returned) == 10:  # the signal lands here, as the step returns
                signal.raise_signal(signal.SIGTERM)
            return loss, n
        return stepped

    monkeypatch.setattr(train_lib, "make_train_step", make)
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "25", *EXACT)) == 130
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "interrupted" and summary["steps"] == len(returned) == 10
    assert summary["events"] == sum(n for _, n in returned)
    assert summary["final_loss"] == pytest.approx(returned[-1][0])
    steps, _ = train_lib.read_scalars(run, "loss")
    assert steps[-1] == 10


def test_a_stop_signal_whose_interrupt_python_dropped_still_stops_the_run(
        data, config_file, tmp_path, monkeypatch, capsys):
    """The handler's KeyboardInterrupt, raised while Python ran a finalizer (a `__del__`),
    is printed and dropped: the run went on to its last step, every later stop signal only
    noted. The loop stops at the next step with a checkpoint, as on any stop."""
    class Finalized:
        def __del__(self):  # the signal lands here: Python drops what it raises
            train_lib._interrupt(signal.SIGTERM, None)

    def dropping_at(function, at):
        def dropping(*args, **kwargs):
            if any(type(a) is int and a == at for a in (*args, *kwargs.values())):  # step
                Finalized()  # (made and finalized at once)
            return function(*args, **kwargs)
        return dropping

    unraisable = []  # what Python hands the hook (it prints "Exception ignored" and a traceback)
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    # (in the step's checkpoint: a stop while a step is counted raises nothing, see
    # test_a_stop_signal_as_a_step_returns_counts_that_step)
    real = batching.QueueBatcher.position_after
    monkeypatch.setattr(batching.QueueBatcher, "position_after", dropping_at(real, 9))
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "25", *EXACT)) == 130
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "interrupted"
    assert "interrupted at step 10: no step since the last checkpoint" in err  # (every 5)
    assert not [e for e in unraisable if isinstance(e, KeyboardInterrupt)]  # (not printed
    # as "Exception ignored" with a traceback)
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-10")
    # the next run in this process starts without it
    monkeypatch.setattr(batching.QueueBatcher, "position_after", real)
    assert train_lib.main(_args(data, run, config_file, "--steps", "25", *EXACT)) == 0
    # dropped in the last valid evaluation: stopped there, as an interrupt that is not
    # dropped stops it (no summary: the rerun evaluates again)
    monkeypatch.setattr(train_lib, "_log_valid", dropping_at(train_lib._log_valid, 30))
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        train_lib.main(_args(data, run, config_file, "--steps", "30", "--eval-every", "7",
                             "--dropout", "0"))
    assert not os.path.exists(os.path.join(run, "train_summary.json"))
    assert not [e for e in unraisable if isinstance(e, KeyboardInterrupt)]


def test_changed_training_options_on_resume_are_said_recorded_and_used(data, tmp_path, capsys):
    # a constant learning rate: a variable the checkpoint holds (the step schedule is not)
    config_file = str(tmp_path / "constant.json")
    with open(config_file, "w") as f:
        json.dump({**PLAIN, "train": {**PLAIN["train"], "lr_schedule": "constant"}}, f)
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "10", "--eval-every", "0")) == 0
    capsys.readouterr()
    # after a NaN loss, say: the same run with a lower learning rate
    assert train_lib.main(_args(data, run, config_file, "--steps", "12", "--eval-every", "0",
                                "--learning-rate", "0.005")) == 0
    rates = [tf.train.load_variable(os.path.join(run, "checkpoints", f"ckpt-{n}"),
                                    "optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE")
             for n in (10, 12)]
    assert rates == [pytest.approx(0.01), pytest.approx(0.005)]  # the new rate is the one used
    assert ("resuming " + run + " at step 10 with other training options: learning_rate 0.01 "
            "-> 0.005, steps 10 -> 12; the learning rate from step 11 is 0.005 (0.01 under the "
            "earlier options)\n") in capsys.readouterr().err
    with open(os.path.join(run, train_lib.RESUMES_FILE)) as f:
        assert [json.loads(line) for line in f] == [
            {"step": 10, "changed": {"learning_rate": [0.01, 0.005], "steps": [10, 12]}}]
    with open(os.path.join(run, registry.CONFIG_FILE)) as f:
        config = f.read()
    # a command that trains nothing changes nothing
    assert train_lib.main(_args(data, run, config_file, "--steps", "12", "--seed", "7")) == 0
    assert "nothing to do" in capsys.readouterr().err
    with open(os.path.join(run, registry.CONFIG_FILE)) as f:
        assert f.read() == config
    with open(os.path.join(run, train_lib.RESUMES_FILE)) as f:
        assert len(f.readlines()) == 1


def test_a_resume_that_scores_other_valid_events_than_the_best_is_refused(data, config_file,
                                                                         tmp_path, capsys):
    """--eval-users changed on resume: the best checkpoint's figure, measured on the other
    valid sample, was compared with the new ones (an audit's 16 events' R@20 0.50 replaced
    351 events' 0.36 as the best, which export and evaluation then loaded)."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "4", "--eval-every",
                                "2")) == 0
    best = registry.read_best(run)
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", "--eval-every", "2",
                                "--eval-users", "1")) == 2
    err = capsys.readouterr().err
    assert (f"{run}: --eval-users 1 (the run's: 10000) would score other valid events than "
            f"its best checkpoint's (step {best['step']}, recall@20 {best['recall@20']:.4f} on "
            f"{best['events']:,} events), and the two figures would not compare: resume with "
            "--eval-users 10000, or train into a new --model-dir") in err, err
    assert err.count("\n") == 1 and registry.read_best(run) == best
    # the same sample: the resume trains on
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", "--eval-every",
                                "2")) == 0


def test_more_steps_on_resume_say_that_the_step_schedule_moves():
    """The step schedule decays at fractions of the run: a finished 200-step run (rate
    0.01 / 25 at its end) resumed with --steps 700 trains its next steps at 0.01 again."""
    tc = config_lib.TrainConfig(learning_rate=0.01, lr_schedule="step", lr_decay_at=(0.3, 0.6),
                                lr_decay_factor=5.0, steps=700)
    assert train_lib.rate_change(tc, {"steps": [200, 700]}, 200, 700) == (
        "; the learning rate from step 201 is 0.01 (0.0004 under the earlier options): the "
        "schedule's decay points are fractions of the run's length")
    # a change that leaves the rate where it was, or no schedule option changed: nothing
    assert train_lib.rate_change(tc, {"steps": [650, 700]}, 500, 700) == ""
    assert train_lib.rate_change(tc, {"eval_every": [10, 20]}, 200, 700) == ""
    # a run in epochs before: its length is not known here, the new rate alone
    assert train_lib.rate_change(tc, {"steps": [0, 700], "epochs": [3, 0]}, 100, 700) == (
        "; the learning rate from step 101 is 0.01: the schedule's decay points are fractions "
        "of the run's length")


def test_a_finished_epochs_run_rerun_keeps_its_summary(data, config_file, tmp_path, capsys):
    run = str(tmp_path / "epochs")
    assert train_lib.main(_args(data, run, config_file, "--epochs", "1", "--eval-every", "0")) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["steps"] > 0 and first["stopped_by"] == "epochs"
    assert train_lib.main(_args(data, run, config_file, "--epochs", "1", "--eval-every", "0")) == 0
    out, err = capsys.readouterr()
    assert "all its epochs; nothing to do" in err
    assert json.loads(out.strip().splitlines()[-1]) == first
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        assert json.load(f) == first
    # a larger --epochs goes on into the next pass (the finished flag was the checkpoint's)
    assert train_lib.main(_args(data, run, config_file, "--epochs", "2", "--eval-every", "0")) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["stopped_by"] == "epochs" and second["steps"] >= 2 * first["steps"] - 1


def test_a_resumed_run_killed_after_its_first_checkpoint_does_not_look_finished(
        data, config_file, tmp_path):
    """The earlier process's train_summary.json said the run finished at its step: kept
    beside a newer checkpoint, `model.evaluate` and `serving.export` took the killed run
    for a finished one."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "5", "--eval-every", "0")) == 0
    assert registry.training_note(run) is None
    _kill_at_checkpoint(_args(data, run, config_file, "--steps", "100000",
                              "--checkpoint-every", "5", "--eval-every", "0"), run, 10)
    assert not os.path.exists(os.path.join(run, train_lib.SUMMARY_FILE))
    assert "its training has not finished" in registry.training_note(run)


def _kill_at_checkpoint(argv, run, step):
    """`python -m model.train ARGV` in a process, SIGKILLed once checkpoint `step` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "model.train", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = os.path.join(run, "checkpoints", f"ckpt-{step}.index")
        deadline = time.time() + 240
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.exists(marker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_killed_run_keeps_its_curve_up_to_the_last_checkpoint(data, config_file, tmp_path):
    run = str(tmp_path / "killed")
    _kill_at_checkpoint(_args(data, run, config_file, "--steps", "100000",
                              "--checkpoint-every", "20", "--eval-every", "0"), run, 20)
    steps, _ = train_lib.read_scalars(run, "loss")
    assert {10, 20} <= set(steps.tolist())


def test_sigterm_to_a_training_process_checkpoints_exits_130_and_the_same_command_resumes(
        data, config_file, tmp_path):
    """What a preempted job gets: a real SIGTERM to `python -m model.train`. It saves a
    checkpoint of the step it was at, says so, exits 130, and the same command trains the
    remaining steps from there."""
    run = str(tmp_path / "preempted")
    checkpoints = os.path.join(run, "checkpoints")
    # A checkpoint every 20 steps; the first valid evaluation, at step 25, writes the first
    # best-on-valid checkpoint: the signal comes after that, between two periodic checkpoints.
    cmd = [sys.executable, "-m", "model.train",
           *_args(data, run, config_file, "--steps", "300", "--checkpoint-every", "20",
                  "--eval-every", "25", "--patience", "0")]
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
    try:
        marker = os.path.join(run, registry.BEST_DIR, "ckpt-25.index")
        deadline = time.monotonic() + 240
        while not os.path.exists(marker):
            if proc.poll() is not None:
                pytest.fail(f"model.train exited ({proc.returncode}) before step 25:\n"
                            + err_path.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("model.train wrote no step-25 checkpoint within 240 s:\n"
                            + err_path.read_text()[-3000:])
            time.sleep(0.01)
        assert os.path.exists(os.path.join(checkpoints, "ckpt-20.index"))  # the first one
        proc.send_signal(signal.SIGTERM)
        # once it is taken (two pending at once run SIGINT's handler first, by number: the
        # run then ended as killed by SIGINT, 2 of 22 times)
        deadline = time.monotonic() + 60
        while "interrupted at step" not in err_path.read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        for again in (signal.SIGINT, signal.SIGTERM):  # a scheduler's or an impatient user's
            proc.send_signal(again)
            time.sleep(0.02)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    assert returncode == 130, err[-3000:]
    summary = json.loads(out_path.read_text().strip().splitlines()[-1])
    step = summary["steps"]
    assert summary["stopped_by"] == "interrupted" and summary["steps_this_run"] == step >= 25
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        assert json.load(f) == summary
    assert f"interrupted at step {step}: " in err and "Traceback" not in err
    # the checkpoint beyond the first holds the step it stopped at: saved by the stop
    # (unless the signal landed right after a periodic checkpoint of that very step)
    assert tf.train.latest_checkpoint(checkpoints).endswith(f"ckpt-{step}")
    if step % 20:
        assert "saving a checkpoint; the same command resumes from it" in err
    assert f"its training was interrupted at step {step}" in registry.training_note(run)
    # the same command again: the remaining steps, from the checkpoint
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"steps {step + 1}-300" in rerun.stderr  # resumed, not started over
    final = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert final["stopped_by"] == "steps" and final["steps"] == 300
    assert final["steps_this_run"] == 300 - step
    assert tf.train.latest_checkpoint(checkpoints).endswith("ckpt-300")
    assert registry.training_note(run) is None


@pytest.mark.parametrize("nohup", [False, True])
def test_a_closed_terminal_stops_with_a_checkpoint_unless_nohup(data, config_file, tmp_path,
                                                                nohup):
    """SIGHUP (an ssh session dropped) killed the run with every step since the last
    checkpoint lost (audit): it stops as Ctrl-C does, with a checkpoint and status 130;
    under nohup (SIGHUP ignored) it trains on."""
    run = str(tmp_path / "run")
    steps = "40" if nohup else "100000"
    cmd = [sys.executable, "-m", "model.train",
           *_args(data, run, config_file, "--steps", steps, "--eval-every", "0",
                  "--checkpoint-every", "100000")]
    hangup = signal.SIG_IGN if nohup else signal.SIG_DFL
    err_path = tmp_path / "err.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup))
    try:
        deadline = time.monotonic() + 240
        # (the config is recorded once a step is trained)
        while not os.path.exists(os.path.join(run, "config.json")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(err_path.read_text()[-3000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    if nohup:
        assert proc.returncode == 0 and summary["steps"] == 40, err_path.read_text()[-3000:]
        return
    assert proc.returncode == 130, err_path.read_text()[-3000:]
    assert summary["stopped_by"] == "interrupted" and summary["steps"] > 0
    latest = tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))
    assert latest.endswith(f"ckpt-{summary['steps']}")


def test_a_stop_with_the_outputs_reader_gone_still_checkpoints(data, config_file, tmp_path):
    """`model.train ... 2>&1 | tee log` stopped by Ctrl-C (or a scheduler's SIGTERM to the
    job): tee dies with it, and the stop path's first line meets a closed pipe. It used to
    end there in a BrokenPipeError (exit 1, every step since the last checkpoint lost);
    the output is dropped instead and the checkpoint written (exit 130). (SIGTERM here: a
    test worker may run its children with SIGINT ignored, as a background job does.)"""
    run = str(tmp_path / "teed")
    checkpoints = os.path.join(run, "checkpoints")
    cmd = [sys.executable, "-m", "model.train",
           *_args(data, run, config_file, "--steps", "300", "--checkpoint-every", "20",
                  "--eval-every", "25", "--patience", "0")]
    read, write = os.pipe()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=write, stderr=write)
    os.close(write)
    os.set_blocking(read, False)
    said = []
    try:
        marker = os.path.join(run, registry.BEST_DIR, "ckpt-25.index")
        deadline = time.monotonic() + 240
        while not os.path.exists(marker):
            try:  # (drained as tee would: the pipe never fills)
                said.append(os.read(read, 65536))
            except BlockingIOError:
                pass
            assert proc.poll() is None, b"".join(said)[-3000:]
            assert time.monotonic() < deadline, b"".join(said)[-3000:]
            time.sleep(0.01)
        os.close(read)  # tee is gone: every write from now on meets a closed pipe
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 130
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["stopped_by"] == "interrupted" and summary["steps"] >= 25
    assert tf.train.latest_checkpoint(checkpoints).endswith(f"ckpt-{summary['steps']}")


def test_an_interrupt_before_the_first_step_or_with_evaluations_due(data, config_file, tmp_path,
                                                                    monkeypatch, capsys):
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "10", "--eval-every", "0")) == 0
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        before = f.read()
    capsys.readouterr()

    def waiting_for_the_first_batch(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    real = train_lib.batching.make_dataset
    monkeypatch.setattr(train_lib.batching, "make_dataset", waiting_for_the_first_batch)
    assert train_lib.main(_args(data, run, config_file, "--steps", "20", "--eval-every", "0")) == 130
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == {
        "model": "hiertcn", "steps": 10, "steps_this_run": 0, "stopped_by": "interrupted"}
    assert "nothing to do" not in err
    assert "interrupted at step 10: no step since the last checkpoint, nothing to save" in err
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        assert f.read() == before  # nothing trained, nothing written
    monkeypatch.setattr(train_lib.batching, "make_dataset", real)
    # an interrupt with a valid evaluation due at the end: it is skipped (a stop signal's
    # grace period is short), the checkpoint is not
    _interrupt_at(monkeypatch, 20)
    assert train_lib.main(_args(data, run, config_file, "--steps", "50", "--eval-every", "15")) == 130
    err = capsys.readouterr().err
    assert "step 15: valid recall@20" in err and "step 20: valid" not in err
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-20")


def test_a_checkpoint_another_version_of_the_model_wrote_is_one_line(data, config_file, tmp_path,
                                                                      capsys, monkeypatch):
    """A run folder whose checkpoint holds other variables than this code's model (here:
    the training cache grew a tensor, as GRU4Rec's did when it learned to continue a
    chunked session) is refused with one line, not TensorFlow's assertion and a warning
    per checkpoint value."""
    run = str(tmp_path / "old")
    assert train_lib.main(_args(data, run, config_file, "--steps", "2", *EXACT)) == 0
    capsys.readouterr()
    model_class = registry.MODELS["hiertcn"]
    grown = model_class.train_cache
    monkeypatch.setattr(model_class, "train_cache",
                        lambda self, b: (*grown(self, b), tf.zeros([b], tf.int64)))
    assert train_lib.main(_args(data, run, config_file, "--steps", "4", *EXACT)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "its checkpoint does not match the hiertcn model this code builds" in err


def test_an_evaluation_lost_after_its_checkpoint_is_done_on_resume(data, config_file, tmp_path,
                                                                   monkeypatch, capsys):
    """The disk fills while the step-10 evaluation writes its best checkpoint, after the
    step-10 checkpoint was saved: one line, exit 1; the rerun evaluates step 10 before
    training on, so it selects the same best step as a run that never failed."""
    import errno

    args = ("--steps", "20", "--eval-every", "10", *EXACT[:2])
    straight_run = str(tmp_path / "straight")
    assert train_lib.main(_args(data, straight_run, config_file, *args)) == 0
    run = str(tmp_path / "failed")
    real = train_lib._log_valid

    def full_disk_at_10(model, data_dir, user_ids, step, *rest, **named):
        if step == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, data_dir, user_ids, step, *rest, **named)

    monkeypatch.setattr(train_lib, "_log_valid", full_disk_at_10)
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, *args)) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write to {run}: No space left on device; it keeps its last " \
           "complete checkpoint" in err and "Traceback" not in err
    monkeypatch.setattr(train_lib, "_log_valid", real)
    assert train_lib.main(_args(data, run, config_file, *args)) == 0
    assert "step 10: valid recall@20" in capsys.readouterr().err
    assert train_lib.read_scalars(run, "valid/recall@20")[0].tolist() == [10, 20]
    assert registry.read_best(run)["step"] == registry.read_best(straight_run)["step"]
    assert registry.read_best(run)["recall@20"] == registry.read_best(straight_run)["recall@20"]


def test_a_lost_or_stale_summary_of_a_finished_run_is_written_again(data, config_file, tmp_path,
                                                                    capsys):
    """A finished run whose train_summary.json was not written (a full disk, a kill right
    before it), is an earlier interrupted process's, or is damaged: the rerun writes the
    summary of the finished run (model.compare reads it) instead of returning what is
    there."""
    from model import evaluate

    run = str(tmp_path / "run")
    args = ("--steps", "20", "--eval-every", "10", *EXACT[:2])
    assert train_lib.main(_args(data, run, config_file, *args)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = os.path.join(run, train_lib.SUMMARY_FILE)
    for damage in ("remove", "interrupted", "not JSON", "not a record"):
        if damage == "remove":
            os.remove(path)
        elif damage == "interrupted":
            with open(path, "w") as f:
                json.dump({"model": "hiertcn", "steps": 5, "stopped_by": "interrupted"}, f)
        else:  # (a JSONDecodeError or AttributeError traceback)
            with open(path, "w") as f:
                f.write('{"steps": 2' if damage == "not JSON" else "[20]")
            assert evaluate.main(["--data", data, "--split", "valid", "--model-dir", run,
                                  "--no-progress"]) == 0
            assert (f"note: {run}: its train_summary.json cannot be read: whether its "
                    "training finished is unknown") in capsys.readouterr().err
        assert train_lib.main(_args(data, run, config_file, *args)) == 0
        out, err = capsys.readouterr()
        assert "nothing to do" not in err
        with open(path) as f:
            summary = json.load(f)
        assert summary == json.loads(out.strip().splitlines()[-1])
        assert summary["steps"] == 20 and summary["stopped_by"] == "steps"
        assert summary["steps_this_run"] == 0 and summary["best"] == first["best"]
        assert summary["valid"] == first["valid"]  # the last evaluation, done again
        # the last step's loss, from the checkpoint (it was null: no step in this process)
        assert summary["final_loss"] == first["final_loss"] is not None
    # and now the run is whole: nothing to do
    assert train_lib.main(_args(data, run, config_file, *args)) == 0
    assert "already holds 20 steps; nothing to do" in capsys.readouterr().err


def test_signals_after_the_first_stop_are_noted_and_ignored(capsys):
    """The first Ctrl-C or SIGTERM stops training (KeyboardInterrupt); the ones that follow,
    while the checkpoint is written, no longer raise (they used to abort the save)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, train_lib._interrupt)
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handlers run here: nothing raises
        assert capsys.readouterr().err.count("already stopping: the checkpoint is being "
                                             "written") == 2
        # a later run in the same process takes them back from `_already_stopping` (it
        # stops on a Ctrl-C again); as a library call it gives back what it found
        args = ["--data", "/nonexistent", "--model-dir", "/nonexistent"]
        assert train_lib.main(args) == 2
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) \
            is train_lib._already_stopping
        assert train_lib.main(args, restore_signals=False) == 2
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) \
            is train_lib._interrupt
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_the_unraisable_hook_is_the_main_thread_s_and_given_back(monkeypatch):
    """`main` keeps a dropped stop's KeyboardInterrupt off stderr with its own
    `sys.unraisablehook` only where stop signals are handled, the main thread, and gives
    the hook back (a run in a thread, overlapping another, left it in place for good)."""
    import threading

    before = sys.unraisablehook
    during = []
    monkeypatch.setattr(train_lib, "_main",
                        lambda args, command=False: during.append(sys.unraisablehook) or 2)
    args = ["--data", "/nonexistent", "--model-dir", "/nonexistent"]
    assert train_lib.main(args) == 2
    thread = threading.Thread(target=train_lib.main, args=(args,))
    thread.start()
    thread.join()
    assert during == [train_lib._lost_interrupts_unsaid, before]
    assert sys.unraisablehook is before


def test_a_run_resumed_with_fewer_epochs_than_it_has_done_trains_nothing(
        data, config_file, tmp_path, capsys):
    """A run of 200 steps (more than two passes over the tiny train split) resumed with
    `--epochs 2`: nothing to do, nothing written (it used to train on to the end of the
    pass under way, `steps 201-N` with N < 201, and rewrite the run)."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "200", "--eval-every", "0")) == 0
    position = json.loads(tf.train.load_checkpoint(os.path.join(run, "checkpoints", "ckpt-200"))
                          .get_tensor("train_state/position/.ATTRIBUTES/VARIABLE_VALUE"))
    assert position["epoch"] > 2 or (position["epoch"] == 2 and position["consumed"] > 0)
    before = {name: os.path.getmtime(os.path.join(root, name))
              for root, _, names in os.walk(run) for name in names}
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--epochs", "2", "--eval-every", "0")) == 0
    out, err = capsys.readouterr()
    assert "already holds 200 steps, more than --epochs 2; nothing to do" in err, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 200
    assert {name: os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(run) for name in names} == before


def test_a_resumed_run_s_time_limit_and_figures_are_the_whole_run_s(data, config_file, tmp_path,
                                                                    capsys):
    """--max-minutes bounds the run, not each process (a `model.compare --budget-minutes`
    run interrupted and resumed got a whole new budget); `seconds`, `events` and
    `events_per_s` of train_summary.json are the run's, `seconds_this_run` this process's."""
    run = str(tmp_path / "run")
    summary_file = os.path.join(run, "train_summary.json")
    assert train_lib.main(_args(data, run, config_file, "--steps", "100", *EXACT)) == 0
    with open(summary_file) as f:
        first = json.load(f)
    assert first["seconds"] == first["seconds_this_run"] and first["events"] > 0
    assert first["eval_seconds_this_run"] == 0  # (--eval-every 0)
    assert first["wall_seconds_this_run"] >= first["seconds_this_run"]
    # resumed for many more steps with a limit the first process has used up: nothing to
    # do (each rerun trained one more step), nothing written
    spent = f"{first['seconds'] * 0.9 / 60:.6f}"
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "100000", "--max-minutes",
                                spent, *EXACT)) == 0
    assert (f"already holds 100 steps, trained for its --max-minutes {float(spent):g}; nothing "
            "to do") in capsys.readouterr().err
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-100")
    # with 2 ms of the limit left: it trains one step (the limit is checked after each)
    # and stops
    limit = f"{(first['seconds'] + 0.002) / 60:.6f}"
    assert train_lib.main(_args(data, run, config_file, "--steps", "100000", "--max-minutes",
                                limit, *EXACT)) == 0
    with open(summary_file) as f:
        second = json.load(f)
    assert second["stopped_by"] == "time" and second["steps"] == 101
    # the stop is said on stderr, as an early stop is (the bar's last line in a log file
    # can be 30 s old and shows the time left to --steps)
    # (and how far it got: a capped audit run said "about 6.9 epochs" at its start and
    # trained 0.52)
    assert re.search(rf"^stopping at step 101: --max-minutes {float(limit):g} reached \(\d+ s of "
                     r"training, about [\d.,]+ epochs of the train split\); the latest weights "
                     r"are checkpointed, a larger --max-minutes trains on$",
                     capsys.readouterr().err, re.M)
    # (what a checkpoint records is what its process's summary said: exact, however long
    # the last save took; 3 decimals each)
    assert second["seconds"] == pytest.approx(first["seconds"] + second["seconds_this_run"],
                                              abs=0.002)
    # (a process's first step, which traces, is not in the rate: the one step adds its
    # events, not its time)
    assert second["events"] > first["events"] and second["events_per_s"] == first["events_per_s"]


def test_a_run_folder_another_process_trains_is_refused(data, config_file, tmp_path, capsys):
    """A second `model.train` into a folder that one is training would train beside it and
    overwrite its checkpoints: refused in one line while the first holds its lock (the
    flock of another process's descriptor on the folder, as the first process holds it);
    nothing is written into the folder for it."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train_lib.main(_args(data, str(run), config_file, "--steps", "2", *EXACT)) == 2
        err = capsys.readouterr().err
        # (the holder named, as /proc/locks names it; concurrency audit)
        assert err == (f"error: {run} is being trained by another process (process "
                       f"{os.getpid()}): wait for it to end, or pass another --model-dir\n")
        assert os.listdir(run) == []
    finally:
        os.close(fd)
    assert train_lib.main(_args(data, str(run), config_file, "--steps", "2", *EXACT)) == 0
    # the lock goes with the run: a second run into the folder in this process trains
    assert train_lib.main(_args(data, str(run), config_file, "--steps", "3", *EXACT)) == 0


def test_a_run_folder_under_a_link_to_nothing_is_refused_in_one_line(data, config_file,
                                                                     tmp_path, capsys):
    """--model-dir LINK/run with LINK pointing nowhere: makedirs's FileNotFoundError was a
    traceback (audit); LINK itself was already said."""
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "x")
    run = tmp_path / "link" / "run"
    assert train_lib.main(_args(data, str(run), config_file, "--steps", "2", *EXACT)) == 2
    assert capsys.readouterr().err == (f"error: cannot create the run folder {run}: "
                                       f"{tmp_path / 'link'} is a link to nothing\n")


def test_a_best_checkpoint_without_its_training_is_discarded(data, config_file, tmp_path, capsys):
    """A run whose first training checkpoint never completed (a full disk at its save) or
    whose checkpoints were deleted keeps a best/ of training that is gone: the rerun starts
    from step 0, so that best is discarded, not shipped as this run's; a save's leftover
    PREFIX_temp folder goes too."""
    run = str(tmp_path / "run")
    args = _args(data, run, config_file, "--steps", "4", "--eval-every", "2", "--dropout", "0")
    assert train_lib.main(args) == 0
    assert registry.read_best(run)["step"] in (2, 4)
    ckpts = os.path.join(run, registry.CHECKPOINT_DIR)
    for name in os.listdir(ckpts):
        os.remove(os.path.join(ckpts, name))
    os.makedirs(os.path.join(ckpts, "ckpt-9_temp"))
    capsys.readouterr()
    assert train_lib.main(args) == 0
    err = capsys.readouterr().err
    assert "holds a best checkpoint of step" in err and "the run starts from step 0" in err
    assert not os.path.exists(os.path.join(ckpts, "ckpt-9_temp"))
    summary = json.load(open(os.path.join(run, "train_summary.json")))
    assert summary["steps"] == 4 and registry.read_best(run)["step"] in (2, 4)
    assert 0 < summary["eval_seconds_this_run"] < summary["wall_seconds_this_run"]


def test_a_best_record_naming_a_deleted_checkpoint_is_discarded_and_chosen_again(
        data, config_file, tmp_path, capsys):
    """best/ keeps two checkpoints: a kill after a newer best's save (which deletes the
    oldest) and before best.json names it, twice, leaves best.json naming a deleted one.
    The rerun says so, drops the record and chooses again at its next evaluation."""
    run = str(tmp_path / "run")
    args = _args(data, run, config_file, "--eval-every", "2", "--dropout", "0")
    assert train_lib.main([*args, "--steps", "4"]) == 0
    best_file = os.path.join(run, registry.BEST_DIR, registry.BEST_FILE)
    record = registry.read_best(run)
    with open(best_file, "w") as f:
        json.dump({**record, "checkpoint": "ckpt-1"}, f)
    capsys.readouterr()
    assert train_lib.main([*args, "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "best.json names checkpoint ckpt-1 of step" in err and "chooses the best again" in err
    best = registry.read_best(run)
    assert best["step"] == 6
    assert os.path.exists(os.path.join(run, registry.BEST_DIR, best["checkpoint"] + ".index"))


def test_a_full_disk_at_the_first_checkpoint_says_nothing_was_kept(data, config_file, tmp_path):
    """A write past the file size limit fails as on a full disk (EFBIG for ENOSPC): at the
    first checkpoint no checkpoint is complete, and the message says so instead of
    promising a resume; the half-written save is removed."""
    from tiny_logs import file_size_limited

    run = str(tmp_path / "run")
    proc = subprocess.run(file_size_limited(64 << 10, [
                              sys.executable, "-m", "model.train",
                              *_args(data, run, config_file, "--steps", "3", *EXACT)]),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write to {run}: ") and last.endswith(
        "no checkpoint was complete, so any steps trained are lost: make room and rerun the "
        "same command to start again"), last
    ckpts = os.path.join(run, registry.CHECKPOINT_DIR)
    assert not [n for n in os.listdir(ckpts) if n.endswith("_temp")]
    assert tf.train.latest_checkpoint(ckpts) is None


def test_a_full_disk_after_the_best_copy_names_it_and_a_read_only_folder_trained_nothing(
        data, config_file, tmp_path, read_only_mount, capsys):
    """The storage failure's line where the best-on-valid copy was saved and no training
    checkpoint was (the disk filled between them): it names best/'s step, which evaluate
    and export read, not "any steps trained are lost"; a run folder on a read-only file
    system says that nothing could be written there."""
    import argparse
    import errno

    run = tmp_path / "run"
    (run / registry.BEST_DIR).mkdir(parents=True)
    (run / registry.BEST_DIR / registry.BEST_FILE).write_text(json.dumps(
        {"step": 10, "checkpoint": "ckpt-1", "recall@20": 0.1, "mrr@20": 0.05}))
    args = argparse.Namespace(model_dir=str(run))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert train_lib._storage_failure(args, full) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write to {run}: No space left on device; no training checkpoint was "
        "complete, so a rerun of the same command starts again from step 0 (make room "
        "first); until then best/ holds the best-on-valid weights of step 10, which "
        "model.evaluate and serving.export read\n")
    mnt, remount_read_only = read_only_mount
    remount_read_only()
    assert train_lib.main(_args(data, str(mnt / "run"), config_file, "--steps", "3",
                                *EXACT)) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "Read-only file system; nothing could be written there: make it writable and rerun "
        "the same command")


def test_a_run_of_an_older_version_is_read_as_it_was_trained(data, config_file, tmp_path,
                                                              capsys):
    """A run saved before model.exclude_current existed (config.json without it, trained
    without ruling out the current item) is evaluated, exported and resumed with it off:
    this version's default (on) scored it as another model, and its resume was refused
    with "None -> True", which no option gives. A model option the loader cannot date is
    named in a note, and the resume says to add it to config.json."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "3", "--keep-current",
                                *EXACT)) == 0
    path = os.path.join(run, registry.CONFIG_FILE)
    saved = json.loads(open(path).read())
    assert saved["model"].pop("exclude_current") is False
    with open(path, "w") as f:
        json.dump(saved, f)
    model, _, _ = registry.load_model(run)
    assert model.config.exclude_current is False
    assert registry.older_config_note(run) is None
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "5", "--keep-current",
                                *EXACT)) == 0
    # an option without a date in the loader: named, and the resume says what to do
    saved = json.loads(open(path).read())
    saved["model"].pop("session_summary")
    with open(path, "w") as f:
        json.dump(saved, f)
    note = registry.older_config_note(run)
    assert note.startswith(f"note: {run}: its config.json, an older version's, lacks") and \
        "(session_summary = False)" in note, note
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "7", "--keep-current",
                                *EXACT)) == 2
    err = capsys.readouterr().err
    assert "holds a run of an older version: its config.json lacks the model option(s) " \
           "model.session_summary, added since; add each" in err, err


def test_a_checkpoint_without_training_totals_takes_them_from_the_runs_summary(
        data, config_file, tmp_path, monkeypatch, capsys):
    """A checkpoint of a version before 2026-12-03 records no totals (`TRAINED`, here read
    under another key): the resumed run's events and seconds are the whole run's, from the
    summary of the run that ended at that step (they counted the resuming process alone);
    without such a summary a note says so."""
    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "3", *EXACT)) == 0
    first = json.loads(open(os.path.join(run, train_lib.SUMMARY_FILE)).read())
    monkeypatch.setattr(train_lib, "TRAINED", "not-recorded-then")
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, "--steps", "5", *EXACT)) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["steps_this_run"] == 2
    this_run = resumed["events"] - first["events"]
    assert 0 < this_run < first["events"] and resumed["seconds"] > first["seconds"]
    os.remove(os.path.join(run, train_lib.SUMMARY_FILE))
    monkeypatch.setattr(train_lib, "TRAINED", "not-recorded-either")
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", *EXACT)) == 0
    assert (f"note: {run}'s checkpoint of step 5 (an older version's) records no training "
            "totals") in capsys.readouterr().err


def test_an_interrupt_while_the_best_is_recorded_leaves_that_evaluation_due(
        data, config_file, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM lands while the step-15 evaluation (not a checkpoint step) records
    its best (after its best checkpoint, before best.json): the stop's checkpoint leaves
    that evaluation due, so the rerun evaluates step 15 again and its selection is not lost."""
    args = ("--steps", "25", "--eval-every", "15", *EXACT[:2])
    straight_run = str(tmp_path / "straight")
    assert train_lib.main(_args(data, straight_run, config_file, *args)) == 0
    run = str(tmp_path / "interrupted")
    real = train_lib.write_json

    def interrupted_at_best(path, obj, *rest, **named):
        if path.endswith(registry.BEST_FILE) and obj["step"] == 15:
            raise KeyboardInterrupt
        real(path, obj, *rest, **named)

    monkeypatch.setattr(train_lib, "write_json", interrupted_at_best)
    assert train_lib.main(_args(data, run, config_file, *args)) == 130
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-15")
    monkeypatch.setattr(train_lib, "write_json", real)
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, *args)) == 0
    assert "step 15: valid recall@20" in capsys.readouterr().err
    assert registry.read_best(run)["step"] == registry.read_best(straight_run)["step"]
    assert registry.read_best(run)["recall@20"] == registry.read_best(straight_run)["recall@20"]


def test_a_stop_signal_during_the_last_save_still_saves_it(data, config_file, tmp_path,
                                                           monkeypatch, capsys):
    """SIGTERM lands while the run's last checkpoint (step 25, after the loop: not a
    periodic one) is written: it is written all the same, the run says it was interrupted
    and exits 130, and the rerun has nothing left to train."""
    run = str(tmp_path / "run")
    real = tf.train.CheckpointManager.save
    signals = []

    def signal_during_save(self, checkpoint_number=None, **named):
        if checkpoint_number == 25 and not signals:
            signals.append(checkpoint_number)
            train_lib._interrupt(signal.SIGTERM, None)  # what the handler does
        return real(self, checkpoint_number=checkpoint_number, **named)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", signal_during_save)
    args = ("--steps", "25", *EXACT)
    assert train_lib.main(_args(data, run, config_file, *args)) == 130
    assert signals == [25]
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("ckpt-25")
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        assert json.load(f)["stopped_by"] == "interrupted"
    capsys.readouterr()
    assert train_lib.main(_args(data, run, config_file, *args)) == 0
    with open(os.path.join(run, train_lib.SUMMARY_FILE)) as f:
        assert json.load(f)["steps"] == 25


def test_a_stop_signal_after_the_summary_leaves_the_finished_status(data, config_file,
                                                                     tmp_path):
    """A scheduler's SIGTERM (or a Ctrl-C) that lands after the run has printed its summary,
    during the interpreter's shutdown, made a finished run exit as killed by it (-15, -2):
    read as interrupted, though a rerun has nothing to do. And the shutdown, where a
    clean-up can hang (a tf.data thread that wants the GIL; here an object whose finalizer
    blocks), is skipped: the finished run exits at once."""
    stuck_at_teardown = (
        "import runpy, sys, time, types\n"
        "class Stuck:\n    def __del__(self):\n        time.sleep(600)\n"
        "holder = types.ModuleType('holder')\nholder.stuck = Stuck()\n"
        "sys.modules['holder'] = holder\n"
        "sys.argv = ['model.train', *sys.argv[1:]]\n"
        "runpy.run_module('model.train', run_name='__main__', alter_sys=True)\n")
    cmd = [sys.executable, "-c", stuck_at_teardown,
           *_args(data, str(tmp_path / "run"), config_file, "--steps", "2", "--eval-every", "0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("{"):  # the summary
                # (SIGTERM: pytest-xdist's workers start their children with SIGINT ignored)
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert json.loads(line)["stopped_by"] == "steps"
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]


def test_a_stop_signal_inside_tensorflows_set_up_calls_is_the_one_line_interrupt(
        data, config_file, tmp_path, monkeypatch, capsys):
    """A SIGTERM during the set-up (tf.data, the first traces), raised inside a TensorFlow
    call, can come out as another error with the interrupt as its context (a SystemError,
    a ValueError): a 40-line traceback and exit 1 where a stop is one line and 130."""
    def set_up(args, command=False):  # what such a signal leaves: not reproducible at will
        try:
            raise KeyboardInterrupt("signal 15")
        except KeyboardInterrupt:
            raise SystemError("<built-in method> returned a result with an exception set")

    monkeypatch.setattr(train_lib, "_main", set_up)
    assert train_lib.main(_args(data, str(tmp_path / "run"), config_file)) == 130
    assert capsys.readouterr().err == train_lib.INTERRUPTED + "\n"

    def failing(args, command=False):  # any other error is not taken for an interrupt
        raise SystemError("a real one")

    monkeypatch.setattr(train_lib, "_main", failing)
    with pytest.raises(SystemError, match="a real one"):
        train_lib.main(_args(data, str(tmp_path / "run"), config_file))


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler of its own for `signum` (Linux's /proc)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command, message", [
    ("model.train", train_lib.INTERRUPTED),
    ("model.evaluate", "interrupted: no metrics were written (an earlier --output is as it "
                       "was)")])
def test_a_sigterm_during_the_start_up_says_the_interrupt_line(data, config_file, tmp_path,
                                                               command, message, signame):
    """A scheduler's SIGTERM in a command's first seconds (TensorFlow's import) was a silent
    exit where Ctrl-C says what it leaves behind; evaluate had no SIGTERM handling at all.
    The status is 130 after a SIGTERM (it was a death by SIGINT, Python's end of an unhandled
    Ctrl-C), and a Ctrl-C ends the process as killed by SIGINT (evaluate's early one exited
    130, which let a shell loop go on)."""
    args = (_args(data, str(tmp_path / "run"), config_file) if command == "model.train" else
            ["--data", data, "--split", "test", "--model", "popularity", "--no-progress",
             "--output", str(tmp_path / "m.json"), "--per-user-output", str(tmp_path / "u.npz")])
    # (a terminal's Ctrl-C: pytest-xdist's workers start their children with SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", command, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not _catches(proc.pid, signal.SIGTERM):
            assert time.monotonic() < deadline, "no SIGTERM handler within 60 s"
            time.sleep(0.005)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (130 if signame == "SIGTERM" else -signal.SIGINT), err[-3000:]
    assert err.splitlines()[-1] == message, err[-3000:]
    assert "Traceback" not in err and not os.path.exists(tmp_path / "m.json")
    assert [f for f in os.listdir(tmp_path) if f.startswith("u.npz")] == []


def test_a_damaged_or_missing_checkpoint_is_one_line_in_every_command(data, config_file,
                                                                      tmp_path, capsys):
    """A truncated data file, an index that is not one, files removed by hand, or a
    config.json edited since training: `model.evaluate`, `serving.export` and a resumed
    `model.train` printed a Python traceback (a short read's IndexError, "file is too
    short to be an sstable", "Received incompatible tensor"), or said that a training run
    had removed the files while none was running (audit). Each is one line, status 2, and
    the resume changes nothing of the run before saying so."""
    import shutil

    from model import evaluate
    from serving import export

    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "10", "--eval-every", "5",
                                "--patience", "0")) == 0
    capsys.readouterr()

    def damaged(name, change):
        copy = str(tmp_path / name)
        shutil.copytree(run, copy)
        for folder in ("best", "checkpoints"):
            prefix = os.path.join(copy, folder, os.path.basename(
                registry.checkpoint_path(run, "best" if folder == "best" else "latest")))
            change(copy, prefix)
        return copy

    def truncate(_, prefix):
        with open(prefix + ".data-00000-of-00001", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".data-00000-of-00001") // 2)

    def garble_index(_, prefix):
        with open(prefix + ".index", "wb") as f:
            f.write(b"garbage\n")

    def remove(_, prefix):
        for name in os.listdir(os.path.dirname(prefix)):
            if name.startswith(os.path.basename(prefix) + "."):
                os.remove(os.path.join(os.path.dirname(prefix), name))

    def edit_config(copy, _):
        path = os.path.join(copy, registry.CONFIG_FILE)
        with open(path) as f:
            saved = json.load(f)
        saved["model"]["gru_units"] = 2 * saved["model"]["gru_units"]
        with open(path, "w") as f:
            json.dump(saved, f)

    cases = {"truncated": (truncate, "cannot be read (", "damaged or truncated"),
             "garbled index": (garble_index, "cannot be read (", "damaged or truncated"),
             "removed": (remove, "has no files (removed", "restore them, or train again"),
             "edited config": (edit_config, "does not match the hiertcn model its run's "
                               "config.json describes (", "was config.json edited")}
    for name, (change, *said) in cases.items():
        copy = damaged(name.replace(" ", "_"), change)
        before = sorted(os.listdir(copy)), sorted(os.listdir(os.path.join(copy, "best")))
        commands = {
            "evaluate": lambda: evaluate.main(["--data", data, "--split", "test",
                                               "--model-dir", copy, "--no-progress"]),
            "export": lambda: export.main(["--model-dir", copy, "--export-base",
                                           str(tmp_path / f"exports_{id(copy)}")]),
            "export latest": lambda: export.main(["--model-dir", copy, "--checkpoint", "latest",
                                                  "--export-base", str(tmp_path / "x")]),
        }
        if name != "edited config":  # (a changed option of the model is refused before)
            commands["train"] = lambda: train_lib.main(_args(data, copy, config_file,
                                                             "--steps", "20"))
        for command, call in commands.items():
            assert call() == 2, (name, command)
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if not line.startswith("note:")]
            assert len(lines) == 1 and lines[0].startswith(("error:", "python -m")), \
                (name, command, err)
            assert all(part in lines[0] for part in said), (name, command, err)
            assert "Traceback" not in err and "WARNING" not in err and "ERROR:" not in err
        assert (sorted(os.listdir(copy)), sorted(os.listdir(os.path.join(copy, "best")))) \
            == before, name


def test_a_damaged_checkpoint_state_file_is_refused_not_taken_for_a_new_run(
        data, config_file, tmp_path, capsys):
    """`checkpoints/checkpoint` (the file naming the latest checkpoint) garbled or emptied:
    a resumed training took the run for a new one, trained from step 0 and deleted the
    checkpoints it had not seen, with TensorFlow's "ParseError" and "Checkpoint ignored"
    warnings; evaluation said "no checkpoint: train first". Each is one line naming the
    newest checkpoint there, and nothing of the run changes."""
    from model import evaluate

    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "3", "--eval-every", "0")) == 0
    state_file = os.path.join(run, registry.CHECKPOINT_DIR, "checkpoint")
    said = (f"error: {state_file} is damaged (it names the latest checkpoint, and does not "
            'parse): restore it, or write the line model_checkpoint_path: "ckpt-3" into it '
            "(the newest checkpoint there)")
    for content in ("model_checkpoint_path: {{ garbled\n", ""):
        with open(state_file, "w") as f:
            f.write(content)
        capsys.readouterr()
        before = sorted(os.listdir(os.path.join(run, registry.CHECKPOINT_DIR)))
        assert train_lib.main(_args(data, run, config_file, "--steps", "6",
                                    "--eval-every", "0")) == 2
        assert capsys.readouterr().err.strip() == said
        assert sorted(os.listdir(os.path.join(run, registry.CHECKPOINT_DIR))) == before
        assert evaluate.main(["--data", data, "--split", "valid", "--model-dir", run,
                              "--no-progress"]) == 2
        assert capsys.readouterr().err.strip() == "python -m model.evaluate: " + said
    # written as the file says, the run resumes from its step 3
    with open(state_file, "w") as f:
        f.write('model_checkpoint_path: "ckpt-3"\n')
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", "--eval-every", "0")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps_this_run"] == 3


def test_a_damaged_best_record_is_one_line_in_every_command(data, config_file, tmp_path,
                                                           capsys):
    """`best/best.json` that is not JSON (or not a record) gave a JSONDecodeError traceback
    in `model.evaluate` and a resumed `model.train`, and "error: Invalid control character
    at: ..." in `serving.export`: one line naming the file and the way out, and the run
    unchanged."""
    from model import evaluate
    from serving import export

    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "6", "--eval-every", "3")) == 0
    record = os.path.join(run, registry.BEST_DIR, registry.BEST_FILE)
    for content, why in (('{"step": 6, "checkp\x01', "Invalid control character at"),
                         ("[6]", "no checkpoint, step, recall@20 and mrr@20 in it"),
                         ('{"step": 6, "checkpoint": "ckpt-6"}', "no checkpoint, step")):
        with open(record, "w") as f:
            f.write(content)
        before = sorted(os.listdir(run)), sorted(os.listdir(os.path.join(run, "best")))
        capsys.readouterr()
        for name, call in (
                ("evaluate", lambda: evaluate.main(["--data", data, "--split", "valid",
                                                    "--model-dir", run, "--no-progress"])),
                ("export", lambda: export.main(["--model-dir", run, "--export-base",
                                                str(tmp_path / "exports")])),
                ("train", lambda: train_lib.main(_args(data, run, config_file, "--steps", "9",
                                                       "--eval-every", "3")))):
            assert call() == 2, name
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"error: {record} is damaged ({why}" in lines[0], lines
            assert lines[0].endswith("restore it, or remove it (evaluation and export then use "
                                     "the latest checkpoint, and a resumed training chooses "
                                     "the best again at its next valid evaluation)")
        assert (sorted(os.listdir(run)), sorted(os.listdir(os.path.join(run, "best")))) == before
        with open(record) as f:
            assert f.read() == content


def test_an_export_records_the_checkpoint_it_loaded_and_an_unfinished_training(
        data, config_file, tmp_path, capsys):
    """`export_config.json` said "which": "best" for a run without a best, whose latest
    checkpoint was exported, and nothing in it said the training had not finished (audit):
    both as loaded, as `model.evaluate --output` records them."""
    from serving import export

    run = str(tmp_path / "run")
    assert train_lib.main(_args(data, run, config_file, "--steps", "10", "--eval-every", "0")) == 0

    def exported(base):
        assert export.main(["--model-dir", run, "--export-base", base]) == 0
        with open(os.path.join(base, "1", "assets.extra", "export_config.json")) as f:
            return json.load(f)["source"]

    source = exported(str(tmp_path / "finished"))
    assert (source["which"], source["training_finished"], source["step"]) == ("latest", True, 10)
    os.remove(os.path.join(run, train_lib.SUMMARY_FILE))  # as a killed run leaves it
    source = exported(str(tmp_path / "killed"))
    assert (source["which"], source["training_finished"]) == ("latest", False)
    assert "its training has not finished" in capsys.readouterr().err
