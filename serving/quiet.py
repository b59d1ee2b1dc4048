"""Import-time notes of TensorFlow's native libraries that mean nothing to a gRPC client.

Importing TensorFlow (which `tensorflow_serving.apis` does) makes its C++ side write to the
process's stderr before Python's logging exists: absl's "All log messages before
absl::InitializeLog() ..." and, on a machine without CUDA, "Could not find cuda drivers".
`serving.client`'s command line never uses a GPU, so it imports with those lines held back
and writes everything else (warnings, errors) through.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog() is called",
         "Could not find cuda drivers on your machine")


@contextlib.contextmanager
def native_notes_dropped(noise=NOISE):
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
