"""The data contract: vocabulary file and SequenceExample round trips."""
import numpy as np
import pytest

from pipeline import schema


def test_vocabulary_round_trip_reserves_pad_and_unknown(tmp_path):
    path = tmp_path / schema.ITEMS_FILE
    schema.write_vocabulary(str(path), [("b", 7), ("a\tb", 3)])
    vocab = schema.read_vocabulary(str(tmp_path))
    assert vocab.ids == (schema.PAD_TOKEN, schema.UNKNOWN_TOKEN, "b", "a\tb")
    assert vocab.counts.tolist() == [0, 0, 7, 3]
    assert vocab.size == 4 and vocab.num_items == 2
    assert vocab.index_of() == {"b": 2, "a\tb": 3}


def test_read_vocabulary_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(schema.DataError, match="not found"):
        schema.read_vocabulary(str(tmp_path))
    (tmp_path / schema.ITEMS_FILE).write_text("id\titem\n0\tx\n")
    with pytest.raises(schema.DataError, match="header"):
        schema.read_vocabulary(str(tmp_path))
    # damaged files are DataError (one line in every command), never ValueError
    head = "index\titem_id\tcount\n0\t[PAD]\t0\n"
    _each_is_a_data_error(schema.read_vocabulary, tmp_path / schema.ITEMS_FILE, [
        (head + "1\t[UNK]\tx\n", "line 3 must be '1<TAB>item<TAB>count'"),
        (head + "z\t[UNK]\t0\n", "line 3 must be"),
        (b"\xff\xfe\x00", "not a UTF-8 tab-separated file")])


def test_read_stats_rejects_damaged_files(tmp_path):
    _each_is_a_data_error(schema.read_stats, tmp_path / schema.STATS_FILE, [
        ("{cut", "is not valid JSON"), ("[1]", "must hold a JSON object"),
        (b"\xff", "is not valid JSON")])


def test_a_file_that_cannot_be_read_is_a_data_error_local_or_remote(tmp_path):
    """A data file that cannot be read (here a folder of its name) is a one-line DataError
    naming it: locally at the open, and through TensorFlow's file systems (`file://`, as
    gs:// goes), where a file opens lazily and the error came at the read as a TensorFlow
    traceback. A missing one is "not found"."""
    (tmp_path / schema.STATS_FILE).mkdir()
    (tmp_path / schema.ITEMS_FILE).mkdir()
    for folder in (str(tmp_path), f"file://{tmp_path}"):
        for read, name in ((schema.read_stats, schema.STATS_FILE),
                           (schema.read_vocabulary, schema.ITEMS_FILE)):
            with pytest.raises(schema.DataError, match=f"^cannot read {folder}/{name}: "
                                                       "(Is a directory|it is a folder)$"):
                read(folder)
    with pytest.raises(schema.DataError, match="not found: is this a folder written by"):
        schema.read_stats(str(tmp_path / "missing"))


def _each_is_a_data_error(read, path, cases):
    for content, match in cases:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        with pytest.raises(schema.DataError, match=match):
            read(str(path.parent))


def test_sequence_example_round_trip_through_the_tf_data_parser(tmp_path):
    import tensorflow as tf

    (tmp_path / "valid").mkdir()
    path = tmp_path / "valid" / ("part-00000" + schema.SHARD_SUFFIX)
    with tf.io.TFRecordWriter(str(path), options=schema.COMPRESSION) as w:
        w.write(schema.make_sequence_example("u1", 1, [[2, 3, 4], [5, 1]], [[10, 20, 30], [99, 100]]))
        w.write(schema.make_sequence_example("ü2", 0, [[6, 7]], [[5, 6]]))
    users = list(schema.iter_users(str(tmp_path), "valid"))
    assert [u.user_id for u in users] == ["u1", "ü2"]
    assert users[0].num_context_sessions == 1
    assert [s.tolist() for s in users[0].sessions] == [[2, 3, 4], [5, 1]]
    assert [t.tolist() for t in users[0].times] == [[10, 20, 30], [99, 100]]
    assert users[1].sessions[0].dtype == np.int64



