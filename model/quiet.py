"""TensorFlow's start-up lines, held back where they say nothing.

Importing TensorFlow makes its native libraries write to the process's stderr before
Python's logging exists: absl's "All log messages before absl::InitializeLog() is called
are written to STDERR" (twice), and on a machine without an NVIDIA GPU "Could not find cuda
drivers on your machine, GPU will not be used." (twice) and, at the first op, "failed call to
cuInit: ... UNKNOWN ERROR (303)": five lines before every command's own output, the last one
an ERROR that is none. The command lines import TensorFlow through `import_tensorflow`,
which holds fd 2 while TensorFlow loads and finds its devices, then writes every other line
through. On a machine with an NVIDIA device the CUDA lines are kept: there they mean
something (a driver that does not load).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog() is called",)
CUDA_NOISE = ("Could not find cuda drivers on your machine", "failed call to cuInit")


@contextlib.contextmanager
def native_notes_dropped(noise=NOISE + CUDA_NOISE):
    """Runs the block with file descriptor 2 captured, then writes the captured lines that
    contain none of `noise` to stderr (also when the block raises)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(n in line for n in noise):
                    sys.stderr.write(line)
            sys.stderr.flush()


def has_nvidia_device() -> bool:
    """Whether the machine shows an NVIDIA device (Linux device nodes; WSL's GPU node)."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def import_tensorflow() -> None:
    """Imports TensorFlow and lists its GPUs (where CUDA says it has none) with the start-up
    notes held back; nothing when TensorFlow is already imported."""
    if "tensorflow" in sys.modules:
        return
    noise = NOISE + (() if has_nvidia_device() else CUDA_NOISE)
    with native_notes_dropped(noise):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
