"""Parsing and validation of raw log rows (pure functions, no Beam).

A raw log is CSV, TSV (or another delimiter, e.g. MovieLens' `::`) or JSON lines with one
event per line, or Parquet or Avro with one event per row (read by `sources.read_parquet`
and `sources.read_avro` column by column; a row is an object, as a JSON line is): a user
id, an item id and a time. Each row either
becomes an event or a malformed-row record naming the reason; nothing here raises on bad
data.

Times are kept internally as integer unix milliseconds, so millisecond logs keep their
order and the session gap is compared exactly; records store unix seconds (floor).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime
import decimal
import functools
import json
import math
import re
from typing import Iterable, NamedTuple, Sequence

from pipeline.schema import PAD_TOKEN, UNKNOWN_TOKEN

# items.tsv's rows 0 and 1: a raw item with one of these ids could not be told apart
RESERVED_ITEM_IDS = frozenset((PAD_TOKEN, UNKNOWN_TOKEN))

FORMATS = ("csv", "tsv", "jsonl", "parquet", "avro")
# formats whose rows are objects keyed by column name (JSON lines, Parquet rows, Avro records)
OBJECT_FORMATS = ("jsonl", "parquet", "avro")
TIME_UNITS = ("s", "ms", "iso")
_DELIMITERS = {"csv": ",", "tsv": "\t"}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MAX_RAW = 1000
# Unix seconds pass 1e11 only in the year 5138: a later time is a unit mistake (milli- or
# microseconds read as seconds) or garbage, and goes to malformed/ with that reason.
MAX_PLAUSIBLE_UNIX_SECONDS = 10**11
MAX_TIME_MS = MAX_PLAUSIBLE_UNIX_SECONDS * 1000

# A row is one line, read whole before it is split: csv's own 128 KiB cap on a field (a
# big JSON "properties" column) would only turn good events into errors.
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))

_NO_VALUE = object()
# the stats' kind of a malformed row whose error is not a `RowError` (none is known)
_UNEXPECTED = "unexpected error ({})"
_MAX_KIND = 120
# where the malformed rows of the less common kinds are counted together
OTHER_REASONS = "(other reasons)"
# the reason of a text row that does not decode as UTF-8
NOT_UTF8 = "bad UTF-8"
# the reason of a line over `sources.MAX_LINE_BYTES` (16 MiB), which the readers read past
LINE_TOO_LONG = "line longer than 16 MiB"


class RowError(ValueError):
    """A malformed row: `str(e)` is the reason, with the row's value in it (for the
    dead-letter record); `kind` is the same reason without the value (for the stats'
    counts by kind, so that rows rejected for the same cause count together whatever the
    value and its type, and no row's value reaches the stats).

    `RowError("empty user")`: a reason without a value, its own kind;
    `RowError("negative time ", value)`: `negative time '-3'`, of kind `negative time …`;
    `RowError("time ", value, " is not finite")`: `time inf is not finite`, of kind
    `time … is not finite`.
    """

    def __init__(self, before: str, value: object = _NO_VALUE, after: str = "",
                 kind: str | None = None):
        if value is _NO_VALUE:
            super().__init__(before + after)
            self.kind = kind or before + after
        else:
            super().__init__(f"{before}{value!r}{after}")
            self.kind = kind or f"{before}…{after}"


def most_common_kinds(counts: dict[str, int], keep: int) -> dict[str, int]:
    """The `keep` largest counts of malformed rows by kind, largest first (ties by kind),
    the rest summed under OTHER_REASONS (with what was counted there already). NOT_UTF8 is
    kept whatever its count: the run's closing note on encodings reads it."""
    counts = dict(counts)
    other = counts.pop(OTHER_REASONS, 0)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:keep])
    folded = [(kind, n) for kind, n in ranked[keep:] if kind != NOT_UTF8]
    if len(folded) < len(ranked[keep:]):
        out[NOT_UTF8] = counts[NOT_UTF8]
    other += sum(n for _, n in folded)
    if other:
        out[OTHER_REASONS] = other
    return out


