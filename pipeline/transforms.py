"""Beam composite transforms around the pure functions of this package.

Per-element Python work is kept to one element per (byte range), per (user, range) chunk
and per user: rows are parsed a range at a time, grouped by user inside the range, and
the per-user steps run once per user after one `GroupByKey`. Counts that feed
`stats.json` are summed per bundle and emitted in `finish_bundle`, and mirrored in Beam
`Metrics` counters for runner UIs.

Memory: a worker holds one byte range (≤ 32 MiB) or one user's events (bounded by
`max_events_per_user`). Two global aggregates are gathered on one worker by design: the
vocabulary (items with ≥ `min_item_count` train events) and the list of session start
times, which the exact percentile cut-offs of the `time` split need (8 bytes per session).
"""
from __future__ import annotations

import array
import collections
import dataclasses
import json
import os
import re
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from pipeline import parse, records, schema, sessions, sources, split, vocabulary

STATS = "stats"
# stats key prefix of a split's largest events of one user (max, not summed): MAX_PREFIX + split
MAX_PREFIX = "max_user_events/"
# ... and of a split's longest session (events; max, not summed): LONGEST_PREFIX + split
LONGEST_PREFIX = "max_session_events/"
# ... and its most events in a row at one time within a session (bulk additions: an import)
SAME_TIME_RUN_PREFIX = "max_same_time_run/"
MAXIMA = (MAX_PREFIX, LONGEST_PREFIX, SAME_TIME_RUN_PREFIX)
# stats key prefixes of a split's consecutive events within sessions, and of those at one
# time (as sessionized, before the vocabulary cut): SPLIT_PAIRS_PREFIX + split
SPLIT_PAIRS_PREFIX = "session_event_pairs/"
SPLIT_SAME_TIME_PREFIX = "same_time_pairs/"
# ... and of a split's user with the most events: [events, user id] (the larger pair wins)
HEAVIEST_PREFIX = "heaviest_user/"
# stats key prefix of a split's target events that are items outside the vocabulary
UNKNOWN_PREFIX = "unknown_target_events/"
# ... of the events of sessions past a later split's cut-off (`split.LATE_EVENTS` keys)
LATE_PREFIX = "late_events/"
# stats key of the items with train events, but fewer than --min-item-count: left out of
# the vocabulary
ITEMS_BELOW_MIN_COUNT = "train_items_below_min_count"
MALFORMED = "malformed"
# (kind of reason (`parse.RowError.kind`), malformed rows of that kind in a block)
KINDS = "malformed_kinds"
# the stats name this many kinds of reason, the commonest (the rest: parse.OTHER_REASONS)
MALFORMED_KINDS = 20
# rows_filtered reason of the rows that --filter leaves out
FILTER = "filter"
NEWLINES = "newlines"
STARTS = "starts"
# A user id that is an integer or a whole number written as a float (`229`, `229.0`): one
# user made two where both forms are users (a file written from a float column, as pandas
# writes an integer column with a missing value, beside one written from an integer one).
_NUMBER_ID = re.compile(r"[+-]?\d+(?:\.0*)?")
# ... of which the run names this many pairs (and counts them all)
FLOAT_USER_EXAMPLES = 3
# Progress lines for a local launcher that reads our stderr (`pipeline.__main__`): written
# only when it sets PROGRESS_ENV, so that remote workers' logs stay clean.
PROGRESS_ENV = "HIERTCN_PIPELINE_PROGRESS"
PROGRESS_MARK = b"\x1ehiertcn-progress "
USERS_PER_REPORT = 1000


