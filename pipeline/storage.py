"""Telling a write that failed for want of room (a full disk, a file-size limit, a quota, a
read-only file system) from other errors, whichever layer reports it: Python's OSError,
TensorFlow's file ops (`ResourceExhaustedError: ...; No space left on device`), SQLite
(`database or disk is full`) or Beam, which hands a worker's error back as the text of a
RuntimeError. The entry points say such a failure in one line instead of a traceback."""
from __future__ import annotations

import errno
import os

ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
_PHRASES = tuple(os.strerror(n) for n in sorted(ROOM_ERRNOS)) + ("database or disk is full",)


def storage_error(e: BaseException | None) -> str | None:
    """The reason ("No space left on device", "File too large", ...) when `e`, or an
    exception it was raised from or while handling, is a write that failed for want of
    room; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ROOM_ERRNOS:
            return os.strerror(e.errno)
        text = str(e)
        for phrase in _PHRASES:
            if phrase in text:
                return phrase
        e = e.__cause__ or e.__context__
    return None


def reason_or_raise(e: BaseException) -> str:
    """`storage_error(e)` for an entry point's one-line message; any other error is raised
    again (with its traceback), since the entry point has nothing better to say of it."""
    reason = storage_error(e)
    if reason is None:
        raise e
    return reason
