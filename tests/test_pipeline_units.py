"""Pure functions of the pipeline: parsing, sessionization, split, vocabulary, records."""
import collections
import bz2
import datetime
import decimal
import gzip
import json
import lzma
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorflow.core.example import example_pb2

from pipeline import (argtypes, outputs, parse, records, schema, sessions, sources, split,
                      storage, vocabulary)
from pipeline.sessions import Session

CSV = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time"))


def ev(t_s, order, item):
    return (t_s * 1000, order, item)


# --- parsing -------------------------------------------------------------------------

@pytest.mark.parametrize("value,unit,ms", [
    ("10", "s", 10_000), ("1.5", "s", 1500), ("1441864236661", "ms", 1441864236661),
    ("1970-01-01T00:00:01Z", "iso", 1000), ("1970-01-01 00:00:02.5", "iso", 2500),
    ("1970-01-01T01:00:00+01:00", "iso", 0), (7, "s", 7000), ("0", "s", 0),
    # a Parquet or Avro decimal column (a database's NUMERIC), read exactly
    (decimal.Decimal("1600000000.0"), "s", 1_600_000_000_000),
    (decimal.Decimal("1.5"), "s", 1500), (decimal.Decimal("1441864236661"), "ms", 1441864236661),
    # --time-format (strptime): naive times are UTC, an offset is kept
    ("01/02/1970 00:00:01", "%m/%d/%Y %H:%M:%S", 86_401_000),
    (" 02.01.1970 01:00 +0100 ", "%d.%m.%Y %H:%M %z", 86_400_000),
    ("1970-01-01 00:00:00.250", "%Y-%m-%d %H:%M:%S.%f", 250),
    # an offset's minutes count (India's +05:30)
    ("2021-01-01T00:00:00+05:30", "iso", 1_609_439_400_000),
    ("2021-01-01T00:00:00+0530", "iso", 1_609_439_400_000),
    # a fraction's digits are kept as written (property-based audit: float's 1.001 * 1000
    # is 1000.999..., 0.6% of such times lost a millisecond); a JSON number's too
    ("1.001", "s", 1001), ("1073741824.001", "s", 1_073_741_824_001), (1.001, "s", 1001),
    (" 1_600_000_000.009 ", "s", 1_600_000_000_009), ("1.0019999", "ms", 1),
    ("1e-999999999", "s", 0)])
def test_parse_time_ms(value, unit, ms):
    assert parse.parse_time_ms(value, unit) == ms


@pytest.mark.parametrize("value,unit", [("-1", "s"), ("abc", "s"), ("nan", "ms"),
                                        ("inf", "s"), ("2020-13-01", "iso"), (None, "s"),
                                        (decimal.Decimal("NaN"), "s"),
                                        ("1970-01-02", "%m/%d/%Y"), (86400, "%m/%d/%Y"),
                                        (decimal.Decimal("-1"), "ms"),
                                        # before 1970 by less than a millisecond too
                                        ("-0.0001", "s"), (-0.4, "ms")])
def test_parse_time_ms_rejects(value, unit):
    with pytest.raises(ValueError):
        parse.parse_time_ms(value, unit)


@pytest.mark.parametrize("value,unit", [
    ("10000000000000000000", "s"), ("1e19", "s"), ("1600500000000", "s"),  # ms read as s
    ("1600500000000000", "ms"), (2**70, "s"), ("9999-12-31T00:00:00Z", "iso")])
def test_times_past_the_year_5138_are_rejected_with_the_reason(value, unit):
    with pytest.raises(ValueError, match="past 10\\^11 unix seconds, the year 5138"):
        parse.parse_time_ms(value, unit)
    assert parse.parse_time_ms(value, unit, check_range=False) > parse.MAX_TIME_MS
    assert parse.parse_time_ms(str(parse.MAX_PLAUSIBLE_UNIX_SECONDS), "s") == parse.MAX_TIME_MS


def test_rows_no_parser_could_take_become_malformed_rows():
    big = "x" * 200_000  # over csv's default 128 KiB field limit
    lines = ["\ufeffu1,a,10", f'u1,b,11,"{{{big}}}"', "u1,c,1600500000000", "u1,d,1e19",
             "u1,e,12", "u1,[UNK],13", 'u1,"[PAD]",14', "u1,f\rg,15", 'u1,"h\ri",16']
    fmt = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time", "props"))
    block = parse.parse_block([(l + ",p" if k != 1 else l).encode()
                               for k, l in enumerate(lines)], fmt, first_order=0,
                              file_start=True)
    # the byte-order mark of a file without a header is not part of the first user id
    assert block.by_user == {"u1": (["a", "b", "e"], [10_000, 11_000, 12_000], [0, 1, 4])}
    # ... but U+FEFF at the start of a later line is: a user of its own (audit: merged)
    later = parse.parse_block(["u1,a,10,p".encode(), "\ufeffu1,b,11,p".encode()], fmt,
                              first_order=0, file_start=True)
    assert sorted(later.by_user) == ["u1", "\ufeffu1"]
    block_after = parse.parse_block(["\ufeffu1,b,11,p".encode()], fmt, first_order=0)
    assert list(block_after.by_user) == ["\ufeffu1"]  # (a later block of the file)
    assert [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [
        (2, "time '1600500000000' is past 10^11 unix seconds, the year 5138"),
        (3, "time '1e19' is past 10^11 unix seconds, the year 5138"),
        (5, "item id '[UNK]' is reserved"), (6, "item id '[PAD]' is reserved"),
        (7, "item id 'f\\rg' has a line break"), (8, "item id 'h\\ri' has a line break")]
    deep = parse.RowFormat("jsonl", "s", "u", "i", "t")
    nested = "[" * 100_000 + "]" * 100_000
    block = parse.parse_block([b'{"u": "v", "i": "a", "t": 1}', nested.encode(),
                               '\ufeff{"u": "v", "i": "b", "t": 2}'.encode()], deep, 0)
    assert block.by_user == {"v": (["a", "b"], [1000, 2000], [0, 2])}
    assert [(k, r) for k, r, _ in block.malformed] == [(1, "bad JSON: nested too deeply")]
    block = parse.parse_block([b'{"u": "v", "i": "a\\nb", "t": 1}'], deep, 0)
    assert [r.split(" (")[0] for _, r, _ in block.malformed] == ["item id 'a\\nb' has a line break"]


def test_parse_block_groups_by_user_and_routes_bad_rows():
    lines = [b"user,item,time", b"u1,a,10", b"u2,b,11", b"", b"u1,c,12",
             b"u1,,13", b"u1,a", b"u1,a,-5", b"u1,a,x", b'"u 3","it,em",14', b"u1,\xff,15\r"]
    block = parse.parse_block(lines, CSV, first_order=100, skip_first=True)
    assert block.rows == 9  # header and the blank line are not rows
    assert block.by_user == {"u1": (["a", "c"], [10_000, 12_000], [101, 104]),
                             "u2": (["b"], [11_000], [102]),
                             "u 3": (["it,em"], [14_000], [109])}
    reasons = {k: r for k, r, _ in block.malformed}
    assert reasons == {5: "empty item", 6: "wrong column count: expected 3, got 2",
                       7: "negative time '-5'", 8: "unparseable time 'x' (--time-unit s)",
                       10: "bad UTF-8"}


def test_a_line_of_separators_is_a_malformed_row_not_a_blank_line():
    """Every input row is accounted for: a TSV line of tabs (an export's empty row) is a
    row of empty fields, which strip() alone took for a blank line and never counted."""
    tsv = parse.RowFormat("tsv", "s", "user", "item", "time", ("user", "item", "time"))
    block = parse.parse_block([b"u\ta\t1", b"\t\t", b"", b"  ", b"u\tb\t2"], tsv, 0)
    assert block.rows == 3 and block.malformed == [(1, "empty user", "\t\t")]
    block = parse.parse_block([b"u,a,1", b",,", b" ", b"u,b,2"], CSV, 0)
    assert block.rows == 3 and [k for k, _, _ in block.malformed] == [1]


def test_filters_keep_the_listed_values_before_any_other_check():
    """--filter: a row whose column holds another value is a filtered row, also where it
    would be malformed (an event type that carries no item); the fast csv path, quoted
    rows and JSON lines agree; a row that cannot be split is malformed."""
    fmt = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "event", "item", "time"),
                          filters=(("event", frozenset({"view", "1"})),))
    lines = [b"u1,view,a,10", b"u1,cart,b,11", b'u1,"view",c,12', b'"u1",cart,"d",13',
             b"u1, view ,e,14", b"u1,cart,,15", b"u1,view,,16", b"u1,view,f", b"u1,1,g,17"]
    block = parse.parse_block(lines, fmt, first_order=0)
    assert (block.rows, block.filtered) == (9, 3)
    assert block.by_user == {"u1": (["a", "c", "e", "g"], [10_000, 12_000, 14_000, 17_000],
                                    [0, 2, 4, 8])}
    assert [(k, r) for k, r, _ in block.malformed] == [
        (6, "empty item"), (7, "wrong column count: expected 4, got 3")]
    # the checks at start-up parse rows without the filters
    assert parse.parse_line("u1,cart,b,11", fmt) == ("u1", "b", 11_000)
    assert parse.parse_line("u1,cart,b,11", fmt, apply_filters=True) is None
    js = parse.RowFormat("jsonl", "s", "u", "i", "t", filters=(("type", frozenset({"1", "true"})),))
    rows = [{"u": "v", "i": "a", "t": 1, "type": 1}, {"u": "v", "i": "b", "t": 2, "type": 1.0},
            {"u": "v", "i": "c", "t": 3, "type": "1"}, {"u": "v", "i": "d", "t": 4, "type": 2},
            {"u": "v", "t": 5, "type": 4}, {"u": "v", "i": "e", "t": 6},
            {"u": "v", "i": "f", "t": 7, "type": None}, {"u": "v", "i": "g", "t": 8, "type": True},
            {"u": "v", "i": "h", "t": 9, "type": [1]}, {"u": "v", "t": 10, "type": 1}]
    block = parse.parse_block([json.dumps(r).encode() for r in rows], js, first_order=0)
    assert block.by_user == {"v": (["a", "b", "c", "g"], [1000, 2000, 3000, 8000], [0, 1, 2, 7])}
    assert (block.filtered, [(k, r) for k, r, _ in block.malformed]) == (5, [(9, "missing key 'i'")])


