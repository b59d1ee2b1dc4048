"""`python -m pipeline --input GLOB --output DIR [options] [beam options]` (DESIGN.md §4).

Raw interaction logs (CSV, TSV or JSON lines) → one `tf.train.SequenceExample` per user per
split under DIR/{train,valid,test}/, plus `items.tsv`, `stats.json` and `malformed/`.
Options this command does not know are handed to Beam's `PipelineOptions`, so the same
command runs on Dataflow, Flink or Spark (`--runner DataflowRunner --project ...`). Without
`--runner` it runs locally on Beam's FnApiRunner with one worker process per CPU core.

The output is built in a temporary folder beside DIR and put in place when the job has
succeeded (`pipeline.outputs`: renamed locally; on gs:// or s3:// moved file by file with
`stats.json` last). Errors a user can fix (bad option, missing or unreadable input, an
existing DIR) stop the command with a one-line message and exit code 2 before anything
is written.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime
import difflib
import glob
import json
import logging
import os
import re
import shlex
import sys
import threading
import time

import pipeline
from pipeline import argtypes, outputs, parse, schema, sessions, split, storage

DEFAULT_MAX_EVENTS_PER_USER = 100_000
TIME_SAMPLE_ROWS = 20  # rows per input file checked for a time unit mistake at start
# a run stops at start where at least this many of a file's first rows all split into one
# other number of columns than named (a column missing from --columns)
SAME_WIDTH_MIN_ROWS = 5
# A note when more than this share of the events are dropped in too short sessions, or of
# the rows read are malformed.
SHORT_NOTE_SHARE = 0.5
# ... or of the users (of at least this many) are left with no session (a sparse log's
# one-event users: 67% of an Amazon-shaped log's users with 41% of its events)
SHORT_NOTE_MIN_USERS = 20
# a note where this share of the consecutive events in sessions are at the same time
SAME_TIME_NOTE_SHARE = 0.25
# ... and says the file looks sorted by item id where this share of those are in one order
# of their ids (about half each way where another order ties them), of at least this many
ID_ORDER_SHARE = 0.9
ID_ORDER_MIN_PAIRS = 20
# ... and that the file lists events newest first where this share of the pairs at
# different times (of at least ID_ORDER_MIN_PAIRS) came in reverse input order
NEWEST_FIRST_SHARE = 0.9
# ... with each split's share where one is this far from the whole log's
SPLIT_SHARE_APART = 0.1
# ... and names bulk additions where a session holds this many events in a row at one time
BULK_RUN_EVENTS = 50
# stats.json: per split, the pairs, the same-time ones and the longest same-time run
SAME_TIME_BY_SPLIT = "same_time_pairs_by_split"
# a note where train sessions hold more events past the valid (test) cut-off than this
# share of the valid (test) split's events (a session that spans a cut-off by minutes is
# every log's: sessions are never cut)
LATE_NOTE_SHARE = 0.01
MALFORMED_NOTE_SHARE = 0.1
# a note on days and months swapped where more than this share of the rows read are
# malformed for a time that the swapped format reads
SWAPPED_NOTE_SHARE = 0.05
# no note on short sessions where more than this share of the rows read are malformed
MOSTLY_MALFORMED_SHARE = 0.9
# the malformed-rows note names this many of them
MALFORMED_NOTE_KINDS = 3
# The first bytes of a compressed file or an archive, and what it is: a file whose name
# does not end in its compression's extension is read as text (`sources`).
COMPRESSED_MAGIC = tuple((re.compile(magic, re.DOTALL), what, advice) for magic, what, advice in (
    (rb"\x1f\x8b", "gzip data", "rename it to end in .gz"),
    (rb"BZh[1-9]1AY&SY", "bzip2 data", "rename it to end in .bz2"),
    (rb"\xfd7zXZ\x00", "xz data", "rename it to end in .xz"),
    (rb"\x28\xb5\x2f\xfd", "zstandard data", "decompress it"),
    (rb"PK\x03\x04", "a zip archive", "unpack it")))
# --time-unit ms: a median of the first rows below this many seconds (April 1970) gets a
# note that the times may be seconds (unix seconds of 2001-2033 read as ms: 1e6-2e6).
LIKELY_SECONDS_AS_MS = 10**7
# ... and unix seconds of 2000 or later read as ms are at least this many seconds (12 days
# into 1970): a cut-off before it is no such mistake but times since a session's start
YEAR_2000_SECONDS_AS_MS = 946_684
# --time-unit s: a median of the first rows below this (1980) gets a note that the times
# may be relative (seconds since a session's or the log's start).
LIKELY_RELATIVE_SECONDS = 315_532_800
# a --session-gap of this many seconds (3 years) or more keeps each user's events in one
# session: a session log (README § 1), whose late events are no crawler's
SESSION_LOG_GAP = 10**8
WORK_DIR = "_work"
# Runners whose workers are processes of this machine sharing our stderr (`_quiet_beam_stderr`).
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
STDERR_KEPT_BYTES = 1 << 20  # the last 1 MB of a run's held-back stderr is shown
PROGRESS_EVERY_S = 30.0  # a progress line this often when stderr is not a terminal


class _DropBeamImportNotice(logging.Filter):
    """Hides Beam's import-time notice about optional GCP libraries (not used here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


# Lines of Python's default log format at these levels ("INFO:apache_beam...:...") are Beam's
# chatter: the local worker processes write them to the inherited stderr at INFO whatever
# --default_sdk_harness_log_level says (their pipeline options arrive empty).
_CHATTER = re.compile(rb"^(DEBUG|INFO|WARNING):[\w.]+:")


class _Progress:
    """The run's progress from the workers' `transforms.report_progress` lines: input bytes
    read and user records built, drawn on one line on a terminal (at most twice a second)
    or printed as a line every `PROGRESS_EVERY_S` seconds otherwise."""

    def __init__(self, fd: int, total_bytes: int, mark: bytes):
        self.fd, self.total, self.mark = fd, max(total_bytes, 1), mark
        self.read = self.users = 0
        self.start = self.shown = time.monotonic()
        self.tty = os.isatty(fd)
        self.width = 0

    def add(self, line: bytes) -> None:
        kind, _, n = line[len(self.mark):].decode("ascii", "replace").partition(" ")
        if kind == "read":
            self.read += int(n)
        elif kind == "users":
            self.users += int(n)
        now = time.monotonic()
        if now - self.shown >= (0.5 if self.tty else PROGRESS_EVERY_S):
            self.shown = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        seconds = int(now - self.start)
        size = (f"{self.total / 1e9:,.2f} GB" if self.total >= 1e9 else
                f"{self.total / 1e6:,.1f} MB" if self.total >= 1e6 else f"{self.total / 1e3:,.1f} KB")
        text = (f"pipeline: input read {min(100.0, 100 * self.read / self.total):.0f}% of "
                f"{size}, {self.users:,} users' records built, "
                f"{seconds // 60}:{seconds % 60:02d}")
        if self.tty:
            os.write(self.fd, ("\r" + text.ljust(self.width)).encode())
            self.width = len(text)
        else:
            os.write(self.fd, (text + "\n").encode())

    def close(self) -> None:
        if self.tty and self.width:  # clear the line
            os.write(self.fd, ("\r" + " " * self.width + "\r").encode())


@contextlib.contextmanager
def _quiet_beam_stderr(enabled: bool, total_bytes: int = 0):
    """While the pipeline runs, holds back stderr (this process's and its local workers',
    which share the file descriptor) and drops Beam's INFO/WARNING lines from it. The rest
    (errors, tracebacks, warnings of other libraries) is shown when the run ends, unless the
    run failed on a damaged input or was interrupted, which `main` reports in one line. The
    workers' progress lines (`transforms.report_progress`) become a progress display
    (`_Progress`)."""
    if not enabled:
        yield
        return
    from pipeline import transforms

    kept: collections.deque[bytes] = collections.deque()
    size = [0]
    mark = transforms.PROGRESS_MARK

    def collect():
        # (this thread must keep draining the pipe whatever it reads: a full pipe would
        # block every writer, the workers included)
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if line.startswith(mark):
                    try:
                        progress.add(line)
                    except (ValueError, OSError):
                        pass
                    continue
                if _CHATTER.match(line):
                    continue
                kept.append(line)
                size[0] += len(line)
                while size[0] > STDERR_KEPT_BYTES and len(kept) > 1:
                    size[0] -= len(kept.popleft())

    def restore():
        with argtypes.stop_signals_held():  # (a second stop here: after fd 2 is back)
            os.environ.pop(transforms.PROGRESS_ENV, None)
            sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe ends when the workers, holding it too, have exited
        thread.join(timeout=10)
        progress.close()
        os.close(saved)

    failure, set_up = None, False
    try:
        # (a Ctrl-C or SIGTERM in the set-up waits for its end: one that landed with the
        # pipe in place and its reader not started left fd 2 on the pipe, and the
        # command's "interrupted" line went where nobody reads it)
        with argtypes.stop_signals_held():
            sys.stderr.flush()
            saved = os.dup(2)
            read_end, write_end = os.pipe()
            os.dup2(write_end, 2)
            os.close(write_end)
            progress = _Progress(saved, total_bytes, mark)
            os.environ[transforms.PROGRESS_ENV] = "1"
            thread = threading.Thread(target=collect, name="beam-stderr", daemon=True)
            thread.start()
            set_up = True
        yield
    except BaseException as e:
        failure = e
        raise
    finally:
        if set_up:
            restore()
        # (an interrupt's are the workers' KeyboardInterrupt tracebacks: `main` says it)
        if failure is None or (_said_in_one_line(failure) is None
                               and not isinstance(failure, KeyboardInterrupt)):
            sys.stderr.write(b"".join(kept).decode("utf-8", "replace"))


def _input_error(e: BaseException) -> str | None:
    """The message of an input found damaged while reading (a truncated compressed file),
    else None. A portable runner hands a worker's InputError back as the text of a
    RuntimeError."""
    from pipeline import sources

    if isinstance(e, sources.InputError):
        return str(e)
    if isinstance(e, RuntimeError):
        marker = f"{sources.InputError.__module__}.InputError: "
        found = [line.split(marker, 1)[1] for line in str(e).splitlines() if marker in line]
        return found[-1] if found else None
    return None


def _said_in_one_line(e: BaseException) -> str | None:
    """What `main` says of a failed run in one line (a damaged input; a write that failed
    for want of room, `storage.storage_error`), else None (the traceback is shown)."""
    message = _input_error(e)
    if message is None and isinstance(e, RuntimeError) and "prism binary" in str(e):
        # PrismRunner fetches its binary from GitHub when it starts
        return (f"{str(e).splitlines()[0]} (--runner PrismRunner downloads its binary when it "
                "starts: pass --prism_location with a prism binary or its release zip, or "
                "leave out --runner for the local FnApiRunner)")
    if message is None and isinstance(e, RuntimeError) and (
            "Unable to fetch remote job server jar" in str(e)):
        # FlinkRunner and SparkRunner fetch their job server's jar from Maven when they
        # start (196 lines of seven tracebacks where there is no network)
        url = re.search(r"jar at (\S+?\.jar)", str(e))
        return (f"cannot fetch the runner's job server jar{f' ({url.group(1)})' if url else ''}: "
                "the runner downloads it when it starts; pass --flink_job_server_jar "
                "(FlinkRunner) or --spark_job_server_jar (SparkRunner) with a local copy, or "
                "--job_endpoint of a running job server, or leave out --runner for the local "
                "FnApiRunner")
    reason = storage.storage_error(e) if message is None else None
    return f"cannot write: {reason}" if reason else message


