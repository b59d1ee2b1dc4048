"""argparse types shared by the commands (`python -m pipeline`, `model.train`,
`model.evaluate`, `serving.client`, `serving.server`): a bad number is one line naming the
option; the help formatter that says the defaults there are; and the parser whose usage
errors are one line."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`PROG: error: MESSAGE (see --help)`), not the
    whole usage block before them; its subcommands' parsers are the same kind."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0.0, strict=True)
port = number(int, 0, high=65535)  # 0: any free port
top_k = number(int, 1, high=2**31 - 1)  # how many items: into an int32 tensor, none is no answer
message_mb = number(int, 1, high=2047)  # gRPC's message size limit is an int of bytes


def local_path(text: str) -> str:
    """An argparse `type` for a path this project writes or reads with Python's own file
    calls (run folders, exports, reports, the state store): a `scheme://` path would become
    a local folder named `gs:` (or an error deep inside TensorFlow), so it is refused."""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text} is a remote path: this command writes and reads it on this machine "
            "(remote file systems are for --data and the pipeline's --input and --output); "
            "pass a local path and copy to or from the bucket with its own tool")
    return text


local_path.__name__ = "local path"


def interrupts_in_one_line(message: str) -> None:
    """A Ctrl-C that reaches the top of a command prints `message` (what it leaves behind),
    not a traceback; the process still ends as interrupted (status 130 in a shell). For
    the commands without a handler of their own (`model.train` outside its training loop,
    `model.evaluate`, `serving.export`), installed before TensorFlow's import."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(message, file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
    exit where Ctrl-C says what it leaves behind (`interrupts_in_one_line`)."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within it, SIGTERM (a scheduler's stop, a preempted job) is Ctrl-C: a
    KeyboardInterrupt that the command's own handling turns into a clean stop (exit 130).
    The handler before it is given back after; nothing off the main thread, where Python
    takes no signal handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
