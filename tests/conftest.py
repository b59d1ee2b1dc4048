"""Shared test setup: Keras 2 before TensorFlow loads, paths to the shared real datasets."""
import atexit
import os
import shutil
import sys
import tempfile

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