def report_progress(kind: str, n: int) -> None:
    """Tells the launcher that `n` more input bytes were read (`read`) or user records
    built (`users`): one short line (atomic on a pipe) on file descriptor 2."""
    if n and os.environ.get(PROGRESS_ENV):
        try:
            os.write(2, PROGRESS_MARK + f"{kind} {n}\n".encode())
        except OSError:
            pass


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the pipeline (DESIGN.md §4), resolved and validated by the CLI.

    Attributes:
      formats: file rank → `parse.RowFormat` of that file.
      header: each file's first line is a header.
      session_gap: seconds; a strictly greater gap starts a new session.
      session_ids: sessions are the log's own ids (`--session-col`), not time gaps.
      min_item_count: vocabulary threshold on train events.
      min_session_length: minimum events per session after collapsing repeats.
      split: `time` or `users`.
      valid_fraction, test_fraction: split sizes.
      max_events_per_user: most recent events kept per user.
      seed: seed of the `users` split hash.
    """

    formats: dict
    header: bool = True
    session_gap: int = 1800
    session_ids: bool = False
    min_item_count: int = 5
    min_session_length: int = 2
    split: str = "time"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    max_events_per_user: int = 100_000
    seed: int = 0


def _global(value):
    return GlobalWindows.windowed_value(value)


def _count(namespace: str, counts: dict) -> None:
    for name, n in counts.items():
        Metrics.counter(namespace, name.replace("/", "_")).inc(n)


class _ParseRanges(beam.DoFn):
    """Byte range → (user, (items, times_ms, orders)) chunks; malformed rows tagged aside."""

    def __init__(self, config: Config):
        self._config = config

    def process(self, r: sources.ByteRange):
        fmt = self._config.formats[r.rank]
        if fmt.format in ("parquet", "avro"):  # a Parquet row group or the Avro blocks that
            # start in the range, in batches of rows numbered from the range's first (as lines:
            # `first_line_numbers` counts a range 0's lines - 1)
            read = sources.read_parquet if fmt.format == "parquet" else sources.read_avro
            rows = reported = 0
            for offset, columns, done in read(r, fmt.read):
                block = parse.parse_columns(columns, fmt,
                                            sources.first_order(r.rank, r.index) + offset)
                yield from self._emit(r, r.index, block, offset)
                rows = offset + block.rows
                report_progress("read", done - reported)
                reported = done
            yield pvalue.TaggedOutput(NEWLINES, ((r.rank, r.index), rows - (r.index == 0)))
            report_progress("read", r.end - r.start - reported)
            return
        if sources.is_compressed(r.path):  # blocks of lines, numbered like ranges
            blocks = sources.read_compressed(r)
        else:
            blocks = [(r.index, *sources.read_range(r))]
        for index, lines, newlines in blocks:
            yield pvalue.TaggedOutput(NEWLINES, ((r.rank, index), newlines))
            block = parse.parse_block(lines, fmt, sources.first_order(r.rank, index),
                                      skip_first=self._config.header and index == 0,
                                      file_start=index == 0)
            yield from self._emit(r, index, block)
        report_progress("read", r.end - r.start)

    @staticmethod
    def _emit(r: sources.ByteRange, index: int, block: parse.ParsedBlock, offset: int = 0):
        """A parsed block's malformed rows (line `offset` + k of range `index`), counts and
        per-user chunks."""
        for local, reason, raw in block.malformed:
            yield pvalue.TaggedOutput(MALFORMED, (r.path, r.rank, index, offset + local, reason, raw))
        counts = {"rows_read": block.rows, "rows_malformed": len(block.malformed)}
        if block.filtered:
            counts[f"rows_filtered/{FILTER}"] = block.filtered
        _count("parse", counts)
        # every kind, summed over the blocks before the commonest are chosen (a block's
        # own commonest ranked counts of other blocks that had gone to "(other reasons)")
        for kind, n in block.malformed_kinds.items():
            yield pvalue.TaggedOutput(KINDS, (kind, n))
        yield pvalue.TaggedOutput(STATS, counts)
        yield from block.by_user.items()


class _Sessionize(beam.DoFn):
    """(user, chunks) → (user, [Session]); session start times tagged aside per bundle."""

    def __init__(self, config: Config):
        self._config = config

    def start_bundle(self):
        self._filtered = collections.Counter()
        self._starts = array.array("q")  # int64: 8 bytes a session
        self._overlapping = 0
        self._pairs = collections.Counter()
        self._users = self._users_with_no_session = 0

    def process(self, element):
        user, chunks = element
        self._users += 1
        cap = self._config.max_events_per_user
        events, duplicates, capped, bound = [], 0, 0, 2 * cap
        for items, times, orders, *session_ids in chunks:
            events.extend(zip(times, orders, items, *session_ids))
            # bounded state: the rows that can still be among the most recent `cap`
            # events (all copies of them, whatever file or chunk holds them next), so
            # the end keeps the events of one pass over every row, in any chunk order
            if len(events) > bound:
                events, dropped_duplicates, dropped = sessions.bound_rows(events, cap)
                duplicates += dropped_duplicates
                capped += dropped
                bound = 2 * max(cap, len(events))  # (many rows at one time: no re-sorting per chunk)
        user_sessions, filtered = sessions.sessionize(
            events, self._config.session_gap, self._config.min_session_length, cap,
            session_ids=self._config.session_ids, pairs=self._pairs)
        filtered[sessions.DUPLICATE] += duplicates
        filtered[sessions.CAPPED] += capped
        self._filtered.update(filtered)
        if user_sessions:
            self._starts.extend(s.start for s in user_sessions)
            if self._config.session_ids:
                self._overlapping += sessions.overlapping(user_sessions)
            yield user, [tuple(s) for s in user_sessions]
        else:
            self._users_with_no_session += 1

    def finish_bundle(self):
        counts = {f"rows_filtered/{k}": v for k, v in self._filtered.items() if v}
        counts[sessions.USERS_SESSIONIZED] = self._users
        if self._users_with_no_session:
            counts[sessions.USERS_WITH_NO_SESSION] = self._users_with_no_session
        if self._overlapping:
            counts[sessions.OVERLAPPING] = self._overlapping
        counts.update((k, n) for k, n in self._pairs.items() if n)
        _count("sessionize", counts)
        yield pvalue.TaggedOutput(STATS, _global(counts))
        # one int64 array per bundle: 8 bytes a session, in transit and in the combine
        yield pvalue.TaggedOutput(STARTS, _global(np.frombuffer(self._starts, np.int64).copy()))


def _splits_of(config: Config, user: str, user_sessions, cutoffs: dict) -> list[str]:
    if config.split == "users":
        one = split.user_split_of(user, config.valid_fraction, config.test_fraction, config.seed)
        return [one] * len(user_sessions)
    return [split.time_split_of(s[1][0], cutoffs) for s in user_sessions]


class _CountTrainItems(beam.DoFn):
    """(user, sessions) → (item, train count) pairs, summed per bundle."""

    def __init__(self, config: Config):
        self._config = config

    def start_bundle(self):
        self._counts = collections.Counter()

    def process(self, element, cutoffs):
        user, user_sessions = element
        for s, name in zip(user_sessions, _splits_of(self._config, user, user_sessions, cutoffs)):
            if name == schema.SPLITS[0]:
                self._counts.update(s[0])
        return ()

    def finish_bundle(self):
        for item, n in self._counts.items():
            yield _global((item, n))


class _MinCount(beam.DoFn):
    """(item, train count) → the pairs of at least `min_count` events; the items with fewer
    (unknown items from then on) are counted per bundle, as `ITEMS_BELOW_MIN_COUNT`."""

    def __init__(self, min_count: int):
        self._min_count = min_count

    def start_bundle(self):
        self._below = 0

    def process(self, pair):
        if pair[1] >= self._min_count:
            yield pair
        else:
            self._below += 1

    def finish_bundle(self):
        if self._below:
            counts = {ITEMS_BELOW_MIN_COUNT: self._below}
            _count("vocabulary", counts)
            yield pvalue.TaggedOutput(STATS, _global(counts))


class _BuildRecords(beam.DoFn):
    """(user, sessions) → serialized records tagged by split, plus per-bundle counts."""

    def __init__(self, config: Config):
        self._config = config

    def start_bundle(self):
        self._counts = collections.Counter()
        self._unreported = 0

    def process(self, element, cutoffs, index):
        user, user_sessions = element
        self._unreported += 1
        if self._unreported >= USERS_PER_REPORT:
            report_progress("users", self._unreported)
            self._unreported = 0
        user_sessions = [sessions.Session(*s) for s in user_sessions]
        names = _splits_of(self._config, user, user_sessions, cutoffs)
        for s, name in zip(user_sessions, names):
            self._counts[SPLIT_PAIRS_PREFIX + name] += len(s.items) - 1
            if s.tied:
                self._counts[SPLIT_SAME_TIME_PREFIX + name] += s.tied
                key = SAME_TIME_RUN_PREFIX + name
                self._counts[key] = max(self._counts[key], s.run)
        out = records.build_user_records(user, user_sessions, names, index,
                                         self._config.min_session_length)
        if self._config.split == "time":  # (of the events written: trained on, scored)
            for name, session_times in out.times.items():
                for times in session_times:
                    for key, n in split.late_events(times, name, cutoffs).items():
                        self._counts[LATE_PREFIX + key] += n
        if out.records:
            self._counts[schema.USERS_WRITTEN] += 1
        for name, record in out.records.items():
            yield pvalue.TaggedOutput(name, record)
            self._counts[f"splits/{name}/users"] += 1
            self._counts[f"splits/{name}/sessions"] += out.sessions[name]
            self._counts[f"splits/{name}/events"] += out.events[name]
            self._counts["rows_written"] += out.events[name]
            if out.unknown.get(name):
                self._counts[f"{UNKNOWN_PREFIX}{name}"] += out.unknown[name]
            for key, n in ((f"{MAX_PREFIX}{name}", out.events[name]),
                           (f"{LONGEST_PREFIX}{name}", out.longest[name])):
                self._counts[key] = max(self._counts[key], n)
            heaviest, pair = f"{HEAVIEST_PREFIX}{name}", (out.events[name], str(user))
            if heaviest not in self._counts or pair > tuple(self._counts[heaviest]):
                self._counts[heaviest] = pair
        for reason, n in out.filtered.items():
            self._counts[f"rows_filtered/{reason}"] += n

    def finish_bundle(self):
        report_progress("users", self._unreported)
        counts = dict(self._counts)
        _count("records", {k: n for k, n in counts.items()
                           if not k.startswith(MAXIMA + (HEAVIEST_PREFIX,))})
        yield pvalue.TaggedOutput(STATS, _global(counts))


class _ConcatStarts(beam.CombineFn):
    """Session start lists → the split cut-offs (exact percentiles need every start)."""

    def __init__(self, valid_fraction: float, test_fraction: float):
        self._fractions = (valid_fraction, test_fraction)

    # The accumulator is a list of int64 arrays (8 bytes a session, 16 while the
    # percentiles sort their copy; a list of Python ints took 40-56), joined once.
    def create_accumulator(self):
        return []

    def add_input(self, acc, starts):
        acc.append(np.asarray(starts, np.int64))
        return acc

    def merge_accumulators(self, accs):
        merged = []
        for acc in accs:
            merged.extend(acc)
        return [np.concatenate(merged)] if len(merged) > 1 else merged

    def extract_output(self, acc):
        starts = (acc[0] if len(acc) == 1 else np.concatenate(acc) if acc
                  else np.zeros([0], np.int64))
        return split.time_cutoffs(starts, *self._fractions)


def _sum_counts(dicts: Iterable[dict]) -> dict:
    """Sums the counts; a key starting with one of MAXIMA takes the largest value instead,
    and one starting with HEAVIEST_PREFIX the largest [events, user id] pair."""
    total = collections.Counter()
    for d in dicts:
        for key, n in d.items():
            if key.startswith(HEAVIEST_PREFIX):
                total[key] = (tuple(n) if key not in total else max(tuple(total[key]), tuple(n)))
            else:
                total[key] = max(total[key], n) if key.startswith(MAXIMA) else total[key] + n
    return dict(total)


class _CommonKinds(beam.CombineFn):
    """(kind, malformed rows), each kind once → `parse.most_common_kinds` of them all. An
    accumulator keeps its `keep` commonest kinds and sums the rest: a kind it folds is
    behind `keep` others in the whole count too, the kinds being distinct."""

    def __init__(self, keep: int):
        self._keep = keep

    def create_accumulator(self):
        return {}

    def add_input(self, acc, kind_count):
        kind, n = kind_count
        acc[kind] = acc.get(kind, 0) + n
        return parse.most_common_kinds(acc, self._keep) if len(acc) > 4 * self._keep else acc

    def merge_accumulators(self, accumulators):
        total = collections.Counter()
        for acc in accumulators:
            total.update(acc)
        return parse.most_common_kinds(total, self._keep)

    def extract_output(self, acc):
        return parse.most_common_kinds(acc, self._keep)


def _malformed_json(row, first_lines: dict) -> str:
    path, rank, index, local, reason, raw = row
    return json.dumps(parse.malformed_record(path, first_lines[(rank, index)] + local, reason, raw),
                      ensure_ascii=False)


class _NumberForms(beam.CombineFn):
    """The user ids of one whole number → (whether its integer form is one, the smallest
    of its float forms or None)."""

    def create_accumulator(self):
        return False, None

    def add_input(self, acc, user):
        if parse.whole_number_text(user) == user:
            return True, acc[1]
        return acc[0], user if acc[1] is None else min(acc[1], user)

    def merge_accumulators(self, accs):
        forms = [f for _, f in accs if f is not None]
        return any(h for h, _ in accs), (min(forms) if forms else None)

    def extract_output(self, acc):
        return acc


def _both_forms(number_forms):
    """[integer form, float form] of a whole number both forms of which are users."""
    number, (integer, float_form) = number_forms
    if integer and float_form is not None:
        yield [number, float_form]


class _CountAndFirst(beam.CombineFn):
    """Pairs → {"count": all of them, "examples": the FLOAT_USER_EXAMPLES smallest}."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, pair):
        return acc[0] + 1, sorted(acc[1] + [pair])[:FLOAT_USER_EXAMPLES]

    def merge_accumulators(self, accs):
        return (sum(n for n, _ in accs),
                sorted(p for _, first in accs for p in first)[:FLOAT_USER_EXAMPLES])

    def extract_output(self, acc):
        return {"count": acc[0], "examples": acc[1]}


