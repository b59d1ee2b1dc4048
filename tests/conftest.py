"""Shared test setup: Keras 2 before TensorFlow loads, paths to the shared real datasets."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Temporary files of the run and its commands in a folder of its own, removed at its end:
# what a command killed on purpose leaves (TensorFlow's AutoGraph modules, written with
# delete-at-exit, of a SIGKILLed or file-size-limited process; Beam's temporary folder of
# a stopped run) is not left in the machine's /tmp (13 files a run: a hygiene audit).
_RUN_TMP = tempfile.mkdtemp(prefix="hiertcn-tests-")
os.environ["TMPDIR"] = _RUN_TMP
tempfile.tempdir = None  # (read again from TMPDIR)
atexit.register(shutil.rmtree, _RUN_TMP, True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _mount(*args: str) -> bool:
    import subprocess

    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def read_only_mount(tmp_path):
    """A small tmpfs at `tmp_path / "mnt"`, and a function that remounts it read-only (a
    real read-only file system: `os.access` says no write there for every user, root
    included); skipped where this process may not mount one (not root, a container)."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)):
        pytest.skip("cannot mount a tmpfs here (needs root and a mount namespace)")

    def remount_read_only():
        assert _mount("-o", "remount,ro", str(mnt)), "remount read-only failed"

    try:
        yield mnt, remount_read_only
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
