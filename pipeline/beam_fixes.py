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
