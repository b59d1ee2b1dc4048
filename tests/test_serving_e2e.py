"""The real commands end to end: synthetic log, pipeline, train, export, serve, query."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import serving_testlib as lib
from tiny_logs import file_size_limited

from pipeline import schema

TINY_RUN = {"model": {"embedding_dim": 8, "gru_units": 4, "gru_layers": 1, "channels": 8,
                      "kernel_size": 2, "num_blocks": 1},
            "train": {"batch_size": 4, "sessions_per_batch": 2, "max_session_length": 8}}


def run(*args: str, cwd: str) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=lib.REPO)
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def test_two_sessions_through_the_served_model(tmp_path, monkeypatch, capsys):
    work = str(tmp_path)
    with open(os.path.join(work, "tiny.json"), "w", encoding="utf-8") as f:
        json.dump(TINY_RUN, f)
    run("pipeline.synthetic", "--output", "log.csv", "--users", "40", "--items", "100",
        "--topics", "5", cwd=work)
    run("pipeline", "--input", "log.csv", "--output", "data", cwd=work)
    train = ("model.train", "--data", "data", "--model", "hiertcn", "--model-dir", "run",
             "--steps", "3", "--config", "tiny.json", "--no-progress")
    # a full disk (here a file-size limit) under training and export: one line each, no
    # version published, and the same commands then succeed
    for command, error in ((train, "error: cannot write to run: File too large; no checkpoint "
                                   "was complete, so any steps trained are lost"),
                           (("serving.export", "--model-dir", "run", "--export-base", "export"),
                            "error: cannot write the export under export: File too large; no "
                            "version was published")):
        if command[0] == "serving.export":
            run(*train, cwd=work)
        failed = subprocess.run(file_size_limited(16 << 10, [sys.executable, "-m", *command]),
                                cwd=work, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, PYTHONPATH=lib.REPO))
        said = [line for line in failed.stderr.splitlines() if not line.startswith("training ")]
        assert failed.returncode == 1 and len(said) == 1 and said[0].startswith(error), \
            failed.stderr
    assert not os.path.exists(os.path.join(work, "export")) or not os.listdir(
        os.path.join(work, "export"))
    # two exports of the run at once (a scheduler's retry beside the first attempt): one
    # version (both found none and published two of the same weights; concurrency audit)
    both = [subprocess.Popen([sys.executable, "-m", "serving.export", "--model-dir", "run",
                              "--export-base", "export"], cwd=work, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=lib.REPO)) for _ in range(2)]
    said = sorted((p.communicate(timeout=300), p.returncode) for p in both)
    assert [rc for _, rc in said] == [0, 0], said
    exported, again = said[1][0][0], said[0][0][0]
    assert again.startswith("already exported run (step 3, the best on valid checkpoint)"), said
    assert "export/1" in exported and "(step 3, the best on valid checkpoint)" in exported
    assert sorted(os.listdir(os.path.join(work, "export"))) == ["1"]
    with open(os.path.join(work, "export", "1", "assets.extra", "export_config.json")) as f:
        source = json.load(f)["source"]
    assert (source["step"], source["which"]) == (3, "best")
    assert source["checkpoint"].startswith(os.path.join(work, "run", "best"))
    # the same weights again: no second version (clients would rebuild every user's state);
    # the copy a killed export left (kill -9: its process gone) is named, not removed
    from serving import export as export_lib

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = os.path.join(work, "export", f".tmp-2-{export_lib._HOST}-{dead.pid}-killed")
    os.makedirs(os.path.join(left, "model"))
    with open(os.path.join(left, "model", "saved_model.pb"), "wb") as f:
        f.write(b"x" * 300_000)
    open(os.path.join(left, export_lib.LOCK_FILE), "w").close()
    # (from here on the exports run in this process, as `main` of the command: each
    # subprocess cost a TensorFlow import)
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert export_lib.main(["--model-dir", "run", "--export-base", "export"]) == 0
    again = capsys.readouterr()
    # (stdout names the version, as an export does: a script's $(...) got nothing)
    assert again.out == ("already exported run (step 3, the best on valid checkpoint) to "
                         f"{os.path.join('export', '1')}\n")
    assert again.err.strip().splitlines() == [
        "run's best checkpoint (step 3) is version 1 under export already: nothing exported "
        "(--version N exports it again)",
        f"note: export holds 1 temporary folder of exports that did not finish (killed?): "
        f"{os.path.basename(left)} (0.3 MB); delete it unless another export is writing there "
        "now"]
    assert os.path.isdir(left)
    shutil.rmtree(left)
    # the latest checkpoint of the step the best one is of: the same weights (the index
    # files differ: the latest also holds the optimizer's slots and the training state)
    assert export_lib.main(["--model-dir", "run", "--export-base", "export",
                            "--checkpoint", "latest"]) == 0
    latest = capsys.readouterr()
    assert latest.out == ("already exported run (step 3, the latest checkpoint) to "
                          f"{os.path.join('export', '1')}\n")
    assert latest.err.strip().endswith("run's latest checkpoint (step 3) is version 1 under "
                                          "export already: nothing exported (--version N "
                                          "exports it again)")
    assert sorted(os.listdir(os.path.join(work, "export"))) == ["1"]
    # the same weights in an older export format (an export made before an upgrade: no
    # export_format in its config): exported again as a new version, and said (it said
    # "nothing exported" and kept the older serving graph)
    older = os.path.join(work, "export_older")
    shutil.copytree(os.path.join(work, "export", "1"), os.path.join(older, "1"))
    config_path = os.path.join(older, "1", "assets.extra", "export_config.json")
    with open(config_path) as f:
        written = json.load(f)
    assert written.pop("export_format") == export_lib.EXPORT_FORMAT
    with open(config_path, "w") as f:
        json.dump(written, f)
    capsys.readouterr()
    assert export_lib.main(["--model-dir", os.path.join(work, "run"), "--export-base",
                            older]) == 0
    assert sorted(os.listdir(older)) == ["1", "2"]
    assert (f"note: version 1 under {older} holds the same weights, exported by an older "
            "version of serving.export (its serving graph lacks later changes): exporting "
            "them again as version 2") in capsys.readouterr().err
    # a stop (Ctrl-C, SIGTERM) right after the rename that publishes a version said "no
    # version was published" beside a complete one
    real_sync = export_lib._sync_dir

    def stopped_once_published(path):
        real_sync(path)
        if export_lib.PUBLISHED:
            raise KeyboardInterrupt

    monkeypatch.setattr(export_lib, "PUBLISHED", [])
    monkeypatch.setattr(export_lib, "_sync_dir", stopped_once_published)
    stopped = os.path.join(work, "export_stopped")
    assert export_lib.main(["--model-dir", os.path.join(work, "run"), "--export-base",
                            stopped]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted after {stopped}/1 was published: that version is complete")
    assert os.listdir(stopped) == ["1"] and os.path.isfile(
        os.path.join(stopped, "1", "assets.extra", "export_config.json"))
    monkeypatch.undo()
    monkeypatch.chdir(work)
    # a --version below the newest one is published with a note: it will not be served
    low = os.path.join(work, "export_low")
    os.makedirs(os.path.join(low, "9"))
    assert export_lib.main(["--model-dir", os.path.join(work, "run"), "--export-base", low,
                            "--version", "3"]) == 0
    assert (f"note: version 3 is below the newest one under {low} (9): TensorFlow Serving's "
            "default version policy (latest)") in capsys.readouterr().err
    assert sorted(os.listdir(low)) == ["3", "9"]
    # the same weights read with the sessions' immediate repeats (records not from the
    # pipeline): another export, which says so in its config
    assert export_lib.main(["--model-dir", "run", "--export-base", "export_keep"]) == 0
    assert export_lib.main(["--model-dir", "run", "--export-base", "export_keep",
                            "--keep-repeats"]) == 0
    for version, collapses in (("1", True), ("2", False)):
        with open(os.path.join(work, "export_keep", version, "assets.extra",
                               "export_config.json")) as f:
            assert json.load(f)["collapses_repeats"] is collapses

    items = schema.read_vocabulary(os.path.join(work, "data")).ids[2:]
    server = lib.ServerProcess(os.path.join(work, "export"), "hiertcn")
    try:
        server.wait_version(1)
        cli = ("serving.client", "--target", server.target, "--model-name", "hiertcn",
               "--state-db", "states.sqlite", "--json")
        first = json.loads(run(*cli, "recommend", "--user", "u1", "-k", "5", cwd=work))
        session = ",".join(items[:3])
        stored = json.loads(run(*cli, "end-session", "--user", "u1", "--items", session, cwd=work))
        second = json.loads(run(*cli, "recommend", "--user", "u1", "--items", items[3], "-k", "5",
                                cwd=work))
        human = run(*cli[:-1], "recommend", "--user", "u1", "-k", "3", cwd=work)
    finally:
        assert server.stop() == 0
    assert first["state"] == "new" and first["version"] == 1 and len(first["items"]) == 5
    assert stored["history"] == list(items[:3])
    assert second["state"] == "stored" and second["session"] == [items[3]]
    assert [e["score"] for e in second["items"]] != [e["score"] for e in first["items"]]
    for ranked in (first["items"], second["items"]):
        assert all(e["item"] in items for e in ranked)  # never "", [PAD] or [UNK]
        assert [e["score"] for e in ranked] == sorted((e["score"] for e in ranked), reverse=True)
    assert "stored state of version 1" in human and "  1. " in human
