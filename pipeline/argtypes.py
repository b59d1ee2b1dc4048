"""argparse types shared by the commands (`python -m pipeline`, `model.train`,
`model.evaluate`, `serving.client`, `serving.server`): a bad number is one line naming the
option; the help formatter that says the defaults there are; and the parser whose usage
errors are one line."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import math
import os
import sys
import unicodedata
from typing import Callable

from pipeline import storage


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`PROG: error: MESSAGE (see --help)`), not the
    whole usage block before them, and `--version` (`project_version=False`: none, for a
    command whose --version is a model version); its subcommands' parsers are the same
    kind."""

    def __init__(self, *args, project_version: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if project_version:
            add_version(self)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel, its stderr a notebook cell's output (a
    progress bar redrawn in place shows there): a running IPython kernel, not ipykernel
    merely imported (jupyter_client's kernel lookup imports it into a process that runs a
    notebook in another one, and its log file then got a terminal's bar)."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def first_line(error: BaseException) -> str:
    """The first line of an error's message for a one-line error, or its type's name where
    the message is empty (a bare `KeyError()` from a file system's client)."""
    lines = str(error).splitlines()
    return lines[0] if lines and lines[0].strip() else type(error).__name__


def share(part: float, whole: float) -> str:
    """`part / whole` as a percentage for a note: whole percents, but never "0%" or "100%"
    for a share that is neither (19,999 of 20,095 events read "100%" of them)."""
    x = part / whole
    if 0 < x < 0.005:
        return "under 1%"
    if 0.995 <= x < 1:
        return f"{min(x, 0.999):.1%}"
    return f"{x:.0%}"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: the command and the project's version, then exit 0."""
    import pipeline

    parser.add_argument("--version", action="version",
                        version=f"{parser.prog} (hiertcn) {pipeline.__version__}")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter without "(default: None)" on options that
    have no default (required ones, optional values) and without a default on flags (their
    help says what they change)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0
        if (not flag and action.default not in (None, argparse.SUPPRESS)
                and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def number(kind: type, low: float, strict: bool = False,
           high: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for `kind` (int or float) values >= `low` (> `low` if strict) and,
    with `high`, <= `high`."""
    what = {int: "an integer", float: "a number"}[kind]
    bound = f"> {low}" if strict else f">= {low}"
    if high is not None:
        bound = f"{bound} and <= {high}" if strict else f"from {low} to {high}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)
                and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


def at_most(high: int, base: Callable[[str], int] | None = None) -> Callable[[str], int]:
    """An argparse `type` for integers <= `high`, read by `base` first (its lower bound and
    message, e.g. `positive_int`; none: any integer, for an option whose lower bound is
    checked later with its config key's name, `model.train`'s sizes): a value past what
    the code can hold (`--batch-size 10**30`, a traceback after TensorFlow's start) is one
    line at once."""
    def parse(text: str) -> int:
        if base is not None:
            value = base(text)
        else:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = f"int <= {high}"
    return parse


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
positive_int = number(int, 1)
non_negative_int = number(int, 0)
# a positive size (a tensor's dimension, a count of threads or rows: 32 bits) and a positive
# count of steps, events or users (64 bits), bounded so that a value past them is one line
positive_size = at_most(INT32_MAX, positive_int)
positive_count = at_most(INT64_MAX, positive_int)
positive_float = number(float, 0.0, strict=True)
port = number(int, 0, high=65535)  # 0: any free port
top_k = number(int, 1, high=2**31 - 1)  # how many items: into an int32 tensor, none is no answer
message_mb = number(int, 1, high=2047)  # gRPC's message size limit is an int of bytes


def non_empty(text: str) -> str:
    """An argparse `type` for a name or path that must be given: an empty value (`--model ''`,
    a variable that was not set) is refused, not taken as the option left out."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


non_empty.__name__ = "non-empty text"


def local_path(text: str) -> str:
    """An argparse `type` for a path this project writes or reads with Python's own file
    calls (run folders, exports, reports, the state store): a `scheme://` path would become
    a local folder named `gs:` (or an error deep inside TensorFlow), so it is refused."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a remote path: this command writes and reads it on this machine "
            "(remote file systems are for --data and the pipeline's --input and --output); "
            "pass a local path and copy to or from the bucket with its own tool")
    return home_path(text)


local_path.__name__ = "local path"


def tensorflow_folder(text: str) -> str:
    """An argparse `type` for a local folder that holds (or will hold) checkpoints or
    SavedModels: TensorFlow finds their files by a file pattern made from the path, where
    `*`, `?` and `[ ]` match other names (a run folder `m [v1]` trained, then its resume
    failed in a traceback and its export said the checkpoint was removed while it was
    read; a served version under such a folder failed to load): refused at once."""
    path = local_path(text)
    if glob.has_magic(path):
        raise argparse.ArgumentTypeError(
            f"{path} has *, ? or [ ] in it, which TensorFlow's checkpoint and SavedModel "
            "readers take as a file pattern: choose a folder without them")
    return path


tensorflow_folder.__name__ = "local path"


def home_path(text: str) -> str:
    """An argparse `type` for any path: a leading `~` is the home folder, as the shell
    would have made it (`--output=~/data` reaches the program as it is: it made a folder
    named `~` here, which the messages wrote as if it were the home folder)."""
    return os.path.expanduser(text) if text.startswith("~") else text


home_path.__name__ = "path"


def interrupts_in_one_line(message: str) -> None:
    """A Ctrl-C that reaches the top of a command prints `message` (what it leaves behind),
    not a traceback; the process still ends as interrupted (status 130 in a shell). For
    the commands without a handler of their own (`model.train` outside its training loop,
    `model.evaluate`, `serving.export`), installed before TensorFlow's import."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        # (or another error after a stop signal: TensorFlow turns a KeyboardInterrupt in its
        # tracing into a TypeError, with no chain to it, at times)
        if issubclass(kind, KeyboardInterrupt) or _first_stop[0] is not None:
            print(message, file=sys.stderr)
            # (Python's own end of an unhandled one is a death by SIGINT: after a SIGTERM,
            # in TensorFlow's import say, the status is 130 as the commands document)
            exit_with(130)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook


# how many times a stop handler of this project has run (`MainThreadRelay`)
_handled = [0]
# the handlers that count themselves there: the only ones the relay sends a signal on for
_NOTING: set = set()


def stop_signal_handled() -> None:
    """Counts a stop signal's handler having run (in the main thread): `MainThreadRelay`
    then leaves the signal alone."""
    _handled[0] += 1


# the first stop signal a handler of `noting` took in this process (None: none; a Ctrl-C
# that Python's own handler took leaves it so)
_first_stop: list = [None]


def noting(handler):
    """A stop signal's `handler` that counts itself (`stop_signal_handled`) before it runs,
    and that `MainThreadRelay` may send a signal on for."""
    @functools.wraps(handler)
    def counted(signum, frame):
        stop_signal_handled()
        if _first_stop[0] is None:
            _first_stop[0] = signum
        return handler(signum, frame)

    _NOTING.add(counted)
    return counted


def exit_interrupted(status: int = 130) -> None:
    """Ends the process after a stop, its output flushed by the caller: killed by SIGINT
    where the stop was a Ctrl-C, as Python ends on an unhandled one (a shell running the
    command in a loop or a script then stops too; an exit status of 130 made bash go on
    to the next command), with `status` where it was SIGTERM."""
    import signal

    # (on Windows os.kill with SIGINT ends the process with exit code 2)
    if _first_stop[0] in (None, signal.SIGINT) and os.name == "posix":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def output_gone(error: OSError) -> bool:
    """Whether a write failed because its reader is gone (a pipe, a hung-up terminal)."""
    return isinstance(error, BrokenPipeError) or error.errno in (errno.EPIPE, errno.EIO)


# Writes to stdout or stderr that failed other than by a reader gone (a full disk under
# `> log`): `finish` and `exit_with` say the first and end with a status of at least 1.
_LOST_OUTPUT: list[OSError] = []


class _SurvivesClosedOutput:
    """A text stream (sys.stdout, sys.stderr) whose writes outlive the reader: when the
    pipe or terminal behind it is gone (`cmd | tee log` stopped by the same Ctrl-C, a
    parent that died), the first failed write points the file descriptor at /dev/null and
    the output is dropped from then on, so that the stop path goes on to save, not end in
    a BrokenPipeError before the checkpoint. A write that fails otherwise (a full disk
    under `> log`) is dropped likewise, and the error kept for the command's last line:
    the work goes on to its end (a finished pipeline's or export's print of its summary
    raised a traceback after the output was in place)."""

    def __init__(self, stream):
        self._stream = stream

    def _closed(self, error: OSError) -> None:
        if not output_gone(error):
            _LOST_OUTPUT.append(error)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            if not (output_gone(e) or e.errno in storage.ROOM_ERRNOS):
                raise
            self._closed(e)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            if not (output_gone(e) or e.errno in storage.ROOM_ERRNOS):
                raise
            self._closed(e)
            try:  # what the buffer held goes to /dev/null now
                self._stream.flush()
            except OSError:
                pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Wraps sys.stdout and sys.stderr in `_SurvivesClosedOutput` (once): a command whose
    stop path must save its work (model.train, model.compare), or whose work is done when
    it says so (pipeline, serving.client: `| head -1`), keeps going, and keeps its status,
    when the reader of its output is gone; an output that cannot be written (a full disk)
    is said in one line at the end, and the status is then at least 1.

    A stream closed at the start (`2>&-`: Python's is None, and `sys.stderr.isatty()` ended
    the command with status 1 and no word) is /dev/null instead, which also keeps the
    descriptor from being the next file opened; and a character the stream's encoding
    cannot write (`PYTHONIOENCODING=ascii`, a C locale: an arrow in a summary, an id) is
    written as a backslash escape, not a UnicodeEncodeError once the work was done (an
    end-session stored its session, then said "error" and exited 1: a retry stored it
    twice)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the process's
        if isinstance(stream, _SurvivesClosedOutput):
            continue
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # (not a TextIOWrapper, or closed)
            pass
        setattr(sys, name, _SurvivesClosedOutput(stream))


def say_lost_output(status: int) -> int:
    """Flushes stdout and stderr; where one could not be written (not a reader gone),
    says so on stderr (the raw descriptor) and gives a status of at least 1."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # (a descriptor closed at the start: `>&-`, `2>&-`)
            continue
        try:
            stream.flush()
        except ValueError:  # (closed)
            pass
        except OSError as e:  # (a stream not wrapped by `survive_closed_output`)
            if not output_gone(e):
                _LOST_OUTPUT.append(e)
    if not _LOST_OUTPUT:
        return status
    e = _LOST_OUTPUT[0]
    done = "; the command's work is done: only what it printed is lost" if status == 0 else ""
    try:
        os.write(2, f"error: cannot write the output: {e.strerror or e}{done}\n".encode())
    except OSError:
        pass
    return status or 1


def finish(status: int) -> None:
    """Ends the process with `status`, the interpreter's teardown skipped: the exit
    handlers run (stop signals ignored meanwhile), the output is flushed (one that cannot
    be, a full disk rather than a reader that is gone, is said, and the status is then at
    least 1), and 130 (stopped) ends it as `exit_interrupted` does."""
    import atexit

    ignore_stop_signals()
    atexit._run_exitfuncs()
    status = say_lost_output(status)
    if status == 130:
        exit_interrupted(status)
    os._exit(status)


def exit_with(status: int) -> None:
    """Ends a command (`pipeline`, `serving.client`) with the status its `main` returned:
    `sys.exit`, but for 130 (stopped), which `finish` ends (a Ctrl-C as killed by
    SIGINT); an output that could not be written is said (`finish`)."""
    if status != 130:
        sys.exit(say_lost_output(status))
    finish(status)


@noting
def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class MainThreadRelay:
    """Hands a stop signal to the main thread when another thread took it.

    The kernel may give a signal sent to the process (or its group) to any of its threads;
    Python then runs the handler in the main thread, but only once that thread runs Python
    code again. Blocked in a lock's wait (Beam's runner waiting for a bundle from workers
    that the same SIGTERM to the process group killed) it never does: the pipeline hung
    until SIGKILL. This thread hears each handled signal through `signal.set_wakeup_fd`
    (passing the bytes on to an earlier owner of it, asyncio's) and, where no handler of
    `_NOTING` has run within `grace` seconds while one is installed for it, sends the
    signal to the main thread itself (`signal.pthread_kill`), which ends the wait: once
    for each signal that arrived, never for its own. Made and closed in the main thread;
    `start` gives None where the platform lacks what it needs (Windows).
    """

    def __init__(self, signals, grace: float = 1.0):
        import signal
        import threading

        self.signals, self.grace = set(signals), grace
        self.closing = threading.Event()
        self.own: dict[int, int] = {}  # signals the relay sent, whose bytes are still to come
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        self.previous = signal.set_wakeup_fd(self.write_end, warn_on_full_buffer=False)
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, name="stop-signal-relay", daemon=True)
        self.thread.start()
        _RELAYS.add(self)

    @classmethod
    def start(cls, signals, grace: float = 1.0) -> "MainThreadRelay | None":
        import signal

        if sys.platform == "win32" or not hasattr(signal, "pthread_kill"):
            return None
        return cls(signals, grace)

    def _run(self) -> None:
        import signal

        try:
            while True:
                handled = _handled[0]
                data = os.read(self.read_end, 64)
                if not data or self.closing.is_set():
                    return
                came = bytearray()
                for signum in data:  # (less the relay's own sending)
                    if self.own.get(signum):
                        self.own[signum] -= 1
                    else:
                        came.append(signum)
                if self.previous >= 0 and came:  # (an earlier owner's signals: asyncio's)
                    with contextlib.suppress(OSError):
                        os.write(self.previous, came)
                arrived = set(came) & self.signals
                if not arrived or self.closing.wait(self.grace):
                    continue
                for signum in arrived:
                    if _handled[0] == handled and signal.getsignal(signum) in _NOTING \
                            and not self.closing.is_set():
                        self.own[signum] = self.own.get(signum, 0) + 1
                        signal.pthread_kill(self.main, signum)
        finally:
            os.close(self.read_end)

    def close(self) -> None:
        import signal

        _RELAYS.discard(self)
        self.closing.set()
        try:
            signal.set_wakeup_fd(self.previous)
        finally:
            with contextlib.suppress(OSError):
                os.write(self.write_end, b"\0")  # (ends the thread's read)
            os.close(self.write_end)


# the relays open now: a child forked meanwhile gives up their wakeup fd (its signals
# would reach this process's relay through the shared pipe)
_RELAYS: set = set()


def _after_fork_in_child() -> None:
    import signal

    if _RELAYS:
        _RELAYS.clear()
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def interrupt_in_chain(error: BaseException) -> bool:
    """Whether `error` was raised while a KeyboardInterrupt (Ctrl-C, or SIGTERM turned into
    one) was being handled, or was caused by one: a stop signal that lands inside a
    TensorFlow call can come out as another error (a SystemError, a ValueError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def sigterm_until_handled() -> None:
    """SIGTERM as Ctrl-C from now until the command installs its own handling: in a
    command's start-up (TensorFlow's import, seconds long) a scheduler's stop was a silent
    exit where Ctrl-C says what it leaves behind (`interrupts_in_one_line`). Ctrl-C too goes
    through a handler that notes it (`_first_stop`)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (noted, the same)
        signal.signal(signal.SIGINT, _terminate)


@contextlib.contextmanager
def stop_signals_held(deliver: bool = True):
    """Ctrl-C and SIGTERM that arrive within the block are handled after it (`deliver`) or
    not at all: their handlers are swapped for one that notes them. (A signal mask holds
    them for the main thread only: the process's other threads, TensorFlow's or gRPC's,
    take them, and Python runs the handler in the main thread inside the block all the
    same.) Off the main thread, where Python takes no handler, nothing is changed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def note(signum, frame):
        stop_signal_handled()
        held.append(signum)

    previous = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    previous = {stop: handler for stop, handler in previous.items()
                if handler not in (signal.SIG_IGN, None)}  # (None: not set from Python)
    for stop in previous:
        signal.signal(stop, note)
    try:
        yield
    finally:
        # given back where still ours, all of them even if a signal lands meanwhile (a
        # SIGINT after its own handler was back, raised here, left SIGTERM noted for good)
        stopped = None
        for stop, handler in previous.items():
            while True:
                try:
                    if signal.getsignal(stop) is note:
                        signal.signal(stop, handler)
                    break
                except KeyboardInterrupt as e:
                    stopped = e
        if stopped is not None:
            raise stopped
        if held and deliver:
            if callable(previous[held[0]]):
                previous[held[0]](held[0], None)
            else:  # SIG_DFL: the default action, now
                signal.raise_signal(held[0])


def ignore_stop_signals() -> None:
    """From here on this process ignores Ctrl-C and SIGTERM: a command's work is done (or
    being made permanent), and an interrupt could only make what it says untrue (a
    finished run said to be interrupted, or killed with no word). Off the main thread,
    nothing."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within it, SIGTERM (a scheduler's stop, a preempted job) is Ctrl-C: a
    KeyboardInterrupt that the command's own handling turns into a clean stop (exit 130),
    even where another thread took the signal (`MainThreadRelay`; Ctrl-C too, unless it
    is ignored). The handlers before it are given back after; nothing off the main
    thread, where Python takes no signal handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not an ignored one)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _terminate)
    relay = None
    try:
        relay = MainThreadRelay.start(previous)
        yield
    finally:
        try:
            if relay is not None:
                relay.close()
        finally:
            for signum, handler in previous.items():
                # (one the command set meanwhile stays: `ignore_stop_signals` once its
                # work is done)
                if signal.getsignal(signum) is _terminate:
                    signal.signal(signum, handler)


def shown(text: str) -> str:
    """An id (of a log, a request) for plain-text output: as it is, or as a Python literal
    where it holds a tab, a line break or another control or format character (which would
    break the line or act on the terminal: ESC sequences, right-to-left overrides)."""
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        return repr(text)
    return text
