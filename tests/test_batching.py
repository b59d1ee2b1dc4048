"""The queue-based mini-batch generator on hand-made users (pure Python) and its tf.data wrapper."""
import gc
import json
import os
import sys
import threading
import time

import numpy as np
import pytest

from model import batching

# user A: sessions [2 3 4 5] and [6 7]; user B: [8 9 10]; user C: [2 2 3], [4 5 6 7 8], [9 10]
USERS = [[[2, 3, 4, 5], [6, 7]], [[8, 9, 10]], [[2, 2, 3], [4, 5, 6, 7, 8], [9, 10]]]


def _batcher(**kw):
    args = dict(shuffle_buffer=1, epochs=1)
    args.update(kw)
    return batching.QueueBatcher(lambda: iter(USERS), 2, 2, 3, **args)


def test_user_slots_split_long_sessions_into_chunks():
    slots = batching.user_slots([[2, 3, 4, 5], [], np.array([6, 7], np.int32)], 3)
    assert [(s.items.tolist(), s.reset, s.session_end) for s in slots] == [
        ([2, 3, 4], True, False), ([5], False, True), ([6, 7], False, True)]
    assert all(s.items.dtype == np.int64 for s in slots)
    # a session of exactly two and of three chunks: the last full chunk ends it
    slots = batching.user_slots([[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], 3)
    assert [(s.items.tolist(), s.session_end) for s in slots] == [
        ([2, 3, 4], False), ([5, 6, 7], True), ([8, 9, 10], False), ([11, 12, 13], False),
        ([14], True)]


def test_batches_on_hand_made_log():
    # B=2 rows, S=2 slots, L=3. A's 3 slots -> row 0 (both empty, lowest wins); B's slot -> row 1
    # (row 1 has 0 < 3); C's 4 slots -> row 1 (1 < 3). Row 0: A1a A1b A2; row 1: B1 C1 C2a C2b C3.
    batches = list(_batcher())
    assert len(batches) == 3
    items = [b["items"].tolist() for b in batches]
    assert items[0] == [[[2, 3, 4], [5, 0, 0]], [[8, 9, 10], [2, 2, 3]]]
    assert items[1] == [[[6, 7, 0], [0, 0, 0]], [[4, 5, 6], [7, 8, 0]]]
    assert items[2] == [[[0, 0, 0], [0, 0, 0]], [[9, 10, 0], [0, 0, 0]]]
    assert batches[0]["reset"].tolist() == [[True, False], [True, True]]
    assert batches[0]["session_end"].tolist() == [[False, True], [True, True]]
    assert batches[1]["reset"].tolist() == [[False, False], [False, False]]
    assert batches[1]["session_end"].tolist() == [[True, False], [False, True]]
    assert batches[1]["valid"].tolist() == [[True, False], [True, True]]
    assert batches[2]["session_end"].tolist() == [[False, False], [True, False]]
    assert batches[2]["valid"].tolist() == [[False, False], [True, False]]
    assert [int(b["batch_index"]) for b in batches] == [0, 1, 2]


def test_two_epochs_continue_the_stream():
    batches = list(_batcher(epochs=2))
    flat = [tuple(x) for b in batches for row in b["items"] for x in row if x.any()]
    assert len(flat) == 2 * 8  # every slot of both epochs, none lost


def test_shuffle_is_deterministic_per_seed():
    users = [[[i + 2, i + 3]] for i in range(50)]
    def firsts(seed):
        b = batching.QueueBatcher(lambda: iter(users), 4, 1, 2, seed=seed, shuffle_buffer=8, epochs=1)
        return [int(x["items"][0, 0, 0]) for x in b]
    assert firsts(1) == firsts(1)
    assert firsts(1) != firsts(2)
    out = batching.shuffled(range(20), 5, np.random.default_rng(0))
    assert sorted(out) == list(range(20))


def test_restored_position_gives_the_same_next_batch():
    users = [[[i + 2, i + 3, i + 4], [i + 5] * 1 + [i + 6]] for i in range(30)]
    make = lambda: batching.QueueBatcher(lambda: iter(users), 3, 2, 2, seed=7, shuffle_buffer=5,
                                         epochs=3)
    full = list(make())
    first = make()
    for _ in range(5):
        first.next_batch()
    pos = json.loads(json.dumps(first.position_after(4)))  # JSON round trip, as in checkpoints
    resumed = make()
    resumed.restore(pos)
    rest = list(resumed)
    assert len(rest) == len(full) - 5
    for a, b in zip(rest, full[5:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_resume_with_another_seed_or_buffer_keeps_the_epoch_under_way():
    """The users an epoch consumed are skipped by replaying its stream: with the seed or
    shuffle buffer of a resumed command, it would skip some users and repeat others. The
    epoch under way keeps its own; the next one takes the command's."""
    users = [[[i + 2, i + 3, i + 4]] for i in range(40)]

    def make(seed, buffer):
        return batching.QueueBatcher(lambda: iter(users), 2, 2, 3, seed=seed,
                                     shuffle_buffer=buffer, epochs=2)

    def firsts(batches):
        return [int(x) for b in batches for x in b["items"][:, :, 0].ravel() if x]

    straight = make(7, 5)
    head = [straight.next_batch() for _ in range(3)]
    pos = json.loads(json.dumps(straight.position_after(2)))
    assert (pos["epoch_seed"], pos["epoch_shuffle_buffer"]) == (7, 5)
    resumed = make(8, 10)
    resumed.restore(pos)
    rest = list(resumed)
    first_epoch = firsts(head + rest)[:40]
    assert sorted(first_epoch) == [i + 2 for i in range(40)]  # each user once
    second = make(8, 10)
    second.epoch, second.consumed = 1, 0  # epoch 1 of a run started with the new options
    assert firsts(head + rest)[40:] == firsts(list(second))
    # a position from before these keys: the batcher's own options
    del pos["epoch_seed"], pos["epoch_shuffle_buffer"]
    old = make(7, 5)
    old.restore(pos)
    assert firsts(head + list(old)) == firsts(list(make(7, 5)))


def test_a_finished_run_resumed_with_more_epochs_or_in_steps_goes_on():
    done = _batcher(epochs=1)
    assert len(list(done)) == 3
    pos = json.loads(json.dumps(done.position()))
    assert pos["finished"] and pos["epoch"] == 1
    again = _batcher(epochs=1)
    again.restore(pos)
    assert list(again) == []
    more = _batcher(epochs=2)
    more.restore(pos)
    assert len(list(more)) == 3  # the second pass
    endless = _batcher(epochs=None)
    endless.restore(pos)
    assert endless.next_batch() is not None


def test_a_split_without_a_session_item_ends_in_steps_too():
    """Users whose sessions are all empty: a run in steps (epochs=None) ends as a run in
    epochs does, with users before or after them fed (property-based audit: the batcher
    went from pass to pass for ever, counting users, not slots)."""
    empty = [[np.zeros(0, np.int64)], [np.zeros(0, np.int64), np.zeros(0, np.int64)]]
    result = {}

    def run():
        result["batch"] = batching.QueueBatcher(lambda: iter(empty), 2, 2, 3).next_batch()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and result["batch"] is None
    fed = batching.QueueBatcher(lambda: iter(empty + [[np.array([5, 6])]] + empty), 2, 2, 3)
    batches = [fed.next_batch() for _ in range(4)]  # (pass after pass)
    assert all(b["items"][0, 0].tolist() == [5, 6, 0] for b in batches)


@pytest.mark.parametrize("seed", range(4))
def test_count_batches_is_the_generators_count_without_making_them(seed):
    """`count_batches` (the steps `--epochs` runs for) against the generator itself on
    random logs: heavy users, long sessions cut into chunks, empty users, several passes,
    shuffle buffers small and large."""
    rng = np.random.default_rng(seed)
    users = []
    for _ in range(int(rng.integers(1, 60))):
        sizes = rng.integers(0, 15, size=int(rng.integers(1, 4 if rng.random() < 0.9 else 40)))
        users.append([rng.integers(2, 9, size=int(n)) for n in sizes])
    b, s, length = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 8))
    counts = [len(batching.user_slots(u, length)) for u in users]
    for epochs in (1, 2, 3):
        for buffer in (1, 3, 1000):
            made = sum(1 for _ in batching.QueueBatcher(lambda: iter(users), b, s, length,
                                                        seed=seed, shuffle_buffer=buffer,
                                                        epochs=epochs))
            counted = batching.count_batches(counts, b, s, seed=seed, shuffle_buffer=buffer,
                                             epochs=epochs)
            assert counted == made, (epochs, buffer, counted, made)
    assert batching.count_batches([0, 0], 2, 2, epochs=3) == 0  # nothing to train on


def test_bad_arguments_and_batch_size_change():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        batching.QueueBatcher(lambda: iter(USERS), 0, 2, 3)
    pos = _batcher().position()
    with pytest.raises(ValueError, match="batch size changed"):
        batching.QueueBatcher(lambda: iter(USERS), 3, 2, 3).restore(pos)


def test_tf_dataset_has_fixed_shapes():
    ds = batching.make_dataset(_batcher(), prefetch=2)
    assert ds.element_spec["items"].shape.as_list() == [2, 2, 3]
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 3
    assert batches[1]["items"].tolist() == [[[6, 7, 0], [0, 0, 0]], [[4, 5, 6], [7, 8, 0]]]


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_tf_dataset_chunks_hand_over_the_same_batches(chunk):
    direct = list(_batcher())
    batches = list(batching.make_dataset(_batcher(), prefetch=1, chunk=chunk).as_numpy_iterator())
    assert len(batches) == len(direct) == 3  # chunk 2: one full chunk and a partial one
    for got, want in zip(batches, direct):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def _producers():
    return [t for t in threading.enumerate() if t.name == "hiertcn-batches"]


def test_tf_dataset_batches_come_from_a_low_priority_thread_that_stops_with_the_iterator():
    users = [[[2 + (u + k) % 9 for k in range(3)]] for u in range(400)]  # many batches
    batcher = batching.QueueBatcher(lambda: iter(users), 2, 2, 3, shuffle_buffer=1)
    before = _producers()  # (of other tests in this process, if any are still stopping)
    it = iter(batching.make_dataset(batcher, prefetch=1, chunk=2))
    first = next(it)
    assert first["items"].numpy().tolist() == next(iter(batching.QueueBatcher(
        lambda: iter(users), 2, 2, 3, shuffle_buffer=1)))["items"].tolist()
    (producer,) = [t for t in _producers() if t not in before]
    if sys.platform.startswith("linux"):
        assert os.getpriority(os.PRIO_PROCESS, producer.native_id) == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # not this one
    # it runs at most dataset_lead batches ahead of the consumer, then waits
    time.sleep(0.5)
    assert batcher.batch_index <= 1 + batching.dataset_lead(1, 2)
    del it
    gc.collect()
    producer.join(timeout=60)  # (a thread at nice 19 on cores another test keeps busy)
    assert not producer.is_alive()


def test_a_dataset_whose_feeds_are_stopped_is_deleted_without_waiting_for_the_producer():
    """`stop_feeds`: the iterator of a dataset whose next chunk the producer is slow to make
    (at nice 19 on a busy machine) is deleted at once, without that chunk (training soak:
    a stopped run took 45 s to exit, tf.data's thread waiting for a chunk in the
    generator)."""
    def users():
        yield from ([[2, 3, 4]] for _ in range(4))
        time.sleep(60)  # (the producer making its next chunk)
        yield [[5, 6, 7]]

    batcher = batching.QueueBatcher(users, 1, 1, 3, shuffle_buffer=1)
    it = iter(batching.make_dataset(batcher, prefetch=1, chunk=1))
    start = time.monotonic()
    assert [next(it)["items"].numpy().tolist() for _ in range(3)] == [[[[2, 3, 4]]]] * 3
    time.sleep(0.5)  # (tf.data's prefetch thread is in the generator, waiting for the 4th:
    # a shuffle buffer of 1 gives user 4 once it has read user 5)
    batching.stop_feeds(batcher)
    del it
    gc.collect()
    assert time.monotonic() - start < 30  # (the producer's chunk: 60 s)


def test_tf_dataset_raises_the_generators_error():
    import tensorflow as tf

    def users():
        yield [[2, 3, 4]]
        raise OSError("shard 7 is unreadable")

    before = _producers()
    ds = batching.make_dataset(batching.QueueBatcher(users, 1, 1, 3, epochs=1), prefetch=1, chunk=1)
    # tf.data hands the generator's error on as a tf.errors one, its message kept
    with pytest.raises(tf.errors.UnknownError, match="shard 7 is unreadable"):
        list(ds.as_numpy_iterator())
    for producer in [t for t in _producers() if t not in before]:
        producer.join(timeout=10)
        assert not producer.is_alive()


# A script that stops reading a dataset over a split streamed from its files (a split over
# train.cache_events) and exits with the iterator alive: the iterator's deletion during the
# interpreter's finalization hung for good whenever tf.data's thread was inside the
# generator then (a race: 4 of 6 runs of this script hung before the fix, 0 of 14 since).
_EXIT_SCRIPT = """
import os, sys
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, sys.argv[1])
from model import batching

users = batching.CachedUsers(sys.argv[2], "train", 0)  # 0: streamed, every pass
it = iter(batching.make_dataset(batching.QueueBatcher(users, 32, 10, 20)))
for _ in range(5):
    next(it)
print("read", flush=True)
"""


def test_a_process_exits_with_a_streaming_dataset_iterator_alive(tmp_path):
    import subprocess

    from tiny_logs import planted_users, write_data

    data = write_data(str(tmp_path / "data"), 20, planted_users(40))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(3):  # (a hang is a TimeoutExpired)
        proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, root, data],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "read"


