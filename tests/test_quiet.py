"""The command lines start without TensorFlow's native start-up lines (model.quiet)."""
from __future__ import annotations

import os
import subprocess
import sys

from model import quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_command_line_error_is_its_one_line(tmp_path):
    """`model.train` (which imports TensorFlow first) with a missing data folder: its error
    and nothing before it (the absl notice, and on a machine without an NVIDIA GPU the CUDA
    lines, are held back)."""
    proc = subprocess.run([sys.executable, "-m", "model.train", "--data",
                           str(tmp_path / "missing"), "--model-dir", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    if quiet.has_nvidia_device():  # there the CUDA lines say something and are kept
        lines = [line for line in proc.stderr.splitlines()
                 if not any(n in line for n in quiet.CUDA_NOISE)]
    else:
        lines = proc.stderr.splitlines()
    assert lines == [f"error: data folder {tmp_path / 'missing'} not found: pass the --output "
                     "folder of `python -m pipeline`"], proc.stderr


# Runs `python -m COMMAND ARGS...` and prints its exit status and whether TensorFlow loaded.
RUN_AND_SAY_IF_TENSORFLOW_LOADED = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "except SystemExit as e:\n"
    "    print('exit', e.code, 'tensorflow' in sys.modules)\n")


def test_usage_errors_and_help_are_answered_before_tensorflow_loads():
    """A mistyped option or --help of the commands that use TensorFlow is answered from the
    command line alone (about 0.1 s, not TensorFlow's 5-7 s of start-up)."""
    code = RUN_AND_SAY_IF_TENSORFLOW_LOADED
    for command in ("model.train", "model.evaluate", "serving.export", "serving.server"):
        for option, status in (("--no-such-option", 2), ("--help", 0)):
            proc = subprocess.run([sys.executable, "-c", code, command, option], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
            assert proc.stdout.splitlines()[-1] == f"exit {status} False", (command, option, proc)
            if status:
                assert proc.stderr.splitlines()[-1].startswith(f"python -m {command}: error: ")
            else:
                assert proc.stdout.startswith(f"usage: python -m {command} ")


def test_a_missing_local_folder_is_said_before_tensorflow_loads(tmp_path):
    """A --data or --model-dir that is not there (a typo, the wrong machine) is said from
    the file system alone, not after TensorFlow's seconds of start-up."""
    missing = str(tmp_path / "missing")
    run_folder, a_file = tmp_path / "r", tmp_path / "log.csv"
    run_folder.mkdir()
    a_file.write_text("")
    data, version = tmp_path / "data", tmp_path / "exports" / "1"
    (data / "train").mkdir(parents=True)
    for name in ("stats.json", "items.tsv"):
        (data / name).write_text("")
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    for command, args, message in [
            ("model.train", ["--data", missing, "--model-dir", str(tmp_path / "run")],
             f"error: data folder {missing} not found"),
            ("model.evaluate", ["--data", missing, "--model", "popularity", "--split", "test"],
             f"python -m model.evaluate: error: --data {missing}: no such folder"),
            ("serving.export", ["--model-dir", missing, "--export-base", str(tmp_path / "e")],
             f"error: --model-dir {missing} is not a folder"),
            ("serving.export", ["--model-dir", str(run_folder), "--export-base",
                                str(run_folder / "exports")],
             f"error: --export-base {run_folder}/exports is inside the run folder {run_folder}"),
            ("serving.export", ["--model-dir", str(run_folder), "--export-base", str(a_file)],
             f"error: --export-base {a_file} is a file, not a folder"),
            # another command's folder: a pipeline output, a version folder (one level deep)
            ("serving.export", ["--model-dir", str(run_folder), "--export-base", str(data)],
             f"error: --export-base {data} is a pipeline output: pass the folder TF Serving "
             "watches"),
            ("serving.export", ["--model-dir", str(run_folder), "--export-base", str(version)],
             f"error: --export-base {version} is a SavedModel version folder; its parent may "
             "be the export base")]:
        proc = subprocess.run([sys.executable, "-c", RUN_AND_SAY_IF_TENSORFLOW_LOADED, command,
                               *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.stdout.splitlines()[-1] == "exit 2 False", (command, proc)
        assert proc.stderr.splitlines()[-1].startswith(message), (command, proc.stderr)
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "e")
    assert os.listdir(run_folder) == []


def test_tensorflow_still_reports_its_own_errors(capfd):
    """Only the known notices are dropped: any other line of the import reaches stderr."""
    with quiet.native_notes_dropped(quiet.NOISE):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\nE0000 failed call to cuInit: a driver that does not "
                    b"load\n")
    assert capfd.readouterr().err == "E0000 failed call to cuInit: a driver that does not load\n"


def test_a_fatal_line_before_an_abort_and_a_closed_stderr(tmp_path):
    """A native library's last line before it aborts the process reaches stderr (the filter
    is another process); with fd 2 closed (`2>&-`) a command still runs."""
    code = ("import os\nfrom model import quiet\nwith quiet.native_notes_dropped():\n"
            "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called\\n"
            "The TensorFlow library was compiled to use AVX instructions\\n')\n"
            "    os.abort()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr == "The TensorFlow library was compiled to use AVX instructions\n"
    closed = subprocess.run(f"{sys.executable} -m model.train --help 2>&-", shell=True, cwd=REPO,
                            capture_output=False, stdout=subprocess.PIPE, text=True, timeout=120)
    assert closed.returncode == 0 and "--model-dir" in closed.stdout


def test_a_ctrl_c_to_the_process_group_is_the_commands_alone(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the filter process too: it
    printed a KeyboardInterrupt traceback of its own beside the command's one-line message
    (TensorFlow's import is seconds long, so a Ctrl-C at a command's start lands there)."""
    import signal
    import time

    # (Ctrl-C as a terminal's shell leaves it: pytest-xdist's workers start their children
    # with SIGINT ignored, which the filter would inherit)
    code = ("import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from model import quiet\ntry:\n"
            "    with quiet.native_notes_dropped():\n"
            "        print('ready', flush=True)\n"
            "        while True:\n"  # (TensorFlow's import writing its notes meanwhile)
            "            os.write(2, quiet.NOISE[0].encode() + b'\\n')\n"
            "except KeyboardInterrupt:\n    print('interrupted: one line', file=sys.stderr)\n"
            "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.5)  # (the filter process is up: it started before the block)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err == "interrupted: one line\n", err
