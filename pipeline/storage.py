"""Telling a write that failed for want of room (a full disk, a file-size limit, a quota, a
read-only file system) from other errors, whichever layer reports it: Python's OSError,
TensorFlow's file ops (`ResourceExhaustedError: ...; No space left on device`), SQLite
(`database or disk is full`) or Beam, which hands a worker's error back as the text of a
RuntimeError. The entry points say such a failure in one line instead of a traceback.
Also the access checks, the folder locks and the CPU count every command shares
(`allowed`, `lock_folder`, `usable_cpus`)."""
from __future__ import annotations

import errno
import os

try:
    import fcntl
except ImportError:  # (Windows: no flock)
    fcntl = None

ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
# a path the user named that cannot be written as asked: not a bug to show a traceback for
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})
_PHRASES = tuple(os.strerror(n) for n in sorted(ROOM_ERRNOS)) + ("database or disk is full",)
# cgroup v2's CPU quota of this process's container ("max" or "QUOTA PERIOD")
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


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


def allowed(path: str, mode: int) -> bool:
    """`os.access` with the ids this process opens files with (its effective ones, where
    the system can tell): whether it may read, write or search `path` as `mode` says."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def read_only(path: str) -> bool:
    """Whether `path`, or the nearest folder above it where it does not exist, is on a file
    system mounted read-only (where `allowed` says no write for every user: a permission's
    advice would mislead)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # (gone meanwhile; no statvfs on Windows)
        return False


def remedy(reason: str) -> str:
    """What to do about a `storage_error` reason: "make room", or, for a read-only file
    system, "make it writable"."""
    return "make it writable" if reason == os.strerror(errno.EROFS) else "make room"


def temp_dir_error() -> str | None:
    """Why no temporary folder can be written, when none can: Beam's pipeline and
    TensorFlow's import (absl) need one, and Python's `tempfile` then raises "No usable
    temporary directory found" (ENOENT, the full disk's own error swallowed) from deep
    inside them. Checked by the commands before either; None when one can be written."""
    import tempfile

    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        folders = ", ".join(tempfile._candidate_tempdir_list())
        return (f"no temporary folder can be written ({folders}): a full or read-only "
                "disk? make room, or set TMPDIR to a folder that has some")
    return None


def reason_or_raise(e: BaseException) -> str:
    """`storage_error(e)` for an entry point's one-line message; any other error is raised
    again (with its traceback), since the entry point has nothing better to say of it."""
    reason = storage_error(e)
    if reason is None:
        raise e
    return reason


_PATH_PHRASES = tuple(os.strerror(n) for n in sorted(PATH_ERRNOS)) + ("is not a directory",)


