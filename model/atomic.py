"""Atomic file writes: a temporary file beside the target, then a rename.

A reader never sees a half-written result (a crash or a kill leaves the previous file, or
none, plus at most a hidden `.tmp-*` file that is removed on any Python-level failure).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Callable, IO


def write_atomically(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Calls `write(file)` on a temporary file in `path`'s folder (created if missing), then
    renames it to `path`; on any failure the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    # as open() would create it: 0666 less the umask (mkstemp's 0600 would hide a run's
    # files from a TensorBoard or export job running as another user)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w",
                       **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8, line endings as given) atomically."""
    write_atomically(path, lambda f: f.write(text))


def write_json(path: str, obj, sort_keys: bool = False) -> None:
    """Writes `obj` as indented JSON with a final newline, atomically."""
    def dump(f):
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")

    write_atomically(path, dump)