def test_parse_line_jsonl():
    fmt = parse.RowFormat("jsonl", "ms", "u", "i", "t")
    assert parse.parse_line('{"u": 5, "i": "x", "t": 1500}', fmt) == ("5", "x", 1500)
    for line, reason in [("{bad", "bad JSON"), ("[1]", "not an object"),
                         ('{"u": 1, "i": 2}', "missing key 't'"), ('{"u": "", "i": 2, "t": 1}', "empty user"),
                         ('{"u": {}, "i": 2, "t": 1}', "not a string or number")]:
        with pytest.raises(ValueError, match=reason):
            parse.parse_line(line, fmt)


def test_json_times_keep_their_fraction_and_overflowing_times_are_malformed_rows():
    """A JSON float time keeps its milliseconds, as the same time written in a CSV does
    (truncated to whole seconds, events of one second came out in input order); a time that
    overflows (CSV 1e306 s, JSON Infinity or 1e999) is a malformed row, not a crash."""
    for value in (1600000000.9, "1600000000.9"):
        assert parse.parse_time_ms(value, "s") == 1600000000900
    assert parse.parse_time_ms(1500.7, "ms") == 1500
    with pytest.raises(ValueError, match="negative"):
        parse.parse_time_ms(-0.5, "s")
    for value in (1e306, "1e306", float("inf"), "1e999"):
        with pytest.raises(ValueError):
            parse.parse_time_ms(value, "s", check_range=False)
    jsonl = parse.RowFormat("jsonl", "s", "u", "i", "t")
    lines = [b'{"u": "v", "i": "b", "t": 1600000000.9}', b'{"u": "v", "i": "a", "t": 1600000000.1}',
             b'{"u": "v", "i": "c", "t": Infinity}', b'{"u": "v", "i": "d", "t": 1e999}']
    block = parse.parse_block(lines, jsonl, 0)
    assert block.by_user == {"v": (["b", "a"], [1600000000900, 1600000000100], [0, 1])}
    assert [(k, r) for k, r, _ in block.malformed] == [(2, "time inf is not finite"),
                                                       (3, "time inf is not finite")]
    block = parse.parse_block([b"u1,a,10", b"u1,b,1e306"], CSV, 0)
    assert [(k, r) for k, r, _ in block.malformed] == [(1, "time '1e306' is not finite")]