def folder_bytes(folder: str) -> int:
    """Bytes of the files below a local folder (one removed meanwhile, by the process that
    writes there, counts 0); without Beam, which `pipeline.outputs` would import."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def path_error(e: BaseException) -> str | None:
    """"Permission denied: run/ckpt", "Is a directory: out.json", ... when `e` is an OSError
    (or TensorFlow's error from its file ops) about a path that cannot be written as asked:
    no permission, a file where a folder is needed or the other way round; else None."""
    if (isinstance(e, OSError) and e.errno == errno.EEXIST and e.filename
            and os.path.lexists(e.filename) and not os.path.isdir(e.filename)):
        # makedirs of a folder whose path is a file's: "File exists" says the opposite
        what = "a link to nothing" if not os.path.exists(e.filename) else "a file"
        return f"{e.filename} is {what} where a folder is needed"
    if isinstance(e, OSError) and e.errno in PATH_ERRNOS:
        return f"{os.strerror(e.errno)}: {e.filename}" if e.filename else os.strerror(e.errno)
    if type(e).__module__.startswith("tensorflow") and type(e).__name__ in (
            "PermissionDeniedError", "FailedPreconditionError", "AlreadyExistsError"):
        text = (str(getattr(e, "message", "")) or str(e)).strip().splitlines()
        if text and any(phrase in text[0] for phrase in _PATH_PHRASES):
            return text[0]
    return None


def within(path: str, folder: str) -> bool:
    """Whether local `path` is `folder` or lies inside it (links resolved)."""
    path, folder = (os.path.realpath(p).rstrip(os.sep) + os.sep for p in (path, folder))
    return path.startswith(folder)


def folder_kind(path: str) -> str | None:
    """What this project's commands wrote in local folder `path`, said for an error: "a
    pipeline output", "a model.train run folder", "a SavedModel version folder", "an export
    base (SavedModel versions)", "a model.compare output"; None for anything else (missing,
    empty, a file, other files)."""
    if not os.path.isdir(path):
        return None
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    if "saved_model.pb" in names:
        return "a SavedModel version folder"
    if {"stats.json", "items.tsv"} <= names and names & {"train", "valid", "test"}:
        return "a pipeline output"
    if "config.json" in names and names & {"checkpoints", "best", "train_summary.json"}:
        return "a model.train run folder"
    if "compare.log" in names or ("runs" in names and names & {"results.json",
                                                                "results_valid.json"}):
        return "a model.compare output"
    if any(n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb"))
           for n in names):
        return "an export base (SavedModel versions)"
    return None


def output_folder_error(option: str, path: str, data: str, own: str, what: str) -> str | None:
    """Why a command's output folder `path` (given as `option`) must not be used: it is
    the local `data` folder or lies inside it (a pipeline rerun with --overwrite would
    delete it), or another command's folder (`folder_kind`, other than `own`, the kind
    this command writes); `what` names what to pass instead. None when it may be used."""
    if "://" not in data and within(path, data) and folder_kind(data) == "a pipeline output":
        # (else --data is no pipeline output: the command's own check of it says so)
        return (f"{option} {path} is the --data folder or inside it: pass {what} of its own "
                "(it would write into the pipeline's output, which a rerun with --overwrite "
                "replaces)")
    kind = folder_kind(path)
    if kind is not None and kind != own:
        return f"{option} {path} is {kind}: pass {what} of its own (created if missing)"
    return None


def lock_folder(folder: str, wait: bool = False) -> int | None:
    """An exclusive flock on `folder` itself for this process (the system releases it
    however the process ends; nothing is written into the folder): the descriptor to close
    to release it, or None where there is no lock to take (Windows; a file system whose
    flock refuses a folder opened read-only, as NFS's emulation does, or takes no locks).
    With `wait`, until another process that holds it lets it go.

    Raises:
      BlockingIOError: another process holds it (without `wait`).
    """
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EBADF (NFS: an exclusive lock wants a file open for writing)
        os.close(fd)
        return None
    except BaseException:  # (Ctrl-C while it waits)
        os.close(fd)
        raise
    return fd


def lock_holder(folder: str) -> str:
    """" (process N)" for the process that holds `lock_folder`'s lock on `folder`, as
    Linux's /proc/locks names it (a message that named no holder sent a user looking for
    it), or "" where that cannot be told (another system, a process of another machine or
    PID namespace)."""
    try:
        st = os.stat(folder)
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:567 0 EOF" ("->" before a waiter's)
        if "->" not in fields and len(fields) >= 6 and fields[1] == "FLOCK" \
                and fields[5] == inode and fields[4].isdigit():
            return f" (process {fields[4]})"
    return ""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: `taskset`, a container's cpuset),
    at most its cgroup's CPU quota (a container's --cpus), not the host's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on macOS or Windows)
        cpus = os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def link_target(path: str) -> str:
    """Where a file output named `path` is written: the file a link there points to (a
    rename onto the link replaced it with a file, and the file it pointed to stayed as it
    was), else `path`; as the folder outputs are written where their link points."""
    return os.path.realpath(path) if os.path.islink(path) else path