def error_kind(error: Exception) -> str:
    """The stats' kind of a malformed row's error (`RowError.kind`; another error, by its
    type alone), at most 120 characters."""
    kind = getattr(error, "kind", None) or _UNEXPECTED.format(type(error).__name__)
    return kind[:_MAX_KIND]


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How to read the rows of one input file.

    Attributes:
      format: `csv`, `tsv`, `jsonl`, `parquet` or `avro`.
      time_unit: `s`, `ms`, `iso` or a `--time-format` (`ms` for a Parquet or Avro file
        whose time column is a timestamp or date: `sources` gives their instants as
        milliseconds).
      user_col, item_col, time_col: column names (JSON keys for `jsonl`).
      columns: column names in order (csv/tsv; a Parquet or Avro file's schema; empty for
        jsonl).
      delimiter: the field separator of csv/tsv rows; "" is the format's own (`,` or a tab).
        csv with a one-character separator is split with CSV quoting; tsv (IANA's
        text/tab-separated-values: no quoting, a field holds no tab) and several-character
        separators (`::`) by plain splitting, so a quote is part of the id.
      session_col: the column (JSON key) of the log's own session ids; "" when sessions
        come from time gaps.
      filters: (column, values) pairs: only rows whose column (JSON key) holds one of the
        values are events (`--filter`; `AllBut(values)`: one of the others, `--exclude`);
        the others are filtered rows, not malformed ones.
    """

    format: str
    time_unit: str
    user_col: str
    item_col: str
    time_col: str
    columns: tuple[str, ...] = ()
    delimiter: str = ""
    session_col: str = ""
    filters: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def separator(self) -> str:
        """The field separator of csv/tsv rows."""
        return separator_of(self.format, self.delimiter)

    @property
    def quoted(self) -> bool:
        """Whether rows are split with CSV quoting (csv with a one-character separator)."""
        return is_quoted(self.format, self.separator)

    def indices(self) -> tuple[int, int, int]:
        """Positions of the user, item and time columns (csv/tsv)."""
        return (self.columns.index(self.user_col), self.columns.index(self.item_col),
                self.columns.index(self.time_col))

    @property
    def objects(self) -> bool:
        """Whether rows are objects keyed by column name (JSON lines, Parquet, Avro)."""
        return self.format in OBJECT_FORMATS

    @property
    def wanted(self) -> tuple[str, ...]:
        """The columns (keys) a row must have: user, item, time and the session column."""
        return (self.user_col, self.item_col, self.time_col) + (
            (self.session_col,) if self.session_col else ())

    @property
    def read(self) -> tuple[str, ...]:
        """The columns a run reads: `wanted` and the `filters`' columns."""
        return tuple(dict.fromkeys(self.wanted + tuple(c for c, _ in self.filters)))


def separator_of(fmt: str, delimiter: str = "") -> str:
    """The field separator of `fmt` (csv or tsv) rows: `delimiter`, or the format's own."""
    return delimiter or _DELIMITERS[fmt]


def is_quoted(fmt: str, separator: str) -> bool:
    """Whether `fmt` rows with `separator` are split with CSV quoting: csv with a
    one-character separator; tsv never (a tab-separated file with CSV quoting: csv with
    `--delimiter tab`)."""
    return fmt == "csv" and len(separator) == 1


@functools.lru_cache(maxsize=None)
def _dialect(delimiter: str, strict: bool) -> str:
    """A registered csv dialect (building one per call cost a third of a quoted row's time)."""
    name = f"hiertcn-{ord(delimiter)}-{int(strict)}"
    csv.register_dialect(name, delimiter=delimiter, strict=strict)
    return name


def split_fields(line: str, delimiter: str, quoted: bool = True, strict: bool = True) -> list[str]:
    """Splits one csv/tsv line at `delimiter`; with `quoted` and a one-character delimiter,
    quoted fields are honoured (one physical line per row). With `strict`, a line that holds
    only a part of a quoted field (the first or a later line of a field with a line break)
    is a RowError; other loose quoting is read as csv reads it ('"Heroes" song' is
    'Heroes song', 'a"b' is 'a"b')."""
    if not quoted or '"' not in line or len(delimiter) > 1:
        return line.split(delimiter)
    fields = None
    if strict:
        try:  # (non-strict csv ends a field left open at the line's end)
            fields = next(csv.reader([line], _dialect(delimiter, True)), [])
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise RowError("a quoted field is not closed on its line (a line break "
                               "inside quotes? a row is one line)") from None
    if fields is None:
        try:
            fields = next(csv.reader([line], _dialect(delimiter, False)), [])
        except csv.Error as e:
            raise RowError(f"bad quoting: {e}") from None  # (csv's words, not the row's)
    # (also where strict csv stopped early: the second line of '"\n""a"' is '""a",...')
    if strict and line.count('"') % 2 and any(f.endswith('"') and not f.startswith('"')
                                              for f in fields):
        raise RowError("a quoted field ends on this line without its start (the second "
                       "line of a field with a line break? a row is one line)")
    return fields


