"""The data contract shared by pipeline/, model/ and serving/ (DESIGN.md §4).

One record per user per split, a `tf.train.SequenceExample`:

* context `user_id` (bytes) and `num_context_sessions` (int64): the number of leading
  sessions that are history only (0 in train; in valid/test the user's earlier sessions).
* feature list `items`: one Int64List per session (vocabulary indices).
* feature list `times`: one Int64List per session (unix seconds per event).

Shards are gzipped TFRecord files under `<data>/<split>/`. `items.tsv` maps indices to raw
item ids: index 0 is padding, 1 the unknown item, real items start at 2 in descending
train count. Everything here is the single source of these names; the Beam writer, the
tf.data parser and the serving signatures all derive from it.

TensorFlow is imported lazily so the Beam workers and pure-Python helpers stay light.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline import argtypes

USER_ID = "user_id"
NUM_CONTEXT_SESSIONS = "num_context_sessions"
ITEMS = "items"
TIMES = "times"

PAD_INDEX = 0
UNKNOWN_INDEX = 1
NUM_RESERVED = 2
PAD_TOKEN = "[PAD]"
UNKNOWN_TOKEN = "[UNK]"
# Serving pads string inputs with the empty string.
SERVING_PAD_ID = ""

SPLITS = ("train", "valid", "test")
ITEMS_FILE = "items.tsv"
STATS_FILE = "stats.json"
# stats.json: the users with a record in any split (each once; a backfill's total)
USERS_WRITTEN = "users_written"
MALFORMED_DIR = "malformed"
SHARD_SUFFIX = ".tfrecord.gz"
COMPRESSION = "GZIP"
ITEMS_HEADER = ("index", "item_id", "count")

# Notes to the user, the same in the pipeline, training and evaluation:
# - one user holds more than this share of a split's events, or of the evaluated target
#   events (among at least this many users: a split may hold the crawler alone): a crawler
#   that would decide the metrics, or that training would learn mostly from;
HEAVY_USER_SHARE = 0.25
HEAVY_USER_MIN_USERS = 20
# - more than this share of the valid or test target events are unknown items (misses).
UNKNOWN_NOTE_SHARE = 0.25


class DataError(ValueError):
    """A data folder or file that does not follow this contract."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Item vocabulary read from `items.tsv`.

    Attributes:
      ids: raw item ids by index; ids[0] = PAD_TOKEN, ids[1] = UNKNOWN_TOKEN.
      counts: int64 [size] train event counts by index (0 for the reserved rows).
    """

    ids: tuple[str, ...]
    counts: np.ndarray

    @property
    def size(self) -> int:
        """Number of indices including the two reserved ones (the model's output width)."""
        return len(self.ids)

    @property
    def num_items(self) -> int:
        """Number of real items (without the reserved indices)."""
        return len(self.ids) - NUM_RESERVED

    def index_of(self) -> dict[str, int]:
        """Raw id → index for real items."""
        return {item: i for i, item in enumerate(self.ids) if i >= NUM_RESERVED}


def is_remote(path: str) -> bool:
    """A `scheme://` path (gs://, s3://, ram://...), read through TensorFlow's file systems."""
    return "://" in path


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _remote(call, path: str):
    """`call(path)` through TensorFlow's file systems, its errors as one-line DataErrors."""
    import tensorflow as tf

    try:
        return call(path)
    except tf.errors.UnimplementedError:
        raise DataError(f"{path}: TensorFlow has no file system for this scheme (gs:// is "
                        "built in; s3:// and hdfs:// need `pip install tensorflow-io`)") from None
    except tf.errors.OpError as e:
        raise DataError(f"cannot read {path}: {argtypes.first_line(e)}") from None


def is_folder(path: str) -> bool:
    """A local folder, or a remote one TensorFlow can list (`is_remote`)."""
    if not is_remote(path):
        return os.path.isdir(path)
    # (`isdir` answers False for a scheme TensorFlow lacks; `exists` says why)
    return _remote(lambda p: _gfile().exists(p) and _gfile().isdir(p), path)


def open_text(path: str, mode: str = "r"):
    """A text file, local or remote (newlines untranslated, UTF-8)."""
    if is_remote(path):
        return _gfile().GFile(path, mode)
    return open(path, mode, encoding="utf-8", newline="")


def _looked_up(path: str, remote_call, local_call):
    """`remote_call(path)` on a remote path (TensorFlow's errors as one-line DataErrors),
    else `local_call(path)`; None where the path is not there. A path this user may not
    look at is a DataError, not a missing one."""
    if is_remote(path):
        import tensorflow as tf

        def call(p):
            try:
                return remote_call(p)
            except tf.errors.NotFoundError:
                return None

        return _remote(call, path)
    try:
        return local_call(path)
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except OSError:
        return None


def _check_present(path: str) -> None:
    """A DataError when a data folder's file is not there, is a folder (said here where
    remote: a remote file opens lazily), or when this user may not look (a folder above it
    it may not open: said as such, not as a missing file)."""
    stat = _looked_up(path, lambda p: _gfile().stat(p), os.stat)
    if stat is None:
        raise DataError(f"{path} not found: is this a folder written by `python -m pipeline`?")
    if is_remote(path) and stat.is_directory:
        raise DataError(f"cannot read {path}: it is a folder")


def _through_file_system(call, path: str):
    """`call(path)`; on a remote path TensorFlow's errors as one-line DataErrors (a remote
    file opens lazily: its errors come at the first read)."""
    return _remote(call, path) if is_remote(path) else call(path)


def open_to_read(path: str):
    """`open_text(path)` of a data folder's file, a local file that cannot be opened (no
    permission to read it, a folder of that name) raised as a one-line DataError."""
    try:
        return open_text(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def vocabulary_text(items: Sequence[tuple[str, int]]) -> str:
    """`items.tsv`'s text from (item_id, count) pairs already in index order from 2."""
    out = io.StringIO()
    w = csv.writer(out, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(ITEMS_HEADER)
    w.writerow((PAD_INDEX, PAD_TOKEN, 0))
    w.writerow((UNKNOWN_INDEX, UNKNOWN_TOKEN, 0))
    for i, (item, count) in enumerate(items, start=NUM_RESERVED):
        w.writerow((i, item, int(count)))
    return out.getvalue()


def write_vocabulary(path: str, items: Sequence[tuple[str, int]]) -> None:
    """Writes `items.tsv` from (item_id, count) pairs already in index order from 2."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(vocabulary_text(items))


def read_vocabulary(data_dir_or_file: str) -> Vocabulary:
    """Reads `items.tsv` (a data folder or the file itself).

    Raises:
      DataError: the file is missing or does not follow the contract.
    """
    path = data_dir_or_file
    if is_folder(path):
        path = os.path.join(path, ITEMS_FILE)
    _check_present(path)
    return _through_file_system(_parse_vocabulary, path)


def _parse_vocabulary(path: str) -> Vocabulary:
    """`read_vocabulary`'s reading and checks of the file at `path`."""
    ids, counts = [], []
    with open_to_read(path) as f:
        try:
            rows = csv.reader(f, delimiter="\t")
            header = next(rows, None)
            if tuple(header or ()) != ITEMS_HEADER:
                raise DataError(f"{path}: header must be {ITEMS_HEADER!r} (tab-separated), "
                                f"got {header!r}")
            for n, row in enumerate(rows):
                if len(row) != 3 or not _is_int(row[0]) or int(row[0]) != n or not _is_int(row[2]):
                    raise DataError(f"{path}: line {n + 2} must be '{n}<TAB>item<TAB>count', "
                                    f"got {row!r}")
                ids.append(row[1])
                counts.append(int(row[2]))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path} is not a UTF-8 tab-separated file ({e})") from None
    if len(ids) < NUM_RESERVED or ids[PAD_INDEX] != PAD_TOKEN or ids[UNKNOWN_INDEX] != UNKNOWN_TOKEN:
        raise DataError(f"{path}: rows 0 and 1 must be {PAD_TOKEN} and {UNKNOWN_TOKEN}")
    return Vocabulary(ids=tuple(ids), counts=np.asarray(counts, dtype=np.int64))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def older_pipeline_note(data_dir: str, stats: dict) -> str | None:
    """A note where a data folder's stats.json has no `pipeline_version` (written by a
    pipeline before 2026-12-05, or by another tool): its records may differ from what this
    version's pipeline writes from the same log; None otherwise."""
    if "pipeline_version" in stats:
        return None
    return (f"note: {data_dir} was written by an older pipeline (before 2026-12-05) or "
            "another tool (its stats.json has no pipeline_version): its records may differ "
            "from this version's (until 2026-12-03, immediate repeats left by dropping unknown "
            "items were kept); `python -m pipeline ... --overwrite` writes them again")


def read_stats(data_dir: str) -> dict:
    """Reads `stats.json` of a data folder.

    Raises:
      DataError: the file is missing or is not a JSON object.
    """
    path = os.path.join(data_dir, STATS_FILE)
    _check_present(path)
    with open_to_read(path) as f:
        try:
            stats = json.loads(_through_file_system(lambda _: f.read(), path))
        except DataError:  # (cannot be read: said as such)
            raise
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
            raise DataError(f"{path} is not valid JSON ({e}): write the folder again with "
                            "`python -m pipeline`") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(stats).__name__}")
    return stats


def shard_files(data_dir: str, split: str) -> list[str]:
    """Sorted TFRecord shards of one split.

    Raises:
      DataError: unknown split or no shard found.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    folder = os.path.join(data_dir, split)
    if is_remote(folder):
        files = _remote(_gfile().glob, os.path.join(folder, "*" + SHARD_SUFFIX))
    else:  # (the folder's name escaped: `d[1]` read the shards of a sibling `d1`)
        files = glob.glob(os.path.join(glob.escape(folder), "*" + SHARD_SUFFIX))
    files.sort()
    if not files:  # (a glob finds nothing where it may not look: said as such)
        _looked_up(folder, lambda p: _gfile().listdir(p), os.listdir)
        raise DataError(f"no {split} shards (*{SHARD_SUFFIX}) in {folder}: is this a folder "
                        "written by `python -m pipeline`?")
    _check_shard_set(files, folder)
    return files


_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)" + re.escape(SHARD_SUFFIX) + "$")


def _check_shard_set(files: list[str], folder: str) -> None:
    """Beam names shards `part-SSSSS-of-NNNNN`: a folder whose names count N shards but
    holds fewer (a copy stopped part-way, a file deleted) is refused instead of read as a
    smaller split. Names of another form are not checked."""
    names = [_SHARD_NAME.search(f) for f in files]
    if not all(names):
        return
    totals = {int(m.group(2)) for m in names}
    if len(totals) > 1:
        raise DataError(f"{folder} mixes the shards of {len(totals)} writes (of "
                        f"{' and '.join(map(str, sorted(totals)))} shards): copy the folder "
                        "again or run the pipeline again")
    (total,) = totals
    missing = sorted(set(range(total)) - {int(m.group(1)) for m in names})
    if missing:
        what = (f"shard {missing[0]:05d}-of-{total:05d}" if len(missing) == 1 else
                f"{len(missing)} of its {total} shards")
        raise DataError(f"{folder} lacks {what}: an incomplete copy of the folder? copy it "
                        "again or run the pipeline again")


def split_users(data_dir: str, split: str) -> int | None:
    """The users `stats.json` counts in `split` (None where it does not say)."""
    try:
        count = read_stats(data_dir).get("splits", {}).get(split, {}).get("users")
    except (DataError, AttributeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of an int64 (negative values as 10-byte two's complement)."""
    if 0 <= value < 0x80:
        return bytes((value,))
    return _varints((value,))


def proto_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): its key, length and `payload` (also
    a packed repeated field's wire form, `serving.protos`' replies)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_VARINT_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)

