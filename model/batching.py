"""The paper's queue-based mini-batch generator (pure Python/numpy) and its tf.data wrapper.

B rows, each a FIFO of session slots. Users stream in (shuffled per epoch within a bounded
buffer); all of a user's slots are appended to the currently shortest row (ties: the lowest
row). Each batch takes the next S slots of every row; a row with fewer pending slots is
padded with empty slots. A slot holds at most L items:

* A session longer than L is split into consecutive chunks of L items, in order. Only the
  session's last chunk has `session_end` set, and the model's state cache accumulates the
  AGG sums over the chunks, so the high-level state is updated once per session with
  exactly the aggregate of the whole session (as evaluation and serving do). HierTCN's
  convolutions in a later chunk also read the session's items before it (its chunk
  context, carried in the same cache: `HierTCN._slot_contexts`), so that they see what
  they see in a whole session.
* `reset` marks the first slot of a new user in that row: the state is zeroed before it.
* `valid` marks non-empty slots.
* `history` (only with `history_size` N > 0, for a repeat-aware model): per row, the last
  N items of its current user before the batch, newest last, left-padded with 0. Each row
  carries this bounded buffer (emptied at `reset`, like the model's state cache), so the
  batch holds B x N history items, not one buffer per slot; `slot_histories` derives in
  the graph each slot's last N items before it (earlier sessions and earlier chunks of
  this one).

Within a slot the model's inputs are [start, a1..a(m-1)] and its targets [a1..am] (the
first item is predicted from the state alone); the batch holds only `items` = targets.

Memory is O(B*(S*L+N)) for the batch plus the pending slots of one user per row; it does
not grow with the number of users (the users factory may add a bounded copy of the split:
`CachedUsers`, which also fixes the users' order). The position (epoch, users consumed
from the epoch's shuffled stream, the rows' pending slots and history buffers, batch
counter) is a JSON-able dict: a batcher restored from the position after batch n yields
exactly batch n + 1.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import os
import queue
import sys
import threading
import time
import zlib
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

# Batches handed to tf.data at once by `make_dataset`.
CHUNK = 8
# Chunks `make_dataset`'s producer thread makes ahead of tf.data.
PRODUCER_QUEUE = 1
# How often a `make_dataset` generator waiting for its producer checks for the interpreter's
# exit (seconds).
EXIT_POLL = 0.05

UsersFactory = Callable[[], Iterable[Sequence[np.ndarray]]]


class Slot(NamedTuple):
    """One chunk of a session: up to L item indices (int64, a view of the session's array)
    and its flags (a named tuple: the generator makes one per chunk, so construction must
    be cheap)."""

    items: np.ndarray
    reset: bool
    session_end: bool


_new_slot = tuple.__new__


def user_slots(sessions: Sequence[Sequence[int]], max_session_length: int) -> list[Slot]:
    """Splits a user's sessions into slots of at most `max_session_length` items.

    Args:
      sessions: item indices per session, in time order (empty sessions are skipped).
      max_session_length: L.

    Returns:
      The slots; the first has `reset`, the last chunk of each session `session_end`.
    """
    # The generator's hot loop (a few slots per user, ~20 users per batch): tuples are made
    # with `tuple.__new__` (a named tuple's own constructor is a Python-level call).
    slots = []
    append = slots.append
    length = max_session_length
    for session in sessions:
        items = np.asarray(session, np.int64)
        n = len(items)
        if n <= length:  # the common case: one chunk
            if n:
                append(_new_slot(Slot, (items, not slots, True)))
            continue
        last = n - 1 - (n - 1) % length  # the start of the last chunk
        for k in range(0, n, length):
            append(_new_slot(Slot, (items[k:k + length], not slots, k == last)))
    return slots


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Bounded-buffer shuffle: fills `buffer_size` items, then emits a random one per new item."""
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def count_batches(slot_counts: Sequence[int], batch_size: int, sessions_per_batch: int, *,
                  seed: int = 0, shuffle_buffer: int = 1000, epochs: int = 1) -> int:
    """The batches `QueueBatcher(..., epochs=epochs)` makes over users with these slot
    counts (in the users factory's order), counted without making them: the same shuffle
    per epoch, each user's slots to the shortest row, S slots a row per batch, the next
    pass's users filling the rows as the last one's drain; a pass without a slot ends."""
    b, s = batch_size, sessions_per_batch

    def stream() -> Iterator[int]:
        for epoch in range(epochs):
            fed = False
            for count in shuffled(slot_counts, shuffle_buffer,
                                  np.random.default_rng([seed, epoch])):
                fed = fed or count > 0
                yield count
            if not fed:
                return

    counts, pending, batches, exhausted = stream(), [0] * b, 0, False
    while True:
        shortest = min(pending)
        while shortest < s and not exhausted:
            count = next(counts, None)
            if count is None:
                exhausted = True
            elif count:
                pending[pending.index(shortest)] += count
                shortest = min(pending)
        if exhausted and not any(pending):
            return batches
        pending = [p - s if p > s else 0 for p in pending]
        batches += 1


class QueueBatcher:
    """Yields training batches as dicts of numpy arrays.

    `items` int64 [B, S, L], `reset`, `session_end`, `valid` bool [B, S], `batch_index`
    int64 [] (0-based count of batches produced) and, when `history_size` > 0, `history`
    int64 [B, N] (each row's buffer before the batch; per slot: `slot_histories`).
    """

    def __init__(self, users: UsersFactory, batch_size: int, sessions_per_batch: int,
                 max_session_length: int, *, seed: int = 0, shuffle_buffer: int = 1000,
                 epochs: int | None = None, keep_positions: int = 64, history_size: int = 0):
        """Creates the generator at the start of epoch 0.

        Args:
          users: called once per epoch; returns the users' sessions in a fixed order.
          batch_size: B rows.
          sessions_per_batch: S slots per row per batch.
          max_session_length: L items per slot.
          seed: shuffle seed (epoch e uses the stream seeded by (seed, e)).
          shuffle_buffer: users held by the shuffle buffer (1 = no shuffle).
          epochs: stop after this many passes (None: forever).
          keep_positions: positions remembered for `position_after` (>= prefetch depth).
          history_size: N, recent items per row in `history` (0: no `history`).
        """
        for name, v in (("batch_size", batch_size), ("sessions_per_batch", sessions_per_batch),
                        ("max_session_length", max_session_length), ("shuffle_buffer", shuffle_buffer)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if history_size < 0:
            raise ValueError(f"history_size must be >= 0, got {history_size}")
        self.users = users
        self.b, self.s, self.l = batch_size, sessions_per_batch, max_session_length
        self.seed, self.shuffle_buffer, self.epochs = seed, shuffle_buffer, epochs
        self.rows = [collections.deque() for _ in range(batch_size)]
        self.n = history_size
        self.histories = [collections.deque(maxlen=history_size) for _ in range(batch_size)]
        self.epoch, self.consumed, self.batch_index, self.finished = 0, 0, 0, False
        # whether the epoch under way has given a slot (a restored position's: taken as so)
        self._epoch_fed = False
        # (seed, shuffle buffer) of the epoch under way: a run resumed with other ones
        # keeps the earlier ones until that epoch ends (the users it consumed are skipped
        # by replaying the same stream)
        self._epoch_order = (seed, shuffle_buffer)
        self._stream = None
        self._positions = collections.OrderedDict()
        self._keep = keep_positions
        self._lock = threading.Lock()
        self.error: BaseException | None = None  # what stopped `make_dataset`'s producer

    # --- position -----------------------------------------------------------------------
    def position(self) -> dict:
        """The current position as a JSON-able dict."""
        return self._to_dict(self._snapshot())

    def _snapshot(self) -> tuple:
        return (self.epoch, self.consumed, self.finished, self.batch_index,
                [tuple(row) for row in self.rows], [list(h) for h in self.histories],
                self._epoch_order)

    @staticmethod
    def _to_dict(snapshot: tuple) -> dict:
        epoch, consumed, finished, batch_index, rows, histories, order = snapshot
        return {"epoch": epoch, "consumed": consumed, "finished": finished,
                "batch_index": batch_index, "epoch_seed": order[0],
                "epoch_shuffle_buffer": order[1],
                "rows": [[[s.items.tolist(), s.reset, s.session_end] for s in row] for row in rows],
                "histories": histories}

    def position_after(self, batch_index: int) -> dict:
        """The position right after batch `batch_index` was produced (for checkpoints taken
        while later batches are already prefetched)."""
        with self._lock:
            if batch_index not in self._positions:
                raise KeyError(f"position after batch {batch_index} is no longer kept")
            return self._to_dict(self._positions[batch_index])

    def restore(self, position: dict) -> None:
        """Continues from a `position()` dict."""
        if len(position["rows"]) != self.b:
            raise ValueError(f"position has {len(position['rows'])} rows, the batcher {self.b}: "
                             "the batch size changed since the checkpoint")
        self.epoch, self.consumed = position["epoch"], position["consumed"]
        self.batch_index = position["batch_index"]
        # finished by this batcher's epochs, not the saved ones: a run resumed with more
        # epochs, or in steps, goes on into the next pass (an empty split ends again)
        self.finished = self.epochs is not None and self.epoch >= self.epochs
        self.rows = [collections.deque(Slot(np.asarray(i, np.int64), bool(r), bool(e))
                                       for i, r, e in row)
                     for row in position["rows"]]
        histories = position.get("histories") or [[] for _ in range(self.b)]
        self.histories = [collections.deque(h, maxlen=self.n) for h in histories]
        self._epoch_fed = True
        # (a position from before these keys: the batcher's own, as it was read then)
        self._epoch_order = (position.get("epoch_seed", self.seed),
                             position.get("epoch_shuffle_buffer", self.shuffle_buffer))
        self._stream = None

    # --- generation ---------------------------------------------------------------------
    def _next_user(self):
        """Next user's sessions from the current epoch, moving to the next epoch at the end."""
        while not self.finished:
            if self._stream is None:
                if self.consumed == 0:  # a new epoch: this batcher's seed and buffer
                    self._epoch_order = (self.seed, self.shuffle_buffer)
                seed, buffer = self._epoch_order
                rng = np.random.default_rng([seed, self.epoch])
                self._stream = shuffled(self.users(), buffer, rng)
                for _ in range(self.consumed):
                    next(self._stream)
            user = next(self._stream, None)
            if user is not None:
                self.consumed += 1
                return user
            # (a pass of users without a session item: more passes would give none either)
            empty_epoch = not self._epoch_fed
            self.epoch, self.consumed, self._stream = self.epoch + 1, 0, None
            self._epoch_fed = False
            if empty_epoch or (self.epochs is not None and self.epoch >= self.epochs):
                self.finished = True
        return None

    def _fill(self) -> None:
        pending = [len(r) for r in self.rows]
        while min(pending) < self.s:
            user = self._next_user()
            if user is None:
                return
            slots = user_slots(user, self.l)
            if slots:
                self._epoch_fed = True
                row = pending.index(min(pending))  # the shortest row; ties: the lowest
                self.rows[row].extend(slots)
                pending[row] += len(slots)

    def next_batch(self) -> dict | None:
        """The next batch, or None when the last epoch is exhausted."""
        self._fill()
        if self.finished and not any(self.rows):
            return None
        b, s, l, n = self.b, self.s, self.l, self.n
        taken, where = [], []  # the slots of this batch and their index r * S + k
        for r, row in enumerate(self.rows):
            m = min(s, len(row))
            taken.extend([row.popleft() for _ in range(m)])
            where.extend(range(r * s, r * s + m))
        where = np.asarray(where, np.int64)
        chunks = [t.items for t in taken]
        lengths = np.fromiter(map(len, chunks), np.int64, len(chunks))
        total = int(lengths.sum())
        # Each item's flat position in [B * S * L]: its slot's start plus its offset.
        first = np.cumsum(lengths) - lengths
        offsets = np.repeat(where * l - first, lengths) + np.arange(total)
        items = np.zeros(b * s * l, np.int64)
        if chunks:
            items[offsets] = np.concatenate(chunks)
        items = items.reshape(b, s, l)
        flags = {k: np.zeros(b * s, bool) for k in ("reset", "session_end", "valid")}
        flags["reset"][where] = [t.reset for t in taken]
        flags["session_end"][where] = [t.session_end for t in taken]
        flags["valid"][where] = True
        flags = {k: v.reshape(b, s) for k, v in flags.items()}
        if n:
            history = np.zeros([b, n], np.int64)
            for r, buffer in enumerate(self.histories):
                if buffer:
                    history[r, n - len(buffer):] = np.fromiter(buffer, np.int64, len(buffer))
            for slot, i in zip(taken, where.tolist()):
                buffer = self.histories[i // s]
                if slot.reset:
                    buffer.clear()
                buffer.extend(slot.items.tolist())
        batch = {"items": items, **flags, "batch_index": np.int64(self.batch_index)}
        if self.n:
            batch["history"] = history
        self.batch_index += 1
        with self._lock:
            self._positions[int(batch["batch_index"])] = self._snapshot()
            while len(self._positions) > self._keep:
                self._positions.popitem(last=False)
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch


def make_dataset(batcher: QueueBatcher, prefetch: int = 4, chunk: int = CHUNK):
    """Wraps a batcher in `tf.data` with fixed shapes and prefetch.

    The generator hands `chunk` batches at a time to `tf.data` (stacked, then unbatched in
    C++): the Python-to-tensor hand-over of `from_generator` costs about as much as making
    a batch, so paying it once per chunk halves the input pipeline's CPU time. The batches
    are made in a thread of their own at the lowest CPU priority (`_produce`), one chunk
    ahead of `tf.data`, so that on a CPU the generator fills the cores' idle moments instead
    of preempting the training step's threads (each preempted shard stalls the whole op);
    an error in it is raised by the dataset. The batcher runs ahead of the consumer by up
    to `dataset_lead(prefetch, chunk)` batches.
    """
    import tensorflow as tf

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, s, l = batcher.b, batcher.s, batcher.l
    signature = {
        "items": tf.TensorSpec([None, b, s, l], tf.int64),
        "reset": tf.TensorSpec([None, b, s], tf.bool),
        "session_end": tf.TensorSpec([None, b, s], tf.bool),
        "valid": tf.TensorSpec([None, b, s], tf.bool),
        "batch_index": tf.TensorSpec([None], tf.int64),
    }
    if batcher.n:
        signature["history"] = tf.TensorSpec([None, b, batcher.n], tf.int64)

    def chunks():
        feed = _Feed(batcher, chunk, list(signature))
        try:
            while True:
                item = feed.next_chunk()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                feed.busy = False  # (tf.data now converts the chunk: `feed.last` says when)
                yield item
                feed.busy, feed.last = True, time.monotonic()
        finally:  # the dataset's iterator is gone (or done): the producer stops too
            feed.close()

    return (tf.data.Dataset.from_generator(chunks, output_signature=signature)
            .unbatch().prefetch(prefetch))


def slot_histories(history, items, reset, after: bool = False):
    """Each slot's history from a batch's per-row buffers (TensorFlow ops, for the step).

    Per row, the buffer and then the items of its slots in order form one stream; slot k's
    history is the window of the N stream entries just before its first item, with the
    entries from before the row's last `reset` at or before k blanked: exactly the last N
    items of the slot's user before it, as a per-slot buffer would hold them. Static shapes
    (a sort, not `tf.where`), so that it also compiles with XLA.

    Args:
      history: int [B, N] the batch's `history` (newest last, left-padded with 0).
      items: int [B, S, L] the batch's `items` (each slot left-aligned).
      reset: bool [B, S] the batch's `reset` (or any other starts: HierTCN's chunk context
        passes the session starts).
      after: also return the row's buffer after the batch (the window after its last item,
        blanked before its last `reset`).

    Returns:
      int64 [B, S, N]: newest last, left-padded with 0 (all 0 for an empty slot); with
      `after`, (that, int64 [B, N]).
    """
    import tensorflow as tf

    history = tf.cast(history, tf.int64)
    items = tf.cast(items, tf.int64)
    b, s = tf.shape(items)[0], tf.shape(items)[1]
    n = tf.shape(history, out_type=tf.int64)[1]
    flat = tf.reshape(items, [b, -1])                                           # [B, S L]
    # the stream [B, N + S L]: the buffer, then the row's items packed to the left (a stable
    # sort of the present ones first)
    order = tf.argsort(tf.cast(flat <= 0, tf.int32), axis=1, stable=True)
    stream = tf.concat([history, tf.gather(flat, order, batch_dims=1)], axis=1)
    lengths = tf.reduce_sum(tf.cast(items > 0, tf.int64), axis=2)               # [B, S]
    # where each slot's first item is in the stream (less N), and where one after the
    # last slot's would be
    ends = tf.concat([tf.cumsum(lengths, axis=1, exclusive=True),
                      tf.reduce_sum(lengths, axis=1, keepdims=True)], axis=1)   # [B, S + 1]
    starts = tf.concat([reset, tf.zeros_like(reset[:, :1])], axis=1)
    # the stream position where each one's user starts in this batch (0: before it)
    causal = tf.range(s + 1)[None, :] <= tf.range(s + 1)[:, None]               # j <= k
    boundary = tf.reduce_max(tf.where(starts[:, None, :] & causal[None], (n + ends)[:, None, :],
                                      tf.constant(0, tf.int64)), axis=2)        # [B, S + 1]
    window = ends[:, :, None] + tf.range(n)[None, None, :]                      # [B, S + 1, N]
    out = tf.where(window >= boundary[:, :, None], tf.gather(stream, window, batch_dims=1),
                   tf.zeros_like(window))
    slots = tf.where((lengths > 0)[:, :, None], out[:, :-1], tf.zeros_like(out[:, :-1]))
    return (slots, out[:, -1]) if after else slots


class _Feed:
    """One `make_dataset` generator's producer thread and hand-over queue, registered
    (in `_FEEDS`) while the generator lives, for `_end_feeds_at_exit`.

    Why: a dataset iterator still alive when the interpreter exits is deleted during its
    finalization, which waits for tf.data's prefetch thread; if that thread is then running
    the generator (waiting for a chunk, or converting one), it needs the GIL, and a thread
    that asks for the GIL once finalization has begun is ended on the spot: tf.data's
    thread never returns and the process hangs for good (seen with a split streamed from
    its files, whose producer is slower than the step). So at the exit, while threads still
    run, every generator is ended and the exit waits until none is running.
    """

    def __init__(self, batcher: QueueBatcher, chunk: int, keys: list[str]):
        self.handover: queue.Queue = queue.Queue(maxsize=PRODUCER_QUEUE)
        self.stop = threading.Event()
        # running (waiting for or taking a chunk) and the time it last handed one over
        self.busy, self.last = True, time.monotonic()
        self.pid = os.getpid()  # (a forked child inherits the registry, not the threads)
        self.batcher = batcher
        self.producer = threading.Thread(target=_produce, args=(batcher, chunk, keys,
                                                                self.handover, self.stop),
                                         name="hiertcn-batches", daemon=True)
        with _FEEDS_LOCK:
            _FEEDS.add(self)
        self.producer.start()

    def next_chunk(self):
        """The producer's next item (a chunk, None at the end or an exception); None once
        the interpreter is exiting or the feed is stopped (`stop_feeds`)."""
        while not (_EXITING.is_set() or self.stop.is_set()):
            try:
                return self.handover.get(timeout=EXIT_POLL)
            except queue.Empty:
                pass
        return None

    def close(self) -> None:
        self.stop.set()
        self.busy, self.last = False, time.monotonic()
        with _FEEDS_LOCK:
            _FEEDS.discard(self)


def stop_feeds(batcher: QueueBatcher) -> None:
    """Ends `batcher`'s `make_dataset` generators and producer at their next wait, for a
    caller done with the dataset: deleting its iterator waits for tf.data's prefetch
    thread, which may be in the generator waiting for the producer's next chunk, and the
    producer runs at the lowest CPU priority (a training run stopped on a busy machine took
    45 s to exit, waiting for a chunk it would never use)."""
    with _FEEDS_LOCK:
        feeds = [f for f in _FEEDS if f.batcher is batcher]
    for feed in feeds:
        feed.stop.set()


# Set at the interpreter's exit: every `make_dataset` generator then ends its dataset.
_EXITING = threading.Event()
_FEEDS: set = set()
_FEEDS_LOCK = threading.Lock()


@atexit.register
def _end_feeds_at_exit(timeout: float = 5.0, settle: float = 0.1) -> None:
    """At the interpreter's exit (atexit runs while threads still run): stops every live
    `make_dataset` producer and generator, then waits (at most `timeout` seconds) until the
    producers have stopped and no generator has run for `settle` seconds, so that no
    tf.data thread is inside Python when finalization deletes the iterators (`_Feed`)."""
    _EXITING.set()
    deadline = time.monotonic() + timeout
    pid = os.getpid()
    with _FEEDS_LOCK:
        feeds = [f for f in _FEEDS if f.pid == pid]
    for feed in feeds:
        feed.stop.set()
    for feed in feeds:
        feed.producer.join(max(0.0, deadline - time.monotonic()))
    while time.monotonic() < deadline:
        with _FEEDS_LOCK:
            feeds = [f for f in _FEEDS if f.pid == pid]
        now = time.monotonic()
        if not any(f.busy or now - f.last < settle for f in feeds):
            return
        time.sleep(0.01)


def _produce(batcher: QueueBatcher, chunk: int, keys: list[str], handover: queue.Queue,
             stop: threading.Event) -> None:
    """`make_dataset`'s producer thread: stacked chunks of batches into `handover`, then
    None at the end, or the exception that stopped it; returns early once `stop` is set."""
    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                handover.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    lower_thread_priority()
    try:
        it = iter(batcher)
        while True:
            batches = list(itertools.islice(it, chunk))
            item = {k: np.stack([x[k] for x in batches]) for k in keys} if batches else None
            if not hand_over(item) or item is None:
                return
    except BaseException as e:  # noqa: BLE001 -- re-raised by the dataset
        batcher.error = e
        hand_over(e)


def raise_producer_error(batcher: QueueBatcher) -> None:
    """Raises the exception that stopped `batcher`'s producer thread, if one did: tf.data
    hands it on as a `tf.errors` error with the Python traceback in its message; call this
    where that error is caught to raise the original (a `DataError`, say) instead."""
    if batcher.error is not None:
        raise batcher.error


def lower_thread_priority(niceness: int = 19) -> bool:
    """Gives the calling thread the lowest CPU priority (Linux: a thread's own nice value;
    elsewhere nothing); returns whether it did. Lowering needs no privilege and is never
    undone: call it only in a thread of one's own."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError:
        return False
    return True


def dataset_lead(prefetch: int, chunk: int = CHUNK) -> int:
    """How many batches `make_dataset` can produce ahead of the one being consumed: the
    prefetch buffer, the chunk being unbatched, the chunks in the producer's queue and the
    one it holds."""
    return prefetch + (2 + PRODUCER_QUEUE) * chunk


class CachedUsers:
    """A users factory over a split that keeps it in memory when it totals at most
    `max_events` events, in an order that does not depend on the pipeline's files.

    The first pass reads the split before yielding: within the bound, the users are
    ordered by a hash of their id (`user_order_key`) and every pass replays that memory
    copy, so two pipeline runs that put the same users in differently numbered or ordered
    shard files train identically. A split over the bound streams in file order, every
    pass, in bounded memory (the users read up to the bound go first, then the rest).
    """

    def __init__(self, data_dir: str, split: str, max_events: int):
        from pipeline import schema

        self._read = schema.user_reader(data_dir, split)
        self.max_events = max_events
        self.cached: list[list[np.ndarray]] | None = None
        self._too_big = False  # a pass went over the bound: stream without keeping

    def __call__(self) -> Iterator[list[np.ndarray]]:
        if self.cached is not None:
            return iter(self.cached)
        if self._too_big:
            return (user.sessions for user in self._read())
        return self._first_pass()

    def slot_counts(self, max_session_length: int) -> list[int] | None:
        """Each user's slots (session chunks of at most L items), in the order of a pass,
        read now if the first pass has not been (the split is then in memory for
        training); None for a split over the bound, which streams (this does not read it)."""
        self._read_once()
        if self.cached is None:
            return None
        length = max_session_length
        return [sum(-(-len(s) // length) for s in sessions) for sessions in self.cached]

    def high_level_share(self, sessions_per_batch: int, max_session_length: int,
                         max_users: int = 20_000) -> float | None:
        """About what share of the slots follow, in their batch, the end of an earlier
        session of the same user: the only slots whose high-level state the batch computes
        (the state cache carries it between batches without gradient), so the only ones a
        GRU over sessions learns from. Estimated over the first `max_users` users as one
        queue cut into batches of S slots (a row's queue is such a run of users). Reads
        the split now if no pass has (as `slot_counts`: callers check that it fits the
        bound); None for a split over the bound."""
        self._read_once()
        if self.cached is None:
            return None
        s, length = sessions_per_batch, max_session_length
        slot = learning = 0
        for sessions in self.cached[:max_users]:
            ended_in_batch = -1  # the batch (slot // S) in which this user's last session ended
            for items in sessions:
                chunks = -(-len(items) // length)
                for c in range(chunks):
                    if ended_in_batch == slot // s:
                        learning += 1
                    if c == chunks - 1:
                        ended_in_batch = slot // s
                    slot += 1
        return learning / slot if slot else None

    def _read_once(self) -> None:
        """Runs the first pass now if none has run (it fills the cache within the bound)."""
        if self.cached is None and not self._too_big:
            for _ in self._first_pass():
                pass

    def longest_session(self) -> int | None:
        """The most items of one session in the split, read now if the first pass has not
        been (a split over the bound is then read once to find out); None for a split over
        the bound, which streams."""
        self._read_once()
        if self.cached is None:
            return None
        return max((len(s) for sessions in self.cached for s in sessions), default=0)

    def _first_pass(self) -> Iterator[list[np.ndarray]]:
        kept: list[tuple[tuple[int, str], list[np.ndarray]]] = []
        events = 0
        users = self._read()
        for user in users:
            kept.append((user_order_key(user.user_id), user.sessions))
            events += sum(map(len, user.sessions))
            if events > self.max_events:
                self._too_big = True
                yield from (sessions for _, sessions in kept)
                del kept
                yield from (u.sessions for u in users)
                return
        kept.sort(key=lambda pair: pair[0])
        if self.cached is None:
            self.cached = [sessions for _, sessions in kept]
        yield from self.cached


def user_order_key(user_id: str) -> tuple[int, str]:
    """The users' training order within a cached split: a stable hash of the id (the same
    in every process and run; Python's `hash` of a string is not), then the id."""
    return zlib.crc32(user_id.encode("utf-8")), user_id