def fit_fields(fields: list[str], width: int) -> list[str] | None:
    """A row's fields as its `width` columns: the empty field after a trailing delimiter
    (some exporters end every row with one) is dropped; None for another count."""
    if len(fields) == width + 1 and not fields[-1].strip():
        return fields[:-1]
    return fields if len(fields) == width else None


def row_fields(line: str, fmt: RowFormat) -> list[str] | None:
    """A csv/tsv line's fields as `fmt`'s columns (`fit_fields`), None for another count.

    Raises:
      RowError: the line's quoting (`split_fields`).
    """
    return fit_fields(split_fields(line, fmt.separator, fmt.quoted), len(fmt.columns))


def parse_header(line: str, delimiter: str, quoted: bool = True) -> tuple[str, ...]:
    """Column names from a header line (a UTF-8 byte-order mark is dropped)."""
    return tuple(f.strip() for f in split_fields(line.lstrip("\ufeff").rstrip("\r\n"),
                                                 delimiter, quoted, strict=False))


def parse_delimiter(text: str) -> str:
    """`--delimiter`: the text itself, with `\\t` or `tab` for a tab.

    Raises:
      ValueError: empty, or holding a quote, a newline or a carriage return.
    """
    value = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if not value or any(c in value for c in '"\r\n'):
        raise ValueError(f"--delimiter must be a non-empty text without quotes or newlines, "
                         f"got {text!r}")
    return value


def guess_delimiter(line: str) -> str | None:
    """The separator a header line seems to use, among the common ones (for a hint)."""
    counts = {d: line.count(d) for d in ("::", ";", "|", "\t", ",")}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def is_time_format(unit: str) -> bool:
    """Whether a `RowFormat.time_unit` is a `--time-format` (strptime directives)."""
    return "%" in unit


def time_option(unit: str) -> str:
    """The option that set `unit`, as a user wrote it: `--time-unit s`, `--time-format '%d'`."""
    return f"--time-format {unit!r}" if is_time_format(unit) else f"--time-unit {unit}"


# the end of a malformed row's reason whose time parses with --time-format's %d and %m
# swapped (a day/month/year log read as month/day/year: its days up to 12 read as months)
DAYS_MONTHS = "days and months swapped"


def days_months_swapped(fmt: str) -> str | None:
    """`fmt` with its %d and %m exchanged, or None where it lacks either."""
    if not is_time_format(fmt) or "%d" not in fmt or "%m" not in fmt:
        return None
    return fmt.replace("%d", "\0").replace("%m", "%d").replace("\0", "%m")


def strptime_reads(value: object, fmt: str) -> bool:
    """Whether `fmt` reads the text `value` as a time."""
    try:
        datetime.datetime.strptime(str(value).strip(), fmt)
    except ValueError:
        return False
    return True


def time_format_error(fmt: str) -> str | None:
    """Why a `--time-format` cannot read times right, or None: no strptime directive, no
    year (every time would fall in 1900), `%Z` (a zone name: strptime takes only the
    machine's own and drops it, so the times would be read as UTC), or a directive
    strptime does not know (checked by writing a fixed time with it and reading it back)."""
    if not is_time_format(fmt):
        return "holds no strptime directive (%Y, %m, %d, %H, %M, %S, %z, ...)"
    if "%Z" in fmt:
        return ("holds %Z, a zone name, which Python's strptime reads only for the machine's "
                "own zone and then drops: use %z for offsets (+0100, +01:00, Z)")
    if not re.search(r"%[Yycx]", fmt):  # (%c and %x: the locale's date, with its year)
        return "holds no year (%Y or %y): every time would fall in 1900"
    directives = re.findall(r"%[^%]", fmt.replace("%%", ""))
    repeated = sorted({d for d in directives if directives.count(d) > 1})
    if repeated:
        return (f"repeats {', '.join(repeated)}: one of them is likely another directive "
                "(%m is the month, %M the minutes)")
    # a part without the larger one it belongs to: a month or an hour typed in the wrong
    # case (%M is minutes): every time would fall in January, or in the first hour
    for part, needs, name in (("dej", "mbBhj", "a day but no month (%m, %b or %B)"),
                              ("M", "HIk", "minutes (%M) but no hour (%H or %I)"),
                              ("S", "M", "seconds (%S) but no minutes (%M)")):
        if any(f"%{p}" in directives for p in part if p != "j") and not any(
                f"%{n}" in directives for n in needs):
            return f"holds {name}: %m is the month, %M the minutes"
    sample = datetime.datetime(2021, 3, 2, 15, 8, 11, 250000, tzinfo=datetime.timezone.utc)
    try:
        datetime.datetime.strptime(sample.strftime(fmt), fmt)
    except (ValueError, re.error) as e:
        return f"cannot read the times it writes ({e})"
    return None