# `encode_int64_features` encodes up to this many values in Python, more with numpy: the
# numpy path's fixed cost, ~40 us a call and two calls a user, was 5% of a one-worker run
# over 21k light users (1 to 3 sessions each); Python's cost per value passes it near 300.
PYTHON_VARINTS = 256


def _varints(values: Sequence[int]) -> bytes:
    """The concatenated varints of `values` (`_varint` of each)."""
    out = bytearray()
    for value in values:
        value = int(value) & 0xFFFFFFFFFFFFFFFF
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _packed_varints(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Varints of many int64 values at once.

    Returns:
      (the concatenated encodings, int64 [n + 1] byte offset of each value and the end).
    """
    v = values.astype(np.int64).view(np.uint64)
    groups = (v[:, None] >> _VARINT_SHIFTS[None, :]) & np.uint64(0x7F)
    sizes = 1 + ((v[:, None] >> _VARINT_SHIFTS[None, 1:]) != 0).sum(axis=1)
    position = np.arange(len(_VARINT_SHIFTS))[None, :]
    groups |= np.where(position < sizes[:, None] - 1, np.uint64(0x80), np.uint64(0))
    offsets = np.zeros(len(v) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return groups[position < sizes[:, None]].astype(np.uint8).tobytes(), offsets


def encode_int64_features(lists: Sequence[Sequence[int]]) -> list[bytes]:
    """Each inner list as one serialized `FeatureList.feature` entry (packed int64_list).

    A writer that puts the same session into several records (the context of valid and
    test records) encodes it once and passes the pieces to `assemble_sequence_example`.
    """
    lengths = [len(x) for x in lists]
    if sum(lengths) <= PYTHON_VARINTS:
        bodies = [_varints(x) for x in lists]
    else:
        flat = np.fromiter((int(v) for x in lists for v in x), dtype=np.int64,
                           count=sum(lengths))
        packed, offsets = _packed_varints(flat)
        ends = np.cumsum([0] + lengths)
        bodies = [packed[offsets[a]:offsets[b]] for a, b in zip(ends[:-1], ends[1:])]
    out = []
    for body in bodies:
        if 0 < len(body) < 124:  # all three length prefixes fit in one byte
            size = len(body)
            out.append(bytes((10, size + 4, 26, size + 2, 10, size)) + body)
        else:
            out.append(proto_field(1, proto_field(3, proto_field(1, body) if body else b"")))
    return out


def assemble_sequence_example(user_id: str, num_context_sessions: int,
                              item_features: Sequence[bytes],
                              time_features: Sequence[bytes]) -> bytes:
    """A serialized `tf.train.SequenceExample` from `encode_int64_features` pieces."""
    # Field numbers from tensorflow/core/example/{example,feature}.proto: SequenceExample
    # context=1 feature_lists=2; Features.feature=1 and FeatureLists.feature_list=1 are
    # maps (entries: key=1, value=2); Feature.bytes_list=1, int64_list=3; BytesList and
    # Int64List value=1; FeatureList.feature=1.
    user_feature = proto_field(1, proto_field(1, user_id.encode("utf-8")))
    context = (
        proto_field(1, proto_field(1, USER_ID.encode()) + proto_field(2, user_feature))
        + proto_field(1, proto_field(1, NUM_CONTEXT_SESSIONS.encode())
                 + proto_field(2, proto_field(3, proto_field(1, _varint(int(num_context_sessions)))))))
    feature_lists = (
        proto_field(1, proto_field(1, ITEMS.encode()) + proto_field(2, b"".join(item_features)))
        + proto_field(1, proto_field(1, TIMES.encode()) + proto_field(2, b"".join(time_features))))
    return proto_field(1, context) + proto_field(2, feature_lists)


def make_sequence_example(user_id: str, num_context_sessions: int,
                          sessions: Sequence[Sequence[int]],
                          times: Sequence[Sequence[int]]) -> bytes:
    """Serializes one user's record (the Beam writer assembles the same bytes from
    `encode_int64_features` pieces with `assemble_sequence_example`).

    The protobuf wire format of `tf.train.SequenceExample` is written directly, so Beam
    workers never import TensorFlow (seconds per process); `tf.io` and `example_pb2`
    parse the bytes like any other SequenceExample.

    Args:
      user_id: raw user id.
      num_context_sessions: leading sessions that are history only.
      sessions: item indices per session.
      times: unix seconds per event, same shape as `sessions`.

    Returns:
      The serialized `tf.train.SequenceExample`.
    """
    return assemble_sequence_example(user_id, num_context_sessions,
                                     encode_int64_features(sessions), encode_int64_features(times))


def _record_features():
    """The context and sequence features of a record, for `tf.io`'s parsers."""
    import tensorflow as tf

    return ({USER_ID: tf.io.FixedLenFeature([], tf.string),
             NUM_CONTEXT_SESSIONS: tf.io.FixedLenFeature([], tf.int64)},
            {ITEMS: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64),
             TIMES: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)})


