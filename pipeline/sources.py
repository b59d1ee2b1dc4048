"""Input files: matching, headers, byte ranges and line numbers.

Large files are read in parallel as byte ranges. A range owns the lines that start inside
it (the standard split rule: a range after the first skips the partial line it starts
in, and the line running past its end is read to completion). The input-order key of a
line is (file rank, range index, line index within the range), packed into one int; the
absolute line number, needed only for malformed rows, comes from the newline counts of
the earlier ranges of the same file (`first_line_numbers`).

A compressed file (`.gz`, `.bz2`, `.xz`/`.lzma`, by extension, as Beam detects it) cannot be
cut at byte offsets: it is one range, read by one worker as a stream of blocks of about
`COMPRESSED_BLOCK_BYTES` decompressed bytes, each block of whole lines numbered like a
range of its own (`read_compressed`), so memory stays bounded. Python's own decompressors
read it (concatenated members too), because they fail on a truncated or corrupt file,
where Beam's `CompressedFile` stops quietly at the damage; `.zst` and `.deflate`, whose
readers here cannot tell a truncated file from a complete one, are refused.

A Parquet file (`--format parquet`) is cut at its row groups instead: a range is one row
group (`rows` rows), read `BATCH_ROWS` rows at a time, column by column and only
the columns the run needs (`read_parquet`), a row's "line" being its 1-based row number in
the file; timestamp and date columns come as unix milliseconds. An Avro container file
(`--format avro`) is cut into byte ranges like a text file, a range owning the blocks that
start in it (after a sync marker, as a line starts after a newline), read a record batch
at a time (`read_avro`), records numbered from the range's first as a row group's rows
are; timestamp and date fields (logical types) come as unix milliseconds too.

Paths go through Beam's `FileSystems`, so `gs://`, `s3://` or `hdfs://` inputs work where
the matching Beam extra is installed.
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import dataclasses
import datetime
import functools
import glob
import gzip
import lzma
import os
from typing import BinaryIO, Iterator, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline import argtypes

MAX_FILES = 1 << 20
MAX_RANGES = 1 << 19
MAX_LINES_PER_RANGE = 1 << 24
# Input-order keys of one file (`first_order`): a key // ORDERS_PER_FILE is its file's rank.
ORDERS_PER_FILE = MAX_RANGES * MAX_LINES_PER_RANGE
MIN_RANGE_BYTES = 1 << 20
MAX_RANGE_BYTES = 64 << 20
# An Avro file's ranges are smaller: its records are numbered within their range, fewer than
# MAX_LINES_PER_RANGE (a record takes more than a byte, compressed blocks included).
AVRO_MAX_RANGE_BYTES = 16 << 20
# Decompressed bytes read at a time from a compressed input (`read_compressed`).
COMPRESSED_BLOCK_BYTES = 16 << 20
# The longest line read as a row. A longer one (megabytes without a newline: a binary file
# in the folder, a corrupt stretch, a few bytes of gzip that inflate to gigabytes) is one
# malformed row, read past in bounded pieces: it cost 9 times its length in memory.
MAX_LINE_BYTES = 16 << 20
# The start of an over-long line kept for its malformed record.
LONG_LINE_PREFIX = 1000
# Rows of a Parquet row group or Avro records converted to Python lists at a time
# (`read_parquet`, `read_avro`).
BATCH_ROWS = 1 << 16


class Lines(list):
    """A reader's lines (bytes, without their newline), where `long` maps the index of
    each line over `MAX_LINE_BYTES` (its entry there is b"") to its first
    `LONG_LINE_PREFIX` bytes."""

    long: dict[int, bytes]


def _lines(lines: list[bytes], long: dict[int, bytes] | None = None,
           size: int | None = None) -> list[bytes]:
    """`lines` (of `size` bytes in all, where known) with those over `MAX_LINE_BYTES` set
    aside (`Lines`), as they are where none is (the usual case: a list)."""
    long = dict(long or {})
    if (lines and (size is None or size > MAX_LINE_BYTES)
            and max(map(len, lines)) > MAX_LINE_BYTES):
        for k, line in enumerate(lines):
            if len(line) > MAX_LINE_BYTES:
                long[k] = line[:LONG_LINE_PREFIX]
                lines[k] = b""
    if not long:
        return lines
    out = Lines(lines)
    out.long = long
    return out


def _read_past_line(f) -> None:
    """Reads on to just after the next newline (or the end), a bounded piece at a time."""
    while (piece := f.readline(MIN_RANGE_BYTES)) and not piece.endswith(b"\n"):
        pass


class InputError(ValueError):
    """An input that cannot be read (one-line message for the user)."""


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """A slice of one input file.

    Attributes:
      path: the file.
      rank: index of the file in sorted path order.
      index: index of the range within the file (a Parquet file: its row group).
      start, end: byte offsets, [start, end) (a Parquet row group: its share of the file's
        bytes, for progress only).
      rows: a Parquet row group's rows (0 for text).
    """

    path: str
    rank: int
    index: int
    start: int
    end: int
    rows: int = 0

    def first_order(self) -> int:
        """Input-order key of the range's first line."""
        return first_order(self.rank, self.index)