# Times with a fraction are scaled to milliseconds in decimal, exact to 60 digits.
_EXACT = decimal.Context(prec=60)


def parse_time_ms(value: object, unit: str, check_range: bool = True) -> int:
    """Unix milliseconds of a raw time value.

    Args:
      value: a string or (JSON) number.
      unit: `s`, `ms`, `iso`, or a strptime format (`--time-format`); naive ISO and
        formatted times are taken as UTC.
      check_range: refuse times after MAX_TIME_MS (False: any non-negative time).

    Returns:
      Integer milliseconds in [0, MAX_TIME_MS].

    Raises:
      ValueError: unparseable, non-finite, negative or implausibly late (past 10^11 unix
        seconds, the year 5138) time.
    """
    if value is None:  # JSON null, a Parquet or Avro null
        raise RowError("missing time (null)")
    if is_time_format(unit):  # --time-format: Python's strptime directives
        if not isinstance(value, str):
            raise RowError("time ", value, f" is not text (--time-format {unit})")
        try:
            dt = datetime.datetime.strptime(value.strip(), unit)
        except ValueError:  # ("time data ... does not match format ...")
            swapped = days_months_swapped(unit)
            if swapped and strptime_reads(value, swapped):
                raise RowError("unparseable time ", value, f" ({time_option(unit)}; "
                               f"{swapped!r} reads it: {DAYS_MONTHS}?)") from None
            raise RowError("unparseable time ", value, f" ({time_option(unit)})") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        ms = (dt - _EPOCH) // datetime.timedelta(milliseconds=1)
    elif unit == "iso":
        if not isinstance(value, str):
            raise RowError("time ", value, " is not an ISO 8601 string")
        text = value.strip()
        if text[-4:].upper() == " UTC":  # BigQuery's and many databases' exports
            text = text[:-4] + "+00:00"
        dt = datetime.datetime.fromisoformat(_iso_for_python(text))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        ms = (dt - _EPOCH) // datetime.timedelta(milliseconds=1)
    else:
        scale = 1000 if unit == "s" else 1
        if isinstance(value, decimal.Decimal):  # a Parquet or Avro decimal column
            if not value.is_finite():
                raise RowError("time ", value, " is not finite")
            value = str(value)  # read exactly, as the text of a CSV file is
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowError("time ", value, " is not a number")
        try:
            if isinstance(value, float):  # a JSON number with a fraction: keep the fraction
                raise ValueError
            ms = int(value) * scale
        except ValueError:
            number = float(value) * scale
            if not math.isfinite(number):  # inf, nan, or a huge number that overflows
                raise RowError("time ", value, " is not finite") from None
            try:  # the number's own digits: float's 1.001 * 1000 is 1000.99999..., 1000 ms
                exact = decimal.Decimal(value if isinstance(value, str) else repr(value))
            except decimal.InvalidOperation:  # (a form float reads and Decimal does not)
                ms = math.floor(number)
            else:
                ms = math.floor(exact.scaleb(3 if scale == 1000 else 0, _EXACT))
    if ms < 0:
        raise RowError("negative time ", value)
    if check_range and ms > MAX_TIME_MS:
        hint = {"s": "; milli- or microseconds? see --time-unit", "ms": "; microseconds?"}
        raise RowError("time ", value, " is past 10^11 unix seconds, the year 5138 "
                       f"({time_option(unit)})" + hint.get(unit, ""))
    return ms


# The common ISO 8601 forms that Python 3.10's fromisoformat refuses (3.11 takes them):
# a "Z", a fraction of other than 3 or 6 digits (cut to microseconds), "+HHMM" or "+HH".
_ISO = re.compile(r"(\d{4}-\d\d-\d\d(?:[Tt ]\d\d(?::\d\d(?::\d\d)?)?)?)(?:[.,](\d+))?"
                  r"(?:([Zz])|([+-]\d\d)(?::?(\d\d))?)?")


