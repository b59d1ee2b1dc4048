"""A fix of the local Beam runner used by `python -m pipeline` (apache-beam 2.77, pinned).

A failed run that never ended: with worker processes (`--direct_running_mode
multi_processing`, the default here), the FnApiRunner closes each worker's control
connection when a run ends, and a connection that its worker has not opened yet is marked
closed without the "done" message that tells a worker to exit. A worker that starts late
(a loaded machine; a run that failed early, on a damaged input) then opens it, waits for
instructions that never come, and the runner waits for it to exit: both wait forever
(stack dumps of such a run: the runner in `stop_worker`, joining that worker; the worker
reading its control stream; the runner's side of that stream waiting in `get_req`).

`apply` makes the close leave the done message queued on a connection not yet opened, so
a worker that opens it later reads it at once and exits, as the others do.

Workers that outlived a killed run: a `kill -9` of `python -m pipeline` left its SDK
worker processes (each ~160 MB, behind a `/bin/sh` of their own) running for about two
minutes, until their connections timed out. On Linux `apply` also starts each worker with
`exec` (no shell between) and with the parent-death signal set (`prctl(PR_SET_PDEATHSIG,
SIGKILL)`): a worker ends with the run that started it, however that run ends.
"""
from __future__ import annotations

_PATCHED = "_hiertcn_closes_unopened"


def apply() -> bool:
    """Installs the fix once (idempotent). Returns whether it is in place; False when this
    Beam lacks the pieces it changes (another version: nothing is touched)."""
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers
    except ImportError:
        return False
    connection = getattr(worker_handlers, "ControlConnection", None)
    servicer = getattr(worker_handlers, "BeamFnControlServicer", None)
    if connection is None or servicer is None or not all(
            hasattr(servicer, name) for name in ("UNSTARTED_STATE", "_DONE_MARKER")):
        return False
    _workers_end_with_the_run(worker_handlers)
    original = connection.close
    if getattr(original, _PATCHED, False):
        return True

    def close(self) -> None:
        with connection._lock:  # noqa: SLF001 - the lock `close` and `set_input` take
            unopened = getattr(self, "_state", None) == servicer.UNSTARTED_STATE
        if unopened:
            # (a worker that opens it now reads this first; if it opened it meanwhile,
            # `original` queues a second one, which nobody reads: harmless)
            self.push(servicer._DONE_MARKER)  # noqa: SLF001
        original(self)

    setattr(close, _PATCHED, True)
    connection.close = close
    return True


# the command line the FnApiRunner gives its worker processes (`multi_processing`)
_WORKER_MODULE = "apache_beam.runners.worker.sdk_worker_main"
# run by the worker's interpreter: the parent-death signal (Linux's PR_SET_PDEATHSIG = 1),
# then, where the run already ended before it was set, an exit; then Beam's worker
_WORKER_CODE = ("import ctypes, os, runpy, signal, sys; "
                "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
                "os.getppid() != {parent} and sys.exit(1); "
                "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def worker_command(command, parent: int):
    """The command line of a worker that dies with `parent` (`exec`: no shell between),
    for Beam's own worker command; any other command as it is."""
    import shlex
    import sys

    text = command.decode("utf-8") if isinstance(command, bytes) else command
    if not sys.platform.startswith("linux") or text != f"{sys.executable} -m {_WORKER_MODULE}":
        return command
    code = _WORKER_CODE.format(parent=parent, module=_WORKER_MODULE)
    wrapped = f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    return wrapped.encode("utf-8") if isinstance(command, bytes) else wrapped


def _workers_end_with_the_run(worker_handlers) -> None:
    handler = getattr(worker_handlers, "SubprocessSdkWorkerHandler", None)
    if handler is None or getattr(handler.__init__, _PATCHED, False):
        return
    original = handler.__init__

    def __init__(self, worker_command_line, *args, **kwargs):
        import os

        original(self, worker_command(worker_command_line, os.getpid()), *args, **kwargs)

    setattr(__init__, _PATCHED, True)
    handler.__init__ = __init__