class UsageError(ValueError):
    """A mistake in the command line or the inputs (one-line message, exit code 2)."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _filter(text: str, empty: bool = False) -> tuple[str, tuple[str, ...]]:
    """`COLUMN=VALUE[,VALUE...]` -> (column, values), both stripped (values as the rows'
    are compared: `parse.whole_number_text`); the values are a CSV row, so a value with a
    comma is quoted: `user="Crosby, Stills & Nash",bot7`. `empty`: an empty value is
    one (`--exclude`'s: the rows whose column is empty), else refused (a `--filter`
    without its value would keep nothing but empty rows)."""
    column, sep, values = text.partition("=")
    try:
        fields = next(csv.reader([values]), None) or [""]
    except csv.Error:
        fields = [None]  # (refused)
    kept = tuple(None if v is None else parse.whole_number_text(v.strip()) for v in fields)
    if not sep or not column.strip() or None in kept or not (empty or all(kept)):
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE[,VALUE...], got {text!r}")
    return column.strip(), kept


def _exclusion(text: str) -> tuple[str, tuple[str, ...]]:
    """`--exclude`'s `_filter`: an empty value (`userId=`, `userId=,NA`) is the rows whose
    column is empty (JSON: null or missing)."""
    return _filter(text, empty=True)


def _filter_value(value: str) -> str:
    """`value` as `--filter`/`--exclude` read it back (`_filter`): quoted where it holds a
    comma or a quote."""
    return f'"{value.replace(chr(34), 2 * chr(34))}"' if "," in value or '"' in value else value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see python -m pipeline --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command's own options (Beam's options are parsed by Beam)."""
    p = _Parser(
        prog="python -m pipeline", formatter_class=argtypes.DefaultsHelpFormatter,
        description="Raw interaction logs → TFRecord session sequences (HierTCN).",
        epilog="Other --options go to Apache Beam, e.g. --runner DataflowRunner --project P "
               "--region R --temp_location gs://B/tmp; --direct_num_workers N locally.")
    argtypes.add_version(p)
    p.add_argument("--input", action="extend", nargs="+", required=True, metavar="GLOB",
                   type=argtypes.home_path,
                   help="input files (globs or paths, several after one flag or the flag "
                        "repeated; .gz, .bz2 and .xz files are decompressed)")
    p.add_argument("--output", required=True, metavar="DIR", type=argtypes.home_path,
                   help="output folder (local, or gs://, s3://... through Beam's file systems)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.add_argument("--shared-mount", action="store_true",
                   help="a --runner whose workers run on other machines mounts the local "
                        "paths of --input and --output at the same place (NFS, /dbfs): "
                        "allow them (they are refused with such a runner otherwise)")
    p.add_argument("--format", choices=parse.FORMATS, default="csv",
                   help="input format: csv (CSV quoting), tsv (no quoting: a tab-separated "
                        "file with quoting is csv with --delimiter tab), jsonl (one JSON "
                        "object per line), parquet or avro (one event per row; timestamp and "
                        "date columns are read as their instants, whatever --time-unit says)")
    cols = p.add_mutually_exclusive_group()
    cols.add_argument("--header", dest="header", action="store_true", default=True,
                      help="each file's first line names the columns (the default)")
    cols.add_argument("--columns", metavar="a,b,c",
                      help="column names in order, for files without a header (csv/tsv)")
    p.add_argument("--delimiter", metavar="TEXT",
                   help="field separator of csv/tsv files (default ',' for csv, a tab for tsv; "
                        "'\\t' or tab: a tab); several characters, e.g. MovieLens' '::', "
                        "split without quoting")
    p.add_argument("--user-col", default="user", help="user id column (jsonl: key)")
    p.add_argument("--item-col", default="item", help="item id column (jsonl: key)")
    p.add_argument("--time-col", default="time", help="timestamp column (jsonl: key)")
    p.add_argument("--time-unit", choices=parse.TIME_UNITS, default=None,
                   help="unix seconds, unix milliseconds or ISO 8601 text (naive times: "
                        "UTC) (parquet, avro: for a time column of numbers or text) "
                        "(default: s)")
    p.add_argument("--time-format", metavar="FORMAT",
                   help="text times in another layout, in Python's strptime directives, e.g. "
                        "'%%m/%%d/%%Y %%H:%%M:%%S' or '%%d.%%m.%%Y %%H:%%M %%z' (naive times: "
                        "UTC); instead of --time-unit")
    p.add_argument("--session-gap", type=argtypes.non_negative_int, default=None, metavar="SECONDS",
                   help="a gap strictly greater starts a new session (default: 1800)")
    p.add_argument("--session-col", metavar="NAME",
                   help="the log's own session ids: a session is a user's events with one id, "
                        "in time order (instead of --session-gap)")
    p.add_argument("--filter", action="append", type=_filter, metavar="COLUMN=VALUE[,VALUE...]",
                   help="keep only the rows whose COLUMN (jsonl: key) holds one of the values, "
                        "e.g. --filter event=view,addtocart (repeatable: every filter must hold); "
                        "the others are counted in stats.json's rows_filtered.filter")
    p.add_argument("--exclude", action="append", type=_exclusion, metavar="COLUMN=VALUE[,VALUE...]",
                   help="leave out the rows whose COLUMN (jsonl: key) holds one of the values, "
                        "e.g. --exclude user=crawler7 (repeatable; compared as --filter "
                        "compares; an empty value, --exclude user=, is the rows whose COLUMN "
                        "is empty: the anonymous rows of a log of logged-in and anonymous "
                        "users); counted in stats.json's rows_filtered.filter")
    p.add_argument("--min-item-count", type=argtypes.positive_int, default=5,
                   help="vocabulary threshold on train events")
    p.add_argument("--min-session-length", type=argtypes.positive_int, default=2,
                   help="after collapsing immediate repeats")
    p.add_argument("--split", choices=split.SPLIT_METHODS, default="time",
                   help="time: global cut-offs on session start times, the latest --test-fraction "
                        "of sessions is test and the --valid-fraction before them valid; users: "
                        "whole users by a hash of their ids")
    p.add_argument("--valid-fraction", type=_fraction, default=0.1,
                   help="share of sessions (time) or users (users) for valid")
    p.add_argument("--test-fraction", type=_fraction, default=0.1,
                   help="share of sessions (time) or users (users) for test")
    p.add_argument("--max-events-per-user", type=argtypes.positive_int,
                   default=DEFAULT_MAX_EVENTS_PER_USER,
                   help="keep each user's most recent events only (counted in stats)")
    p.add_argument("--max-malformed-fraction", type=_fraction, default=None, metavar="F",
                   help="fail the run (exit 1; an earlier output is not replaced) when more "
                        "than this fraction of the rows read are malformed (default: no "
                        "limit; a bad row never stops the job, and malformed/ keeps it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --split users hash")
    p.add_argument("--beam-logs", action="store_true",
                   help="show Apache Beam's own INFO and WARNING log lines of a local run "
                        "(hidden by default; errors always show)")
    return p


def _non_empty(files, fmt: str = "csv") -> tuple[list, dict, list]:
    """(the files with at least one non-blank line, their first lines, the empty files' paths).

    Empty files are skipped, not errors: exports from Spark, Hive or Beam itself hold
    0-byte part files and `_SUCCESS` markers beside the data; a text file of blank lines
    only (an empty data frame's CSV is one newline) is empty too, not a header naming no
    column. A Parquet or Avro file's
    (`fmt`) first rows come as JSON lines (`sources.parquet_head`, `sources.avro_head`).

    Raises:
      UsageError: every file is empty.
    """
    from pipeline import sources

    kept, heads, empty = [], {}, []
    for path, size in files:
        if fmt in ("parquet", "avro"):
            read = sources.parquet_head if fmt == "parquet" else sources.avro_head
            head = [parse.row_text(row).encode("utf-8")
                    for row in read(path, 1 + TIME_SAMPLE_ROWS)] if size else []
        else:
            head = sources.read_first_lines(path, 1 + TIME_SAMPLE_ROWS) if size else []
            if len(head) < 1 + TIME_SAMPLE_ROWS and not getattr(head, "long", None) and not any(
                    line.lstrip(b"\xef\xbb\xbf").strip() for line in head):
                head = []  # only blank lines (an empty frame's export, `echo > f`): no rows
                # (a line over sources.MAX_LINE_BYTES is a row: a malformed one)
        if head:
            kept.append((path, size))
            heads[path] = head
        else:
            empty.append(path)
    if not kept:
        raise UsageError(f"every --input file is empty ({len(empty)}: "
                         f"{', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''})")
    return kept, heads, empty


def _row_formats(args, files, heads) -> dict:
    """Per-file `RowFormat`, from each file's header or from --columns (`heads`: each
    file's first lines)."""
    from pipeline import sources

    wanted = (args.user_col, args.item_col, args.time_col) + (
        (args.session_col,) if args.session_col else ())
    if len(set(wanted)) < len(wanted):
        same_session = args.session_col is not None and args.session_col == args.user_col
        raise UsageError(f"--user-col, --item-col, --time-col{' and --session-col' if args.session_col else ''} "
                         f"must differ, got {wanted}"
                         + (f"; for a log of sessions without users, leave out --session-col: "
                            f"the {args.user_col} column's ids are then the users, each one's "
                            "events split into sessions by --session-gap (a large one, "
                            "e.g. --session-gap 1000000000, keeps them in one)"
                            if same_session else ""))
    text = args.format in ("csv", "tsv")
    separator = parse.separator_of(args.format, args.delimiter or "") if text else ""
    filters = (tuple((column, frozenset(values)) for column, values in args.filter or ())
               + tuple((column, parse.AllBut(values)) for column, values in args.exclude or ()))
    formats = {}
    for rank, (path, _) in enumerate(files):
        head = heads[path]
        first = head[0]
        for magic, fmt in ((sources.PARQUET_MAGIC, "parquet"), (sources.AVRO_MAGIC, "avro")):
            if args.format != fmt and first.startswith(magic):
                raise UsageError(f"{path} is {'a Parquet' if fmt == 'parquet' else 'an Avro'} "
                                 f"file: pass --format {fmt}")
        for magic, what, advice in COMPRESSED_MAGIC:
            if magic.match(first):
                raise UsageError(f"{path} holds {what}, but its name does not say so (the "
                                 f"compression is read from the name): {advice}")
        if text or args.format == "jsonl":
            line = getattr(head, "long", {}).get(0, first)  # (a first line over 16 MiB)
            if len(head) == 1 and b"\r" in line:  # no line feed: the whole file is one line
                raise UsageError(f"{path}: its lines end in a carriage return alone (\\r, as "
                                 "classic Mac OS wrote them), which is not a line end here: "
                                 f"convert it first, e.g. tr '\\r' '\\n' < {path} > {path}.lf")
        if args.format in ("csv", "tsv") and first.lstrip(b"\xef\xbb\xbf \t").startswith(b"{"):
            raise UsageError(f"{path} holds JSON objects, not {args.format} rows: pass "
                             "--format jsonl")
        if args.format in ("csv", "tsv", "jsonl"):
            _check_encoding(path, head)
        columns: tuple[str, ...] = ()
        time_unit = args.time_unit
        if args.format != "jsonl":
            if args.format in ("parquet", "avro"):
                types = (sources.parquet_schema if args.format == "parquet"
                         else sources.avro_schema)(path)
                columns = tuple(types)
                where = f"the schema of {path}"
                if args.time_col in types and sources.is_instant(types[args.time_col]):
                    time_unit = "ms"  # (sources gives instants as milliseconds)
            elif args.columns:
                columns = tuple(c.strip() for c in args.columns.split(","))
                where = "--columns"
            else:
                try:
                    columns = parse.parse_header(first.decode("utf-8"), separator,
                                                 parse.is_quoted(args.format, separator))
                except UnicodeDecodeError:
                    raise UsageError(f"{path}: the header line is not UTF-8; {_to_utf8(path)}"
                                     ) from None
                where = f"the header of {path}"
            missing = [c for c in wanted if c not in columns]
            if missing:
                options = dict(zip(wanted, ("--user-col", "--item-col", "--time-col",
                                            "--session-col")))
                alike = [f"{options[c]} {shlex.quote(col)}? " for c in missing for col in columns
                         if col.lower().replace("_", "") == c.lower().replace("_", "")]
                raise UsageError(
                    f"column(s) {', '.join(missing)} not in {where} {_listed(columns)}: "
                    + (f"names must match exactly: {''.join(alike)}" if alike else "")
                    + "set --user-col/--item-col/--time-col"
                    + ("/--session-col" if args.session_col else "")
                    + (", or --columns for files without a header"
                       + _delimiter_hint(first, separator, args.format) if text else ""))
            for option in ("--filter", "--exclude"):
                missing = [c for c, values in filters if c not in columns
                           and isinstance(values, parse.AllBut) == (option == "--exclude")]
                if missing:
                    raise UsageError(f"{option} column(s) {', '.join(missing)} not in {where} "
                                     f"{_listed(columns)}")
            if len(set(columns)) != len(columns):
                twice = [c for c, n in collections.Counter(columns).items() if n > 1]
                raise UsageError(f"duplicate column names in {where}: {', '.join(twice)} (in "
                                 f"{_listed(columns)})")
            sessions_column = [c for c in columns if _names_sessions(c)
                               and c not in wanted]  # (a session log's session id as the user)
            if not args.session_col and sessions_column and rank == 0:
                print(f"note: the log has a column {sessions_column[0]!r}: sessions come from time "
                      f"gaps (--session-gap) unless you pass --session-col {sessions_column[0]}",
                      file=sys.stderr)
        formats[rank] = parse.RowFormat(args.format, time_unit, args.user_col,
                                        args.item_col, args.time_col, columns,
                                        args.delimiter or "", args.session_col or "", filters)
        has_header = text and not args.columns
        rows = _check_filters(path, head[1:] if has_header else head, formats[rank])
        if text:
            _check_column_count(path, rows, formats[rank], where)
        elif args.format == "jsonl":  # (a Parquet or Avro file's columns are in its schema)
            _check_json_keys(path, rows, formats[rank])
        _check_time_unit(path, rows, formats[rank])
    if getattr(args, "gap_by_default", False) and _names_sessions(args.user_col):
        print(f"note: --user-col {args.user_col} names session ids (a log of sessions "
              "without users?): each one's events are still cut at gaps over --session-gap "
              "1800 s; a gap longer than any session (--session-gap 1000000000) keeps each "
              "whole", file=sys.stderr)
    return formats


def _names_sessions(column: str) -> bool:
    """Whether a column name says it holds session ids (session, session_id, sessionId)."""
    return column.lower().replace("_", "") in ("session", "sessionid")


# The most column names an error lists: a header line that is not one (a file whose lines
# a line feed does not end, a binary file) can hold thousands.
MAX_LISTED_COLUMNS = 20


def _listed(columns) -> str:
    """Column names as an error lists them: the first `MAX_LISTED_COLUMNS`, then how many
    more."""
    names = list(columns)
    if len(names) <= MAX_LISTED_COLUMNS:
        return str(names)
    return f"{str(names[:MAX_LISTED_COLUMNS])[:-1]}, ... {len(names) - MAX_LISTED_COLUMNS} more]"


def _to_utf8(path: str, source: str = "cp1252") -> str:
    return (f"the pipeline reads UTF-8 (ASCII is UTF-8): convert the file first, e.g. "
            f"iconv -f {source} -t utf-8 {path} > {path}.utf8"
            + (" (Windows-1252 or Latin-1 text)" if source == "cp1252" else ""))


def _decodes_as(lines: list[bytes], width: int) -> str | None:
    """The byte order ("le" or "be"; None: neither) in which the first lines read as UTF-16
    (`width` 2) or UTF-32 (4) text: most of their 0x0A bytes (where they were split) are that encoding's line break
    at a character boundary (a few can be a byte of another character: U+4E0A), and the
    lines joined back decode to printable characters and white space (U+3000 too), not
    the NULs, control characters and invalid sequences of a binary file or of a UTF-8 one
    (pairs of ASCII bytes decode as UTF-16 CJK)."""
    data = b"\n".join(lines)
    breaks = [m.start() for m in re.finditer(b"\n", data)]
    pad = b"\x00" * (width - 1)
    for order in ("le", "be"):
        if order == "le":
            aligned = sum(i % width == 0 and data[i + 1:i + width] == pad for i in breaks)
        else:
            aligned = sum(i % width == width - 1 and data[i - width + 1:i] == pad for i in breaks)
        if breaks and 2 * aligned < len(breaks):
            continue
        text = data[:len(data) // width * width].decode(f"utf-{8 * width}-{order}", "replace")
        good = sum((c.isprintable() or c.isspace()) and c != "\ufffd" for c in text)
        if text and good >= 0.95 * len(text):
            return order
    return None


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_encoding(path: str, lines: list[bytes]) -> None:
    """Stops a text input whose first lines are not UTF-8: UTF-16 or UTF-32 (a byte-order
    mark, or NULs between the characters), or lines of bytes beyond ASCII none of which
    decodes as UTF-8 (a Latin-1 or Windows-1252 export: every row with an accent would go
    to malformed/ as "bad UTF-8", after the whole run). A UTF-8 log with a damaged row or
    two among rows that decode goes on: those rows are malformed, the rest are read."""
    first = lines[0] if lines else b""
    # NULs in a third of a line's bytes: UTF-16 or UTF-32 text (with or without a byte-order
    # mark), else binary data (a compressed or executable file passed by mistake); a lone
    # NUL in a UTF-8 row is that row's damage, not the file's encoding
    nuls = any(len(line) >= 4 and 3 * line.count(b"\x00") >= len(line) for line in lines)
    # (text of mostly CJK characters in UTF-16 has few NULs, but is not UTF-8 either)
    wide = nuls or not all(map(_is_utf8, lines))
    # (with a byte-order mark, iconv's utf-16 and utf-32 read either order; without one,
    # glibc's read little-endian, and big-endian text becomes garbage: name the order)
    if first.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise UsageError(f"{path} is UTF-32; {_to_utf8(path, 'utf-32')}")
    order = _decodes_as(lines, 4) if wide else None
    if order:
        raise UsageError(f"{path} is UTF-32; {_to_utf8(path, 'utf-32' + order)}")
    if first.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path} is UTF-16; {_to_utf8(path, 'utf-16')}")
    order = _decodes_as(lines, 2) if wide else None
    if order:
        raise UsageError(f"{path} is UTF-16; {_to_utf8(path, 'utf-16' + order)}")
    if nuls:
        raise UsageError(f"{path} is not a text file (NUL bytes in its first lines: binary "
                         "data): pass the log itself, as text (CSV, TSV, JSON lines), "
                         "Parquet or Avro")
    bad, beyond_ascii = [], 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(line)
            continue
        beyond_ascii += not line.isascii()
    if bad and not beyond_ascii and (len(bad) >= 3 or len(bad) == len(lines)):
        raise UsageError(f"{path}: {len(bad)} of its first {len(lines)} lines are not UTF-8 "
                         f"(like {bad[0][:60]!r}); {_to_utf8(path)}")


def _check_filters(path: str, lines: list[bytes], fmt) -> list[bytes]:
    """The first rows the other checks look at: without --filter all of them, with it those
    that pass it or cannot be read (a row the filters leave out may lack an item or hold
    another kind of time without being an error). A note when no readable row passes, with
    the values those rows hold (a misspelt value would filter out every row)."""
    if not fmt.filters:
        return lines
    seen: dict[str, collections.Counter] = {c: collections.Counter() for c, _ in fmt.filters}
    kept, rows, passed = [], 0, False
    keys: dict[str, None] = {}  # (the JSON objects' keys, in the order first met)
    for line in lines:
        text = line.decode("utf-8", "replace").strip().lstrip("\ufeff")
        try:
            if not text:
                raise ValueError("a blank line")
            if fmt.objects:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            else:
                row = parse.row_fields(text, fmt)
                if row is None:
                    raise ValueError("wrong column count")
        except (ValueError, RecursionError):  # malformed rows: said elsewhere
            kept.append(line)
            continue
        rows += 1
        if fmt.objects:
            keys.update(dict.fromkeys(row))
        values = parse.filter_values(row, fmt)
        if parse.passes_filters(values, fmt):
            kept.append(line)
            passed = True
            continue
        for (c, _), value in zip(fmt.filters, values):
            seen[c][value] += 1
    if rows and not passed:
        absent = [c for c, values in fmt.filters if c not in keys
                  and not isinstance(values, parse.AllBut)] if fmt.objects else []
        alike = {c: difflib.get_close_matches(c, list(keys), 1, 0.75) for c in absent}
        if any(alike.values()):  # (a misspelt key: every row would be filtered out)
            said = "; ".join(f"--filter {c}=...: did you mean {alike[c][0]!r}?"
                             for c in absent if alike[c])
            raise UsageError(f"{path}: none of the first {rows} JSON objects has the --filter "
                             f"key(s) {', '.join(absent)} (they have {_listed(list(keys))}): "
                             f"{said}")
        held = "; ".join(f"{c}: no such key" if c in absent else
                         f"{c}: {', '.join(repr(v) for v, _ in seen[c].most_common(5))}"
                         for c in seen)
        print(f"note: {path}: none of the first {rows} rows passes --filter (they hold {held}): "
              "rows whose values are not listed are filtered out", file=sys.stderr)
    return kept


def _delimiter_hint(line: bytes, separator: str, fmt: str, what: str = "the header looks") -> str:
    """`; the header looks ';'-separated: pass --delimiter ';'` when it does (`--format
    csv` or `--format tsv` when it is the other format's own separator)."""
    guess = parse.guess_delimiter(line.decode("utf-8", "replace"))
    if guess is None or guess == separator:
        return ""
    own = {",": "csv", "\t": "tsv"}.get(guess)
    advice = f"--format {own}" if own and own != fmt else f"--delimiter {guess!r}"
    return f"; {what} {guess!r}-separated: pass {advice}"


def _check_column_count(path: str, lines: list[bytes], fmt, where: str = "") -> None:
    """When none of a file's first rows splits into the expected columns: stops the run
    where the rows look separated by another separator, or all hold one other number of
    columns than `where` (--columns, the header) names (every row would be malformed; the
    error names the option), a note otherwise (later rows may split)."""
    texts = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
    texts = [t for t in texts if t.strip()]
    if not texts:
        return
    for text in texts:
        try:
            if parse.row_fields(text, fmt) is not None:
                return
        except ValueError:
            continue
    said = (f"{path}: none of the first {len(texts)} rows has {len(fmt.columns)} "
            f"{fmt.separator!r}-separated columns")
    hint = _delimiter_hint(texts[0].encode("utf-8"), fmt.separator, fmt.format, "they look")
    if hint:
        raise UsageError(f"{said} (every row would be malformed){hint}")
    counts = set()
    for text in texts:
        try:
            counts.add(len(parse.split_fields(text, fmt.separator, fmt.quoted)))
        except ValueError:
            counts.add(None)
    if len(texts) >= SAME_WIDTH_MIN_ROWS and len(counts) == 1 and None not in counts:
        # (a column left out of --columns, or one too many: the whole log malformed)
        how = ("name each of them in --columns, in order (one the run does not read too)"
               if where == "--columns" else "the rows and the header disagree")
        raise UsageError(f"{path}: each of its first {len(texts)} rows has {counts.pop()} "
                         f"{fmt.separator!r}-separated columns, where {where or 'the header'} "
                         f"names {len(fmt.columns)} {_listed(fmt.columns)} (every row would be "
                         f"malformed): {how}")
    print(f"note: {said} (they are malformed rows)", file=sys.stderr)


