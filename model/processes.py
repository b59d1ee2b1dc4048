"""Child processes of the commands that run other commands (`model.compare`, `serving.demo`)."""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import IO, Sequence


def die_with_parent() -> None:
    """In a child process, before it starts (Linux): SIGTERM when the parent dies, even by
    SIGKILL, so that no child outlives the command that started it. A training run takes
    SIGTERM as a stop: it saves a checkpoint and exits."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def preexec():
    """`preexec_fn` for a child that must not outlive this process (None off Linux)."""
    return die_with_parent if sys.platform == "linux" else None


def run_stoppable(cmd: Sequence[str], log: IO) -> int:
    """Runs `cmd` with its output to `log` and returns its exit status. Ctrl-C (or a
    SIGTERM that the caller turns into KeyboardInterrupt) is passed on to the child exactly
    once, as SIGTERM (which `model.train` takes as a stop even where SIGINT is ignored, as
    in a background job), and the child is waited for, so that a training run can save its
    checkpoint (the child runs in a session of its own, so the terminal's Ctrl-C reaches
    only this process); a second Ctrl-C kills it. Then the KeyboardInterrupt goes on up."""
    proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        print("\nstopping: waiting for the running command to save its work (Ctrl-C again "
              "kills it) ...", file=sys.stderr, flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise
