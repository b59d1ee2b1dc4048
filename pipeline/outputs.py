"""The pipeline's output folder, local or on a remote file system (gs://, s3://, ...).

The output is built in a temporary folder beside DIR and put in place at the end, so a
failed run never leaves a DIR that looks complete:

- a local DIR is renamed into place (atomic);
- on a file system reached through Beam's `FileSystems` (object stores have no folders:
  a folder is a key prefix and a rename is a copy per file), the files are moved one by one
  with `stats.json` last, after the old output's `stats.json` is gone. Every reader of a
  data folder needs `stats.json`, so a DIR without it is incomplete (a run stopped while
  moving, or a partial copy).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
import uuid

from pipeline import argtypes, schema, storage

# a temporary folder no live run holds, this old, is a killed run's (`remove_abandoned`)
ABANDONED_AFTER_S = 60.0
# temporary folder: the descriptor whose flock says a live run writes it (`make_temp`)
_HELD: dict[str, int] = {}


def is_local(path: str) -> bool:
    """True for a path on this machine (no `scheme://`)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) is None


def check_writable_scheme(path: str) -> None:
    """Raises ValueError (one line) when Beam has no file system for `path`'s scheme
    (`gs://` without `apache-beam[gcp]`, say)."""
    from apache_beam.io.filesystems import FileSystems

    if is_local(path):
        return
    try:
        FileSystems.get_filesystem(path)
    except Exception as e:  # ValueError or BeamIOError, by scheme
        raise ValueError(f"no file system for {path}: {argtypes.first_line(e)}") from None


def join(folder: str, *parts: str) -> str:
    if is_local(folder):
        return os.path.join(folder, *parts)
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(folder, *parts)


def files_under(folder: str) -> list[str]:
    """Every file below `folder` (any depth), sorted."""
    if is_local(folder):
        return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(folder, "**")
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def relative(path: str, folder: str) -> str:
    """`path` (a file under `folder`) relative to `folder`, with "/" separators."""
    if is_local(folder):
        return os.path.relpath(path, folder).replace(os.sep, "/")
    return path[len(folder.rstrip("/")) + 1:]


def exists(folder: str) -> bool:
    """A local path, or a remote folder holding at least one file."""
    return os.path.exists(folder) if is_local(folder) else bool(files_under(folder))


def local_folder_problem(output: str) -> str | None:
    """Why the folders of a local `output` (and the temporary folder beside it) cannot be
    made, found before the run: the nearest existing folder above it is a file, or this
    user may not write there; else None (remote outputs: None)."""
    if not is_local(output):
        return None
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not storage.allowed(parent, os.W_OK | os.X_OK):
        if storage.read_only(parent):
            return f"{parent} is on a read-only file system"
        return f"no permission to write in {parent}"
    return None


def replace_problem(output: str) -> str | None:
    """Why this user cannot move an existing local `output` folder aside and delete it
    (another user's in a sticky folder such as /tmp, or holding folders it may not write;
    a folder it may not write at all: `local_folder_problem`), or None. Found after the
    whole run, it was a traceback with the old output half replaced."""
    parent = os.path.dirname(os.path.abspath(output))
    try:
        st, parent_st = os.stat(output), os.stat(parent)
    except OSError as e:
        return f"{e.strerror}: {output}"
    if parent_st.st_mode & stat.S_ISVTX and os.geteuid() not in (0, st.st_uid, parent_st.st_uid):
        return (f"it is another user's, in {parent}, where only a folder's owner may move it "
                "(the sticky bit, as in /tmp)")
    for root, dirs, _ in os.walk(output):
        for folder in [root] + [os.path.join(root, d) for d in dirs]:
            if not storage.allowed(folder, os.W_OK | os.X_OK):
                return f"this user may not delete what {folder} holds (another user's?)"
    return None


def make_temp(output: str) -> str:
    """A new, empty temporary folder beside `output` (remote: a fresh unique prefix)."""
    if is_local(output):
        parent = os.path.dirname(os.path.abspath(output))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{uuid.uuid4().hex[:12]}")
        os.mkdir(tmp)  # 0777 less the umask, as the output's own folders (mkdtemp: 0700)
        fd = storage.lock_folder(tmp)  # held while this process lives: a killed run's lets go
        if fd is not None:  # (None: no flock here; such folders are only named)
            _HELD[tmp] = fd
        return tmp
    from apache_beam.io.filesystems import FileSystems

    parent, base = FileSystems.split(output)
    return FileSystems.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")


def replaced_output(output: str) -> str | None:
    """The folder that holds a local `output`'s previous complete output where `output`
    itself is missing: a run killed (kill -9) between moving the old output aside and
    putting its own in place left it as a `.NAME.tmp-*.old-*` folder."""
    if not is_local(output) or os.path.exists(output):
        return None
    replaced = [folder for folder in leftovers(output) if ".old-" in os.path.basename(folder)
                and os.path.isfile(os.path.join(folder, schema.STATS_FILE))]
    # (two kills there, a run between them: the newest is the previous output)
    return max(replaced, key=os.path.getmtime, default=None)


def _let_go(tmp: str) -> None:
    """Releases `make_temp`'s hold on `tmp` (removed, or in place as the output)."""
    fd = _HELD.pop(tmp, None)
    if fd is not None:
        os.close(fd)


def remove_abandoned(output: str) -> list[str]:
    """Removes the temporary folders beside a local `output` of runs that were killed (a
    scheduler's kill -9 left a whole output's copy each time, named by every later run and
    never removed): those no live process holds (`make_temp`'s flock) and untouched for
    `ABANDONED_AFTER_S`; not the `.old-*` folders, one of which may hold the previous
    output (`replaced_output`). Returns the folders removed."""
    removed = []
    for folder in leftovers(output):
        if ".old-" in os.path.basename(folder):
            continue
        try:
            if os.stat(folder).st_mtime > time.time() - ABANDONED_AFTER_S:
                continue
            fd = storage.lock_folder(folder)
        except OSError:  # (BlockingIOError: a live run holds it)
            continue
        if fd is None:  # (no flock here: whose it is cannot be told)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.exists(folder):
                removed.append(folder)
        finally:
            os.close(fd)
    return removed


def leftovers(output: str) -> list[str]:
    """Temporary folders of earlier runs beside a local `output` that never finished (a
    killed process cannot remove its own): `.NAME.tmp-*` and their `.old-*` twins. A run
    writing the same output right now has one too. Remote outputs: [] (not listed)."""
    if not is_local(output):
        return []
    parent = os.path.dirname(os.path.abspath(output))
    prefix = f".{os.path.basename(output)}.tmp-"
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, n) for n in names
                  if n.startswith(prefix) and os.path.isdir(os.path.join(parent, n)))


def read_text(path: str) -> str:
    if is_local(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    if is_local(path):
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        return
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, mime_type="text/plain",
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(text.encode("utf-8"))


def remove(folder: str) -> None:
    """Deletes `folder` and everything below it (nothing if it does not exist)."""
    if is_local(folder):
        shutil.rmtree(folder, ignore_errors=True)
        _let_go(folder)
        return
    from apache_beam.io.filesystems import FileSystems

    files = files_under(folder)
    if files:
        FileSystems.delete(files)


class InterruptedAfterCommit(KeyboardInterrupt):
    """A stop signal (Ctrl-C) while `commit` deleted the replaced output's files: the
    new output is in place and complete; `leftover` holds what was not deleted."""

    def __init__(self, leftover: str):
        super().__init__(leftover)
        self.leftover = leftover


def commit(tmp: str, output: str) -> None:
    """Puts the finished folder `tmp` in place as `output`, replacing an existing one."""
    if is_local(output):
        # (its hold let go first: stats.json written just now, no one takes it for a
        # killed run's, `remove_abandoned`)
        _let_go(tmp)
        if os.path.exists(output):
            trash = f"{tmp}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(output, trash)
                os.rename(tmp, output)
            except BaseException:  # Ctrl-C or SIGTERM between the two: the old one back
                if os.path.isdir(trash) and not os.path.exists(output):
                    os.rename(trash, output)
                raise
            try:
                # its stats.json first: a deletion cut short never leaves a folder that
                # `replaced_output` would name as a complete output
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(trash, schema.STATS_FILE))
                shutil.rmtree(trash, ignore_errors=True)
            except KeyboardInterrupt:
                raise InterruptedAfterCommit(trash) from None
        else:
            os.rename(tmp, output)
        return
    from apache_beam.io.filesystems import FileSystems

    new, old = files_under(tmp), files_under(output)
    stats_new, stats_old = join(tmp, schema.STATS_FILE), join(output, schema.STATS_FILE)
    if stats_new not in new:
        raise RuntimeError(f"{tmp} has no {schema.STATS_FILE}: not a finished output")
    if stats_old in old:  # from here on the old output is incomplete
        FileSystems.delete([stats_old])
    moves = {f: output + f[len(tmp):] for f in new if f != stats_new}
    if moves:
        FileSystems.rename(list(moves), list(moves.values()))
    stale = sorted(set(old) - set(moves.values()) - {stats_old})
    if stale:
        FileSystems.delete(stale)
    FileSystems.rename([stats_new], [stats_old])  # last: the output is complete