def _check_json_keys(path: str, lines: list[bytes], fmt) -> None:
    """Stops the run when none of a file's first lines is a JSON object with any of the
    wanted keys (every row would be malformed: misnamed keys, not JSON lines), saying which
    keys the objects have; a note when some have some of them but none all (a log of mixed
    event types whose first events carry no item: those rows are malformed)."""
    texts = [line.decode("utf-8", "replace").strip().lstrip("\ufeff") for line in lines]
    texts = [t for t in texts if t]
    first_keys = None
    objects = 0
    some = False  # an object with some of the wanted keys
    for text in texts:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            objects += 1
            if all(k in obj for k in fmt.wanted):
                return
            some = some or any(k in obj for k in fmt.wanted)
            first_keys = list(obj) if first_keys is None else first_keys
    if not texts:
        return
    if not objects:
        hint = ("; they look like Python dicts (quoted with '), not JSON: convert them, e.g. "
                "python -c 'import ast, json, sys; [print(json.dumps(ast.literal_eval(l))) "
                "for l in sys.stdin]'" if _python_dict(texts[0]) else
                "; it looks like one JSON document (an array?): write one object per line, "
                "e.g. jq -c '.[]'" if texts[0][:1] in "[{" else _rows_hint(texts[0]))
        raise UsageError(f"{path}: none of the first {len(texts)} lines is a JSON object "
                         f"(--format jsonl reads one object per line){hint}")
    missing = [k for k in fmt.wanted if k not in first_keys]
    options = "--user-col/--item-col/--time-col" + ("/--session-col" if fmt.session_col else "")
    nested = ("; nested keys are not read: flatten them first (e.g. jq -c)"
              if any("." in k for k in missing) else "")
    said = (f"none of the first {objects} JSON objects has the key(s) {', '.join(missing)} "
            f"(the first has {first_keys[:12]}{'...' if len(first_keys) > 12 else ''})")
    if some and not nested:
        print(f"note: {path}: {said}: rows without {', '.join(fmt.wanted)} are malformed",
              file=sys.stderr)
        return
    raise UsageError(f"{path}: {said}: set {options}{nested}")


def _rows_hint(text: str) -> str:
    """"; they look like ','-separated rows: pass --format csv" for a delimited line read as
    JSON lines; "" when it does not look delimited."""
    guess = parse.guess_delimiter(text)
    if guess is None:
        return ""
    advice = {",": "--format csv", "\t": "--format tsv"}.get(guess, f"--format csv --delimiter {guess!r}")
    return f"; they look like {guess!r}-separated rows: pass {advice}"


# The longest line `_python_dict` tries as a Python literal (a row is far shorter; parsing a
# long one costs memory hundreds of times its length).
PYTHON_DICT_MAX_CHARS = 65536


def _python_dict(text: str) -> bool:
    """Whether a line is a Python dict literal (as some published logs are written)."""
    import ast

    if len(text) > PYTHON_DICT_MAX_CHARS or not text.lstrip().startswith("{"):
        return False
    try:
        return isinstance(ast.literal_eval(text), dict)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False


def _finer_unit(value: float) -> str:
    """The unit unix times like `value` (now-ish) are in, among the finer ones."""
    return ("milliseconds" if value < 10**14 else "microseconds" if value < 10**17
            else "nanoseconds")