def test_random_log_every_user_once_in_order_with_its_history():
    rng = np.random.default_rng(3)
    users = [[rng.integers(2, 50, size=rng.integers(1, 12)) for _ in range(rng.integers(1, 6))]
             for _ in range(40)]
    n = 5
    batcher = batching.QueueBatcher(lambda: iter(users), 4, 3, 4, epochs=1, history_size=n)
    rows = [[] for _ in range(4)]  # per row: (items, reset, end, history) of its valid slots
    for batch in batcher:
        assert batch["history"].shape == (4, n)  # one buffer per row
        slot_history = batching.slot_histories(batch["history"], batch["items"],
                                               batch["reset"]).numpy()
        for r in range(4):
            for k in range(3):
                if not batch["valid"][r, k]:
                    assert not batch["items"][r, k].any()
                    continue
                items = batch["items"][r, k]
                m = int(np.count_nonzero(items))
                assert not items[m:].any(), "items are left-aligned"
                rows[r].append((items[:m].tolist(), bool(batch["reset"][r, k]),
                                bool(batch["session_end"][r, k]), slot_history[r, k].tolist()))
    seen = []
    for row in rows:
        past = []
        for items, reset, end, history in row:
            if reset:
                seen.append([])
                past = []
            seen[-1].append((tuple(items), end))
            want = past[-n:]
            assert history == [0] * (n - len(want)) + want
            past += items
    expected = sorted(tuple((tuple(s.items.tolist()), s.session_end)
                            for s in batching.user_slots(u, 4))
                      for u in users)
    assert sorted(tuple(x) for x in seen) == expected


