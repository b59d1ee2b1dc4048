"""Atomic file writes: a temporary file beside the target, then a rename.

A reader never sees a half-written result (a crash or a kill leaves the previous file, or
none, plus at most a hidden `.tmp-*` file: removed on any Python-level failure, and after
a kill by the next write into the same folder).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Callable, IO

from pipeline import storage

try:
    import fcntl
except ImportError:  # Windows: no flock, so a killed writer's temporary file stays
    fcntl = None

_TEMPORARY = re.compile(r"^\.tmp-[0-9a-f]{32}(\.[A-Za-z0-9]+)?$")
# a writer takes its temporary file's lock just after creating it: a file this recent may
# be one between the two
ABANDONED_AFTER_S = 10.0


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Calls `write(file)` on a temporary file in `path`'s folder (created if missing), then
    renames it to `path`; on any failure the temporary file is removed. A `path` that is a
    link is written where it points (the rename replaced the link with a file, and the
    file it pointed to stayed as it was), as the folder outputs are."""
    path = storage.link_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_abandoned_temporaries(folder)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    # as open() would create it: 0666 less the umask (mkstemp's 0600 would hide a run's
    # files from a TensorBoard or export job running as another user)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    held = None
    try:
        if fcntl is not None:  # held through the rename: a live writer's file is not swept
            held = _locked_copy(fd)
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if held is not None:
            os.close(held)


def _locked_copy(fd: int) -> int | None:
    """A duplicate of `fd` holding an exclusive flock on its file until it is closed; None
    where the file system takes no locks (some network and FUSE mounts: ENOLCK), whose
    temporary files are then not told from a live writer's and never swept."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a file just made: no one holds it)
        return os.dup(fd)
    except OSError:  # (or no descriptor left to copy it to: written unlocked then)
        return None


def remove_abandoned_temporaries(folder: str) -> list[str]:
    """Removes the `.tmp-*` files in `folder` that no live writer holds (a writer killed
    mid-write left them); returns their names. A file written in the last
    `ABANDONED_AFTER_S` seconds is left alone, and so is every one where flock is missing."""
    removed = []
    try:
        names = os.listdir(folder) if fcntl is not None else []
    except OSError:
        return removed
    for name in names:
        if not _TEMPORARY.match(name):
            continue
        tmp = os.path.join(folder, name)
        try:
            if time.time() - os.stat(tmp).st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(tmp)
            removed.append(name)
        except OSError:  # held by a live writer (or gone already)
            pass
        finally:
            os.close(fd)
    return removed


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8, line endings as given) atomically."""
    write_atomically(path, lambda f: f.write(text))


def write_json(path: str, obj, sort_keys: bool = False) -> None:
    """Writes `obj` as indented JSON with a final newline, atomically."""
    def dump(f):
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")

    write_atomically(path, dump)