def _check_time_unit(path: str, lines: list[bytes], fmt) -> None:
    """Stops a run whose times are in a finer unit than --time-unit says, or none of whose
    first rows' present times parse (every row would be malformed), and notes times that
    look like seconds given as --time-unit ms.

    Millisecond times read as seconds land in the year 47,000: every gap between two clicks
    exceeds --session-gap, every session is one event long and the run writes nothing.
    Unix seconds pass 1e11 only in the year 5138, so a median of the first rows' times
    above that is a unit mistake, not data.
    """
    times, bad_times, negative = [], [], []
    swapped = parse.days_months_swapped(fmt.time_unit)
    written = []  # (with `swapped`: the times as written)
    for line in lines:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a bad row goes to malformed/ in the run
        if swapped:
            written.append(_raw_time(text, fmt))
        try:
            times.append(parse.parse_line(text, fmt, check_range=False)[2])  # (ms)
        except ValueError:
            value = _raw_time(text, fmt)
            if value is not None:  # (a row malformed for another reason, such as an `NA`
                try:               # user, still shows the unit of its time)
                    times.append(parse.parse_time_ms(value, fmt.time_unit, check_range=False))
                except ValueError as error:
                    bad_times.append(value)
                    negative.append(str(error).startswith("negative time"))
    if swapped and len(bad_times) >= 2 and all(parse.strptime_reads(v, swapped)
                                               for v in written if v is not None):
        # (a day/month/year log read as month/day/year: the days after the 12th malformed,
        # the others read with their day as the month)
        raise UsageError(f"{path}: {len(bad_times)} of the {len(bad_times) + len(times)} times "
                         "of its first rows do not parse "
                         f"as {parse.time_option(fmt.time_unit)} (like {bad_times[0]!r}), and "
                         f"every one parses as {swapped!r}: days before months? pass "
                         f"--time-format {shlex.quote(swapped)}")
    if bad_times and not times:  # every row with a time would be malformed: say why now
        other = "; for another layout pass --time-format, e.g. '%m/%d/%Y %H:%M:%S'"
        if all(negative):  # (the example said is one of them)
            hint = "; times before 1970-01-01 (negative unix times) are not read"
        elif parse.is_time_format(fmt.time_unit):
            hint = ("; its directives are Python's strptime's (%Y year, %m month, %d day, %H "
                    "hour, %M minute, %S second, %f fraction, %z offset)")
        elif fmt.time_unit == "iso":
            hint = ("; ISO 8601 looks like 2021-03-02T15:08:11Z, 2021-03-02 15:08:11+01:00 or "
                    "2021-03-02 15:08:11.000000 UTC" + other)
        elif isinstance(bad_times[0], str) and re.search(r"\d[-/:T ]\d", bad_times[0]):
            hint = "; text times need --time-unit iso" + other
        else:
            hint = ""
        raise UsageError(f"{path}: none of the times of its first rows parses as "
                         f"{parse.time_option(fmt.time_unit)} ({len(bad_times)} like "
                         f"{bad_times[0]!r}){hint}")
    if fmt.time_unit not in ("s", "ms"):  # (text times: no unit to mistake)
        return
    median_ms = sorted(times)[len(times) // 2] if times else 0
    raw = median_ms // 1000 if fmt.time_unit == "s" else median_ms  # (as the file has it)
    median = median_ms // 1000  # (seconds)
    if fmt.time_unit == "ms" and median > parse.MAX_PLAUSIBLE_UNIX_SECONDS:
        raise UsageError(f"{path}: times like {raw} read as milliseconds are after "
                         f"the year 5138; they look like {_finer_unit(raw)}: convert "
                         "them to milliseconds or seconds")
    if fmt.time_unit == "ms":
        # Seconds read as milliseconds fall in January 1970 and their gaps shrink 1000
        # times (whole days become one session); relative times (since a log's start)
        # look the same, so this is a note, not an error.
        if times and 0 < median < LIKELY_SECONDS_AS_MS:
            print(f"note: {path}: times like {raw} read as milliseconds fall in "
                  "early 1970: unix seconds? pass --time-unit s; times since a session's or "
                  "the log's start? they cannot order a user's sessions or split by time: "
                  "use the log's absolute times", file=sys.stderr)
        return
    if median > parse.MAX_PLAUSIBLE_UNIX_SECONDS:
        unit = _finer_unit(median)
        hint = ("they look like milliseconds: pass --time-unit ms" if unit == "milliseconds"
                else f"they look like {unit}: convert them to seconds or milliseconds")
        raise UsageError(f"{path}: times like {raw} are not unix seconds (that is after "
                         f"the year 5138); {hint}")
    if 0 < median < LIKELY_RELATIVE_SECONDS:
        print(f"note: {path}: times like {raw} read as seconds fall in the 1970s: times since "
              "a session's or the log's start? they cannot order a user's sessions or split "
              "by time: use the log's absolute times", file=sys.stderr)


def _raw_time(line: str, fmt) -> object:
    """A row's time value as written, or None where it has none to judge (a row that does
    not split, an empty or NULL time: those rows are malformed for their own reason)."""
    try:
        if fmt.objects:
            value = json.loads(line).get(fmt.time_col)
        else:
            fields = parse.row_fields(line.rstrip("\r"), fmt)
            value = fields[fmt.columns.index(fmt.time_col)] if fields is not None else None
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(value, str) and (not value.strip() or parse.is_missing(value.strip())):
        return None
    return value


def _check_runner(name, beam_args: list[str]) -> None:
    """Raises UsageError for a runner Beam cannot make (an unknown name, a runner whose
    package is missing) or whose required options are missing (Dataflow's project, region,
    temp_location: Beam's own validator), which Beam would report as a traceback when the
    run starts."""
    from apache_beam.options import pipeline_options as po
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners import runner

    if not isinstance(name, str):
        return
    try:
        made = runner.create_runner(name)
    except ValueError as e:
        raise UsageError(f"--runner {name}: {str(e).splitlines()[0]}") from e
    except ImportError as e:
        raise UsageError(f"--runner {name} needs a package that is not installed ({e})") from e
    logging.disable(logging.WARNING)  # (its notes on GCS buckets it cannot make)
    try:
        errors = PipelineOptionsValidator(po.PipelineOptions(beam_args), made).validate()
    finally:
        logging.disable(logging.NOTSET)
    if errors:
        raise UsageError(f"--runner {name}: " + " ".join(e.strip() for e in errors))


def _runner_class(runner) -> str:
    """The class name of the runner a `--runner` value makes (Beam takes `direct`,
    `fnapirunner`, a dotted path: each was read as a runner of other machines and refused);
    the value itself where Beam makes none of it."""
    if not isinstance(runner, str):
        return type(runner).__name__
    if runner in LOCAL_RUNNERS:
        return runner
    from apache_beam.runners import runner as runners

    try:
        return type(runners.create_runner(runner)).__name__
    except Exception:  # (said by `_check_runner`)
        return runner


def _runs_elsewhere(options) -> str | None:
    """The runner's name when its workers run on other machines (Dataflow, a Flink or
    Spark cluster, a portable runner's Docker workers), else None (the local runners, and
    any runner with --environment_type LOOPBACK, whose workers run in this process)."""
    values = options.get_all_options()
    name = _runner_class(values.get("runner") or "FnApiRunner")
    if name in LOCAL_RUNNERS or name in ("PrismRunner", "InteractiveRunner"):
        return None
    if str(values.get("environment_type") or "").upper() == "LOOPBACK":
        return None
    return name


def _beam_options(beam_args: list[str], own_flags: list[str]):
    """Beam options; local FnApiRunner with a worker process per core unless --runner.

    Raises:
      UsageError: a bad Beam option value, or an unknown option that looks like a
        misspelling of this command's own (Beam ignores unknown options otherwise, so
        runner plug-ins can define their own).
    """
    import difflib

    from apache_beam.options import pipeline_options as po

    def fail(message):
        raise UsageError(f"bad Beam option: {message}")

    parser = po._BeamArgumentParser(allow_abbrev=False)  # the parser Beam itself builds
    parser.error = fail
    for cls in {str(c): c for c in po.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    known, unknown = parser.parse_known_args(beam_args)
    if (getattr(known, "direct_num_workers", None) or 0) < 0:
        # (0: one worker per core, Beam's own meaning; a negative number was an IndexError
        # traceback from Beam's runner)
        fail(f"--direct_num_workers must be >= 0 (0: one per core), got "
             f"{known.direct_num_workers}")
    beam_flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for k, arg in enumerate(unknown):
        previous = unknown[k - 1] if k else ""
        if not arg.startswith("-") and not (previous.startswith("--") and "=" not in previous):
            raise UsageError(f"unexpected argument {arg!r} (not the value of an option)")
        name = arg.split("=")[0]
        # a near miss of Beam's own flags too (--runer DataflowRunner ran the job here,
        # after Beam's "Discarding unparseable args"), closer than a plug-in's own would be
        hint = (difflib.get_close_matches(name, own_flags, n=1, cutoff=0.8)
                or difflib.get_close_matches(name, beam_flags, n=1, cutoff=0.9))
        if arg.startswith("--") and ("-" in name[2:] or hint):
            raise UsageError(f"unknown option {name}" + (f": did you mean {hint[0]}?" if hint else
                                                         " (see python -m pipeline --help)"))

    def given(flag):
        return any(a == flag or a.startswith(flag + "=") for a in beam_args)

    args = list(beam_args)
    if given("--runner"):
        _check_runner(po.PipelineOptions(beam_args).get_all_options()["runner"], beam_args)
    else:
        args += ["--runner", "FnApiRunner"]
        if not given("--direct_running_mode"):
            args += ["--direct_running_mode", "multi_processing"]
        if not given("--direct_num_workers"):
            args += ["--direct_num_workers", str(storage.usable_cpus())]
    if not given("--default_sdk_harness_log_level"):
        args += ["--default_sdk_harness_log_level", "ERROR"]
    return po.PipelineOptions(args)


def _resolve(argv):
    from pipeline import sources
    from pipeline.transforms import Config

    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    options = _beam_options(beam_args, [o for a in parser._actions for o in a.option_strings])
    if args.valid_fraction + args.test_fraction >= 1.0:
        raise UsageError(
            f"--valid-fraction + --test-fraction must be < 1, got "
            f"{args.valid_fraction} + {args.test_fraction}")
    if args.max_events_per_user < args.min_session_length:
        raise UsageError(
            f"--max-events-per-user {args.max_events_per_user} keeps fewer events per user than "
            f"a session needs (--min-session-length {args.min_session_length}): nothing would "
            "be written")
    named = {"jsonl": "JSON lines name their keys", "parquet": "a Parquet file names its columns",
             "avro": "an Avro file names its fields"}
    if args.columns is not None and not args.columns.replace(",", "").strip():
        # (it was taken as no --columns: the file's first line read as its header)
        raise UsageError(f"--columns {args.columns!r} names no column: name the file's "
                         "columns in order, e.g. user,item,time")
    if args.format in parse.OBJECT_FORMATS and args.columns:
        raise UsageError(f"--columns is for csv/tsv; {named[args.format]}")
    if args.session_col is not None:
        if not args.session_col.strip():
            raise UsageError("--session-col names no column")
        if args.session_gap is not None:
            raise UsageError("--session-gap and --session-col exclude each other: sessions come "
                             "from time gaps or from the log's own ids")
    elif args.session_gap is None:
        args.session_gap = 1800
        args.gap_by_default = True  # (a note where --user-col names session ids: _row_formats)
    if args.time_format is not None:
        if args.time_unit is not None:
            raise UsageError("--time-format and --time-unit exclude each other: a format reads "
                             "text times, --time-unit numbers or ISO 8601 text")
        wrong = parse.time_format_error(args.time_format)
        if wrong:
            raise UsageError(f"--time-format {args.time_format!r} {wrong}"
                             + ("" if "%Z" in args.time_format else "; e.g. '%m/%d/%Y %H:%M:%S'"))
        args.time_unit = args.time_format
    args.time_unit = args.time_unit or "s"
    if args.delimiter is not None:
        if args.format in parse.OBJECT_FORMATS:
            raise UsageError(f"--delimiter is for csv/tsv, not {args.format} files")
        try:
            args.delimiter = parse.parse_delimiter(args.delimiter)
        except ValueError as e:
            raise UsageError(str(e)) from None
    output = args.output.rstrip("/") or args.output
    try:
        outputs.check_writable_scheme(output)
    except ValueError as e:
        raise UsageError(f"--output: {e}") from None
    elsewhere = _runs_elsewhere(options)
    local = [p for p in [*args.input, output] if outputs.is_local(p)]
    if elsewhere and local and not args.shared_mount:
        raise UsageError(
            f"--runner {elsewhere} runs the job's workers on other machines, which cannot read "
            f"or write this machine's {local[0]}: pass --input and --output on a file system "
            "they share (gs://, s3://, hdfs://), --shared-mount where the workers mount these "
            "paths too (NFS, /dbfs), or --environment_type LOOPBACK to run the workers here")
    if outputs.is_local(output):
        if os.path.islink(output):
            # the run replaces the folder the link names (the link stays), not the link
            output = os.path.realpath(output)
        if glob.has_magic(os.path.abspath(output)):
            # (Beam's file sinks read the path they finish writing in as a glob)
            raise UsageError(f"--output {output}: a local path with *, ? or [ ] in it cannot "
                             "be written by Beam's file sinks: choose a folder without them")
    try:
        exists = outputs.exists(output)
    except Exception as e:  # a remote file system's own error (credentials, network)
        import importlib.util

        hint = ("; s3:// needs pip install 'apache-beam[aws]'" if output.startswith("s3://")
                and importlib.util.find_spec("boto3") is None else "")
        raise UsageError(f"--output: cannot look at {output}: {argtypes.first_line(e)}{hint}"
                         ) from None
    if exists and not args.overwrite:
        _check_replaceable(output, [])  # (a file, a folder of other things: not replaceable)
        raise UsageError(f"output {output} exists: pass --overwrite to replace it")
    problem = outputs.local_folder_problem(output)
    if problem:
        raise UsageError(f"--output {output}: {problem}")
    try:
        hidden: list[str] = []
        sources.forget_footers()  # (a file may have been rewritten since an earlier run)
        files = sources.match_inputs(args.input, hidden)
        if exists:
            _check_replaceable(output, [path for path, _ in files])
        files, heads, empty = _non_empty(files, args.format)
        formats = _row_formats(args, files, heads)
    except sources.InputError as e:
        raise UsageError(str(e)) from None
    if hidden:
        print(f"note: skipping {len(hidden)} file(s) the --input glob matched whose names start "
              f"with '_' or '.' (Spark's and Hadoop's markers and checksums; name them to read "
              f"them): {', '.join(sorted(hidden)[:3])}{', ...' if len(hidden) > 3 else ''}",
              file=sys.stderr)
    if empty:
        print(f"note: skipping {len(empty)} empty input file(s): {', '.join(empty[:3])}"
              f"{', ...' if len(empty) > 3 else ''}", file=sys.stderr)
    config = Config(
        formats=formats, header=args.format in ("csv", "tsv") and not args.columns,
        session_gap=args.session_gap if args.session_gap is not None else 1800,
        session_ids=bool(args.session_col), min_item_count=args.min_item_count,
        min_session_length=args.min_session_length, split=args.split,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
        max_events_per_user=args.max_events_per_user, seed=args.seed)
    return args, output, files, config, options


def _check_replaceable(output: str, inputs: list[str]) -> None:
    """Refuses an --overwrite that would delete something that is not an earlier output:
    a file, a folder of other things, or a folder that holds an input.

    Raises:
      UsageError: `output` must not be replaced.
    """
    local = outputs.is_local(output)
    if local and not os.path.isdir(output):
        raise UsageError(f"output {output} is a file, not a pipeline output folder: "
                         "pick another --output")
    inside = [p for p in inputs if outputs.is_local(p) == local and (
        storage.within(p, output) if local
        else p.startswith(output.rstrip("/") + "/"))]
    if inside:
        raise UsageError(f"--input {inside[0]} lies inside --output {output}, which "
                         "--overwrite would delete: pick another --output")
    names = (set(os.listdir(output)) if local else  # (an empty folder of its own too)
             {outputs.relative(f, output).split("/")[0] for f in outputs.files_under(output)})
    ours = {schema.STATS_FILE, schema.ITEMS_FILE, schema.MALFORMED_DIR, *schema.SPLITS}
    if names and not names & {schema.STATS_FILE, schema.ITEMS_FILE, *schema.SPLITS}:
        raise UsageError(f"output {output} is not a pipeline output (no {schema.STATS_FILE}, "
                         f"{schema.ITEMS_FILE} or split folders): --overwrite only replaces "
                         "an earlier run's output; pick another --output")
    if local:
        denied = outputs.replace_problem(output)
        if denied:
            raise UsageError(f"--overwrite cannot replace {output}: {denied}: pass another "
                             "--output, or ask its owner")
    # (dot-files: a desktop's or a notebook's own, .DS_Store, .ipynb_checkpoints)
    others = sorted(n for n in names - ours if not n.startswith("."))
    if others:
        # (a model.train run folder holds items.tsv too: replacing it would lose the run)
        what = (" (a model.train run folder?)" if {"checkpoints", "config.json"} & set(others)
                else "")
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UsageError(f"output {output} holds {shown}, which the pipeline does not write"
                         f"{what}: --overwrite would delete them; pick another --output (or "
                         "move them out first)")


def _nest(flat: dict) -> tuple[dict, dict]:
    """Flat 'rows_filtered/reason' and 'splits/name/key' counts → nested objects."""
    filtered, splits = {}, {s: {"users": 0, "sessions": 0, "events": 0} for s in schema.SPLITS}
    for key, n in flat.items():
        parts = key.split("/")
        if parts[0] == "rows_filtered":
            filtered[parts[1]] = n
        elif parts[0] == "splits":
            splits[parts[1]][parts[2]] = n
    return dict(sorted(filtered.items())), splits


# the pipeline's outputs of one element each, read back after the run
SINGLE_VALUES = ("stats", "vocabulary", "cutoffs", "float_users", "malformed_kinds")


def _named_json(value, name: str) -> str:
    return json.dumps([name, value])


def _read_single_values(path: str) -> list:
    """The values of SINGLE_VALUES, in that order, from the run's one file of them."""
    values = dict(json.loads(line) for line in outputs.read_text(path).splitlines())
    return [values[name] for name in SINGLE_VALUES]


def run(args, output: str, files, config, options, command: bool = False) -> dict:
    """Builds and runs the pipeline into a temporary folder, then renames it to `output`;
    `command`: stop signals are ignored from then on.

    Returns:
      The stats written to `stats.json`.
    """
    import apache_beam as beam

    from pipeline import beam_fixes, sources
    from pipeline.transforms import (HEAVIEST_PREFIX, ITEMS_BELOW_MIN_COUNT, LATE_PREFIX,
                                     LONGEST_PREFIX, MAX_PREFIX, SAME_TIME_RUN_PREFIX,
                                     SPLIT_PAIRS_PREFIX, SPLIT_SAME_TIME_PREFIX, UNKNOWN_PREFIX,
                                     SessionRecords)

    beam_fixes.apply()  # a local run that fails early must not wait forever for a worker
    children = _child_processes()  # (the caller's: an interrupt kills only the run's own)
    try:
        tmp = outputs.make_temp(output)
    except OSError as e:  # a file where a folder must be, no permission, ...
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise UsageError(f"--output {output}: cannot make a folder beside it ({reason})") from e
    try:
        work = outputs.join(tmp, WORK_DIR)
        runner = options.get_all_options()["runner"]
        with _quiet_beam_stderr(_runner_class(runner) in LOCAL_RUNNERS and not args.beam_logs,
                                sum(size for _, size in files)), \
                beam.Pipeline(options=options) as p:
            out = (p
                   | "Ranges" >> beam.Create(sources.plan_ranges(
                       files, parquet=args.format == "parquet", avro=args.format == "avro"))
                   | "Records" >> SessionRecords(config))
            for name in schema.SPLITS:
                _ = out[name] | f"Write{name.title()}" >> beam.io.WriteToTFRecord(
                    outputs.join(tmp, name, "part"), file_name_suffix=schema.SHARD_SUFFIX,
                    compression_type=beam.io.filesystem.CompressionTypes.GZIP)
            _ = out["malformed"] | "WriteMalformed" >> beam.io.WriteToText(
                outputs.join(tmp, schema.MALFORMED_DIR, "part"), file_name_suffix=".jsonl")
            # the run's five single values, one line [name, value] each, through one write
            # (a write is ~10 transforms: five of them were a third of a small run's time)
            _ = ([out[name] | f"{name.title()}Json" >> beam.Map(_named_json, name)
                  for name in SINGLE_VALUES]
                 | "SingleValues" >> beam.Flatten()
                 | "WriteSingleValues" >> beam.io.WriteToText(
                     outputs.join(work, "values"), num_shards=1, shard_name_template=""))
        counts, vocab, cutoffs, float_users, malformed_kinds = _read_single_values(
            outputs.join(work, "values"))
        outputs.write_text(outputs.join(tmp, schema.ITEMS_FILE), schema.vocabulary_text(vocab))
        filtered, splits = _nest(counts)
        # (--exclude and --time-format are absent when unused, so data made before the
        # options digests the same)
        options_out = {k: v for k, v in vars(args).items()
                       if k not in ("overwrite", "shared_mount")
                       and not (k in ("exclude", "time_format", "max_malformed_fraction")
                                and v is None)}
        options_out["header"] = config.header
        options_out["runner"] = options.get_all_options()["runner"]
        stats = {
            "pipeline_version": pipeline.__version__,
            "rows_read": counts.get("rows_read", 0),
            "rows_malformed": counts.get("rows_malformed", 0),
            "rows_filtered": filtered,
            "rows_written": counts.get("rows_written", 0),
            schema.USERS_WRITTEN: counts.get(schema.USERS_WRITTEN, 0),
            "splits": splits,
            "items": len(vocab),
            # the items the vocabulary left out (unknown in valid and test)
            ITEMS_BELOW_MIN_COUNT: counts.get(ITEMS_BELOW_MIN_COUNT, 0),
            "cutoffs": cutoffs,
            "options": options_out,
        }
        # the most events one user has in each split (a crawler's share of the metrics)
        stats["max_user_events"] = {name: counts.get(MAX_PREFIX + name, 0)
                                    for name in schema.SPLITS}
        # who that is (the heavy-user note names them for --exclude); None without users
        stats["heaviest_user"] = {name: (counts.get(HEAVIEST_PREFIX + name) or [0, None])[1]
                                  for name in schema.SPLITS}
        # the most events of one session in each split (whether training cuts any in chunks)
        stats["max_session_events"] = {name: counts.get(LONGEST_PREFIX + name, 0)
                                       for name in schema.SPLITS}
        # valid and test events whose item is outside the vocabulary: misses for any model
        stats["unknown_target_events"] = {name: counts.get(UNKNOWN_PREFIX + name, 0)
                                          for name in schema.SPLITS[1:]}
        # the malformed rows by kind of reason, most first (malformed/ holds each row)
        stats["malformed_reasons"] = malformed_kinds
        # users written both as N and as N.0: two users each (their count, the first pairs)
        stats["float_user_pairs"] = float_users
        if config.session_ids:
            stats[sessions.OVERLAPPING] = counts.get(sessions.OVERLAPPING, 0)
        if config.split == "time":
            # events of sessions that run on past a later split's cut-off (a session goes
            # whole to the split of its start): trained on ahead of the events they overlap
            stats["late_events"] = {key: counts.get(LATE_PREFIX + key, 0)
                                    for key in split.LATE_EVENTS}
        # consecutive events in sessions, and those at one time (ordered as the input was)
        for key in (sessions.PAIRS, sessions.SAME_TIME_PAIRS):
            stats[key] = counts.get(key, 0)
        # the users whose events were sessionized, and those of them with no session kept
        for key in (sessions.USERS_SESSIONIZED, sessions.USERS_WITH_NO_SESSION):
            stats[key] = counts.get(key, 0)
        # ... and of those, the ones in item-id order (a file sorted by item id)
        stats[sessions.ID_ORDER] = {order: counts.get(f"{sessions.ID_ORDER}.{order}", 0)
                                    for order in sessions.ID_ORDERS}
        # ... the others, in the input's order or reversed (a file written newest first)
        stats[sessions.INPUT_ORDER] = {order: counts.get(f"{sessions.INPUT_ORDER}.{order}", 0)
                                       for order in sessions.INPUT_ORDERS}
        # both per split (by the split of each session), with the most events in a row at
        # one time (bulk additions), before the vocabulary cut
        stats[SAME_TIME_BY_SPLIT] = {
            name: {"pairs": counts.get(SPLIT_PAIRS_PREFIX + name, 0),
                   "same_time": counts.get(SPLIT_SAME_TIME_PREFIX + name, 0),
                   "longest_run": counts.get(SAME_TIME_RUN_PREFIX + name, 0)}
            for name in schema.SPLITS}
        outputs.remove(work)
        outputs.write_text(outputs.join(tmp, schema.STATS_FILE),
                           json.dumps(stats, indent=2) + "\n")
        if failed(stats) and outputs.exists(output) and outputs.files_under(output):
            # a failed run (a typo in --filter) never replaces a good earlier output: that
            # stays, and this run's is left aside to be read
            return dict(stats, left_aside=tmp)
        if not args.overwrite and outputs.exists(output):
            # another run wrote it while this one ran (the check at the start saw none):
            # without --overwrite it is not replaced (it was, without a word); this run's
            # output is left aside, whole
            return dict(stats, left_aside=tmp, written_meanwhile=True)
        outputs.commit(tmp, output)
        if command:  # done: a stop signal now would only kill a finished run
            argtypes.ignore_stop_signals()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            _end_child_processes(children)
        outputs.remove(tmp)
        raise
    return stats


def _child_processes() -> set[tuple[int, bytes]]:
    """(pid, start time) of this process's children, from /proc (Linux; elsewhere none)."""
    me = str(os.getpid()).encode()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return set()
    children = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # (gone meanwhile)
            continue
        # "PID (COMMAND) STATE PPID ... STARTTIME (field 22)": COMMAND may hold anything
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 19 and fields[1] == me:
            children.add((int(pid), fields[19]))
    return children


def _end_child_processes(before: set[tuple[int, bytes]]) -> None:
    """Kills the children this run started (a local runner's SDK workers; not those in
    `before`) after a stop signal: one that outlived it (a SIGTERM to the process group
    while the runner started it) kept the interpreter from exiting, after "interrupted"
    was said, until a SIGKILL (Beam's thread that waits for it is not a daemon)."""
    import signal

    for pid, _ in _child_processes() - before:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def failed(stats: dict) -> bool:
    """A run that wrote no event, or more malformed rows than --max-malformed-fraction
    allows (its exit status is 1, so that a scheduler does not go on to train). An empty
    train split with events in valid or test is a warning, not a failure: model.train
    refuses it with its own line."""
    return not stats["rows_written"] or too_malformed(stats)


def too_malformed(stats: dict) -> bool:
    """Whether more of the rows read are malformed than --max-malformed-fraction allows."""
    limit = stats.get("options", {}).get("max_malformed_fraction")
    return (limit is not None and stats["rows_read"] > 0
            and stats["rows_malformed"] > limit * stats["rows_read"])


def _below_text(stats: dict) -> str:
    """The summary's word on the items with train events that the vocabulary left out."""
    below = stats.get("train_items_below_min_count")
    if not below:
        return ""
    return (f" ({below:,} more in train, each seen fewer than --min-item-count "
            f"{stats['options']['min_item_count']} times: unknown items)")


def _id_order(counts: dict, tied: int) -> str:
    """'N of them (X%) in ascending item-id order' where at least ID_ORDER_SHARE of the
    `tied` same-time pairs (at least ID_ORDER_MIN_PAIRS) are in one order of their ids
    (`sessions.ID_ORDERS`), '' otherwise."""
    if tied < ID_ORDER_MIN_PAIRS or not counts:
        return ""
    order, n = max(counts.items(), key=lambda kv: kv[1])
    if n < ID_ORDER_SHARE * tied:
        return ""
    words = order.replace("_by_length", "").replace("_", " ")
    how = " (by length, then as text: numbers in numeric order)" if "_by_length" in order \
        else ""
    return f"{n:,} of them ({argtypes.share(n, tied)}) in {words} item-id order{how}"


def _same_time(stats: dict) -> str:
    """What the note on events at one time says: where more than SAME_TIME_NOTE_SHARE of
    the consecutive events within sessions are at the same time, in all or in the valid or
    test split (whose metrics score them), or a session holds BULK_RUN_EVENTS in a row at
    one time, how many, why their order may be wrong (a file
    sorted by item id within a time, or written newest first) and the bulk additions among
    them; '' otherwise."""
    pairs, tied = stats.get(sessions.PAIRS, 0), stats.get(sessions.SAME_TIME_PAIRS, 0)
    by_split = stats.get(SAME_TIME_BY_SPLIT) or {}
    scored = [name for name in schema.SPLITS[1:] if by_split.get(name, {}).get("pairs", 0)
              >= ID_ORDER_MIN_PAIRS and by_split[name]["same_time"]
              > SAME_TIME_NOTE_SHARE * by_split[name]["pairs"]]
    runs = {name: c.get("longest_run", 0) for name, c in by_split.items()}
    bulky = max(runs.values(), default=0) >= BULK_RUN_EVENTS
    if not pairs or (tied <= SAME_TIME_NOTE_SHARE * pairs and not scored and not bulky):
        return ""
    # (per split where a split's share stands out)
    counted = {name: c for name, c in by_split.items() if c["pairs"]}
    shares = ", ".join(f"{name} {argtypes.share(c['same_time'], c['pairs'])}"
                       for name, c in counted.items()) if any(
        abs(c["same_time"] / c["pairs"] - tied / pairs) > SPLIT_SHARE_APART
        for c in counted.values()) else ""
    by_id = _id_order(stats.get(sessions.ID_ORDER) or {}, tied)
    forward, backward = ((stats.get(sessions.INPUT_ORDER) or {}).get(order, 0)
                         for order in sessions.INPUT_ORDERS)
    if by_id:
        why = (f"{by_id}: the file looks sorted by item id within each time (Amazon's review "
               "files are), an order the models would learn and the metrics reward: shuffle "
               "the file's rows first (`shuf log.csv -o shuffled.csv` for a file without a "
               "header) or give finer times")
    elif forward + backward >= ID_ORDER_MIN_PAIRS and backward >= NEWEST_FIRST_SHARE * (
            forward + backward):
        why = (f"the file lists events newest first ({backward:,} of the {forward + backward:,} "
               "pairs at different times come in reverse input order), so the same-time ones, "
               "kept in input order, are read newest first: the models learn that order and "
               "are scored on it: write the log oldest first (`tac log.csv > "
               "oldest_first.csv` for a file without a header) and run again")
    else:
        why = ("the input's order orders them: the models learn that order and are scored "
               "on it, so it should be the order the events happened in (a log of whole-day "
               "or whole-second times written in event order is fine; one sorted by item id "
               "within a user or a day is not: give finer times, or sort the file by its "
               "real order first)")
    bulk = ""
    if bulky:
        where = ", ".join(f"{name} {n:,}" for name, n in runs.items() if n >= BULK_RUN_EVENTS)
        bulk = (f"; sessions hold up to {max(runs.values()):,} events in a row at one time "
                f"({where}): bulk additions (an import, a batch job)? they have no order of "
                "their own, yet every event after a run's first is a next item trained on or "
                "scored: leave such rows out of the log")
    return (f"{tied:,} of the {pairs:,} consecutive events within sessions "
            f"({argtypes.share(tied, pairs)}"
            + (f"; {shares}" if shares else "") + f") are at the same time, and {why}{bulk}")


def _counts_text(counts: dict, most: int = 4) -> str:
    """` (reason 98,267, other 259, ...)`: the largest counts first, the rest summed (a
    single one left named, not `other`)."""
    ranked = sorted(((n, k) for k, n in counts.items() if n), key=lambda c: (-c[0], c[1]))
    if not ranked:
        return ""
    if len(ranked) == most + 1:
        most += 1
    shown = [f"{k} {n:,}" for n, k in ranked[:most]]
    rest = sum(n for n, _ in ranked[most:])
    return f" ({', '.join(shown)}" + (f", other {rest:,}" if rest else "") + ")"


def _cutoffs_text(cutoffs: dict) -> str:
    """`valid from 2007-08-31 05:46:39, test from ... (UTC)`: the time split's start times."""
    def when(t) -> str:
        if t is None:
            return "none"
        try:
            return datetime.datetime.fromtimestamp(
                int(t), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):  # (a time past what a date holds)
            return str(t)
    return (f"valid from {when(cutoffs.get('t_valid'))}, test from "
            f"{when(cutoffs.get('t_test'))} (UTC)")


def _summary(stats: dict, output: str, seconds: float) -> str:
    s = stats["splits"]
    lines = [f"pipeline: {stats['rows_read']:,} rows read in {seconds:.1f} s → {output}",
             f"  written {stats['rows_written']:,}, malformed {stats['rows_malformed']:,}"
             f"{_counts_text(stats.get('malformed_reasons', {}), 2)}, "
             f"filtered {sum(stats['rows_filtered'].values()):,}"
             f"{_counts_text(stats['rows_filtered'])}",
             f"  items {stats['items']:,}{_below_text(stats)}; cutoffs: "
             f"{_cutoffs_text(stats['cutoffs'])}"]
    lines += [f"  {name:5s}: {s[name]['users']:,} users, {s[name]['sessions']:,} sessions, "
              f"{s[name]['events']:,} events" for name in schema.SPLITS]
    return "\n".join(lines)


def _test_cutoff(stats: dict) -> tuple[int | None, str]:
    """(the test cut-off in unix seconds, None without one; its UTC date, '' then)."""
    t_test = stats.get("cutoffs", {}).get("t_test")
    return t_test, time.strftime("%Y-%m-%d", time.gmtime(t_test)) if t_test else ""


def _seconds_as_ms(stats: dict) -> str:
    """Where times read as milliseconds put the test cut-off in early 1970 (unix seconds
    given as --time-unit ms: the start's note said so, and the run's end repeats it, since
    the notes there follow from it), what to say; '' otherwise."""
    t_test, day = _test_cutoff(stats)
    if (stats["options"].get("time_unit") != "ms" or not t_test or t_test >= LIKELY_SECONDS_AS_MS
            or t_test < YEAR_2000_SECONDS_AS_MS):  # (earlier: offsets, `_times_before_1980`)
        return ""
    return (f"the test cut-off read as milliseconds is on {day}: are the times unix seconds? "
            "then every gap here is 1000 times shorter than in the log (days of a user "
            "fall within one --session-gap) and the sessions are wrong: rerun with "
            "--time-unit s")


def _times_before_1980(stats: dict) -> str:
    """Where the test cut-off falls before 1980 (times since each session's start, as
    Diginetica's timeframe, or since the log's: the start's note said so) and not because
    of seconds read as ms (`_seconds_as_ms`), what to say; '' otherwise (and for text
    times: a date before 1980 written as one is the log's)."""
    t_test, day = _test_cutoff(stats)
    options = stats["options"]
    if (not t_test or t_test >= LIKELY_RELATIVE_SECONDS or _seconds_as_ms(stats)
            or options.get("time_unit", "s") not in ("s", "ms") or options.get("time_format")):
        return ""
    return (f"the test cut-off is on {day}: are the times offsets (since each session's "
            "start, say)? such times cannot order a user's sessions nor split the log by "
            "time, and the notes here follow from them: give the pipeline the log's absolute "
            "times (a date plus the offset, summed first)")


def _notes(stats: dict, output: str, aside: bool = False) -> list[str]:
    """Notes and warnings on a finished run's counts: what in the log or the options made
    the output smaller or stranger than the user may think, and what to change (`aside`:
    the run's output is in `output`, a folder beside the earlier output it did not
    replace)."""
    from pipeline import transforms  # (Beam: imported by the run already)

    lines = []
    options, splits, dropped = stats["options"], stats["splits"], stats["rows_filtered"]
    if stats.get(sessions.OVERLAPPING):
        lines.append(f"note: {stats[sessions.OVERLAPPING]:,} session(s) start before an earlier "
                     "session of their user ends (--session-col): each sees that earlier session "
                     "whole as its history, events after its own start included; time gaps "
                     "(--session-gap) have no such overlap")
    if stats["rows_read"] and stats["rows_malformed"] > MALFORMED_NOTE_SHARE * stats["rows_read"]:
        kinds = list(stats.get("malformed_reasons", {}).items())
        most = ", ".join(f"{kind} ({n:,})" for kind, n in kinds[:MALFORMED_NOTE_KINDS])
        user_col = options.get("user_col", "user")
        user_key = f"missing key {user_col!r}"  # (jsonl)
        anonymous = bool(kinds) and (kinds[0][0].startswith(("empty user", "missing user"))
                                     or kinds[0][0] == user_key)
        time_col = options.get("time_col", "time")
        timeless = bool(kinds) and kinds[0][0] in ("empty time", "missing time (null)",
                                                   f"missing key {time_col!r}")
        malformed = argtypes.share(stats['rows_malformed'], stats['rows_read'])
        lines.append(f"note: {stats['rows_malformed']:,} of the {stats['rows_read']:,} rows read "
                     f"({malformed}) are malformed"
                     + (f", most for: {most}" if most else "")
                     + ("; a log of mostly anonymous sessions can take its session id column "
                        "as --user-col (a session log), or keep its known users alone: "
                        f"--exclude {shlex.quote(user_col + '=')} leaves out the rows without "
                        f"one, as filtered (a marker too: --exclude "
                        f"{shlex.quote(user_col + '=,NA')})" if anonymous else "")
                     + ("; --format tsv reads no quotes: --format csv --delimiter "
                        f"{shlex.quote(options['delimiter'])} reads quoted fields"
                        if options.get("format") == "tsv" and options.get("delimiter")
                        not in (None, "\t") and kinds[0][0].startswith("wrong column count")
                        else "")
                     + ("; rows without a time (an event that has not happened yet?) are left "
                        f"out as filtered with --exclude {shlex.quote(time_col + '=')}"
                        if timeless else "")
                     + f": {schema.MALFORMED_DIR}/ under {output} holds each with its reason")
    swapped = sum(n for kind, n in stats.get("malformed_reasons", {}).items()
                  if kind.endswith(f"{parse.DAYS_MONTHS}?)"))
    options_format = options.get("time_format") or options.get("time_unit") or ""
    other = parse.days_months_swapped(options_format)
    if swapped > SWAPPED_NOTE_SHARE * stats["rows_read"] and other:
        # (a few rows of another layout in a log read right: no note)
        lines.append(f"note: the times of {swapped:,} malformed rows parse with days and months "
                     f"swapped ({other!r}): a day-first log? then the rows read were read with "
                     "their day (12 or less) as the month: rerun with --time-format "
                     f"{shlex.quote(other)}")
    not_utf8 = stats.get("malformed_reasons", {}).get(parse.NOT_UTF8, 0)
    if not_utf8:  # (a file stops at start only where its first lines say so)
        lines.append(f"note: {not_utf8:,} rows are not UTF-8 (\"{parse.NOT_UTF8}\" in "
                     f"{schema.MALFORMED_DIR}/), and only their bytes say what they hold: rows of "
                     "a Latin-1 or Windows-1252 export (an accent, a symbol)? the pipeline reads "
                     "UTF-8: convert such a file first (iconv -f cp1252 -t utf-8 FILE > "
                     "FILE.utf8) and run again")
    # what the times say when they are not the log's (said once, below the notes that
    # follow from them, which point at it)
    seconds_as_ms, relative = _seconds_as_ms(stats), _times_before_1980(stats)
    # the events that reached the sessions (not malformed, not left out by --filter, not
    # copies or past the per-user cap)
    sessionized = (stats["rows_read"] - stats["rows_malformed"] - dropped.get(transforms.FILTER, 0)
                   - dropped.get(sessions.DUPLICATE, 0) - dropped.get(sessions.CAPPED, 0))
    short = dropped.get(sessions.SHORT, 0)
    users = stats.get(sessions.USERS_SESSIONIZED, 0)
    users_out = stats.get(sessions.USERS_WITH_NO_SESSION, 0)
    # (a run whose rows are near all malformed: its few events say nothing of sessions)
    mostly_malformed = stats["rows_malformed"] > MOSTLY_MALFORMED_SHARE * stats["rows_read"]
    if not mostly_malformed and (
            (sessionized and short > SHORT_NOTE_SHARE * sessionized)
            or (users >= SHORT_NOTE_MIN_USERS and users_out > SHORT_NOTE_SHARE * users)):
        length = options.get("min_session_length", 2)
        gap = options.get("session_gap", 1800)
        longer = [f"{g}: a {unit}" for g, unit in ((86400, "day"), (604800, "week")) if g > gap]
        how = ("the times fall before 1980 (the note below): absolute times first"
               if relative else
               f"the log's sessions (--session-col {options['session_col']}) mostly hold fewer "
               f"events: --min-session-length {length - 1} keeps more" if options.get("session_col")
               else f"a gap over --session-gap {gap:g} s starts a new session; "
               + (f"for a log of sparse events (reviews, ratings, purchases) pass a longer "
                  f"--session-gap ({', '.join(longer)})" if longer else
                  "even so most users' events stand alone")
               + (", or --min-session-length 1 to keep one-event sessions (they join the users' "
                  "histories and the first-item metrics; positions from a session's second "
                  "event on are the ones scored)" if length > 1 else ""))
        lines.append(f"note: {short:,} of the {sessionized:,} events "
                     f"({argtypes.share(short, sessionized)}) "
                     f"were in sessions shorter than --min-session-length {length} (after "
                     f"collapsing immediate repeats) and were dropped"
                     + (f", and with them {users_out:,} of the {users:,} users "
                        f"({argtypes.share(users_out, users)}), who had no longer session"
                        if users_out else "") + f": {how}")
    same_time = _same_time(stats)
    if same_time:
        lines.append(f"note: {same_time}")
    if seconds_as_ms:
        lines.append(f"note: {seconds_as_ms}")
    if relative:
        lines.append(f"note: {relative}")
    late = stats.get("late_events", {})
    in_valid, in_test = late.get("train_after_t_valid", 0), late.get("train_after_t_test", 0)
    cutoffs = stats.get("cutoffs", {})
    # (no valid split: its cut-off is the test one, and the events past it are in_test's)
    has_valid = splits["valid"]["events"] and cutoffs.get("t_valid") != cutoffs.get("t_test")
    if ((has_valid and in_valid > LATE_NOTE_SHARE * splits["valid"]["events"])
            or in_test > LATE_NOTE_SHARE * splits["test"]["events"]):
        how = ("--session-col's ids that come back later make one session of them: without "
               "--session-col, --session-gap splits them" if options.get("session_col") else
               "seconds read as --time-unit ms (the note above) make a user's days one "
               "session" if seconds_as_ms else
               "times before 1980 (the note above): offsets, not the log's times?"
               if relative else
               "a session log (each user one session, --session-gap "
               f"{options.get('session_gap', 0)}): its sessions that began before a cut-off "
               "and ran past it"
               if options.get("session_gap", 0) >= SESSION_LOG_GAP else
               "sessions that run on for hours or days (a user never idle for --session-gap: "
               "a crawler?): --exclude leaves a user out, a shorter --session-gap cuts them")
        where = (f"{in_valid:,} event{'s' * (in_valid != 1)} of train sessions are at or "
                 f"after the valid cut-off ({in_test:,} at or after the test cut-off)"
                 if has_valid else f"{in_test:,} event{'s' * (in_test != 1)} of train "
                 "sessions are at or after the test cut-off")
        lines.append(f"note: {where}: a session belongs whole to the split it starts in, so "
                     "these later events are trained on beside the valid and test events of "
                     f"their time (stats.json's late_events); {how}")
    capped = dropped.get(sessions.CAPPED, 0)
    if capped:
        cap = options.get("max_events_per_user", 100_000)
        lines.append(f"note: {capped:,} events ({argtypes.share(capped, stats['rows_read'])} "
                     "of the rows "
                     f"read) were the older ones of users with more than --max-events-per-user "
                     f"{cap:,} and were dropped (a crawler's, or a cap too low for this log)")
    for name in schema.SPLITS[1:]:
        events, unknown = splits[name]["events"], stats["unknown_target_events"][name]
        if events and unknown > schema.UNKNOWN_NOTE_SHARE * events and splits["train"]["events"]:
            # (an empty train split has its own warning below: no item is known)
            count = options.get("min_item_count", 5)
            lines.append(f"note: {unknown:,} of the {name} split's {events:,} events are items "
                         "outside the vocabulary, misses for every model: "
                         + (f"seen fewer than --min-item-count {count} times in train (a lower "
                            "--min-item-count keeps more items)" if count > 1 else
                            "items that train never holds (new items, or a time split after "
                            "a catalogue change)"))
    log_users = max(splits[name]["users"] for name in schema.SPLITS)
    for name in schema.SPLITS:
        events, users = splits[name]["events"], splits[name]["users"]
        heaviest = stats["max_user_events"][name]
        if log_users >= schema.HEAVY_USER_MIN_USERS and heaviest > schema.HEAVY_USER_SHARE * events:
            who = stats.get("heaviest_user", {}).get(name)
            typable = who is not None and argtypes.shown(who) == who
            leave_out = ("--exclude COLUMN=ID" if not typable else "--exclude " + shlex.quote(
                options.get("user_col", "user") + "=" + _filter_value(who)))
            who = None if who is None else argtypes.shown(who)
            bulk = (stats.get(SAME_TIME_BY_SPLIT) or {}).get(name, {}).get("longest_run", 0)
            kind = ("a bulk import (the note on events at one time) or a crawler?"
                    if bulk >= BULK_RUN_EVENTS else "a crawler?")
            effect = ("training learns mostly from that user's events"
                      if name == "train" else
                      "the metrics average over events, so that user decides them")
            lines.append(f"note: one user{f' ({who})' if who is not None else ''} holds "
                         f"{argtypes.share(heaviest, events)} of the {name} split's "
                         f"events ({heaviest:,} of {events:,}, {users:,} "
                         f"user{'s' * (users != 1)}): {effect}; {kind} {leave_out} "
                         "leaves a user out, --max-events-per-user N keeps each user's "
                         "N most recent events")
    train_users = splits["train"]["users"]
    if (train_users >= schema.HEAVY_USER_MIN_USERS and splits["train"]["sessions"] == train_users
            and not options.get("session_col")):
        lines.append(f"note: each of the {train_users:,} train users has one session: the "
                     "GRU over sessions has no earlier session to carry in training; a "
                     "--session-gap as long as the log, or times read in too coarse a unit "
                     "(seconds as --time-unit ms shrink every gap 1000 times), makes each "
                     "user's events one session; a log whose user column holds session ids "
                     "is a session log (gru4rec and sknn suit it)")
    if stats["rows_written"] and not splits["train"]["events"]:
        lines.append(f"warning: the train split is empty ({stats['items']:,} items in the "
                     f"vocabulary, cut-offs {stats['cutoffs']}): model.train has nothing to train "
                     "on; check --min-item-count and that the sessions' start times spread out")
    elif splits["train"]["events"] and options.get("split", "time") == "time":
        cutoffs = stats["cutoffs"]
        for name, fraction in (("valid", "valid_fraction"), ("test", "test_fraction")):
            if not splits[name]["events"] and options.get(fraction, 0.1) > 0:
                tied = cutoffs.get("t_valid") == cutoffs.get("t_test")
                lines.append(f"warning: the {name} split is empty (cut-offs {cutoffs}"
                             + ("; equal: many sessions start at the same time, e.g. times "
                                "of whole days" if tied else "") + "): "
                             + ("model.train has no valid events to select a checkpoint on"
                                if name == "valid" else "model.evaluate has nothing to score")
                             + "; use times to the second, other --valid-fraction/"
                             "--test-fraction, or --split users")
    elif splits["train"]["events"]:  # --split users: whole users by a hash of their ids
        for name, fraction in (("valid", "valid_fraction"), ("test", "test_fraction")):
            if not splits[name]["events"] and options.get(fraction, 0.1) > 0:
                users = sum(splits[n]["users"] for n in schema.SPLITS)
                lines.append(f"warning: the {name} split is empty (--split users drew none of "
                             f"the {users:,} user{'s' * (users != 1)} for it): "
                             + ("model.train has no valid events to select a checkpoint on"
                                if name == "valid" else "model.evaluate has nothing to score")
                             + f"; with few users try another --seed or a larger "
                             f"--{fraction.replace('_', '-')}, or --split time")
    ids = _vocabulary_ids(output) if stats["rows_written"] else set()
    if ids:
        pairs = _float_id_pairs(ids)
        if pairs:
            lines.append(f"note: the vocabulary holds items written both as integers and as "
                         f"floats ({', '.join(f'{a!r} and {b!r}' for a, b in pairs[:3])}"
                         f"{f' and {len(pairs) - 3:,} more pairs' if len(pairs) > 3 else ''}): "
                         "two items each here; a file written from a float column (pandas "
                         "writes an integer column with a missing value as floats)? Write "
                         "the ids as integers")
        groups = _case_twins(ids)
        if groups:
            shown = "; ".join(" and ".join(map(repr, g)) for g in groups[:3])
            rest = len(groups) - 3
            more = f"; {rest:,} more group{'s' * (rest != 1)}" if rest > 0 else ""
            lines.append(f"note: the vocabulary holds {len(groups):,} group"
                         f"{'s' * (len(groups) != 1)} of item ids that differ only in letter "
                         f"case ({shown}{more}): separate items here, each with part of the "
                         "events; if a group is one item, write its ids in one case")
    twins = stats.get("float_user_pairs") or {"count": 0}
    if twins["count"]:
        shown = ", ".join(f"{a!r} and {b!r}" for a, b in twins["examples"])
        more = twins["count"] - len(twins["examples"])
        lines.append(f"note: users written both as integers and as floats ({shown}"
                     f"{f' and {more:,} more pairs' if more > 0 else ''}): two users each "
                     "here, each with part of the history; a file written from a float column "
                     "(pandas writes an integer column with a missing value as floats)? Write "
                     "the ids as integers")
    if stats["rows_written"] and too_malformed(stats):  # (the exit status is then 1)
        lines.append(f"error: {stats['rows_malformed']:,} of the {stats['rows_read']:,} rows "
                     f"read ({argtypes.share(stats['rows_malformed'], stats['rows_read'])}) "
                     "are malformed, more than --max-malformed-fraction "
                     f"{stats['options']['max_malformed_fraction']} allows: check the input and "
                     f"the options; {schema.MALFORMED_DIR}/ under {output} says why rows were "
                     "rejected")
    if not stats["rows_written"]:  # (the exit status is then 1)
        why = (f"; {schema.MALFORMED_DIR}/ under {output} says why rows were rejected"
               if stats["rows_malformed"] else "")
        lines.append(f"error: no event was written ({stats['rows_malformed']:,} rows "
                     f"malformed, filtered {dropped}): check the options against the log{why} "
                     + (f"({output} holds its stats.json)" if aside else
                        f"({output} holds its stats.json; a rerun into it needs --overwrite)"))
    return lines


def _vocabulary_ids(output: str) -> set[str]:
    """The item ids of the output's vocabulary (none where it cannot be read)."""
    try:
        return set(schema.read_vocabulary(output).ids[schema.NUM_RESERVED:])
    except (schema.DataError, OSError):
        return set()


def _float_id_pairs(ids: set[str]) -> list[tuple[str, str]]:
    """Item ids held both as `N` and as `N.0` (the same item written once from an integer,
    once from a float column)."""
    whole = {i: parse.whole_number_text(i) for i in ids}
    return sorted((w, i) for i, w in whole.items() if w != i and w in ids)


def _case_twins(ids: set[str]) -> list[tuple[str, ...]]:
    """Groups of item ids that differ only in letter case (`SKU-7` and `sku-7`: one item
    written by two systems?), each sorted, in order. (`str.lower`, not `casefold`: `SS`
    and `ß` are two spellings, not two cases.)"""
    lowered = [i.lower() for i in ids]
    if len(set(lowered)) == len(ids):  # (nearly every log: no group built)
        return []
    groups: dict[str, list[str]] = {}
    for low, i in zip(lowered, ids):
        groups.setdefault(low, []).append(i)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1)


def main(argv=None, command: bool = False) -> int:
    """Entry point; returns the exit code (2 for a usage error, 130 when interrupted by
    Ctrl-C or SIGTERM, which removes the temporary output: the default action of SIGTERM
    left a full-size copy beside the output). `command` (`python -m pipeline`): once the
    output is in place, stop signals are ignored (one then killed the finished run
    without a word, or raised a traceback)."""
    with argtypes.sigterm_as_interrupt():
        return _main(argv, command)


# The open files a local run needs at least: its workers, their gRPC channels and the
# output files (it hung, or failed with tracebacks, under `ulimit -n 20`).
MIN_OPEN_FILES = 64


def _open_files_error() -> str | None:
    """Raises this process's open-files limit to its hard limit (its workers inherit it);
    why a local run cannot start under it, or None."""
    try:
        import resource
    except ImportError:  # (not a POSIX system)
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        return (f"this process may open only {soft} files (ulimit -n), and a local run needs "
                f"at least {MIN_OPEN_FILES}: raise the limit (ulimit -n 1024)")
    return None


def _say_start(output: str, files, options) -> None:
    """The start line, and a note on what earlier runs left beside `output`."""
    print(f"pipeline: {len(files)} input file(s), {sum(s for _, s in files):,} bytes, "
          f"runner {options.get_all_options()['runner']}", file=sys.stderr)
    gone = outputs.remove_abandoned(output)
    if gone:
        print(f"note: removed {len(gone)} temporary folder(s) beside {output} of runs that "
              f"were killed: {', '.join(os.path.basename(f) for f in gone)}", file=sys.stderr)
    stale = outputs.leftovers(output)
    replaced = outputs.replaced_output(output)
    if replaced:
        print(f"note: {output} is missing, and {replaced} holds its previous complete output "
              "(a run killed while replacing it): to keep it, stop this run and move it back "
              f"(mv {shlex.quote(replaced)} {shlex.quote(output)})", file=sys.stderr)
    elif stale:
        size = sum(storage.folder_bytes(f) for f in stale)
        print(f"note: {len(stale)} temporary folder(s) of runs that did not finish lie beside "
              f"{output} ({size / 1e6:,.1f} MB): {', '.join(os.path.basename(f) for f in stale)}"
              "; delete them unless another run is writing this output now", file=sys.stderr)


def _main(argv=None, command: bool = False) -> int:
    start = time.perf_counter()
    logging.getLogger().addFilter(_DropBeamImportNotice())
    try:
        args, output, files, config, options = _resolve(argv)
        from pipeline import sources
        reason = storage.temp_dir_error()  # Beam's pipeline makes one at its start
        if not reason and _runner_class(options.get_all_options()["runner"]) in LOCAL_RUNNERS:
            reason = _open_files_error()
        if not reason:
            _say_start(output, files, options)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (reading the options imports Beam: seconds)
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    if reason:
        print(f"error: {reason}; nothing was written to {output}", file=sys.stderr)
        return 1
    try:
        stats = run(args, output, files, config, options, command)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except outputs.InterruptedAfterCommit as e:
        print(f"\ninterrupted once {output} was in place: it is this run's complete output; "
              f"the replaced output's files left in {e.leftover} can be deleted",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C: Beam's traceback would say nothing more
        print(f"\ninterrupted: nothing was written to {output}"
              + (" (what was there is unchanged)" if outputs.exists(output) else ""),
              file=sys.stderr)
        return 130
    except (sources.InputError, RuntimeError, OSError) as e:
        message = _said_in_one_line(e)
        if message is None:
            raise
        print(f"error: {message}; nothing was written to {output}"
              + (" (what was there is unchanged)" if outputs.exists(output) else ""),
              file=sys.stderr)
        return 1
    aside = stats.pop("left_aside", None)
    meanwhile = stats.pop("written_meanwhile", False)
    print(_summary(stats, aside or output, time.perf_counter() - start))
    for line in _notes(stats, aside or output, aside=aside is not None):
        print(line, file=sys.stderr)
    if meanwhile:
        print(f"error: another run wrote {output} while this one ran, and this one has no "
              f"--overwrite: {output} is as that run left it; this run's own output is whole "
              f"in {aside} (move it where you want it, or run again with --overwrite)",
              file=sys.stderr)
        return 1
    if aside:
        print(f"error: this run failed, so it did not replace {output}, which is unchanged; "
              f"its own output is in {aside} (delete it when done)", file=sys.stderr)
    # a run that wrote no event failed at its task, whatever its output says: a scheduler
    # must not start the training on it
    return 1 if failed(stats) else 0


if __name__ == "__main__":
    argtypes.survive_closed_output()  # (`| head -1`: a finished run's status stays 0)
    argtypes.exit_with(main(command=True))