def _iso_for_python(text: str) -> str:
    """`text` in the ISO 8601 form every supported Python's `fromisoformat` reads."""
    m = _ISO.fullmatch(text)
    if m is None:
        return text  # fromisoformat says what is wrong
    main, fraction, zulu, hours, minutes = m.groups()
    out = main.replace("t", "T")  # (RFC 3339 allows a lower-case t and z)
    if len(main) == 10 and (zulu or hours):  # a date with a zone (XML Schema's xs:date):
        out += "T00:00"  # its midnight there (fromisoformat took "+05:00" as the time)
    if fraction is not None:
        out += "." + fraction[:6].ljust(6, "0")
    if zulu:
        out += "+00:00"
    elif hours:
        out += f"{hours}:{minutes or '00'}"
    return out


# Ids that database and dataframe exports write for a missing value (case-insensitive):
# such a row has no user (or item, or session), it is not one user or item called "NULL".
# (SQL's \N and NULL, Python's None, pandas' and R's NaN, NA and <NA>, spreadsheets' N/A and
# #N/A, JavaScript's undefined.)
MISSING_IDS = frozenset({"\\N", "NULL", "NONE", "NAN", "NA", "N/A", "#N/A", "<NA>", "UNDEFINED"})
_MISSING_MAX = max(map(len, MISSING_IDS))


def is_missing(text: str) -> bool:
    """Whether an id (stripped) is a missing-value marker."""
    return len(text) <= _MISSING_MAX and text.upper() in MISSING_IDS