def parse_sequence_example(serialized):
    """tf.data parser for one serialized record.

    Args:
      serialized: string scalar tensor.

    Returns:
      dict with `user_id` string [], `num_context_sessions` int64 [],
      `items` and `times` int64 RaggedTensor [sessions, (events)].
    """
    import tensorflow as tf

    context_features, sequence_features = _record_features()
    context, sequence = tf.io.parse_single_sequence_example(
        serialized, context_features=context_features, sequence_features=sequence_features)
    return {USER_ID: context[USER_ID], NUM_CONTEXT_SESSIONS: context[NUM_CONTEXT_SESSIONS],
            ITEMS: sequence[ITEMS], TIMES: sequence[TIMES]}


def parse_sequence_examples(serialized):
    """tf.data parser for a batch of serialized records, in one op (a quarter of the CPU
    time of `parse_sequence_example` per record, then `batch`, for the same result).

    Args:
      serialized: string tensor [users].

    Returns:
      dict with `user_id` string [users], `num_context_sessions` int64 [users],
      `items` and `times` int64 RaggedTensor [users, (sessions), (events)].
    """
    import tensorflow as tf

    context_features, sequence_features = _record_features()
    context, sequence, _ = tf.io.parse_sequence_example(
        serialized, context_features=context_features, sequence_features=sequence_features)
    return {USER_ID: context[USER_ID], NUM_CONTEXT_SESSIONS: context[NUM_CONTEXT_SESSIONS],
            ITEMS: sequence[ITEMS], TIMES: sequence[TIMES]}