@pytest.mark.parametrize("python_varints", [0, 10 ** 9])
def test_records_encode_every_int64_as_tensorflow_does_in_python_and_in_numpy(
        monkeypatch, python_varints):
    """`encode_int64_features` encodes small inputs in Python (a light user's record) and
    large ones with numpy: each path, on short and long sessions (a body past the
    one-byte length prefixes), the int64 extremes and negative times, parses to the
    message TensorFlow's own protobuf classes build."""
    import tensorflow as tf

    monkeypatch.setattr(schema, "PYTHON_VARINTS", python_varints)
    rng = np.random.default_rng(0)
    sessions = [[2, 3, 127, 128, 16383, 16384, 2 ** 31], list(rng.integers(2, 10 ** 7, 300)),
                [5]]
    times = [[-1, 0, 2 ** 63 - 1, -2 ** 63, 1_600_000_000_000, -62_135_596_800, 7],
             list(1_600_000_000 + np.cumsum(rng.integers(0, 10 ** 6, 300))), [2 ** 40]]
    got = tf.train.SequenceExample.FromString(
        schema.make_sequence_example("u\u00e9", 2, sessions, times))
    want = tf.train.SequenceExample()
    want.context.feature[schema.USER_ID].bytes_list.value.append("u\u00e9".encode())
    want.context.feature[schema.NUM_CONTEXT_SESSIONS].int64_list.value.append(2)
    for key, lists in ((schema.ITEMS, sessions), (schema.TIMES, times)):
        for values in lists:
            want.feature_lists.feature_list[key].feature.add().int64_list.value.extend(
                int(v) for v in values)
    assert got == want


def test_shard_files_names_the_problem(tmp_path):
    with pytest.raises(schema.DataError, match="unknown split 'dev'"):
        schema.shard_files(str(tmp_path), "dev")
    with pytest.raises(schema.DataError, match=r"no train shards \(\*\.tfrecord\.gz\) in"):
        schema.shard_files(str(tmp_path), "train")


def test_shard_files_of_a_folder_whose_name_is_a_glob_pattern(tmp_path):
    """A data folder named `d[1]` beside a `d1` read d1's shards (with d[1]'s items.tsv:
    other metrics, exit 0); a folder's name is not a pattern."""
    for folder, shards in (("d[1]", 2), ("d1", 3)):
        (tmp_path / folder / "train").mkdir(parents=True)
        for k in range(shards):
            (tmp_path / folder / "train" /
             f"part-{k:05d}-of-{shards:05d}{schema.SHARD_SUFFIX}").write_bytes(b"")
    files = schema.shard_files(str(tmp_path / "d[1]"), "train")
    assert files == [str(tmp_path / "d[1]" / "train" / f"part-{k:05d}-of-00002"
                         f"{schema.SHARD_SUFFIX}") for k in range(2)]


def test_users_parsed_in_reads_keep_every_user_and_session(tmp_path, monkeypatch):
    """Users are parsed several at a time and split back by their row splits: across read
    boundaries, with users of one or many sessions and sessions of any length, every user
    comes back whole, in file order, and the arrays cannot be written through."""
    import tensorflow as tf

    monkeypatch.setattr(schema, "USERS_PER_READ", 4)
    rng = np.random.default_rng(0)
    written = []
    (tmp_path / "train").mkdir()
    for shard in range(2):
        path = tmp_path / "train" / (f"part-0000{shard}" + schema.SHARD_SUFFIX)
        with tf.io.TFRecordWriter(str(path), options=schema.COMPRESSION) as w:
            for n in range(7):
                sessions = [rng.integers(2, 50, int(rng.integers(1, 30))).tolist()
                            for _ in range(int(rng.integers(1, 5)))]
                times = [list(range(len(s))) for s in sessions]
                written.append((f"u{shard}-{n}", n % 3, sessions, times))
                w.write(schema.make_sequence_example(*written[-1]))
    read = schema.user_reader(str(tmp_path), "train")
    for _ in range(2):  # the reader can be called again: the same stream
        users = list(read())
        assert [(u.user_id, u.num_context_sessions, [s.tolist() for s in u.sessions],
                 [t.tolist() for t in u.times]) for u in users] == written
    with pytest.raises(ValueError, match="read-only"):
        users[0].sessions[0][0] = 5