def first_order(rank: int, index: int) -> int:
    """Input-order key of the first line of range (or compressed block) `index` of the
    file of rank `rank`."""
    return (rank * MAX_RANGES + index) * MAX_LINES_PER_RANGE


# Compressed formats read here: their Python readers raise on a truncated stream.
_DECOMPRESSORS = {
    CompressionTypes.GZIP: lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    CompressionTypes.BZIP2: lambda raw: bz2.BZ2File(raw, "rb"),
    CompressionTypes.LZMA: lambda raw: lzma.LZMAFile(raw, "rb"),
}


# Archives (many files in one), which no reader here streams as one log.
_ARCHIVES = (".zip", ".7z", ".rar", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_compressed(path: str) -> bool:
    """The file is compressed (by its extension, as Beam's `FileSystems` detect it)."""
    return CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED


def _compression(path: str) -> str:
    """The file's compression (by extension); InputError for one that is not supported."""
    kind = CompressionTypes.detect_compression_type(path)
    archive = next((e for e in _ARCHIVES if path.lower().endswith(e)), None)
    if archive:
        raise InputError(f"{path}: a {archive} archive is not read: extract it and pass its "
                         "files (gzip, bzip2 or xz files are read as they are)")
    if kind != CompressionTypes.UNCOMPRESSED and kind not in _DECOMPRESSORS:
        raise InputError(f"{path}: {kind} input is not supported (a truncated file would "
                         "go unnoticed): decompress it, or use gzip, bzip2 or xz")
    return kind


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """A binary stream of the file's contents, decompressed when its extension says so.

    Raises:
      InputError: a compression that is not supported.
    """
    kind = _compression(path)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        if kind == CompressionTypes.UNCOMPRESSED:
            yield raw
        else:
            with _DECOMPRESSORS[kind](raw) as f:
                yield f


def match_inputs(patterns: Sequence[str], hidden: list | None = None) -> list[tuple[str, int]]:
    """(path, size) of every file matching the globs, sorted by path, duplicates once; the
    names a glob skipped (`_match`) are appended to `hidden` when it is given.

    Raises:
      InputError: a pattern matches nothing.
    """
    files, seen = {}, set()
    for pattern in patterns:
        local = "://" not in pattern
        if local and os.path.isdir(pattern):
            raise InputError(f"--input {pattern!r} is a folder: pass its files, e.g. "
                             f"--input '{os.path.join(pattern, '*')}'")
        if local and os.path.exists(pattern) and not os.path.isfile(pattern):
            raise InputError(f"--input {pattern!r} is not a regular file (a pipe or a "
                             "device: the pipeline reads its inputs in parallel ranges, more "
                             "than once): write the log to a file and pass that")
        if local and os.path.isfile(pattern):  # a name as it is, even with [ ] * ? in it
            found = [(pattern, os.path.getsize(pattern))]
        else:
            found = _match(pattern, hidden)
        for path, size in found:
            _compression(path)  # refuses an unsupported one before anything runs
            # one file under two spellings (a.csv, ./a.csv, /abs/a.csv) is read once
            key = os.path.realpath(path) if local else path
            if key not in seen:
                seen.add(key)
                files[path] = size
    if len(files) >= MAX_FILES:
        raise InputError(f"--input matches {len(files)} files; at most {MAX_FILES - 1} are supported")
    return sorted(files.items())


def _match(pattern: str, hidden: list | None = None) -> list[tuple[str, int]]:
    """(path, size) of the files a glob (or a remote path) matches. A glob skips the names
    that start with `.` or `_` (`_SUCCESS`, `.part-0.crc`: Hadoop's and Spark's markers and
    checksums, which their own readers skip too) unless the pattern's own name does.

    Raises:
      InputError: it cannot be listed, or matches no file.
    """
    local = "://" not in pattern
    # Beam's local glob needs a folder part: `*.csv` matches nothing, `./*.csv` does
    bare = local and not os.path.dirname(pattern) and glob.has_magic(pattern)
    try:
        found = FileSystems.match(["./" + pattern if bare else pattern])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError/ValueError subclasses per scheme.
        raise InputError(f"cannot list --input {pattern!r}: {e}") from None
    found = [(m.path[2:] if bare and m.path.startswith("./") else m.path, m.size_in_bytes)
             for m in found if not m.path.endswith("/")]
    skipped = []
    if glob.has_magic(pattern) and not os.path.basename(pattern).startswith((".", "_")):
        skipped = [p for p, _ in found if os.path.basename(p).startswith((".", "_"))]
        found = [(p, n) for p, n in found if not os.path.basename(p).startswith((".", "_"))]
    if not found:
        closed = _closed_folder(pattern) if local else None
        if closed:
            raise InputError(f"--input {pattern!r} matches no file this process can see: it "
                             f"may not list or enter {closed} (permission denied); make it "
                             "readable to this user")
        raise InputError(f"--input {pattern!r} matches no file"
                         + (f" but {len(skipped)} whose names start with '.' or '_' (markers "
                            "and checksums, skipped)" if skipped else "")
                         + ": check the path or glob")
    if hidden is not None:
        hidden.extend(skipped)
    return found


def _closed_folder(pattern: str) -> str | None:
    """The folder on a local pattern's way that this process may not list or enter, if any
    (a folder of another user's, mode 700: the pattern "matched no file", a wrong path as far
    as the message told)."""
    from pipeline import storage

    folder = os.path.abspath(pattern)
    while glob.has_magic(folder) or not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    if not storage.allowed(folder, os.X_OK):
        return folder
    after = os.path.relpath(os.path.abspath(pattern), folder).split(os.sep)[0]
    if glob.has_magic(after) and not storage.allowed(folder, os.R_OK):
        return folder  # (a name as it is may be entered without listing the folder)
    return None


def read_first_lines(path: str, n: int) -> list[bytes]:
    """The first `n` lines of a file (fewer if it is shorter), without line ends; also
    proves the file is readable. A line over `MAX_LINE_BYTES` is b"" there, and in the
    `long` of the `Lines` returned (the run counts it malformed).

    Raises:
      InputError: the file cannot be opened or read.
    """
    try:
        lines, long = [], {}
        with open_input(path) as f:
            for _ in range(n):
                line = f.readline(MAX_LINE_BYTES + 2)  # (the longest, its newline, and one)
                if not line:
                    break
                if len(line) - line.endswith(b"\n") > MAX_LINE_BYTES:
                    if not line.endswith(b"\n"):
                        _read_past_line(f)
                    long[len(lines)] = line[:LONG_LINE_PREFIX]
                    line = b""
                lines.append(line.rstrip(b"\r\n"))
        return _lines(lines, long)
    except Exception as e:  # any I/O failure of any filesystem is the user's to fix
        kind = _compression(path)
        hint = ""
        if kind != CompressionTypes.UNCOMPRESSED and isinstance(e, (OSError, EOFError, lzma.LZMAError)):
            try:  # a plain file with a compressed file's name: say so
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
                    start = raw.read(512)
                codecs.getincrementaldecoder("utf-8")().decode(start)  # (a cut last character)
                hint = (f" (its name says {kind} data, but it starts as plain text: rename it "
                        f"without the {os.path.splitext(path)[1]})")
            except Exception:
                pass
        raise InputError(f"cannot read input file {path!r}: {e}{hint}") from None


def plan_ranges(files: Sequence[tuple[str, int]], target_ranges: int = 8,
                parquet: bool = False, avro: bool = False) -> list[ByteRange]:
    """Cuts the files into byte ranges for parallel reading.

    Range size is the total size / `target_ranges`, clamped to [1 MiB, 64 MiB], so small
    inputs still spread over a few workers and big ones are read in bounded pieces. A
    compressed file is one range (`read_compressed` streams it); an Avro file (`avro`) is cut
    like a text file, at most `AVRO_MAX_RANGE_BYTES` a range (`read_avro` reads the blocks
    that start in it); a Parquet file (`parquet`) is one range per non-empty row group (and
    row group 0).
    """
    total = sum(size for _, size in files)
    size = min(MAX_RANGE_BYTES, max(MIN_RANGE_BYTES, -(-total // max(1, target_ranges))))
    ranges = []
    for rank, (path, file_size) in enumerate(files):
        if parquet:
            ranges.extend(_row_group_ranges(path, rank, file_size))
            continue
        if is_compressed(path):
            ranges.append(ByteRange(path, rank, 0, 0, file_size))
            continue
        step = min(size, AVRO_MAX_RANGE_BYTES) if avro else size
        starts = range(0, max(file_size, 1), step)
        if len(starts) >= MAX_RANGES:
            raise InputError(f"{path} is too large ({file_size} bytes)")
        ranges.extend(ByteRange(path, rank, k, s, min(s + step, file_size))
                      for k, s in enumerate(starts))
    return ranges


def read_range(r: ByteRange) -> tuple[list[bytes], int]:
    """Reads the lines a range owns.

    Returns:
      (lines without their newline (`Lines` where some are over `MAX_LINE_BYTES`),
      newlines counted in [start − 1, end − 1) — or [0, end − 1) for the first range —
      which `first_line_numbers` sums up).
    """
    with FileSystems.open(r.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        offset = max(r.start - 1, 0)
        f.seek(offset)
        data = f.read(r.end - offset)
        newlines = data.count(b"\n", 0, max(len(data) - 1, 0))
        if r.start > 0:
            cut = data.find(b"\n")
            data = b"" if cut < 0 else data[cut + 1:]
        if data and not data.endswith(b"\n"):
            # the range's last line, to its end (read past beyond the longest a row is)
            tail = f.readline(MAX_LINE_BYTES + 1)
            if len(tail) > MAX_LINE_BYTES and not tail.endswith(b"\n"):
                _read_past_line(f)
            data += tail
    if not data:
        return [], newlines
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    if len(lines) >= MAX_LINES_PER_RANGE:
        raise InputError(f"{r.path}: more than {MAX_LINES_PER_RANGE} lines in one range")
    return _lines(lines, size=len(data)), newlines


def read_compressed(r: ByteRange, block_bytes: int | None = None
                    ) -> Iterator[tuple[int, list[bytes], int]]:
    """Streams a compressed file (one range) as blocks of whole lines.

    Yields:
      (block index, lines without their newline, the block's newline count as
      `first_line_numbers` expects it for a range of that index: lines − 1 for block 0,
      lines after it), about `block_bytes` (default `COMPRESSED_BLOCK_BYTES`) decompressed
      bytes at a time.

    Raises:
      InputError: the file cannot be opened or decompressed (a truncated or corrupt file
        stops the run: its other lines would be lost silently otherwise).
    """
    block_bytes = COMPRESSED_BLOCK_BYTES if block_bytes is None else block_bytes
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    index, rest = 0, b""
    # the start of an over-long line being read past (None: none), and the starts of such
    # lines ended since the last block, the next block's first lines
    skipping: bytes | None = None
    ended: list[bytes] = []

    def block(lines, size=None):
        if len(lines) >= MAX_LINES_PER_RANGE:
            raise InputError(f"{r.path}: more than {MAX_LINES_PER_RANGE} lines in one block")
        if index >= MAX_RANGES:
            raise InputError(f"{r.path} is too large (more than {MAX_RANGES} blocks of "
                             f"{block_bytes} bytes)")
        lines = _lines([b""] * len(ended) + lines, dict(enumerate(ended)), size)
        ended.clear()
        return index, lines, len(lines) - (1 if index == 0 else 0)

    try:
        with open_input(r.path) as f:
            while data := f.read(block_bytes):
                if skipping is not None:  # inside an over-long line: on to its end
                    cut = data.find(b"\n")
                    if cut < 0:
                        continue
                    ended.append(skipping)
                    skipping, data = None, data[cut + 1:]
                data = rest + data
                cut = data.rfind(b"\n")
                if cut < 0:  # a line longer than a block: keep reading, up to the longest
                    if len(data) > MAX_LINE_BYTES:
                        skipping, data = data[:LONG_LINE_PREFIX], b""
                    rest = data
                    continue
                rest = data[cut + 1:]
                yield block(data[:cut].split(b"\n"), cut)
                index += 1
    except InputError:
        raise
    except Exception as e:  # zlib/bz2/lzma errors, EOFError of a truncated stream, I/O
        raise InputError(f"cannot decompress input file {r.path!r} after {index} block(s) "
                         f"of {block_bytes} bytes: {type(e).__name__}: {e}") from None
    if skipping is not None:  # the file ends inside an over-long line
        ended.append(skipping)
    if rest or ended:
        yield block([rest] if rest else [])


def first_line_numbers(newlines: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """1-based line number of the first line of each range.

    Args:
      newlines: (file rank, range index) → count from `read_range`.
    """
    first = {}
    by_file: dict[int, list[int]] = {}
    for rank, index in newlines:
        by_file.setdefault(rank, []).append(index)
    for rank, indices in by_file.items():
        before = 0
        for index in sorted(indices):
            first[(rank, index)] = 1 if index == 0 else 2 + before
            before += newlines[(rank, index)]
    return first


def _row_group_ranges(path: str, rank: int, file_size: int) -> list[ByteRange]:
    """One range per non-empty row group of a Parquet file, its bytes a share of the
    file's in proportion to its rows (for the progress bar), and row group 0 even when
    empty: `first_line_numbers` counts the rows of the others from it."""
    counts = parquet_row_groups(path)
    total, done, out = sum(counts), 0, []
    if len(counts) >= MAX_RANGES:
        raise InputError(f"{path} has {len(counts)} row groups; at most {MAX_RANGES - 1} are supported")
    for index, n in enumerate(counts):
        if n >= MAX_LINES_PER_RANGE:
            raise InputError(f"{path}: row group {index} has {n} rows; at most "
                             f"{MAX_LINES_PER_RANGE - 1} are supported (write smaller row groups)")
        if n or index == 0:
            out.append(ByteRange(path, rank, index, file_size * done // max(total, 1),
                                 file_size * (done + n) // max(total, 1), n))
        done += n
    return out


@contextlib.contextmanager
def _open_whole(path: str, kind: str) -> Iterator[BinaryIO]:
    """The file of a format that compresses inside (`kind`: Parquet, Avro), opened as it is.

    Raises:
      InputError: it is compressed outside, or cannot be opened.
    """
    if is_compressed(path):
        raise InputError(f"{path}: a compressed {kind} file is not read ({kind} compresses "
                         f"inside): pass the .{kind.lower()} file itself")
    try:
        raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # any file system's own error
        raise InputError(f"cannot read input file {path!r}: {e}") from None
    with raw:
        yield raw


@contextlib.contextmanager
def _parquet_file(path: str):
    """The file as a `pyarrow.parquet.ParquetFile`.

    Raises:
      InputError: it cannot be opened, or is not Parquet.
    """
    import pyarrow.parquet as pq

    with _open_whole(path, "Parquet") as raw:
        try:
            pf = pq.ParquetFile(raw)
        except Exception as e:  # ArrowInvalid: no magic bytes, a damaged footer
            raise InputError(f"{path}: not a Parquet file ({type(e).__name__}: "
                             f"{argtypes.first_line(e)}); --format parquet "
                             "reads Parquet files only") from None
        yield pf


@functools.lru_cache(maxsize=None)
def _parquet_footer(path: str) -> tuple[tuple[tuple[str, str], ...], tuple[int, ...]]:
    """((column, Arrow type as text) of the top-level columns, rows per row group) of a
    Parquet file, read once per file in a run (`forget_footers`): the start-up checks and
    the range planning both need them, and each read of a remote file's footer is a round
    trip."""
    with _parquet_file(path) as pf:
        schema, meta = pf.schema_arrow, pf.metadata
        return (tuple((name, str(schema.field(name).type)) for name in schema.names),
                tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))


def forget_footers() -> None:
    """Drops the footers `_parquet_footer` keeps (a run starts with none: in a process
    that runs the pipeline twice, a file may have been rewritten in between)."""
    _parquet_footer.cache_clear()


def parquet_row_groups(path: str) -> list[int]:
    """Rows per row group of a Parquet file (from its footer)."""
    return list(_parquet_footer(path)[1])


def parquet_schema(path: str) -> dict[str, str]:
    """Column name → Arrow type (as text) of a Parquet file: only its top-level columns."""
    return dict(_parquet_footer(path)[0])


def is_instant(type_text: str) -> bool:
    """Whether a column of this type (`parquet_schema`'s Arrow type, `avro_schema`'s
    logical type) holds instants (timestamp or date), which `read_parquet` and `read_avro`
    give as unix milliseconds."""
    return type_text.startswith(("timestamp", "date", "local-timestamp"))


def parquet_head(path: str, n: int, columns: Sequence[str] | None = None) -> list[dict]:
    """The first `n` rows of a Parquet file (`columns` only; None: all) as dicts, their
    values as `read_parquet` gives them."""
    with _parquet_file(path) as pf:
        try:
            for batch in pf.iter_batches(batch_size=max(n, 1),
                                         columns=None if columns is None else list(columns)):
                return _rows(batch)[:n]
        except Exception as e:  # a damaged first page
            raise InputError(f"cannot read the first rows of input file {path!r}: "
                             f"{type(e).__name__}: {e}") from None
    return []


def read_parquet(r: ByteRange, columns: Sequence[str],
                 batch_rows: int | None = None) -> Iterator[tuple[int, dict[str, list], int]]:
    """Streams a Parquet range (one row group) as batches of rows, column by column.

    Yields:
      (the batch's first row's offset within the row group, {column: its values as a
      list} for `columns`, the range's bytes done: its share of `r.end - r.start` in
      proportion to its rows), `batch_rows` (default `BATCH_ROWS`) rows at a time.

    Raises:
      InputError: the row group cannot be read (a damaged or truncated file stops the run:
        its rows would be lost silently otherwise).
    """
    batch_rows = BATCH_ROWS if batch_rows is None else batch_rows
    offset = 0
    try:
        with _parquet_file(r.path) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[r.index],
                                         columns=list(columns)):
                done = (r.end - r.start) * (offset + batch.num_rows) // max(r.rows, 1)
                yield offset, _columns(batch), done
                offset += batch.num_rows
    except InputError:
        raise
    except Exception as e:  # ArrowInvalid / OSError of a damaged page
        raise InputError(f"cannot read row group {r.index} of input file {r.path!r} after "
                         f"{offset} rows: {type(e).__name__}: {e}") from None
    if offset != r.rows:
        raise InputError(f"{r.path}: row group {r.index} gave {offset} rows, its footer "
                         f"says {r.rows}")


def _columns(batch) -> dict[str, list]:
    """An Arrow record batch as {column: list of values}; timestamp and date columns as
    integer unix milliseconds (their instants: a time zone only changes how they print)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for field, array in zip(batch.schema, batch.columns):
        t = field.type
        if pa.types.is_timestamp(t):
            ints = array.cast(pa.int64())
            if t.unit == "s":
                ints = pc.multiply(ints, 1000)
            elif t.unit != "ms":
                ints = pc.divide(ints, 1000 if t.unit == "us" else 1_000_000)
            array = ints
        elif pa.types.is_date32(t):
            array = pc.multiply(array.cast(pa.int32()).cast(pa.int64()), 86_400_000)
        elif pa.types.is_date64(t):
            array = array.cast(pa.int64())
        out[field.name] = array.to_pylist()
    return out


def _rows(batch) -> list[dict]:
    """An Arrow record batch as one dict per row (`_columns`' values)."""
    columns = _columns(batch)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


AVRO_MAGIC = b"Obj\x01"  # the first bytes of an Avro container file
AVRO_SYNC_BYTES = 16  # the marker after the header and after each block
PARQUET_MAGIC = b"PAR1"  # the first (and last) bytes of a Parquet file


@contextlib.contextmanager
def _avro_file(path: str, blocks: bool = False):
    """(a `fastavro.reader` of the file, or its `block_reader` with `blocks`, the open file
    just after the header).

    Raises:
      InputError: it cannot be opened, or is not an Avro container file.
    """
    import fastavro

    with _open_whole(path, "Avro") as raw:
        try:
            magic = raw.read(len(AVRO_MAGIC))
            raw.seek(0)
            if magic != AVRO_MAGIC:
                raise ValueError(f"it starts with {magic!r}, not Avro's {AVRO_MAGIC!r}")
            reader = (fastavro.block_reader if blocks else fastavro.reader)(raw)
        except Exception as e:  # no magic bytes, a damaged header, an unknown codec
            raise InputError(f"{path}: not an Avro file ({type(e).__name__}: {e}); --format "
                             "avro reads Avro container files only") from None
        yield reader, raw


def _avro_type_text(avro_type) -> str:
    """A field's type as text: the logical type where it has one, the non-null branch of
    a union."""
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        return _avro_type_text(branches[0]) if len(branches) == 1 else "union"
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical in _AVRO_INSTANTS:  # (fastavro gives datetimes; other logical types as
            return logical             # their base type, e.g. timestamp-nanos as a long)
        return _avro_type_text(avro_type.get("type"))
    return str(avro_type)


# The logical types that fastavro reads as datetimes or dates (`_raw_instants` reads the
# fields `avro_schema` names so raw; `_instant_ms` converts those it reads elsewhere).
_AVRO_INSTANTS = ("timestamp-millis", "timestamp-micros", "local-timestamp-millis",
                  "local-timestamp-micros", "date")


def avro_schema(path: str) -> dict[str, str]:
    """Field name → type (`_avro_type_text`) of an Avro file's records."""
    with _avro_file(path) as (reader, _):
        schema = reader.writer_schema
        fields = schema.get("fields", []) if isinstance(schema, dict) else []
        return {f["name"]: _avro_type_text(f["type"]) for f in fields}


def avro_head(path: str, n: int) -> list[dict]:
    """The first `n` records of an Avro file, their instants as unix milliseconds."""
    out = []
    with _avro_file(path) as (reader, _):
        instants = _raw_instants(reader.writer_schema)
        try:
            for record in reader:
                if len(out) >= n:
                    break
                out.append({k: _avro_ms([v], instants[k])[0] if k in instants
                            else _instant_ms(v) for k, v in record.items()}
                           if isinstance(record, dict) else {"": record})
        except Exception as e:  # a damaged first block, a codec without its library
            raise InputError(f"cannot read the first records of input file {path!r}: "
                             f"{type(e).__name__}: {e}") from None
    return out


def read_avro(r: ByteRange, columns: Sequence[str], batch_rows: int | None = None
              ) -> Iterator[tuple[int, dict[str, list], int]]:
    """Streams the records of the Avro blocks that start in a range, as batches.

    A block starts right after a sync marker (the header's, or the block before's), so
    the range's first block is the first one after a marker that ends at or after
    `r.start` (or after the header), and the range reads blocks while the next one
    starts before `r.end`: every block is read by exactly one range.

    Yields:
      (the batch's first record's offset among the range's records, {column: its values}
      for `columns` (instants as unix milliseconds), the range's bytes done: up to the
      file position reached), `batch_rows` (default `BATCH_ROWS`) records at a time.

    Raises:
      InputError: a block cannot be read (a damaged or truncated block stops the run), or
        the range holds `MAX_LINES_PER_RANGE` records.
    """
    batch_rows = BATCH_ROWS if batch_rows is None else batch_rows
    done = 0
    try:
        # the block reader has read the header; it reads each next block from where the
        # file stands, and gives its offset in the file
        with _avro_file(r.path, blocks=True) as (blocks, raw):
            instants = _raw_instants(blocks.writer_schema)
            header_end = raw.tell()
            raw.seek(header_end - AVRO_SYNC_BYTES)  # the header ends with the sync marker
            sync = raw.read(AVRO_SYNC_BYTES)
            first = _avro_first_block(raw, sync, max(r.start, header_end), r.end)
            if first is None:
                return
            raw.seek(first)

            def progress():
                return min(raw.tell(), r.end) - r.start
            batch: list = []
            for block in blocks:
                for record in block:
                    batch.append(record)
                    if len(batch) == batch_rows:
                        yield done, _record_columns(batch, columns, instants), progress()
                        done, batch = done + len(batch), []
                if done + len(batch) >= MAX_LINES_PER_RANGE:
                    raise InputError(f"{r.path}: more than {MAX_LINES_PER_RANGE} records in "
                                     f"its {r.end - r.start} bytes from offset {r.start}")
                if raw.tell() >= r.end:  # the next block starts in the next range
                    break
            if batch:
                yield done, _record_columns(batch, columns, instants), progress()
    except InputError:
        raise
    except Exception as e:  # a damaged block, a truncated file, an unknown codec
        raise InputError(f"cannot read input file {r.path!r} after {done} records of the "
                         f"blocks from offset {r.start}: {type(e).__name__}: {e}") from None


def _avro_first_block(raw: BinaryIO, sync: bytes, begin: int, end: int) -> int | None:
    """The position right after the first sync marker that ends at or after `begin`, if
    it is before `end` (None: no block of the file starts in [begin, end))."""
    pos = begin - len(sync)
    raw.seek(pos)
    window = b""
    while pos < end:
        chunk = raw.read(1 << 16)
        if not chunk:
            return None
        window += chunk
        found = window.find(sync)
        if found >= 0:
            first = pos + found + len(sync)
            return first if first < end else None
        keep = len(sync) - 1  # a marker may straddle two reads
        pos += len(window) - keep
        window = window[-keep:]
    return None


def _raw_instants(schema) -> dict[str, str]:
    """Makes a reader give the fields that `avro_schema` calls instants as their raw
    numbers, by dropping their logical type from its parsed writer schema: as datetimes,
    one value out of Python's years 1 to 9999 (a garbage value, a unit mix-up) failed the
    whole file; raw, it is one malformed row (`_avro_ms`; a Parquet file's is too).
    (fastavro converts by the writer schema's logical type: a reader schema cannot stop it.)

    Returns:
      {field name: its logical type} of those fields.
    """
    def strip(avro_type):
        if isinstance(avro_type, list):
            for branch in avro_type:
                strip(branch)
        elif isinstance(avro_type, dict):
            if avro_type.get("logicalType") in _AVRO_INSTANTS:
                del avro_type["logicalType"]
            strip(avro_type.get("type"))

    instants = {}
    for field in schema.get("fields", []) if isinstance(schema, dict) else []:
        logical = _avro_type_text(field["type"])
        if logical in _AVRO_INSTANTS:
            strip(field["type"])
            instants[field["name"]] = logical
    return instants


def _avro_ms(values: list, logical: str) -> list:
    """Raw values of an Avro instant field (`_raw_instants`) as unix milliseconds: a
    timestamp's whole milliseconds (floored, as a datetime's are), a date's midnight (UTC);
    anything else (null) as `_instant_ms` gives it."""
    if logical == "date":
        return [v * 86_400_000 if type(v) is int else _instant_ms(v) for v in values]
    if logical.endswith("-micros"):
        return [v // 1000 if type(v) is int else _instant_ms(v) for v in values]
    return [v if type(v) is int else _instant_ms(v) for v in values]


def _record_columns(records: list, columns: Sequence[str],
                    instants: dict[str, str]) -> dict[str, list]:
    out = {}
    for c in columns:
        values = [rec.get(c) if isinstance(rec, dict) else None for rec in records]
        out[c] = (_avro_ms(values, instants[c]) if c in instants
                  else [_instant_ms(v) for v in values])
    return out


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MS = datetime.timedelta(milliseconds=1)


def _instant_ms(value):
    """A datetime (naive: UTC) or date as unix milliseconds; any other value as it is."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return (value - _EPOCH) // _MS
    if isinstance(value, datetime.date):
        return (value - datetime.date(1970, 1, 1)).days * 86_400_000
    return value
