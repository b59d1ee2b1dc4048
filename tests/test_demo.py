"""`make demo` (`python -m serving.demo`) end to end on a small log: it runs every stage,
replaces only its own folder, and leaves no server behind, even when killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from model import quiet
from serving import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(output: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)  # TensorFlow's logging as a user gets it
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.Popen([sys.executable, "-m", "serving.demo", "--output", output,
                             "--users", "60", "--steps", "3"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _servers_of(path: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"serving.server" in cmd and any(path.encode() in part for part in cmd):
            found.append(int(pid))
    return found


def test_prepare_output_replaces_only_a_demo_folder(tmp_path):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not a demo's folder"):
        demo.prepare_output(str(mine))
    assert (mine / "keep.txt").read_text() == "mine"
    out = tmp_path / "demo_out"
    demo.prepare_output(str(out))
    (out / "old").write_text("from the last demo")
    demo.prepare_output(str(out))  # an earlier demo's folder is replaced
    assert os.listdir(out) == [demo.MARKER]
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(SystemExit, match="a_file is a file; pass another --output"):
        demo.prepare_output(str(a_file))
    assert a_file.read_text() == "mine"
    # a folder that cannot be made (fuzzing audit: a FileNotFoundError traceback)
    with pytest.raises(SystemExit, match=r"demo stopped: cannot create .*inside: Not a "
                                         r"directory; pass another --output"):
        demo.prepare_output(str(a_file / "inside"))
    # a model name the server's ready line cannot show (the demo waited two minutes)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--output", str(tmp_path / "named"), "--model-name", "a b"])
    assert exit_.value.code == 2 and not (tmp_path / "named").exists()
    # one user's log has an empty train split: refused before anything runs
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--output", str(tmp_path / "one"), "--users", "1"])
    assert exit_.value.code == 2 and not (tmp_path / "one").exists()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc")
def test_the_demo_runs_end_to_end_and_leaves_no_server(tmp_path):
    out = str(tmp_path / "demo_out")
    proc = _demo(out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    for stage in range(1, 8):
        assert f"=== {stage}/7 " in log
    assert "server ready" in log and log.rstrip().endswith("export/, state.db")
    assert "Recall@20" in log and "stored the state after" in log
    # none of TensorFlow's start-up notes (absl's, CUDA's on a machine without a GPU)
    noise = quiet.NOISE + (() if quiet.has_nvidia_device() else quiet.CUDA_NOISE)
    assert not [line for line in log.splitlines() if any(n in line for n in noise)], log
    assert sorted(os.listdir(out)) == sorted(
        [demo.MARKER, "raw", "data", "run", "export", "state.db", "test_hiertcn.json",
         "test_popularity.json"] + [n for n in os.listdir(out) if n.startswith("state.db-")])
    assert not _servers_of(out)


def test_a_sigterm_stops_the_demo_with_exit_130(tmp_path):
    """A scheduler's stop ended the demo with status 1, a failed step's (scheduler audit):
    130, as every command stops, with the step it ran stopped too."""
    proc = _demo(str(tmp_path / "demo_out"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("$ "):  # the first step's command is running
            proc.send_signal(signal.SIGTERM)
            break
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + log
    # (the step's own last line may come after it: the child shares the output)
    assert "demo stopped by signal 15" in log.splitlines(), log
    assert "=== 3/7" not in log  # (the first step may just have ended as the signal came)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_dies_with_a_killed_demo():
    """What the demo starts its server with: SIGKILL the parent, the child goes too."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; from model import processes; "
         "child = subprocess.Popen(processes.dying_with_parent("
         "[sys.executable, '-c', 'import time; time.sleep(120)'])); "
         "time.sleep(1); print(child.pid, flush=True); time.sleep(120)"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # a zombie: dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


def test_a_server_that_fails_to_start_is_said_as_such():
    """The demo reads the server's address from its output; a server whose output ends
    (it failed to start) and then exits is reported with its exit code, not as a server
    that did not become ready in time."""
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nprint('starting', flush=True)\n"
                               "os.close(1)\ntime.sleep(1)\nsys.exit(3)"],
        stdout=subprocess.PIPE, text=True)
    output = demo.ServerOutput(stand_in.stdout)
    output.start()
    with pytest.raises(SystemExit, match="the server exited with code 3"):
        demo.wait_for_server(stand_in, output, "hiertcn", timeout=60)
