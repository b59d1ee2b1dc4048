"""Child processes of the commands that run other commands (`model.compare`, `serving.demo`)."""
from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
import threading
from typing import IO, Callable, Sequence

from pipeline import argtypes


# Run as `python -c _DYING_WITH_PARENT PARENT_PID CMD...`: asks for SIGTERM when the parent
# dies, then becomes CMD (the request survives the exec).
_DYING_WITH_PARENT = """import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the parent died before the request
    sys.exit(128 + signal.SIGTERM)
for s in (signal.SIGPIPE, signal.SIGXFSZ):  # (Python ignores them; an exec would keep that)
    signal.signal(s, signal.SIG_DFL)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    print(f"error: cannot run {sys.argv[2]}: {e.strerror}", file=sys.stderr)
    sys.exit(127)
"""


def dying_with_parent(cmd: Sequence[str]) -> list[str]:
    """`cmd` as a child that gets SIGTERM when this process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; `cmd` itself elsewhere), so that no child outlives the command that
    started it. A training run takes SIGTERM as a stop: it saves a checkpoint and exits.

    A command line rather than a `preexec_fn`: a preexec_fn makes subprocess fork this
    process, and where gRPC runs in it (a client) gRPC's fork handlers restart its poller
    thread in the child, which can write "epoll_wait error: Bad file descriptor" into the
    child's output when subprocess closes the inherited descriptors before the exec."""
    if sys.platform != "linux":
        return list(cmd)
    return [sys.executable, "-I", "-S", "-c", _DYING_WITH_PARENT, str(os.getpid()), *cmd]


class _Relay(threading.Thread):
    """Copies a child's output to `log` as it comes and hands each line (ended by a newline
    or by the carriage return of a progress bar) to `on_line`. The pipe is drained to the
    end whatever happens, so the child never blocks on it; a failed write to the log (a
    full disk) is kept in `error` for the caller."""

    def __init__(self, pipe: IO[bytes], log: IO, on_line: Callable[[str], None]):
        super().__init__(daemon=True)
        self.pipe, self.log, self.on_line = pipe, log, on_line
        self.error: OSError | None = None

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = b""
        while True:
            chunk = os.read(self.pipe.fileno(), 65536)
            if not chunk:
                break
            self._write(decoder.decode(chunk))
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in lines:
                if line.strip():
                    try:
                        self.on_line(line.decode("utf-8", "replace"))
                    except Exception:  # a display error never stops the child's output
                        pass
        self._write(decoder.decode(b"", final=True))

    def _write(self, text: str) -> None:
        if text and self.error is None:
            try:
                self.log.write(text)
                self.log.flush()
            except OSError as e:
                self.error = e


def run_stoppable(cmd: Sequence[str], log: IO,
                  on_line: Callable[[str], None] | None = None) -> int:
    """Runs `cmd` with its output to `log` and returns its exit status. Ctrl-C (or a
    SIGTERM that the caller turns into KeyboardInterrupt) is passed on to the child exactly
    once, as SIGTERM (which `model.train` takes as a stop even where SIGINT is ignored, as
    in a background job), and the child is waited for, so that a training run can save its
    checkpoint (the child runs in a session of its own, so the terminal's Ctrl-C reaches
    only this process); a second Ctrl-C kills it. Then the KeyboardInterrupt goes on up.
    With `on_line`, the output also goes line by line to it (for a progress display)."""
    proc = subprocess.Popen(dying_with_parent(cmd), stdout=subprocess.PIPE if on_line else log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    relay = None
    if on_line:
        relay = _Relay(proc.stdout, log, on_line)
        relay.start()
    try:
        return _wait(proc, relay)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        print("\nstopping: waiting for the running command to save its work (Ctrl-C again "
              "kills it) ...", file=sys.stderr, flush=True)
        try:
            _wait(proc, relay)
        except KeyboardInterrupt:
            proc.kill()
            _wait(proc, relay)
        raise


def _wait(proc: subprocess.Popen, relay: _Relay | None) -> int:
    """The child's exit status, once its output has all reached the log (a grandchild that
    keeps the pipe open is not waited for beyond a few seconds); a failed write to the log
    is raised here."""
    returncode = proc.wait()
    if relay is not None:
        relay.join(timeout=5)
        if not relay.is_alive():
            proc.stdout.close()
        if relay.error is not None:
            raise relay.error
    return returncode


survive_closed_output = argtypes.survive_closed_output
ignore_stop_signals = argtypes.ignore_stop_signals


def interrupted_is(message: str, run: Callable[[], int]) -> int:
    """`run()`'s status, or 130 after saying `message` where a stop signal's
    KeyboardInterrupt ends it, for `exit_now` to end the process with: raised to the top,
    the interrupt went through the interpreter's teardown, which waits for the TensorFlow
    call that the stop cut short (a full-catalogue evaluation: 35 to 56 s after the line was
    said; a scheduler's grace period is 30 s)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(message, file=sys.stderr)
        return 130


def exit_now(status: int) -> None:
    """Ends a command whose work is done and said, with `status`: the exit handlers run
    (stop signals ignored meanwhile; they are bounded: the batch producer's stop waits a
    few seconds at most), the output is flushed, and the interpreter's teardown is skipped.
    In the teardown a Ctrl-C or SIGTERM turned a finished run's status into "killed by
    SIGINT", and a tf.data thread that asks for the GIL there can hang the process for good,
    where signals would then be ignored. An output that cannot be flushed (a full disk, not
    a reader that is gone) is said, and the status is then at least 1. Status 130 after a
    Ctrl-C ends the process as killed by SIGINT (`argtypes.exit_interrupted`)."""
    if "tensorflow" not in sys.modules:  # (an early error: a teardown with nothing to fear)
        argtypes.exit_with(status)  # (130: a stop in the start-up, a Ctrl-C's as one)
    argtypes.finish(status)