def make_dataset(data_dir: str, split: str):
    """`tf.data.Dataset` of parsed user records of one split, in shard then file order."""
    import tensorflow as tf

    files = shard_files(data_dir, split)
    ds = tf.data.TFRecordDataset(files, compression_type=COMPRESSION)
    return ds.map(parse_sequence_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass
class UserRecord:
    """One user's record as numpy (what the batchers and the evaluator consume).

    Attributes:
      user_id: raw user id.
      num_context_sessions: leading sessions that are history only.
      sessions: item indices per session, each int64 [events].
      times: unix seconds per session, each int64 [events].
    """

    user_id: str
    num_context_sessions: int
    sessions: list[np.ndarray]
    times: list[np.ndarray]


# Users parsed per tf.data batch by `user_reader`: converting one parsed element to numpy
# costs ~0.5 ms of Python whatever its size, so it is paid once per this many users.
USERS_PER_READ = 256


def _flatten_batch(rec):
    """A batch of parsed records -> dense tensors only (cheap to hand to numpy): the flat
    values of `items`/`times` and their user -> session and session -> event row splits."""
    out = {USER_ID: rec[USER_ID], NUM_CONTEXT_SESSIONS: rec[NUM_CONTEXT_SESSIONS]}
    for key in (ITEMS, TIMES):
        out[key + "/values"] = rec[key].flat_values
        out[key + "/users"] = rec[key].row_splits
        out[key + "/sessions"] = rec[key].values.row_splits
    return out


def _split_user(rec: dict, key: str, user: int) -> list[np.ndarray]:
    """User `user`'s sessions of `key` from a flattened batch (views of its values)."""
    first, last = rec[key + "/users"][user:user + 2]
    bounds = rec[key + "/sessions"][first:last + 1].tolist()
    values = rec[key + "/values"]
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def user_reader(data_dir: str, split: str) -> Callable[[], Iterator[UserRecord]]:
    """A function that streams the user records of a split, in file order, each time it
    is called (the tf.data pipeline is built once, here).

    Memory is bounded: the records are parsed `USERS_PER_READ` users at a time (one op
    per read, `parse_sequence_examples`); the session arrays are read-only views of one
    buffer per read.

    Raises:
      DataError: the folder has no files for the split.
    """
    import tensorflow as tf

    ds = (tf.data.TFRecordDataset(shard_files(data_dir, split), compression_type=COMPRESSION)
          .batch(USERS_PER_READ)
          .map(lambda serialized: _flatten_batch(parse_sequence_examples(serialized)),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .prefetch(2))

    expected = split_users(data_dir, split)

    def users() -> Iterator[UserRecord]:
        read = 0
        for rec in _read_or_explain(ds.as_numpy_iterator(), data_dir, split):
            for key in (ITEMS, TIMES):
                rec[key + "/values"].setflags(write=False)
            contexts = rec[NUM_CONTEXT_SESSIONS].tolist()
            for u, user_id in enumerate(rec[USER_ID]):
                read += 1
                yield UserRecord(user_id=user_id.decode("utf-8"),
                                 num_context_sessions=contexts[u],
                                 sessions=_split_user(rec, ITEMS, u),
                                 times=_split_user(rec, TIMES, u))
        # a whole pass: the records must be the ones stats.json counts (an emptied shard
        # reads as a smaller split without an error of its own)
        if expected is not None and read != expected:
            raise DataError(f"the {split} split of {data_dir} holds {read:,} users where its "
                            f"{STATS_FILE} counts {expected:,}: an incomplete or altered copy "
                            "of the folder (a shard emptied or replaced)? copy it again or run "
                            "the pipeline again")

    return users


def _read_or_explain(batches, data_dir: str, split: str):
    """`batches`, with a damaged file (truncated, corrupt, not a record of ours) raised as a
    one-line DataError."""
    import tensorflow as tf

    try:
        yield from batches
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError,
            tf.errors.PermissionDeniedError, tf.errors.NotFoundError) as e:
        import re

        message = re.sub(r"\{\{function_node[^}]*\}\}\s*|\s*\[Op:.*$", "",
                         e.message.splitlines()[0])
        # (TensorFlow's own text has a stray quote: "truncated record at 14984' failed with
        # EOF reached")
        message = re.sub(r"^(truncated record at \d+)' failed with ", r"\1: ", message)
        if isinstance(e, tf.errors.PermissionDeniedError):
            advice = "this user may not read it"
        elif isinstance(e, tf.errors.NotFoundError):
            advice = ("a file removed while it was read: restore the folder or run the "
                      "pipeline again")
        else:
            advice = "a damaged or truncated file: run the pipeline again"
        raise DataError(f"cannot read the {split} split of {data_dir}: {message} "
                        f"({advice})") from None


def iter_users(data_dir: str, split: str) -> Iterator[UserRecord]:
    """Streams the user records of a split (`user_reader`)."""
    return user_reader(data_dir, split)()