def test_missing_value_markers_and_broken_unicode_are_not_ids():
    """`\\N`, NULL, None, NaN (any case) in an id column are a database's or a dataframe's
    missing value, not one user or item that every such row would share; a JSON id with
    half a character (a lone surrogate) cannot be written: both are malformed rows."""
    lines = [b"\\N,a,1", b"NULL,b,2", b"u1,null,3", b"u1,NaN,4", b"none,c,5", b"u1,d,6",
             b"NULLS,e,7", b"u1,\\Nx,8"]
    block = parse.parse_block(lines, CSV, 0)
    assert block.by_user == {"u1": (["d", "\\Nx"], [6000, 8000], [5, 7]),
                             "NULLS": (["e"], [7000], [6])}
    assert [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [
        (0, "missing user"), (1, "missing user"), (2, "missing item"), (3, "missing item"),
        (4, "missing user")]
    session_fmt = parse.RowFormat("csv", "s", "user", "item", "time",
                                  ("user", "session", "item", "time"), session_col="session")
    block = parse.parse_block([b"u1,\\N,a,1", b"u1,s1,a,1"], session_fmt, 0)
    assert [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [(0, "missing session")]
    jsonl = parse.RowFormat("jsonl", "s", "u", "i", "t")
    block = parse.parse_block([b'{"u": "u\\ud83d", "i": "a", "t": 1}',
                               b'{"u": "v", "i": "x\\udc00", "t": 1}',
                               b'{"u": "v", "i": "\\ud83d\\ude00", "t": 2}'], jsonl, 0)
    assert block.by_user == {"v": (["\U0001f600"], [2000], [2])}
    assert [r for _, r, _ in block.malformed] == [
        "user 'u\\ud83d' is not valid Unicode (a lone surrogate)",
        "item 'x\\udc00' is not valid Unicode (a lone surrogate)"]


# --- byte ranges ---------------------------------------------------------------------

def test_ranges_own_each_line_once_and_number_lines(tmp_path):
    path = tmp_path / "f.csv"
    lines = [f"line{k:03d}".encode() * (k % 7 + 1) for k in range(200)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    size = path.stat().st_size
    for width in (1, 5, 64, 1000, size):
        ranges = [sources.ByteRange(str(path), 0, k, s, min(s + width, size))
                  for k, s in enumerate(range(0, size, width))]
        got, newlines = [], {}
        for r in ranges:
            owned, newlines[(0, r.index)] = sources.read_range(r)
            got.append((r.index, owned))
        first = sources.first_line_numbers(newlines)
        numbered = [(first[(0, idx)] + k, line) for idx, owned in got for k, line in enumerate(owned)]
        assert numbered == list(enumerate(lines, start=1)), width


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_compressed_blocks_number_lines_like_the_plain_file(tmp_path, suffix, trailing_newline):
    lines = [f"line{k:03d}".encode() * (k % 7 + 1) for k in range(200)]
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path = tmp_path / f"f.csv{suffix}"
    # two concatenated members/streams, as `cat a.gz b.gz` makes them
    half = len(data) // 2
    path.write_bytes(COMPRESS[suffix](data[:half]) + COMPRESS[suffix](data[half:]))
    assert sources.is_compressed(str(path)) and not sources.is_compressed("f.csv")
    [r] = sources.plan_ranges([(str(path), path.stat().st_size)])
    assert sources.read_first_lines(str(path), 1) == [lines[0]]
    for block in (1, 5, 64, 1000, 10 * len(data)):
        got = list(sources.read_compressed(r, block))
        assert [index for index, _, _ in got] == list(range(len(got)))
        first = sources.first_line_numbers({(0, index): n for index, _, n in got})
        numbered = [(first[(0, index)] + k, line) for index, owned, _ in got
                    for k, line in enumerate(owned)]
        assert numbered == list(enumerate(lines, start=1)), block
        assert len(got) > 1 or block >= len(data)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_compressed_input_raises(tmp_path, damage):
    data = gzip.compress(b"".join(f"u{k},i{k % 9},{k}\n".encode() for k in range(20000)))
    data = data[:-100] if damage == "truncated" else data[:200] + b"x" * 64 + data[264:]
    path = tmp_path / "log.csv.gz"
    path.write_bytes(data)
    [r] = sources.plan_ranges([(str(path), len(data))])
    with pytest.raises(sources.InputError, match="cannot decompress input file .*log.csv.gz"):
        list(sources.read_compressed(r, 4096))


def test_compressions_that_hide_truncation_are_refused(tmp_path):
    (tmp_path / "log.csv.zst").write_bytes(b"anything")
    with pytest.raises(sources.InputError, match="zstd input is not supported"):
        sources.match_inputs([str(tmp_path / "*.zst")])


def test_an_input_in_a_folder_this_process_may_not_enter_says_so(tmp_path):
    """A log in another user's folder (mode 700) "matched no file: check the path or glob",
    a wrong path as far as the message told (unprivileged-user audit, left alone before)."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp")
    closed = os.path.join(base, "closed")
    try:
        os.chmod(base, 0o755)
        os.makedirs(os.path.join(closed, "sub"))
        for name in ("a.csv", os.path.join("sub", "b.csv")):
            with open(os.path.join(closed, name), "w") as f:
                f.write("user_id,item_id,timestamp\n")
        os.chmod(closed, 0o700 if os.geteuid() == 0 else 0o000)
        patterns = [os.path.join(closed, "a.csv"), os.path.join(closed, "*.csv"),
                    os.path.join(closed, "sub", "*.csv"), os.path.join(closed, "sub")]
        if os.geteuid() == 0:  # root may enter anything: be someone else for the check
            os.seteuid(65534)
        try:
            said = []
            for pattern in patterns + [os.path.join(base, "missing", "a.csv")]:
                with pytest.raises(sources.InputError) as err:
                    sources.match_inputs([pattern])
                said.append(str(err.value))
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
        for message in said[:-1]:
            assert message.endswith(f"may not list or enter {closed} (permission denied); "
                                    "make it readable to this user"), message
        assert said[-1].endswith("matches no file: check the path or glob"), said[-1]
    finally:
        os.chmod(closed, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# --- sessionization ------------------------------------------------------------------

def test_gap_boundary_is_strict():
    # 0 →1800 s: same session (gap equal); →3601 s: 1801 s gap, new session.
    out = sessions.split_at_gaps([ev(0, 0, "a"), ev(1800, 1, "b"), ev(3601, 2, "c")], 1800)
    assert [[e[2] for e in s] for s in out] == [["a", "b"], ["c"]]


def test_ties_in_time_follow_input_order_and_out_of_order_input_is_sorted():
    events = [ev(50, 3, "d"), ev(10, 2, "c"), ev(10, 1, "b"), ev(0, 0, "a")]
    out, filtered = sessions.sessionize(events, 1800, 1, 100)
    assert out == [Session(["a", "b", "c", "d"], [0, 10, 10, 50], 1, 2)]
    assert filtered == {}


def test_consecutive_events_at_one_time_are_counted_to_the_millisecond():
    """The pairs of consecutive events in the sessions kept, and those whose order only the
    input gives (the same millisecond), for the pipeline's note on tied times."""
    events = [(0, 0, "a"), (0, 1, "b"), (1, 2, "c"), (1, 3, "c"), (5000, 4, "d"),  # a b c (c) d
              (9_000_000, 5, "x"),                                                  # dropped: short
              (20_000_000, 6, "p"), (20_000_000, 7, "q"), (20_000_000, 8, "r"),
              (30_000_000, 9, "i9"), (30_000_000, 10, "i10")]  # as text down, by length up
    pairs = collections.Counter()
    out, filtered = sessions.sessionize(events, 1800, 2, 100, pairs=pairs)
    assert [s.items for s in out] == [["a", "b", "c", "d"], ["p", "q", "r"], ["i9", "i10"]]
    assert out[0].times == [0, 0, 0, 5]  # (seconds: a-b tie, b-c do not)
    order = {f"{sessions.ID_ORDER}.{k}": n for k, n in (
        ("ascending", 3), ("descending", 1), ("ascending_by_length", 4),
        ("descending_by_length", 0))}
    # b-c and c-d at different times, each in the input's order
    order.update({f"{sessions.INPUT_ORDER}.forward": 2, f"{sessions.INPUT_ORDER}.backward": 0})
    assert pairs == {sessions.PAIRS: 3 + 2 + 1, sessions.SAME_TIME_PAIRS: 1 + 2 + 1, **order}
    assert filtered == {sessions.REPEAT: 1, sessions.SHORT: 1}
    # each session's ties and its most events in a row at one time
    assert [(s.tied, s.run) for s in out] == [(1, 2), (2, 3), (1, 2)]


def test_a_file_written_newest_first_is_counted_as_such():
    """Pairs at different times whose rows came in reverse input order: a file listing each
    user's events newest first (the Goodreads dump does), whose same-time events are then
    read in reverse; and a run of events at one time (a bulk import) measured."""
    events = [(5000, 0, "d"), (1000, 1, "c"), (1000, 2, "b"), (1000, 3, "x"), (0, 4, "a")]
    pairs = collections.Counter()
    out, _ = sessions.sessionize(events, 1800, 2, 100, pairs=pairs)
    assert out[0].items == ["a", "c", "b", "x", "d"] and (out[0].tied, out[0].run) == (2, 3)
    assert pairs[f"{sessions.INPUT_ORDER}.backward"] == 2  # a-c, x-d
    assert pairs[f"{sessions.INPUT_ORDER}.forward"] == 0


def test_immediate_repeats_collapse_and_short_sessions_drop():
    events = [ev(0, 0, "a"), ev(1, 1, "a"), ev(2, 2, "b"), ev(3, 3, "a"),  # a a b a → a b a
              ev(5000, 4, "x"), ev(5001, 5, "x"),                          # x x → x (too short)
              ev(9000, 6, "y")]                                            # single event
    out, filtered = sessions.sessionize(events, 1800, 2, 100)
    assert out == [Session(["a", "b", "a"], [0, 2, 3])]
    assert filtered == {sessions.REPEAT: 2, sessions.SHORT: 2}


def test_cap_keeps_most_recent():
    events = [ev(t, t, f"i{t}") for t in (5, 1, 4, 2, 3)]
    out, filtered = sessions.sessionize(events, 1800, 1, 3)
    assert out == [Session(["i3", "i4", "i5"], [3, 4, 5])]
    assert filtered == {sessions.CAPPED: 2}


@pytest.mark.parametrize("a, b, want", [
    # B's copy of X (dropped by the cap in A) must not displace Y
    ("a1 b2 c3 X100 Y100 Z200 W300", "X100", ["Y", "Z", "W"]),
    # a re-view that B holds twice stays twice, whatever was bounded before it came
    ("P10 Q20 X100", "R30 X100 S100 X100", ["X", "S", "X"]),
])
def test_a_heavy_users_rows_give_one_passs_events_in_any_chunk_order(a, b, want):
    """The per-user state is bounded while chunks arrive (over 2 x the cap); the events
    kept, and the rows dropped in all, are those of one pass over every row."""
    import itertools

    from pipeline import transforms

    def chunks(text, rank):  # one chunk per row: the bound runs between them
        for k, row in enumerate(text.split()):
            yield ([row[0]], [int(row[1:]) * 1000], [sources.first_order(rank, 0) + k])

    rows = list(chunks(a, 0)) + list(chunks(b, 1))
    events = [(t[0], o[0], i[0]) for i, t, o in rows]
    one_pass, filtered = sessions.sessionize(events, 10**6, 1, 3)
    assert [x for s in one_pass for x in s.items] == want
    config = transforms.Config(formats={}, session_gap=10**6, min_session_length=1,
                               max_events_per_user=3)
    for order in itertools.permutations(rows):
        fn = transforms._Sessionize(config)
        fn.start_bundle()
        (user, got), = fn.process(("u", list(order)))
        assert [x for s in got for x in s[0]] == want, order
        # the same counts too, whatever the order (the runner's): a row older than the
        # cap's cut is capped, a copy or not
        assert dict(fn._filtered) == {k: v for k, v in filtered.items() if v}, order
        assert sum(filtered.values()) == len(rows) - 3


def test_times_are_floored_to_seconds():
    out, _ = sessions.sessionize([(1999, 0, "a"), (2000, 1, "b")], 1800, 1, 10)
    assert out[0].times == [1, 2]


def test_the_logs_own_session_ids_group_events_whatever_the_gaps():
    events = [(0, 0, "a", "s1"), (1000, 1, "x", "s2"),       # two sessions interleaved
              (2000, 2, "b", "s1"), (2500, 3, "b", "s1"),    # an immediate repeat
              (9_000_000, 4, "y", "s2"),                     # s2 comes back hours later
              (9_500_000, 5, "z", "s3")]                     # one event: too short
    out, filtered = sessions.sessionize(events[::-1], 1800, 2, 100, session_ids=True)
    assert out == [Session(["a", "b"], [0, 2]), Session(["x", "y"], [1, 9000])]
    assert filtered == {sessions.REPEAT: 1, sessions.SHORT: 1}
    assert sessions.overlapping(out) == 1  # s2 starts (1 s) before s1 ends (2 s)
    assert sessions.overlapping([Session(["a"], [0, 5]), Session(["b"], [5, 9])]) == 0
    # the same events by time gaps
    out, _ = sessions.sessionize([e[:3] for e in events], 1800, 1, 100)
    assert [s.items for s in out] == [["a", "x", "b"], ["y", "z"]]


def test_a_row_read_twice_is_one_event_even_between_others_at_the_same_time():
    # minute-resolution times: A B C at one time, then the same rows again from another
    # file (a file given twice); the collapse of immediate repeats cannot see A B C A B C
    second = sources.first_order(1, 0)  # the input-order keys of the second file
    rows = [(60_000, k, item) for k, item in enumerate("abc")]
    again = [(60_000, second + k, item) for k, item in enumerate("abc")]
    out, filtered = sessions.sessionize(rows + again + [(120_000, 20, "d")], 1800, 1, 100)
    assert out == [Session(["a", "b", "c", "d"], [60, 60, 60, 120], 2, 3)]
    assert filtered == {sessions.DUPLICATE: 3}
    # the same item at another time, or in another session, is another event
    out, filtered = sessions.sessionize([(0, 0, "a"), (1000, 1, "b"), (2000, 2, "a")], 1800, 1, 100)
    assert [s.items for s in out] == [["a", "b", "a"]] and not filtered
    out, filtered = sessions.sessionize([(0, 0, "a", "s1"), (0, 1, "a", "s2"), (0, 2, "b", "s2")],
                                        1800, 1, 100, session_ids=True)
    assert [s.items for s in out] == [["a"], ["a", "b"]] and not filtered
    # duplicates go before the cap: the cap keeps the most recent distinct events
    out, filtered = sessions.sessionize([(0, 0, "a"), (1000, 1, "b"), (1000, second, "b")],
                                        1800, 1, 2)
    assert [s.items for s in out] == [["a", "b"]]
    assert filtered == {sessions.DUPLICATE: 1}


def test_a_row_repeated_within_one_file_is_a_repeat_and_its_copy_elsewhere_is_not():
    """Day-resolution times: a user views A, B, A on one day; all three are the log's
    events (they once lost the second A as a duplicate). A copy of the file adds nothing;
    an overlapping export adds only the events it holds more often than the first."""
    day = 86_400_000
    one = [(day, 0, "a"), (day, 1, "b"), (day, 2, "a"), (2 * day, 3, "c")]
    out, filtered = sessions.sessionize(one, 3600, 1, 100)
    assert out == [Session(["a", "b", "a"], [86_400] * 3, 2, 3), Session(["c"], [172_800])]
    assert not filtered
    copy = [(t, sources.first_order(1, 0) + k, item) for t, k, item in one]
    for events in (one + copy, copy + one, copy[::-1] + one[::-1]):  # any input order
        assert sessions.sessionize(events, 3600, 1, 100) == (out, {sessions.DUPLICATE: 4})
    # a third file that holds A three times that day (and nothing else) adds one A
    third = [(day, sources.first_order(2, 0) + k, "a") for k in range(3)]
    assert sessions.drop_duplicates(sorted(one + copy + third)) == (
        sorted(one + [third[2]]), 6)
    # the earliest of each event's kept rows stay: those of the first file that has them
    kept, dropped = sessions.drop_duplicates(sorted(copy + third))
    assert kept == sorted(copy[:3] + [third[2]] + copy[3:]) and dropped == 2


def test_missing_value_markers_of_every_common_export_are_missing_ids():
    fmt = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time"))
    for marker in ("NA", "na", "N/A", "#N/A", "<NA>", "undefined", "NULL", "\\N", "None", "NaN"):
        for line in (f"{marker},i1,100", f"u1,{marker},100"):
            with pytest.raises(ValueError, match="missing-value marker"):
                parse.parse_line(line, fmt)
            block = parse.parse_block([line.encode()], fmt, 0)  # the fast path agrees
            assert not block.by_user and "missing-value marker" in block.malformed[0][1]
    for kept in ("NAB", "N", "nan1", "ANA"):  # ids that only look alike
        assert parse.parse_line(f"{kept},{kept},100", fmt)[:2] == (kept, kept)


def test_tsv_is_split_as_it_is_and_csv_with_quoting():
    tsv = parse.RowFormat("tsv", "s", "user", "item", "time", ("user", "item", "time"))
    line = 'u1\t"Heroes" 5\t100'
    assert parse.parse_line(line, tsv) == ("u1", '"Heroes" 5', 100_000)
    assert parse.parse_block([line.encode(), b'u2\t"open\t200'], tsv, 0).by_user == {
        "u1": (['"Heroes" 5'], [100_000], [0]), "u2": (['"open'], [200_000], [1])}
    assert parse.parse_header('"user"\titem\ttime', "\t", quoted=False)[0] == '"user"'
    # a tab-separated file with CSV quoting: csv with a tab delimiter
    quoted = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time"), "\t")
    assert parse.parse_line('u1\t"a\tb"\t100', quoted) == ("u1", "a\tb", 100_000)
    assert parse.is_quoted("csv", ";") and not parse.is_quoted("csv", "::")
    assert not parse.is_quoted("tsv", "\t")


def test_json_whole_number_floats_are_the_same_ids_as_ints():
    fmt = parse.RowFormat("jsonl", "s", "user", "item", "time")
    assert parse.parse_line('{"user": 7.0, "item": 20.0, "time": 1}', fmt) == ("7", "20", 1000)
    assert parse.parse_line('{"user": 7, "item": 20.5, "time": 1}', fmt)[:2] == ("7", "20.5")
    with pytest.raises(ValueError, match="missing-value marker"):  # pandas' NaN as a number
        parse.parse_line('{"user": NaN, "item": 1, "time": 1}', fmt)
    # a string keeps its text: "20.0" is not "20"
    assert parse.parse_line('{"user": "u", "item": "20.0", "time": 1}', fmt)[1] == "20.0"


def test_infinite_numbers_are_not_ids(tmp_path):
    """A JSON 1e400 (or Infinity) and a Parquet double column's inf are malformed rows, not
    a user or item called "inf" (audit: taken as ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = parse.RowFormat("jsonl", "s", "user", "item", "time")
    block = parse.parse_block([b'{"user": 1e400, "item": 1, "time": 1}',
                               b'{"user": 2, "item": -Infinity, "time": 1}',
                               b'{"user": 2, "item": 1e300, "time": 1}'], fmt, 0)
    assert [(k, r) for k, r, _ in block.malformed] == [
        (0, "user inf is not finite"), (1, "item -inf is not finite")]
    assert list(block.by_user) == ["2"]
    path = str(tmp_path / "e.parquet")
    pq.write_table(pa.table({"user": [1.0, float("inf"), 2.5], "item": ["a", "b", "c"],
                             "time": [1, 2, 3]}), path)
    r = sources.ByteRange(path, 0, 0, 0, 1, rows=3)
    (_, columns, _), = sources.read_parquet(r, ["user", "item", "time"])
    fmt = parse.RowFormat("parquet", "s", "user", "item", "time", tuple(columns))
    block = parse.parse_columns(columns, fmt, 0)
    assert [(k, r) for k, r, _ in block.malformed] == [(1, "user inf is not finite")]
    assert sorted(block.by_user) == ["1", "2.5"]
    assert block.malformed_kinds == {"user … is not finite": 1}


@pytest.mark.parametrize("text, ms", [
    ("2015-06-04T06:16:22.483Z", 1433398582483),          # YooChoose
    ("2015-06-04T06:16:22.483123456Z", 1433398582483),    # nanoseconds (cut)
    ("2015-06-04T06:16:22.4Z", 1433398582400),
    ("2015-06-04T08:16:22+0200", 1433398582000),
    ("2015-06-04T08:16:22+02", 1433398582000),
    ("2015-06-04 06:16:22,5", 1433398582500),
    ("2015-06-04", 1433376000000),
    ("2015-06-04T06:16", 1433398560000),
    ("2015-06-04t06:16:22.483z", 1433398582483),          # RFC 3339's lower case
    # a date with a zone (XML Schema's xs:date) is its midnight there (property-based
    # audit: "+05:00" was read as the time of day, 10 hours late)
    ("2015-06-04+05:00", 1433358000000),
    ("2015-06-04+0530", 1433356200000),
    ("2015-06-04-05", 1433394000000),
    ("2015-06-04Z", 1433376000000),
])
def test_iso_times_in_the_forms_python_3_10_refuses_too(text, ms):
    assert parse.parse_time_ms(text, "iso") == ms
    import datetime
    datetime.datetime.fromisoformat(parse._iso_for_python(text))  # what 3.10 reads
    assert re.fullmatch(r"\d{4}-\d\d-\d\d([T ]\d\d(:\d\d(:\d\d(\.\d{6})?)?)?)?"
                        r"([+-]\d\d:\d\d)?", parse._iso_for_python(text))


def test_session_column_is_parsed_and_required():
    fmt = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "sid", "item", "time"),
                          session_col="sid")
    assert parse.parse_line("u1,s9,a,100", fmt) == ("u1", "a", 100_000, "s9")
    block = parse.parse_block([b"u1,s9,a,100", b"u1, ,b,101", b"u1,s8,c,102"], fmt, 0)
    assert block.by_user == {"u1": (["a", "c"], [100_000, 102_000], [0, 2], ["s9", "s8"])}
    assert block.malformed == [(1, "empty session", "u1, ,b,101")]
    jsonl = parse.RowFormat("jsonl", "s", "u", "i", "t", session_col="s")
    assert parse.parse_line('{"u": 1, "i": "a", "t": 5, "s": 77}', jsonl) == ("1", "a", 5000, "77")
    with pytest.raises(ValueError, match="missing key 's'"):
        parse.parse_line('{"u": 1, "i": "a", "t": 5}', jsonl)


# --- split ---------------------------------------------------------------------------

def test_time_cutoffs_are_lower_percentiles_and_boundaries_go_later():
    starts = list(range(100, 110))  # 10 sessions: p80 lower = 107, p90 lower = 108
    cut = split.time_cutoffs(starts, 0.1, 0.1)
    assert cut == {"t_valid": 107, "t_test": 108}
    assert [split.time_split_of(s, cut) for s in (106, 107, 108, 109)] == [
        "train", "valid", "test", "test"]
    assert cut["t_valid"] == int(np.percentile(starts, 80, method="lower"))


def test_time_cutoffs_edge_cases():
    assert split.time_cutoffs([], 0.1, 0.1) == {"t_valid": None, "t_test": None}
    none = split.time_cutoffs([1, 2, 3], 0.0, 0.0)
    assert [split.time_split_of(s, none) for s in (1, 3)] == ["train", "train"]
    no_valid = split.time_cutoffs(list(range(10)), 0.0, 0.1)
    assert [split.time_split_of(s, no_valid) for s in (7, 8, 9)] == ["train", "test", "test"]


def test_late_events_count_a_sessions_events_past_later_cutoffs():
    cut = {"t_valid": 107, "t_test": 108}
    assert split.late_events([100, 106, 107, 107, 108, 120], "train", cut) == {
        "train_after_t_valid": 4, "train_after_t_test": 2}
    assert split.late_events([107, 107, 109], "valid", cut) == {"valid_after_t_test": 1}
    assert split.late_events([100, 106], "train", cut) == {}
    assert split.late_events([108, 200], "test", cut) == {}
    assert split.late_events([100, 300], "train", {"t_valid": None, "t_test": None}) == {}


def test_small_parsing_and_planning_edges():
    """Edges a mutation audit found untested: a UTF-8 byte-order mark before the header (an
    Excel export), a trailing delimiter followed by spaces, `5.` as a whole number, a large
    compressed file as one range, `within` for a sibling folder sharing a prefix."""
    assert parse.parse_header("\ufeffuser,item,time\r\n", ",") == ("user", "item", "time")
    assert parse.parse_line("u1,a,100, ", CSV) == ("u1", "a", 100_000)
    assert parse.whole_number_text("5.") == "5"
    (whole,) = sources.plan_ranges([("big.csv.gz", 10 << 20)], 8)
    assert (whole.start, whole.end) == (0, 10 << 20)
    assert len(sources.plan_ranges([("big.csv", 10 << 20)], 8)) == 8
    assert not storage.within("/x/data2", "/x/data")
    assert storage.within("/x/data/run", "/x/data") and storage.within("/x/data", "/x/data")
    # a full disk met while handling another error (a cleanup) is still a full disk
    import errno
    try:
        try:
            raise OSError(errno.ENOSPC, "write")
        except OSError:
            raise RuntimeError("cleanup failed")
    except RuntimeError as e:
        assert storage.storage_error(e) == os.strerror(errno.ENOSPC)
    assert storage.storage_error(RuntimeError("other")) is None


def test_a_killed_runs_old_output_is_not_removed_as_abandoned(tmp_path):
    """`remove_abandoned` leaves `.old-*` folders: after a kill -9 between moving the
    previous output aside and putting the new one in place, one holds the only copy."""
    out = tmp_path / "data"
    old = tmp_path / ".data.tmp-abc.old-1234"
    old.mkdir()
    (old / "stats.json").write_text("{}")
    past = time.time() - 10 * outputs.ABANDONED_AFTER_S
    os.utime(old, (past, past))
    assert outputs.remove_abandoned(str(out)) == []
    assert outputs.replaced_output(str(out)) == str(old)


def test_user_split_is_deterministic_and_proportional():
    names = [split.user_split_of(f"u{k}", 0.2, 0.1, seed=3) for k in range(4000)]
    assert names == [split.user_split_of(f"u{k}", 0.2, 0.1, seed=3) for k in range(4000)]
    assert 0.08 < names.count("test") / 4000 < 0.12
    assert 0.17 < names.count("valid") / 4000 < 0.23
    # another --seed draws other users: about 1 - (0.7^2 + 0.2^2 + 0.1^2) = 46% move
    other = [split.user_split_of(f"u{k}", 0.2, 0.1, seed=4) for k in range(4000)]
    assert 0.4 < sum(a != b for a, b in zip(names, other)) / 4000 < 0.52


# --- vocabulary and records ------------------------------------------------------------

def test_vocabulary_order_and_indices():
    vocab = vocabulary.build_vocabulary([("b", 5), ("a", 5), ("c", 9), ("rare", 4)], 5)
    assert vocab == [("c", 9), ("a", 5), ("b", 5)]
    assert vocabulary.index_of(vocab) == {"c": 2, "a": 3, "b": 4}


def test_train_sessions_lose_the_repeats_that_unknown_items_leave():
    user_sessions = [Session(["a", "z", "a", "b", "z", "z2", "b", "a"], [1, 2, 3, 4, 5, 6, 7, 8]),
                     Session(["a", "z", "a"], [10, 11, 12])]   # → [a]: too short
    out = records.build_user_records("u", user_sessions, ["train", "train"],
                                     {"a": 2, "b": 3}, min_length=2)
    assert _decode(out.records["train"]) == (0, [[2, 3, 2]], [[1, 4, 8]])
    assert out.filtered == {records.OOV_IN_TRAIN: 4, records.REPEAT_AFTER_VOCABULARY: 3,
                            records.SHORT_AFTER_VOCABULARY: 1}
    assert out.events == {"train": 3}
    # every event of the input is written or counted once
    assert sum(out.filtered.values()) + 3 == 8 + 3


def _decode(record):
    ex = example_pb2.SequenceExample()
    ex.ParseFromString(record)
    fl = ex.feature_lists.feature_list
    return (ex.context.feature[schema.NUM_CONTEXT_SESSIONS].int64_list.value[0],
            [list(f.int64_list.value) for f in fl[schema.ITEMS].feature],
            [list(f.int64_list.value) for f in fl[schema.TIMES].feature])


def test_build_user_records_context_and_unknown_items():
    user_sessions = [Session(["a", "z", "b"], [1, 2, 3]),    # train: z is OOV → [a, b]
                     Session(["z", "a"], [10, 11]),          # train: only a left → dropped
                     Session(["b", "z"], [20, 21]),          # valid: z → unknown
                     Session(["a", "b"], [30, 31])]          # test
    out = records.build_user_records("u", user_sessions, ["train", "train", "valid", "test"],
                                     {"a": 2, "b": 3}, min_length=2)
    assert out.filtered == {records.OOV_IN_TRAIN: 2, records.SHORT_AFTER_VOCABULARY: 1}
    assert _decode(out.records["train"]) == (0, [[2, 3]], [[1, 3]])
    assert _decode(out.records["valid"]) == (1, [[2, 3], [3, 1]], [[1, 3], [20, 21]])
    assert _decode(out.records["test"]) == (2, [[2, 3], [3, 1], [2, 3]],
                                            [[1, 3], [20, 21], [30, 31]])
    assert out.sessions == {"train": 1, "valid": 1, "test": 1}
    assert out.events == {"train": 2, "valid": 2, "test": 2}
    assert out.unknown == {"valid": 1}  # valid's z


def test_user_without_target_gets_no_record():
    out = records.build_user_records("u", [Session(["a", "b"], [1, 2])], ["test"], {}, 2)
    assert set(out.records) == {"test"}
    assert _decode(out.records["test"]) == (0, [[1, 1]], [[1, 2]])


def test_encoder_matches_protobuf():
    sess = [[2, 3, 2 ** 40], [], [1], list(range(2, 200))]
    times = [[0, 1, 1_700_000_000], [], [-1], list(range(198))]
    ex = example_pb2.SequenceExample()
    ex.ParseFromString(schema.make_sequence_example("üser", 3, sess, times))
    ref = example_pb2.SequenceExample()
    ref.context.feature[schema.USER_ID].bytes_list.value.append("üser".encode())
    ref.context.feature[schema.NUM_CONTEXT_SESSIONS].int64_list.value.append(3)
    for name, lists in ((schema.ITEMS, sess), (schema.TIMES, times)):
        for values in lists:
            ref.feature_lists.feature_list[name].feature.add().int64_list.value.extend(values)
    assert ex == ref


def test_delimiters_split_parse_and_guess():
    dat = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "rating", "time"), "::")
    assert parse.parse_line("1::1193::5::978300760", dat) == ("1", "1193", 978300760000)
    # several characters split plainly: a quote is part of the field
    assert parse.split_fields('a::"b::c"::d', "::") == ["a", '"b', 'c"', "d"]
    assert parse.split_fields('a;"b;c";d', ";") == ["a", "b;c", "d"]
    block = parse.parse_block([b"1::10::5::100", b"1::11::3::200", b"1::11::3"], dat, 0)
    assert block.by_user == {"1": (["10", "11"], [100_000, 200_000], [0, 1])}
    assert block.malformed == [(2, "wrong column count: expected 4, got 3", "1::11::3")]
    # a quoted field with a line break, in the last column: both lines are malformed (the
    # first was a row whose item ended at the line's end, "Lamp" for "Lamp\nRed" and "Lamp\nBlue")
    csv_ = parse.RowFormat("csv", "s", "user", "title", "time", ("user", "time", "title"), ",")
    block = parse.parse_block([b'u0,1700000060,"Lamp', b'Red"', b'u0,1700000180,"Lamp',
                               b'Blue"', b'u0,1700000240,"Lamp ""Red"""'], csv_, 0)
    assert block.by_user == {"u0": (['Lamp "Red"'], [1700000240000], [4])}
    opened, closed = "a quoted field is not closed on its line", "a quoted field ends on this line without its start"
    assert [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [
        (0, opened), (1, closed), (2, opened), (3, closed)]
    # the break in another column: the second line has the row's column count, and is no row
    users = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time"), ",")
    block = parse.parse_block([b'"Ann', b'Lee",lamp,1700000000', b'"Bo', b'Li",lamp,1700000060,'],
                              users, 0)
    assert block.by_user == {} and [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [
        (0, opened), (1, closed), (2, opened), (3, closed)]
    # the second line starting with an escaped quote, where strict csv stops early: user
    # '\n"0' (property-based audit: '""0",i1,...' became an event of user '0"')
    block = parse.parse_block([b'"', b'""0",i1,1700000000', b'"great,',
                               b'""Heroes"", live",lamp,1700000060'], users, 0)
    assert block.by_user == {} and [(k, r.split(" (")[0]) for k, r, _ in block.malformed] == [
        (0, opened), (1, closed), (2, opened), (3, closed)]
    # a header is read as before: a stray quote does not stop the run
    assert parse.parse_header('user,item,"time', ",") == ("user", "item", "time")
    # a trailing delimiter after every row (some exporters write one): its empty field is
    # not a column; a non-empty fourth field still is one too many
    block = parse.parse_block([b"u0,1700000060,lamp,", b'u0,1700000120,"lamp, red",',
                               b"u0,1700000180,lamp,x", b"u0,1700000240,lamp, "], csv_, 0)
    assert block.by_user == {"u0": (["lamp", "lamp, red", "lamp"], [1700000060000, 1700000120000,
                                                                     1700000240000], [0, 1, 3])}
    assert block.malformed == [(2, "wrong column count: expected 3, got 4", "u0,1700000180,lamp,x")]
    # other loose quoting is read as before: a quote inside a field, text after a closing quote
    assert parse.split_fields('a,b"c,d', ",") == ["a", 'b"c', "d"]
    assert parse.split_fields('u,"Heroes" song,5', ",") == ["u", "Heroes song", "5"]
    assert [parse.parse_delimiter(t) for t in ("\\t", "tab", ";", "::")] == ["\t", "\t", ";", "::"]
    for bad in ("", '"', "a\nb"):
        with pytest.raises(ValueError, match="--delimiter must be"):
            parse.parse_delimiter(bad)
    assert parse.guess_delimiter("user::item::time") == "::"
    assert parse.guess_delimiter("user;item;time") == ";"
    assert parse.guess_delimiter("useritemtime") is None


def test_storage_error_finds_a_full_disk_through_every_layer():
    import errno
    import sqlite3

    from pipeline.storage import storage_error

    assert storage_error(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    assert storage_error(OSError(errno.EFBIG, "File too large", "x.tfrecord")) == "File too large"
    # Beam hands a worker's error back as text; TensorFlow's file ops and SQLite say it so
    beam = RuntimeError("OSError: [Errno 28] No space left on device [while running 'Write']")
    assert storage_error(beam) == "No space left on device"
    assert storage_error(sqlite3.OperationalError("database or disk is full")) == \
        "database or disk is full"
    try:  # found in the exception a write failure was raised from
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise ValueError("could not save") from e
    except ValueError as e:
        assert storage_error(e) == "Disk quota exceeded"
    assert storage_error(OSError(errno.ENOENT, "No such file or directory")) is None
    assert storage_error(ValueError("bad value")) is None and storage_error(None) is None
    # what to do: a read-only file system wants no room (failure-injection audit: it said so)
    from pipeline.storage import remedy
    read_only = storage_error(OSError(errno.EROFS, os.strerror(errno.EROFS)))
    assert remedy(read_only) == "make it writable"
    assert remedy("No space left on device") == remedy("File too large") == "make room"
    # an entry point's one line, or the error itself again
    from pipeline.storage import reason_or_raise

    assert reason_or_raise(beam) == "No space left on device"
    with pytest.raises(ValueError, match="bad value"):
        reason_or_raise(ValueError("bad value"))


def test_path_error_names_a_path_that_cannot_be_written_as_asked(tmp_path):
    import errno

    from pipeline.storage import path_error

    assert path_error(PermissionError(errno.EACCES, "Permission denied", "run/ckpt")) == \
        "Permission denied: run/ckpt"
    assert path_error(IsADirectoryError(errno.EISDIR, "Is a directory", "out.json")) == \
        "Is a directory: out.json"
    assert path_error(OSError(errno.ENOSPC, "No space left on device")) is None  # room: storage_error
    assert path_error(FileNotFoundError(errno.ENOENT, "No such file", "x")) is None
    assert path_error(ValueError("Permission denied")) is None
    # a folder to make (the parent of an --output file) where a file is: not "File exists"
    (tmp_path / "demo.log").write_text("x")
    with pytest.raises(OSError) as raised:
        os.makedirs(tmp_path / "demo.log", exist_ok=True)
    assert path_error(raised.value) == f"{tmp_path / 'demo.log'} is a file where a folder is needed"
    # a link to a path that is gone: not "a file"
    os.symlink(tmp_path / "gone", tmp_path / "runs")
    with pytest.raises(OSError) as raised:
        os.makedirs(tmp_path / "runs", exist_ok=True)
    assert path_error(raised.value) == f"{tmp_path / 'runs'} is a link to nothing where a folder is needed"
    os.makedirs(tmp_path / "folder")
    assert path_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "folder"))) == \
        f"File exists: {tmp_path / 'folder'}"


def test_parquet_rows_give_instants_as_unix_milliseconds(tmp_path):
    """`sources.read_parquet`'s rows: timestamps of every unit and zone, date32 and date64
    columns as unix milliseconds; nulls as None; a range per row group, in its order."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    instant = datetime.datetime(2021, 3, 2, 15, 8, 11, 250000, tzinfo=datetime.timezone.utc)
    ms = 1614697691250
    table = pa.table({
        "ns": pa.array([instant, None, instant], pa.timestamp("ns", tz="Asia/Tokyo")),
        "s": pa.array([instant.replace(microsecond=0)] * 3, pa.timestamp("s")),
        "d32": pa.array([instant.date()] * 3, pa.date32()),
        "d64": pa.array([instant.date()] * 3, pa.date64()),
        "other": ["a", "b", "c"]})
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, row_group_size=2)
    assert sources.parquet_row_groups(path) == [2, 1]
    types = sources.parquet_schema(path)
    assert [sources.is_instant(types[c]) for c in table.column_names] == [True] * 4 + [False]
    ranges = sources.plan_ranges([(path, 900)], parquet=True)
    assert [(r.index, r.start, r.end, r.rows) for r in ranges] == [(0, 0, 600, 2), (1, 600, 900, 1)]
    rows = [dict(zip(batch, values)) for r in ranges
            for _, batch, _ in sources.read_parquet(r, ["ns", "s", "d32", "d64"], batch_rows=1)
            for values in zip(*batch.values())]
    day = 1614643200000  # 2021-03-02T00:00:00Z
    assert rows == [{"ns": ms, "s": ms - 250, "d32": day, "d64": day},
                    {"ns": None, "s": ms - 250, "d32": day, "d64": day},
                    {"ns": ms, "s": ms - 250, "d32": day, "d64": day}]
    assert sources.parquet_head(path, 2, ["other"]) == [{"other": "a"}, {"other": "b"}]
    # decimal ids (a database's NUMERIC column) are the integer's or the number's text
    fmt = parse.RowFormat("parquet", "ms", "u", "i", "t", ("u", "i", "t"))
    assert parse.parse_object({"u": decimal.Decimal("120.00"), "i": decimal.Decimal("2.50"),
                               "t": ms}, fmt) == ("120", "2.50", ms)


@pytest.mark.parametrize("unit", ["s", "ms", "iso"])
@pytest.mark.parametrize("sessions", [False, True])
def test_parquet_columns_parse_as_each_row_would(unit, sessions):
    """`parse.parse_columns` (its fast path for plain rows) gives, row by row, what
    `parse.parse_object` gives for the same row: the same events in order, the same
    malformed rows with the same reasons, the same filtered rows."""
    import random

    rng = random.Random(7)
    ids = ["u1", " u2 ", 17, 0, -3, "", "  ", None, "NULL", "nan", "n/a", "[PAD]", "[UNK]",
           "a\nb", "a\rb", 2.0, 2.5, True, b"bytes", decimal.Decimal("120.00"), "é"]
    times = [1_600_000_000, 1_600_000_000_123, 0, -1, 10**11, 10**11 + 1, 10**15, 1.5,
             "1600000000", "2021-03-02T15:08:11Z", "", None, True, float("nan")]
    n = 2000
    cols = ["user", "item", "time"] + (["session"] if sessions else []) + ["kind"]
    columns = {"user": [rng.choice(ids) for _ in range(n)],
               "item": [rng.choice(ids) for _ in range(n)],
               "time": [rng.choice(times) for _ in range(n)],
               "kind": [rng.choice(["view", "buy", 1, None]) for _ in range(n)]}
    if sessions:
        columns["session"] = [rng.choice(ids) for _ in range(n)]
    for filters in ((), (("kind", frozenset({"view", "1"})),)):
        fmt = parse.RowFormat("parquet", unit, "user", "item", "time", tuple(cols),
                              session_col="session" if sessions else "", filters=filters)
        block = parse.parse_columns({c: columns[c] for c in fmt.read}, fmt, 100)
        want_events, want_bad, want_filtered = {}, [], 0
        for k in range(n):
            row = {c: columns[c][k] for c in fmt.read}
            try:
                parsed = parse.parse_object(row, fmt, apply_filters=bool(filters))
            except (ValueError, OverflowError) as e:
                want_bad.append((k, str(e), parse.row_text(row)))
                continue
            if parsed is None:
                want_filtered += 1
                continue
            entry = want_events.setdefault(parsed[0], ([], [], [], []) if sessions else ([], [], []))
            for column, value in zip(entry, (parsed[1], parsed[2], 100 + k, *parsed[3:])):
                column.append(value)
        assert block.by_user == want_events and len(want_events) > 3
        assert block.malformed == want_bad and block.filtered == want_filtered
        assert block.rows == n


def test_avro_fields_and_instants(tmp_path):
    """`sources.avro_schema`: a field's logical type where fastavro reads it as a datetime
    or date (those are instants, given as unix milliseconds), else its base type (a union's
    non-null branch); `avro_head` converts the instants."""
    import fastavro

    fields = [("ts", {"type": "long", "logicalType": "timestamp-micros"}),
              ("local", ["null", {"type": "long", "logicalType": "local-timestamp-millis"}]),
              ("day", {"type": "int", "logicalType": "date"}),
              ("nanos", {"type": "long", "logicalType": "timestamp-nanos"}),
              ("user", ["null", "string"])]
    schema = fastavro.parse_schema({"type": "record", "name": "E",
                                    "fields": [{"name": n, "type": t} for n, t in fields]})
    path = str(tmp_path / "e.avro")
    with open(path, "wb") as f:
        fastavro.writer(f, schema, [{"ts": 1_614_697_691_250_000, "local": 1_614_697_691_250,
                                     "day": 18_688, "nanos": 5, "user": None}])
    types = sources.avro_schema(path)
    assert types == {"ts": "timestamp-micros", "local": "local-timestamp-millis", "day": "date",
                     "nanos": "long", "user": "string"}
    assert [sources.is_instant(t) for t in types.values()] == [True, True, True, False, False]
    assert sources.avro_head(path, 5) == [{"ts": 1614697691250, "local": 1614697691250,
                                           "day": 1614643200000, "nanos": 5, "user": None}]


def test_avro_instants_out_of_pythons_range_are_malformed_rows(tmp_path):
    """An Avro timestamp or date that no datetime holds (past the year 9999, before the
    year 1: a garbage value, a unit mix-up) is one malformed row, as a Parquet file's is
    (audit: the whole run failed, "OverflowError: date value out of range", at start
    when among the first records); valid instants are the milliseconds fastavro's own
    datetimes give."""
    import fastavro

    fields = [("user", "string"), ("item", "string"),
              ("time", {"type": "long", "logicalType": "timestamp-millis"}),
              ("us", ["null", {"type": "long", "logicalType": "timestamp-micros"}]),
              ("day", {"type": "int", "logicalType": "date"})]
    schema = fastavro.parse_schema({"type": "record", "name": "E",
                                    "fields": [{"name": n, "type": t} for n, t in fields]})
    good = [{"user": f"u{k}", "item": "a", "time": 1_614_697_691_250 + k,
             "us": 1_614_697_691_250_999 - k if k % 2 else None, "day": 18_688 - k}
            for k in range(5)]
    bad = [dict(good[0], time=-(2**62)), dict(good[0], time=300_000_000_000_000),
           dict(good[0], us=-(2**62)), dict(good[0], day=-(2**31))]
    path = str(tmp_path / "e.avro")
    with open(path, "wb") as f:
        fastavro.writer(f, schema, bad + good)
    with open(tmp_path / "good.avro", "wb") as f:
        fastavro.writer(f, schema, good)
    with open(tmp_path / "good.avro", "rb") as f:
        want = [{k: sources._instant_ms(v) for k, v in r.items()} for r in fastavro.reader(f)]
    r = sources.ByteRange(path, 0, 0, 0, os.path.getsize(path))
    (_, columns, _), = sources.read_avro(r, [n for n, _ in fields])
    got = [dict(zip(columns, values)) for values in zip(*columns.values())]
    assert got[4:] == want == sources.avro_head(path, 9)[4:]
    assert got[:4] == sources.avro_head(path, 4)
    assert [g["time"] for g in got[:2]] == [-(2**62), 300_000_000_000_000]
    assert (got[2]["us"], got[3]["day"]) == (-(2**62) // 1000, -(2**31) * 86_400_000)
    fmt = parse.RowFormat("avro", "ms", "user", "item", "time", tuple(columns))
    block = parse.parse_columns(columns, fmt, 0)
    assert [(k, reason.split(" (")[0]) for k, reason, _ in block.malformed] == [
        (0, f"negative time {-(2**62)}"),
        (1, "time 300000000000000 is past 10^11 unix seconds, the year 5138")]
    assert sum(len(v[0]) for v in block.by_user.values()) == 7


def test_avro_ranges_read_every_block_once(tmp_path, monkeypatch):
    """An Avro file cut into byte ranges anywhere (inside the header, a block or a sync
    marker, exactly at a block's start) reads every record once, in file order: a range
    owns the blocks that start in it; its records are numbered from its first, and its
    bytes done reach the range's size."""
    import fastavro

    schema = fastavro.parse_schema({"type": "record", "name": "E", "fields": [
        {"name": "user", "type": "string"}, {"name": "time", "type": "long"}]})
    rng = np.random.default_rng(0)
    times = [int(t) for t in 1_600_000_000 + np.cumsum(rng.integers(0, 100, 3000))]
    path = str(tmp_path / "e.avro")
    with open(path, "wb") as f:
        fastavro.writer(f, schema, [{"user": f"u{k % 37}", "time": t} for k, t in enumerate(times)],
                        codec="deflate", sync_interval=400)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        starts = [b.offset for b in fastavro.block_reader(f)]
    assert len(starts) > 50

    def read(cuts):
        got = []
        for k, (start, end) in enumerate(zip([0, *cuts], [*cuts, size])):
            r = sources.ByteRange(path, 0, k, start, end)
            first, done = len(got), 0
            for offset, columns, done in sources.read_avro(r, ["time"], batch_rows=7):
                assert offset == len(got) - first
                got.extend(columns["time"])
            assert done in (0, end - start)
        return got

    for step in (17, 203, starts[0], 1000, 4096, size // 3):
        assert read(list(range(step, size, step))) == times, step
    for b in starts[:3] + starts[-3:]:
        for cut in (b - 17, b - 16, b - 15, b - 1, b, b + 1):
            assert read([cut]) == times, cut
    # plan_ranges cuts an Avro file like a text file, at most AVRO_MAX_RANGE_BYTES a range
    monkeypatch.setattr(sources, "MIN_RANGE_BYTES", 1000)
    ranges = sources.plan_ranges([(path, size)], avro=True)
    assert len(ranges) == 8 and ranges[-1].end == size  # (the default 8 ranges a log)
    monkeypatch.setattr(sources, "AVRO_MAX_RANGE_BYTES", 700)
    assert len(sources.plan_ranges([(path, size)], avro=True)) == -(-size // 700)


@pytest.mark.parametrize("command, message", [
    ("model.train", "interrupted: the run folder keeps its last checkpoint, if any; the same "
                    "command resumes"),
    ("model.evaluate", "interrupted: no metrics were written"),
    ("serving.export", "interrupted: no version was published"),
])
def test_a_ctrl_c_at_the_top_of_a_command_is_one_line(command, message):
    """Outside a handler of its own (model.train's start-up, model.evaluate, serving.export)
    a Ctrl-C used to print a traceback of up to 93 lines; the process still ends as
    interrupted by SIGINT (status 130 in a shell). The hook each command installs is in its
    `__main__` block: the same call, made here."""

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, *command.split(".")) + ".py"
    with open(path) as f:
        assert "argtypes.interrupts_in_one_line(" in f.read()
    code = ("from pipeline import argtypes\n"
            f"argtypes.interrupts_in_one_line({message!r})\n"
            "def deep():\n    raise KeyboardInterrupt\n"
            "deep()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, timeout=60)
    assert proc.stderr == message + "\n"
    assert proc.returncode == -2  # killed by SIGINT, as an unhandled Ctrl-C ends
    if command == "serving.export":  # SIGTERM (a scheduler's stop) says the same line
        with open(path) as f:
            assert "with argtypes.sigterm_as_interrupt():" in f.read()
        code = ("import os, signal, time\nfrom pipeline import argtypes\n"
                f"argtypes.interrupts_in_one_line({message!r})\n"
                "with argtypes.sigterm_as_interrupt():\n"
                "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                              text=True, timeout=60)
        assert proc.stderr == message + "\n" and proc.returncode == 130
    # an error that stands for a stop (TensorFlow's tracing turned the KeyboardInterrupt
    # into a TypeError with no chain, a traceback and status 1) says the line as well
    code = ("import os, signal, time\nfrom pipeline import argtypes\n"
            f"argtypes.interrupts_in_one_line({message!r})\nargtypes.sigterm_until_handled()\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n"
            "except KeyboardInterrupt:\n    raise TypeError('converted') from None\n")
    proc = _python(code)
    assert proc.stderr == message + "\n" and proc.returncode == 130
    failing = subprocess.run([sys.executable, "-c", "from pipeline import argtypes\n"
                              "argtypes.interrupts_in_one_line('x')\nraise ValueError('bad')"],
                             cwd=repo, capture_output=True, text=True, timeout=60)
    assert failing.returncode == 1 and "Traceback" in failing.stderr  # other errors as before


def _python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` in the repository (its own process: its signals and children)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("stop, status, returncode", [
    ("SIGTERM", 130, 130), ("SIGINT", 130, -2), (None, 130, -2), ("SIGTERM", 2, 2),
    (None, 0, 0)])
def test_a_command_stopped_by_ctrl_c_ends_as_killed_by_sigint(stop, status, returncode):
    """`exit_with` (the pipeline's and the client's end; `model.processes.exit_now` the
    others'): status 130 after a Ctrl-C (a handler of ours that took SIGINT first, or
    Python's own: no stop noted) ends the process as killed by SIGINT, so that a shell
    script or loop running the command stops too; after a SIGTERM it is 130. The exit
    handlers run and the output is flushed first."""
    code = ("import atexit, signal, sys\nfrom pipeline import argtypes\n"
            f"argtypes._first_stop[0] = {'signal.' + stop if stop else None}\n"
            "atexit.register(lambda: print('exit handler ran'))\n"
            "sys.stdout.write('unflushed')\n"
            f"argtypes.exit_with({status})\n")
    proc = _python(code)
    assert proc.returncode == returncode, proc.stderr
    assert proc.stdout == "unflushedexit handler ran\n"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_another_thread_took_reaches_the_blocked_main_thread(signame):
    """The kernel may hand a signal sent to the process group to any thread; Python runs
    the handler in the main thread only when that thread runs Python code again, which a
    main thread blocked in a lock's wait (Beam's runner waiting for a bundle from the
    workers the same SIGTERM killed) never did: the pipeline hung until SIGKILL. Here a
    thread sends the signal to itself while the main thread waits on a lock for good."""
    import signal

    code = ("import signal, sys, threading, time\nfrom pipeline import argtypes\n"
            # (a terminal's Ctrl-C: a test run started in the background passes on its
            # ignored SIGINT, which the command leaves ignored: the test waited 60 s)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "lock = threading.Lock()\nlock.acquire()\n"
            "def other():\n"
            "    time.sleep(0.5)  # (the main thread waits by then)\n"
            f"    signal.pthread_kill(threading.get_ident(), signal.{signame})\n"
            "with argtypes.sigterm_as_interrupt():\n"
            "    try:\n"
            "        threading.Thread(target=other).start()\n"
            "        lock.acquire()\n"
            "    except KeyboardInterrupt as e:\n"
            "        print('interrupted:', e)\n"
            "        sys.exit(130)\n")
    proc = _python(code)
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == f"interrupted: signal {int(getattr(signal, signame))}\n"


RELAY_CHECK = """
import json, os, signal, sys, threading, time
from pipeline import argtypes

calls = []
t0 = time.monotonic()


def other(signum, frame):  # a handler of someone else's: never sent on
    calls.append(("other", time.monotonic() - t0))


@argtypes.noting
def stop(signum, frame):
    calls.append(("stop", time.monotonic() - t0))


def from_another_thread(signum):
    time.sleep(0.3)  # (the main thread waits by then)
    signal.pthread_kill(threading.get_ident(), signum)


signal.signal(signal.SIGUSR1, other)
signal.signal(signal.SIGUSR2, stop)
earlier_r, earlier_w = os.pipe()  # an earlier owner of the wakeup fd (asyncio's)
os.set_blocking(earlier_w, False)
signal.set_wakeup_fd(earlier_w)
relay = argtypes.MainThreadRelay({signal.SIGUSR1, signal.SIGUSR2}, grace=0.3)
pid = os.fork()
if pid == 0:  # a forked child's own signal is its own
    signal.raise_signal(signal.SIGUSR2)
    os._exit(0)
os.waitpid(pid, 0)
for signum in (signal.SIGUSR1, signal.SIGUSR2):
    t0 = time.monotonic()
    thread = threading.Thread(target=from_another_thread, args=(signum,))
    thread.start()
    threading.Event().wait(2.0)  # the main thread waits in a lock meanwhile
    thread.join()
relay.close()
assert signal.set_wakeup_fd(-1) == earlier_w
os.set_blocking(earlier_r, False)
print(json.dumps([calls, sorted(os.read(earlier_r, 64))]))
"""


def test_the_relay_sends_a_stop_signal_on_once_and_leaves_the_others_alone():
    """MainThreadRelay: a stop handler's signal that another thread took reaches the main
    thread, blocked in a lock, after the grace period, once (its own sending is not sent on
    again); another handler's waits for the main thread (it was sent on every second);
    a forked child's signal stays the child's; each signal still reaches the earlier
    owner of the wakeup fd (asyncio's), the relay's own sending not."""
    proc = _python(RELAY_CHECK)
    assert proc.returncode == 0, proc.stderr
    calls, forwarded = json.loads(proc.stdout)
    assert [name for name, _ in calls] == ["other", "stop"], calls
    other, stop = (at for _, at in calls)
    assert other >= 1.9 and 0.5 <= stop < 1.5, calls  # (the wait's end; 0.3 s + the grace)
    assert forwarded == [10, 12]  # SIGUSR1, SIGUSR2


def test_a_handler_a_command_sets_inside_sigterm_as_interrupt_stays():
    """`serving.export` ignores stop signals once its version is published
    (`processes.ignore_stop_signals`): leaving the context kept that, not the handler from
    before it (a late Ctrl-C then called a finished export interrupted)."""
    import signal

    from pipeline import argtypes

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with argtypes.sigterm_as_interrupt():
            for s in before:
                signal.signal(s, signal.SIG_IGN)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
        with argtypes.sigterm_as_interrupt():
            pass
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    with argtypes.sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is argtypes._terminate
    assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]


def test_the_pipeline_ends_its_child_processes_after_a_stop():
    """After a stop signal the pipeline kills its children (a local runner's workers): one
    that outlived the stop kept the interpreter from exiting. Only its own children."""
    code = ("import subprocess, sys\nfrom pipeline import __main__ as cli\n"
            "def child():\n"
            "    return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "callers = child()\n"
            "before = cli._child_processes()\n"
            "runs = [child(), child()]\n"
            "cli._end_child_processes(before)\n"
            "print([c.wait(timeout=30) for c in runs], callers.poll())\n"
            "callers.kill()\n")
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout == "[-9, -9] None\n", proc.stderr


REMOTE = "is a remote path"
GLOB = "has *, ? or [ ] in it"


@pytest.mark.parametrize("command, said", [
    (["model.train", "--data", "DATA", "--model-dir", "gs://bucket/run"], REMOTE),
    (["model.evaluate", "--data", "DATA", "--split", "test", "--model", "popularity",
      "--output", "s3://bucket/metrics.json"], REMOTE),
    (["model.compare", "--data", "DATA", "--models", "popularity", "--output",
      "gs://bucket/cmp"], REMOTE),
    (["serving.export", "--model-dir", "RUN", "--export-base", "gs://bucket/models"], REMOTE),
    (["serving.server", "--model-base-path", "gs://bucket/models", "--model-name", "m"], REMOTE),
    (["model.train", "--data", "DATA", "--model-dir", "m [v1]/run"], GLOB),
    (["model.evaluate", "--data", "DATA", "--split", "test", "--model-dir", "run*"], GLOB),
    (["model.compare", "--data", "DATA", "--models", "hiertcn", "--output", "cmp[1]"], GLOB),
    (["serving.export", "--model-dir", "run?", "--export-base", "models"], GLOB),
    (["serving.export", "--model-dir", "run", "--export-base", "models[2]"], GLOB),
    (["serving.server", "--model-base-path", "models[2]", "--model-name", "m"], GLOB),
    (["serving.demo", "--output", "demo[1]"], GLOB),
])
def test_local_only_paths_refuse_a_remote_or_pattern_one_in_one_line(tmp_path, command, said):
    """Run folders, reports and exports are written with Python's own file calls: a
    `gs://` path was a local folder named `gs:` (or a TensorFlow traceback), now a usage
    error that names the option, and nothing is written. TensorFlow finds a checkpoint's
    or SavedModel's files by a pattern made from the path: a run folder `m [v1]/run`
    trained, then its resume was a NotFoundError traceback, its evaluation and export said
    the checkpoint was removed while it was read, and a version under `models[2]` failed
    to load; such folders are refused at once too."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": repo})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], proc.stderr
    assert os.listdir(tmp_path) == []


def test_stats_merge_sums_counts_keeps_maxima_and_the_heaviest_user():
    from pipeline import transforms

    merged = transforms._sum_counts([
        {"rows_read": 2, "max_user_events/test": 5, "heaviest_user/test": (5, "a")},
        {"rows_read": 3, "max_user_events/test": 7, "heaviest_user/test": [7, "b"]},
        {"max_user_events/test": 7, "heaviest_user/test": (7, "c"), "heaviest_user/train": (1, "z")}])
    assert merged == {"rows_read": 5, "max_user_events/test": 7, "heaviest_user/test": (7, "c"),
                      "heaviest_user/train": (1, "z")}


JSONL = parse.RowFormat("jsonl", "s", "user", "item", "time", ())
ISO = parse.RowFormat("jsonl", "iso", "user", "item", "time", ())
# csv with a name column, read with a tab (`--delimiter tab`) and with a semicolon
TABBED = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time", "name"),
                         delimiter="\t")
SEMI = parse.RowFormat("csv", "s", "user", "item", "time", ("user", "item", "time", "name"),
                       delimiter=";")


@pytest.mark.parametrize("row, fmt, reason, kind", [
    ("NA,a,5", CSV, "missing user ('NA', a missing-value marker)",
     "missing user (…, a missing-value marker)"),
    ("u,a,-3", CSV, "negative time '-3'", "negative time …"),  # CSV text
    ({"user": "u", "item": "a", "time": -3}, JSONL, "negative time -3", "negative time …"),
    ("u,a,inf", CSV, "time 'inf' is not finite", "time … is not finite"),
    ({"user": "u", "item": "a", "time": decimal.Decimal("NaN")}, JSONL,
     "time Decimal('NaN') is not finite", "time … is not finite"),
    ({"user": "u", "item": "a", "time": "2021-13-01"}, ISO,
     "unparseable time '2021-13-01' (--time-unit iso)", "unparseable time … (--time-unit iso)"),
    ("u,a,100000000000000", CSV,
     "time '100000000000000' is past 10^11 unix seconds, the year 5138 (--time-unit s); "
     "milli- or microseconds? see --time-unit",
     "time … is past 10^11 unix seconds, the year 5138 (--time-unit s); "
     "milli- or microseconds? see --time-unit"),
    ('{"user": "u" "item": "a"}', JSONL, "bad JSON: Expecting ',' delimiter: line 1 column 14 "
     "(char 13)", "bad JSON: Expecting ',' delimiter"),
    ({"user": [1, 2], "item": "a", "time": 5}, JSONL, "user [1, 2] is not a string or number",
     "user … is not a string or number"),
    ({"user": "u", "item": b"\xff\xfe", "time": 5}, JSONL, "item b'\\xff\\xfe' is not UTF-8",
     "item … is not UTF-8"),
    ({"user": "u", "item": "it's\nb", "time": 5}, JSONL,
     "item id \"it's\\nb\" has a line break (items.tsv and the export's vocabulary hold one id "
     "per line)",
     "item id … has a line break (items.tsv and the export's vocabulary hold one id per line)"),
    ("u,a", CSV, "wrong column count: expected 3, got 2", "wrong column count: expected 3, got 2"),
    # a field that opens a quote (`"Heroes tribute`) closed in a later one swallows the
    # delimiters between them
    ('u\t"Heroes x\t5\tSong "5", part 9', TABBED, "wrong column count: expected 4, got 2 (a "
     "quote runs past a delimiter: --format tsv reads quotes as text)", "wrong column count: "
     "expected 4, got 2 (a quote runs past a delimiter: --format tsv reads quotes as text)"),
    ('u;"Heroes x;5;Song "5", part 9', SEMI, "wrong column count: expected 4, got 2 (a quote "
     "runs past a delimiter)", "wrong column count: expected 4, got 2 (a quote runs past a "
     "delimiter)"),
    ('u;"a";5', SEMI, "wrong column count: expected 4, got 3", "wrong column count: expected "
     "4, got 3"),
    (" ,a,5", CSV, "empty user", "empty user"),
    # values of any type, whole: a MongoDB export's {"$date": ...}, a list, a Parquet time64
    ({"user": "u", "item": "a", "time": {"$date": 1614697271000}}, JSONL,
     "time {'$date': 1614697271000} is not a number", "time … is not a number"),
    ({"user": "u", "item": "a", "time": [1, 2]}, JSONL, "time [1, 2] is not a number",
     "time … is not a number"),
    # a null time is missing, as a null id is (it read "time None is not a number")
    ({"user": "u", "item": "a", "time": None}, JSONL, "missing time (null)",
     "missing time (null)"),
    ({"user": "u", "item": "a", "time": None}, ISO, "missing time (null)", "missing time (null)"),
    ({"user": "u", "item": "a", "time": datetime.time(10)}, JSONL,
     "time datetime.time(10, 0) is not a number", "time … is not a number"),
    ({"user": "u", "item": "a", "time": {"$date": 5}}, ISO,
     "time {'$date': 5} is not an ISO 8601 string", "time … is not an ISO 8601 string"),
    ({"user": {"id": "a b"}, "item": "a", "time": 5}, JSONL,
     "user {'id': 'a b'} is not a string or number", "user … is not a string or number"),
    # a key's name is the column's, not a row's value
    ({"item": "a", "time": 5}, JSONL, "missing key 'user'", "missing key 'user'"),
    # a value holding the words that end its reason
    ({"user": "u", "item": "a", "time": "x is not y"}, ISO,
     "unparseable time 'x is not y' (--time-unit iso)", "unparseable time … (--time-unit iso)"),
])
def test_a_malformed_rows_kind_leaves_out_its_own_value(row, fmt, reason, kind):
    """The stats count malformed rows by `RowError.kind`: the reason with the row's value
    left out, whatever the value and its type, given where the error is raised."""
    with pytest.raises(parse.RowError) as raised:
        if isinstance(row, dict):
            parse.parse_object(row, fmt)
        else:
            parse.parse_line(row, fmt)
    assert (str(raised.value), raised.value.kind) == (reason, kind)
    # a block counts its rows by kind
    if isinstance(row, dict):
        block = parse.parse_columns({c: [row.get(c)] * 2 for c in fmt.read}, fmt, 0)
        if "missing key" in reason:
            return  # (a column is never missing from a Parquet or Avro batch)
    else:
        block = parse.parse_block([row.encode()] * 2, fmt, 0)
    assert block.malformed_kinds == {kind: 2}
    assert [r for _, r, _ in block.malformed] == [reason] * 2


def test_a_leading_tilde_is_the_home_folder_in_every_path_option(monkeypatch, tmp_path):
    """`--output=~/data` reaches the program unexpanded (no shell word starts with ~): it
    made a folder named `~` in the current one, which the messages wrote as the home
    folder (ops audit). Every path option expands it; a tilde inside a name is kept."""
    from model import cli as model_cli
    from model import compare
    from pipeline import __main__ as pipeline_cli
    from pipeline import argtypes

    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    assert argtypes.home_path("~/d") == f"{home}/d" and argtypes.home_path("a~b") == "a~b"
    assert argtypes.local_path("~/run") == f"{home}/run"
    args, _ = pipeline_cli.build_parser().parse_known_args(["--input=~/a.csv", "--output=~/d"])
    assert (args.input, args.output) == ([f"{home}/a.csv"], f"{home}/d")
    args = model_cli.train_args(["--data=~/d", "--model-dir=~/r"])
    assert (args.data, args.model_dir) == (f"{home}/d", f"{home}/r")
    assert compare.main(["--data=~/nothing", "--models", "popularity",
                         "--output=~/cmp"]) == 2  # (said of the expanded path)
    assert not os.path.exists("~")


def _numbered(got, newlines):
    """([(line number, line)], {line number: kept start of an over-long line}) of the
    (range or block index, lines) a reader gave."""
    first = sources.first_line_numbers(newlines)
    numbered = [(first[(0, k)] + j, line) for k, owned in got for j, line in enumerate(owned)]
    starts = {first[(0, k)] + j: s for k, owned in got
              for j, s in getattr(owned, "long", {}).items()}
    return numbered, starts


def test_lines_over_the_bound_are_read_past_and_numbered_in_place(tmp_path, monkeypatch):
    """A line over `MAX_LINE_BYTES` (a binary file, a corrupt stretch, a small gzip that
    inflates to gigabytes) was read whole, at 9 times its length in memory: the readers
    read past it in bounded pieces and keep its start, in its place among the lines, in
    plain and compressed files, at any range or block width."""
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 40)
    monkeypatch.setattr(sources, "LONG_LINE_PREFIX", 5)
    lines = [f"row{k:03d}".encode() for k in range(30)]
    for k in (3, 4, 17, 29):  # two in a row, and the last (without its newline)
        lines[k] = f"big{k:02d}".encode() + b"x" * (41 + 30 * k)
    data = b"\n".join(lines)
    want = [(n, b"" if len(line) > 40 else line) for n, line in enumerate(lines, start=1)]
    long_starts = {n: line[:5] for n, line in enumerate(lines, start=1) if len(line) > 40}
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    size = len(data)
    for width in (1, 7, 64, size):
        newlines, got = {}, []
        for k, s in enumerate(range(0, size, width)):
            r = sources.ByteRange(str(path), 0, k, s, min(s + width, size))
            owned, newlines[(0, k)] = sources.read_range(r)
            got.append((k, owned))
        assert _numbered(got, newlines) == (want, long_starts), width
    gz = tmp_path / "f.csv.gz"
    gz.write_bytes(gzip.compress(data))
    r = sources.ByteRange(str(gz), 0, 0, 0, gz.stat().st_size)
    for block in (3, 16, 50, 4096):
        newlines, got = {}, []
        for k, owned, n in sources.read_compressed(r, block):
            newlines[(0, k)] = n
            got.append((k, owned))
        assert _numbered(got, newlines) == (want, long_starts), block
    head = sources.read_first_lines(str(gz), 6)
    assert head == [b"row000", b"row001", b"row002", b"", b"", b"row005"]
    assert head.long == {3: b"big03", 4: b"big04"}
    # a line of exactly the bound is a row in every reader, its newline or CRLF aside (review)
    edge = tmp_path / "edge.csv"
    edge.write_bytes(b"x" * 40 + b"\n" + b"y" * 39 + b"\r\n" + b"z" * 41 + b"\n")
    assert sources.read_first_lines(str(edge), 3) == [b"x" * 40, b"y" * 39, b""]
    owned, _ = sources.read_range(sources.ByteRange(str(edge), 0, 0, 0, edge.stat().st_size))
    assert owned == [b"x" * 40, b"y" * 39 + b"\r", b""] and owned.long == {2: b"zzzzz"}


def test_a_share_in_a_note_is_never_0_or_100_percent_unless_it_is():
    """19,999 of 20,095 events read "holds 100%" of them (extremes audit)."""
    from pipeline import argtypes

    assert [argtypes.share(p, w) for p, w in ((19_999, 20_095), (1, 1000), (0, 5), (5, 5),
                                              (1, 3), (994, 1000), (99_999, 100_000))] == [
        "99.5%", "under 1%", "0%", "100%", "33%", "99%", "99.9%"]


def test_progress_is_a_notebook_s_only_in_a_running_kernel(monkeypatch):
    """ipykernel imported is not a notebook (jupyter_client's kernel lookup imports it into
    a process that runs a notebook in another: the progress tests after the notebook's in
    one pytest process got a terminal's bar; a test isolation audit's find); a running
    IPython kernel is."""
    import types

    import IPython
    import ipykernel  # noqa: F401 - what the kernel lookup imports

    assert not argtypes.in_notebook()
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=object()))
    assert argtypes.in_notebook()
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace())  # a terminal's
    assert not argtypes.in_notebook()


def test_an_output_without_room_is_dropped_and_said_and_other_errors_are_raised(monkeypatch):
    """stdout on a full disk: the write is dropped (the command goes on to its end) and
    kept for its last line; an error that is neither a reader gone nor a want of room is
    raised as before, not hidden."""
    import errno as errno_lib

    class Failing:
        def __init__(self, code):
            self.code = code

        def write(self, text):
            raise OSError(self.code, os.strerror(self.code))

    monkeypatch.setattr(argtypes, "_LOST_OUTPUT", [])
    full = argtypes._SurvivesClosedOutput(Failing(errno_lib.ENOSPC))
    assert full.write("summary\n") == len("summary\n")
    assert [e.errno for e in argtypes._LOST_OUTPUT] == [errno_lib.ENOSPC]
    gone = argtypes._SurvivesClosedOutput(Failing(errno_lib.EPIPE))
    assert gone.write("x") == 1 and len(argtypes._LOST_OUTPUT) == 1  # (a reader gone: silent)
    with pytest.raises(OSError) as raised:
        argtypes._SurvivesClosedOutput(Failing(errno_lib.EINVAL)).write("x")
    assert raised.value.errno == errno_lib.EINVAL
