"""TensorFlow's start-up lines, held back where they say nothing.

Importing TensorFlow makes its native libraries write to the process's stderr before
Python's logging exists: absl's "All log messages before absl::InitializeLog() is called
are written to STDERR" (twice), and on a machine without an NVIDIA GPU "Could not find
cuda drivers on your machine, GPU will not be used." (twice) and, at the first op, "failed
call to cuInit: ... UNKNOWN ERROR (303)": five lines before every command's own output,
the last one an ERROR that is none; on CPUs with AVX-512 "oneDNN custom operations are on
..." too. The command lines import TensorFlow through `import_tensorflow`, which sends fd
2 through a filter while TensorFlow loads and finds its devices; every other line goes
through as it comes. On a machine with an NVIDIA device the CUDA lines are kept: there
they mean something (a driver that does not load).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

NOISE = ("All log messages before absl::InitializeLog() is called",
         # on CPUs where oneDNN's optimisations default to on (AVX-512, AMX): an INFO line
         "oneDNN custom operations are on. You may see slightly different numerical results")
CUDA_NOISE = ("Could not find cuda drivers on your machine", "failed call to cuInit")
ONEDNN_NOISE = ("Falling back to the default Eigen-based implementation",)


# The filter process: copies its stdin to its stdout line by line, less the noise lines.
_FILTER = """import sys
noise = [n.encode() for n in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(n in line for n in noise):
        out.write(line)
        out.flush()
"""


@contextlib.contextmanager
def native_notes_dropped(noise=NOISE + CUDA_NOISE):
    """Runs the block with file descriptor 2 going through a small filter process that
    writes every line containing none of `noise` to the real stderr as it comes. The filter
    outlives this process: a native library's last words before an abort (TensorFlow's
    "compiled to use AVX instructions, but these aren't available") still reach the
    terminal. Without a usable fd 2 (closed, `2>&-`), the block just runs."""
    if sys.stderr is None:  # Python's own view of a closed fd 2
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        read_end, write_end = os.pipe()
        # in a session of its own: a Ctrl-C or SIGTERM to the process group (a terminal, a
        # scheduler) is this process's to handle, not a traceback of the filter's beside
        # its one-line message; the filter ends when the pipe's last write end closes
        filt = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, *noise],
                                stdin=read_end, stdout=saved, stderr=saved, close_fds=True,
                                start_new_session=True)
    except OSError:  # no process to spare: no filtering either
        os.close(saved)
        yield
        return
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end here: the filter reads to its end
        os.close(saved)
        filt.wait()


def has_nvidia_device() -> bool:
    """Whether the machine shows an NVIDIA device (Linux device nodes; WSL's GPU node)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


# The values of TF_USE_LEGACY_KERAS with which TensorFlow's tf.keras is tf-keras (Keras 2).
LEGACY_KERAS_VALUES = ("true", "True", "1")


def keras_env_error() -> str | None:
    """Why these models cannot be built in this environment: a TF_USE_LEGACY_KERAS the user
    set to another value (`import model` sets it to 1 only where it is not set), with which
    tf.keras is Keras 3."""
    value = os.environ.get("TF_USE_LEGACY_KERAS")
    if value is None or value in LEGACY_KERAS_VALUES:
        return None
    return (f"TF_USE_LEGACY_KERAS={value} is set in this environment, which makes tf.keras "
            "Keras 3; these models need tf-keras (Keras 2): unset it, or set it to 1")


def import_tensorflow(keras: bool = False) -> None:
    """Imports TensorFlow and lists its GPUs (where CUDA says it has none) with the start-up
    notes held back; nothing when TensorFlow is already imported. With `keras` (a command
    that builds the models) a TF_USE_LEGACY_KERAS that makes tf.keras Keras 3 ends the
    command first, in one line (`keras_env_error`)."""
    if keras and (error := keras_env_error()):
        raise SystemExit(f"error: {error}")
    if "tensorflow" in sys.modules:
        return
    from pipeline import storage

    reason = storage.temp_dir_error()  # else a traceback from absl's import
    if reason:
        raise SystemExit(f"error: {reason}")
    gpu = has_nvidia_device()
    noise = NOISE + (() if gpu else CUDA_NOISE + ONEDNN_NOISE)
    with native_notes_dropped(noise):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
        if not gpu:  # (an op here would start a GPU's context before the command sets it up)
            # On a CPU with AMX, oneDNN logs an ERROR line the first time it declines a
            # dtype ("oneDNN supports DT_INT64 only on platforms with AVX-512. Falling back
            # to the default Eigen-based implementation"), once per process: at the first
            # training step, in the middle of the command's own output. Declined here.
            tf.transpose(tf.zeros([1, 1], tf.int64))