class SessionRecords(beam.PTransform):
    """Byte ranges → user records per split, malformed rows, counts and vocabulary.

    Returns a dict of PCollections: `train`, `valid`, `test` (serialized
    SequenceExamples), `malformed` (JSON lines), `stats` (one dict of summed counts),
    `vocabulary` (one list of (item id, count) in index order), `cutoffs` (one dict),
    `float_users` (one dict: the users written both as N and as N.0, `_CountAndFirst`) and
    `malformed_kinds` (one dict: the commonest kinds of reason, `_CommonKinds`).
    """

    def __init__(self, config: Config):
        super().__init__()
        self._config = config

    def expand(self, ranges):
        c = self._config
        parsed = ranges | "Parse" >> beam.ParDo(_ParseRanges(c)).with_outputs(
            STATS, MALFORMED, NEWLINES, KINDS, main="events")
        user_sessions = (
            parsed.events
            | "GroupByUser" >> beam.GroupByKey()
            | "Sessionize" >> beam.ParDo(_Sessionize(c)).with_outputs(STATS, STARTS, main="users"))
        if c.split == "time":
            cutoffs = user_sessions[STARTS] | "Cutoffs" >> beam.CombineGlobally(
                _ConcatStarts(c.valid_fraction, c.test_fraction))
        else:
            cutoffs = ranges.pipeline | "Cutoffs" >> beam.Create([{"split": "users", "seed": c.seed}])
        cutoffs_side = beam.pvalue.AsSingleton(cutoffs)
        counted = (
            user_sessions.users
            | "CountTrainItems" >> beam.ParDo(_CountTrainItems(c), cutoffs_side)
            | "SumCounts" >> beam.CombinePerKey(sum)
            | "MinCount" >> beam.ParDo(_MinCount(c.min_item_count)).with_outputs(
                STATS, main="kept"))
        vocab = (counted.kept
                 | "Collect" >> beam.combiners.ToList()
                 | "Sort" >> beam.Map(vocabulary.build_vocabulary, c.min_item_count))
        index = vocab | "Index" >> beam.Map(vocabulary.index_of)
        built = user_sessions.users | "BuildRecords" >> beam.ParDo(
            _BuildRecords(c), cutoffs_side, beam.pvalue.AsSingleton(index)).with_outputs(
                STATS, *schema.SPLITS)
        first_lines = (parsed[NEWLINES]
                       | "CollectNewlines" >> beam.combiners.ToDict()
                       | "FirstLines" >> beam.Map(sources.first_line_numbers))
        malformed = parsed[MALFORMED] | "MalformedJson" >> beam.Map(
            _malformed_json, beam.pvalue.AsSingleton(first_lines))
        float_users = (user_sessions.users
                       | "UserIds" >> beam.Keys()
                       | "NumberUserIds" >> beam.Filter(lambda u: _NUMBER_ID.fullmatch(u))
                       | "ByNumber" >> beam.Map(lambda u: (parse.whole_number_text(u), u))
                       | "FormsOfNumber" >> beam.CombinePerKey(_NumberForms())
                       | "BothForms" >> beam.FlatMap(_both_forms)
                       | "CountFloatUsers" >> beam.CombineGlobally(_CountAndFirst()))
        stats = ((parsed[STATS], user_sessions[STATS], counted[STATS], built[STATS])
                 | "FlattenStats" >> beam.Flatten()
                 | "SumStats" >> beam.CombineGlobally(_sum_counts))
        out = {name: built[name] for name in schema.SPLITS}
        kinds = (parsed[KINDS]
                 | "SumKinds" >> beam.CombinePerKey(sum)
                 | "CommonKinds" >> beam.CombineGlobally(_CommonKinds(MALFORMED_KINDS)))
        out.update(malformed=malformed, stats=stats, vocabulary=vocab, cutoffs=cutoffs,
                   float_users=float_users, malformed_kinds=kinds)
        return out