def _id(value: object, name: str) -> str:
    if value is None:  # JSON null, a Parquet null
        raise RowError(f"missing {name} (null)")
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RowError(f"{name} ", value[:50], " is not UTF-8") from None
    elif isinstance(value, decimal.Decimal):  # a Parquet decimal column (a database NUMERIC)
        value = int(value) if value.is_finite() and value == value.to_integral_value() \
            else str(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"{name} ", value, " is not a string or number")
    if isinstance(value, float) and math.isinf(value):  # a JSON 1e400, a double column's inf
        raise RowError(f"{name} ", value, " is not finite")  # (not a user called "inf")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a JSON 20.0 (pandas writes ints as floats beside a NaN) is 20
    text = value.strip() if isinstance(value, str) else str(value)
    if not text:
        raise RowError(f"empty {name}")
    if is_missing(text):
        raise RowError(f"missing {name} (", text, ", a missing-value marker)")
    if isinstance(value, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud83d": half of a character, cut off
            raise RowError(f"{name} ", text, " is not valid Unicode (a lone surrogate)") from None
    return text


class AllBut(frozenset):
    """The values a filter keeps when it names the ones it leaves out (`--exclude`):
    `value in AllBut({"a"})` is True for every value but "a", so that a filter's check is
    `value in kept` whichever way it was given. A JSON null or missing key (None) is
    the empty value: `None in AllBut({""})` is False."""

    def __contains__(self, value: object) -> bool:
        return not frozenset.__contains__(self, "" if value is None else value)

    def __repr__(self) -> str:
        return f"AllBut({set(self)!r})"


_WHOLE_NUMBER = re.compile(r"[+-]?\d+\.0*")


def whole_number_text(text: str) -> str:
    """Text as `--filter` compares it: a whole number's `.0` dropped (`5.0` and `5.` are
    `5`, as a JSON 5.0 is), anything else as it is.

    >>> whole_number_text("5.0"), whole_number_text("5.5"), whole_number_text("v1.0")
    ('5', '5.5', 'v1.0')
    """
    return text[:text.index(".")] if "." in text and _WHOLE_NUMBER.fullmatch(text) else text


def filter_text(value: object) -> str | None:
    """A JSON value as `--filter` compares it: text stripped, a whole number without its
    `.0` (`1.0` is `1`, in JSON as in text), true/false in lower case; None for null,
    arrays and objects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, bytes):  # a Parquet binary column
        value = value.decode("utf-8", "replace")
    return whole_number_text(value.strip()) if isinstance(value, str) else None


def filter_values(row: list[str] | dict, fmt: RowFormat) -> list[str | None]:
    """The values of `fmt.filters`' columns in a row, as `--filter` compares them: split
    fields (csv/tsv) or a JSON object (`filter_text`)."""
    if isinstance(row, dict):
        return [filter_text(row.get(column)) for column, _ in fmt.filters]
    return [whole_number_text(row[fmt.columns.index(column)].strip())
            for column, _ in fmt.filters]


def passes_filters(values: list[str | None], fmt: RowFormat) -> bool:
    """Whether `filter_values` are among the values every filter keeps."""
    return all(v in kept for v, (_, kept) in zip(values, fmt.filters))


def parse_line(line: str, fmt: RowFormat, check_range: bool = True,
               apply_filters: bool = False) -> tuple | None:
    """Parses one non-blank line into (user, item, time_ms), and the session id as a fourth
    value with `fmt.session_col` (`check_range` as in `parse_time_ms`). With
    `apply_filters`, None for a row that `fmt.filters` leave out (checked first: a row that
    is not wanted is not malformed for lacking an item).

    Raises:
      RowError (a ValueError): the row is malformed; the message is the reason.
    """
    if fmt.objects:  # a JSON line (or a Parquet row written as one: start-up checks)
        try:
            obj = json.loads(line)
        except ValueError as e:  # (a decoding error's `msg`: without its position)
            raise RowError(f"bad JSON: {e}", kind=f"bad JSON: {getattr(e, 'msg', e)}") from None
        except RecursionError:
            raise RowError("bad JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise RowError("JSON line is not an object")
        return parse_object(obj, fmt, check_range, apply_filters)
    split = split_fields(line, fmt.separator, fmt.quoted)
    fields = fit_fields(split, len(fmt.columns))
    if fields is None:
        hint = ""
        if fmt.quoted and '"' in line and fit_fields(line.split(fmt.separator),
                                                     len(fmt.columns)) is not None:
            # a field such as `"Heroes" tribute` read as quoted swallowed the delimiters
            hint = " (a quote runs past a delimiter" + (
                ": --format tsv reads quotes as text)" if fmt.separator == "\t" else ")")
        raise RowError(f"wrong column count: expected {len(fmt.columns)}, got {len(split)}"
                       f"{hint}")
    if apply_filters and not passes_filters(filter_values(fields, fmt), fmt):
        return None
    u, i, t_ = fmt.indices()
    session = fields[fmt.columns.index(fmt.session_col)] if fmt.session_col else None
    return _event(fields[u], fields[i], fields[t_], session, fmt, check_range)


def parse_object(obj: dict, fmt: RowFormat, check_range: bool = True,
                 apply_filters: bool = False) -> tuple | None:
    """`parse_line` for a row that is already an object keyed by column name (a decoded
    JSON line, a Parquet row)."""
    if apply_filters and not passes_filters(filter_values(obj, fmt), fmt):
        return None
    for key in fmt.wanted:
        if key not in obj:
            raise RowError(f"missing key {key!r}")  # (a column's name, not a row's value)
    session = obj[fmt.session_col] if fmt.session_col else None
    return _event(obj[fmt.user_col], obj[fmt.item_col], obj[fmt.time_col], session, fmt,
                  check_range)


def _event(user, item, t, session, fmt: RowFormat, check_range: bool) -> tuple:
    """(user, item, time_ms[, session]) of a row's raw values; ValueError names what is
    wrong."""
    user = _id(user, "user")
    if fmt.session_col:
        session = _id(session, "session")
    item = _id(item, "item")
    if isinstance(t, str) and not t.strip():
        raise RowError("empty time")
    if item in RESERVED_ITEM_IDS:
        raise RowError("item id ", item, " is reserved (items.tsv rows 0 and 1)")
    if "\n" in item or "\r" in item:
        raise RowError("item id ", item, " has a line break (items.tsv and the export's "
                       "vocabulary hold one id per line)")
    try:
        ms = parse_time_ms(t, fmt.time_unit, check_range)
    except RowError:
        raise
    except (ValueError, OverflowError):  # fromisoformat's, float()'s own words
        raise RowError("unparseable time ", t, f" ({time_option(fmt.time_unit)})") from None
    return (user, item, ms, session) if fmt.session_col else (user, item, ms)


def malformed_record(source: str, line: int, reason: str, raw: str) -> dict:
    """The dead-letter JSON object of a rejected row (raw text truncated to 1000 chars)."""
    return {"source": source, "line": line, "reason": reason, "raw": raw[:_MAX_RAW]}


class ParsedBlock(NamedTuple):
    """Result of parsing a block of lines.

    Attributes:
      by_user: user → (items, times_ms, orders), three equal-length lists in line order,
        and the session ids as a fourth list with `fmt.session_col`.
      malformed: (local line index, reason, raw text) of rejected rows.
      rows: number of rows seen (non-blank lines, header excluded).
      filtered: rows that `fmt.filters` left out.
      malformed_kinds: the rejected rows counted by kind of reason (`RowError.kind`).
    """

    by_user: dict[str, tuple[list, ...]]
    malformed: list[tuple[int, str, str]]
    rows: int
    filtered: int = 0
    malformed_kinds: dict[str, int] = {}


def parse_block(lines: Sequence[bytes], fmt: RowFormat, first_order: int,
                skip_first: bool = False, file_start: bool = False) -> ParsedBlock:
    """Parses consecutive raw lines and groups the valid events by user.

    Args:
      lines: raw lines without their trailing newline.
      fmt: the file's row format.
      first_order: input-order key of `lines[0]`; line k gets `first_order + k`.
      skip_first: the first line is the file's header.
      file_start: the first line is the file's first (a byte-order mark there is not data).

    Returns:
      A `ParsedBlock`; blank lines are not rows and are skipped (a line of separators,
      a TSV line of tabs, is a row).
    """
    by_user: dict[str, tuple[list, ...]] = {}
    with_sessions = bool(fmt.session_col)
    session = None
    malformed: list[tuple[int, str, str]] = []
    kinds: collections.Counter = collections.Counter()
    rows = filtered = 0
    # lines over the readers' bound (`sources.Lines`: b"" here, a blank line skipped below)
    for k, start in sorted(getattr(lines, "long", {}).items()):
        if not (k == 0 and skip_first):
            rows += 1
            malformed.append((k, LINE_TOO_LONG, start.decode("utf-8", "replace") + "..."))
            kinds[LINE_TOO_LONG] += 1
    filters = fmt.filters
    try:
        text_lines: Iterable[str | None] = b"\n".join(lines).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        text_lines = [_decode_or_none(b) for b in lines]
    # Fast path for the common csv/tsv row (no quotes, integer time): it accepts exactly
    # what `parse_line` accepts; anything else goes through `parse_line` for the reason.
    fast = fmt.format in _DELIMITERS and fmt.time_unit in ("s", "ms")
    separator = fmt.separator if fmt.format in _DELIMITERS else None
    if fast:
        delimiter, width, quoted = fmt.separator, len(fmt.columns), fmt.quoted
        u_col, i_col, t_col = fmt.indices()
        s_col = fmt.columns.index(fmt.session_col) if with_sessions else 0
        scale = 1000 if fmt.time_unit == "s" else 1
        f_cols = [(fmt.columns.index(key), values) for key, values in filters]
    for k, line in enumerate(text_lines):
        if k == 0 and skip_first:
            continue
        if line is None:
            rows += 1
            malformed.append((k, NOT_UTF8, lines[k].decode("utf-8", "replace")))
            kinds[NOT_UTF8] += 1
            continue
        line = line.rstrip("\r")
        if line.startswith("\ufeff") and ((k == 0 and file_start) or not separator):
            # a byte-order mark: a file's first line, or a JSON line's (files joined with
            # cat); a later csv/tsv line's first field holds U+FEFF as data
            line = line[1:]
        if not line.strip() and not (separator and separator in line):
            continue  # (a TSV line of tabs is a row of empty fields: malformed, counted)
        rows += 1
        ms = -1
        if fast and (not quoted or '"' not in line):
            fields = line.split(delimiter)
            if len(fields) == width + 1 and not fields[-1].strip():
                fields.pop()  # (a trailing delimiter: fit_fields)
            if len(fields) == width:
                if filters and any(whole_number_text(fields[c].strip()) not in values
                                   for c, values in f_cols):
                    filtered += 1
                    continue
                user, item = fields[u_col].strip(), fields[i_col].strip()
                session = fields[s_col].strip() if with_sessions else True
                try:
                    ms = int(fields[t_col]) * scale if user and item and session else -1
                except ValueError:
                    pass
                if (ms > MAX_TIME_MS or item in RESERVED_ITEM_IDS or "\r" in item
                        or (len(user) <= _MISSING_MAX and user.upper() in MISSING_IDS)
                        or (len(item) <= _MISSING_MAX and item.upper() in MISSING_IDS)
                        or (with_sessions and len(session) <= _MISSING_MAX
                            and session.upper() in MISSING_IDS)):
                    ms = -1  # parse_line says why
        if ms < 0:
            try:
                parsed = parse_line(line, fmt, apply_filters=bool(filters))
            except (ValueError, OverflowError) as e:  # whatever the row, never the job
                malformed.append((k, str(e), line))
                kinds[error_kind(e)] += 1
                continue
            if parsed is None:
                filtered += 1
                continue
            user, item, ms, *session_id = parsed
            if with_sessions:
                session = session_id[0]
        _add_event(by_user, user, item, ms, first_order + k, session if with_sessions else None)
    return ParsedBlock(by_user, malformed, rows, filtered, dict(kinds))


def _add_event(by_user: dict[str, tuple[list, ...]], user: str, item: str, ms: int, order: int,
               session: str | None) -> None:
    """Appends an event to its user's lists in `ParsedBlock.by_user` (the session id as a
    fourth list where sessions are the log's own: `session` not None)."""
    entry = by_user.get(user)
    if entry is None:
        entry = by_user[user] = ([], [], []) if session is None else ([], [], [], [])
    entry[0].append(item)
    entry[1].append(ms)
    entry[2].append(order)
    if session is not None:
        entry[3].append(session)


def parse_columns(columns: dict[str, list], fmt: RowFormat, first_order: int) -> ParsedBlock:
    """`parse_block` for a batch of rows given column by column (a Parquet or Avro file's,
    from `sources`: one list per column in `fmt.read`, equal lengths): row k gets
    the input-order key `first_order + k`; a malformed row's raw text is its JSON.

    Rows of string or integer ids and an integer time (seconds or milliseconds) that
    `parse_object` would accept as they are take a fast path; any other row goes through
    `parse_object`, which says what is wrong with it.
    """
    by_user: dict[str, tuple[list, ...]] = {}
    with_sessions = bool(fmt.session_col)
    malformed: list[tuple[int, str, str]] = []
    kinds: collections.Counter = collections.Counter()
    filtered = 0
    users, items, times = columns[fmt.user_col], columns[fmt.item_col], columns[fmt.time_col]
    sessions = columns[fmt.session_col] if with_sessions else items
    filters = [(columns[c], kept) for c, kept in fmt.filters]
    scale = {"s": 1000, "ms": 1}.get(fmt.time_unit)  # (None: iso, no fast path)
    session = None
    for k in range(len(users)):
        if filters and not all(filter_text(col[k]) in kept for col, kept in filters):
            filtered += 1
            continue
        user, item, t, session = users[k], items[k], times[k], sessions[k]
        fast = scale is not None and type(t) is int
        if fast:
            user = str(user) if type(user) is int else user.strip() if type(user) is str else ""
            item = str(item) if type(item) is int else item.strip() if type(item) is str else ""
            if with_sessions:
                session = (str(session) if type(session) is int else session.strip()
                           if type(session) is str else "")
            ms = t * scale
            fast = (user and item and 0 <= ms <= MAX_TIME_MS and item not in RESERVED_ITEM_IDS
                    and "\n" not in item and "\r" not in item
                    and not (len(user) <= _MISSING_MAX and user.upper() in MISSING_IDS)
                    and not (len(item) <= _MISSING_MAX and item.upper() in MISSING_IDS)
                    and not (with_sessions and (not session or (
                        len(session) <= _MISSING_MAX and session.upper() in MISSING_IDS))))
        if not fast:
            row = {c: columns[c][k] for c in fmt.read}
            try:
                user, item, ms, *session_id = parse_object(row, fmt)
            except (ValueError, OverflowError) as e:  # whatever the row, never the job
                malformed.append((k, str(e), row_text(row)))
                kinds[error_kind(e)] += 1
                continue
            if with_sessions:
                session = session_id[0]
        _add_event(by_user, user, item, ms, first_order + k, session if with_sessions else None)
    return ParsedBlock(by_user, malformed, len(users), filtered, dict(kinds))


def row_text(row: dict) -> str:
    """An object row as one line of JSON (bytes as text, other values as `str` gives them)."""
    return json.dumps({k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                       for k, v in row.items()}, ensure_ascii=False, default=str)


def _decode_or_none(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