def _as_lists(users):
    return [[s.tolist() for s in u] for u in users]


def _hash_order(users, ids):
    """users (file order) in the cached order: by `user_order_key` of their ids."""
    order = sorted(range(len(users)), key=lambda k: batching.user_order_key(ids[k]))
    return [users[k] for k in order]


def test_cached_users_replay_the_split_after_one_complete_pass(tmp_path):
    import shutil

    from tiny_logs import write_data

    data = write_data(str(tmp_path / "d"), 12, USERS)
    ordered = _hash_order(USERS, ["train0", "train1", "train2"])
    assert ordered != USERS  # (the order below is the hash order, not the file order)
    factory = batching.CachedUsers(data, "train", max_events=100)
    first = iter(factory())
    next(first)  # the first pass reads the whole split before its first user
    assert factory.cached is not None
    assert _as_lists(factory()) == ordered
    shutil.rmtree(tmp_path / "d" / "train")  # later passes no longer read the files
    assert _as_lists(factory()) == ordered
    batches = list(batching.QueueBatcher(factory, 2, 2, 3, shuffle_buffer=1, epochs=1))
    expected = list(batching.QueueBatcher(lambda: iter(ordered), 2, 2, 3, shuffle_buffer=1,
                                          epochs=1))
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_cached_users_order_does_not_depend_on_the_shard_files(tmp_path):
    # The same users written as one file in one order, or as two files in another (as two
    # pipeline runs may write them), train on identical batches.
    import os

    import tensorflow as tf

    from pipeline import schema
    from tiny_logs import write_data

    rng = np.random.default_rng(0)
    users = [[rng.integers(2, 14, size=rng.integers(1, 6)).tolist()
              for _ in range(rng.integers(1, 4))] for _ in range(30)]
    one = write_data(str(tmp_path / "one"), 12, users)
    two = write_data(str(tmp_path / "two"), 12, users)
    os.remove(os.path.join(two, "train", "part-00000" + schema.SHARD_SUFFIX))
    records = [(f"train{n}", u) for n, u in enumerate(users)]
    opts = tf.io.TFRecordOptions(compression_type=schema.COMPRESSION)
    for shard, part in enumerate([records[::-2], records[-2::-2]]):
        with tf.io.TFRecordWriter(os.path.join(two, "train", f"part-0000{shard}"
                                               + schema.SHARD_SUFFIX), opts) as w:
            for user_id, sessions in part:
                times = [[1000 * k + j for j in range(len(x))] for k, x in enumerate(sessions)]
                w.write(schema.make_sequence_example(user_id, 0, sessions, times))
    assert [u.user_id for u in schema.iter_users(one, "train")] != \
        [u.user_id for u in schema.iter_users(two, "train")]
    got = {}
    for name, data in (("one", one), ("two", two)):
        factory = batching.CachedUsers(data, "train", max_events=10_000)
        got[name] = list(batching.QueueBatcher(factory, 3, 2, 4, seed=5, epochs=2))
    assert len(got["one"]) == len(got["two"]) > 0
    for a, b in zip(got["one"], got["two"]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_cached_users_stream_a_split_over_the_bound(tmp_path):
    import shutil

    from pipeline import schema
    from tiny_logs import write_data

    data = write_data(str(tmp_path / "d"), 12, USERS)
    factory = batching.CachedUsers(data, "train", max_events=10)  # USERS have 19 events
    assert _as_lists(factory()) == USERS and factory.cached is None  # file order
    assert _as_lists(factory()) == USERS
    shutil.rmtree(tmp_path / "d" / "train")
    with pytest.raises(schema.DataError, match="a file removed while it was read"):
        # streamed again: the files are needed
        list(factory())


def test_high_level_share_counts_the_chunks_after_a_session_end_in_their_batch():
    """Hand-computed: user A has sessions of 5 and 3 items (chunks of L = 4: slots 0, 1 and
    2), user B three of 2 (slots 3, 4, 5). With S = 2 (batches {0,1} {2,3} {4,5}) only slot
    5 follows an end of its user in its batch; with S = 3 ({0,1,2} {3,4,5}) slots 2, 4 and
    5 do; with S = 1 none."""
    users = batching.CachedUsers.__new__(batching.CachedUsers)
    users.cached = [[np.arange(5), np.arange(3)], [np.arange(2)] * 3]
    users._too_big = False
    assert users.high_level_share(2, 4) == pytest.approx(1 / 6)
    assert users.high_level_share(3, 4) == pytest.approx(3 / 6)
    assert users.high_level_share(1, 4) == 0.0
    # every session exactly S chunks: each ends its batch, and the GRU never learns
    users.cached = [[np.arange(40)] * 4]
    assert users.high_level_share(2, 20) == 0.0
    assert users.high_level_share(10, 20) == pytest.approx(6 / 8)  # sessions 2-4, both chunks
