"""Online next-item evaluation of any `Scorer` (README § Evaluation protocol), and its
command line.

Users are read in windows of `SORT_WINDOW`, each reordered by target events (most first)
so that the rows scored together have sessions of similar lengths (less padding). For each
batch of users (one row per user) the evaluator first feeds the history sessions
(`num_context_sessions`) through `Scorer.update`, in lock-step over the rows (a row with
no session at a step gets an all-padding row). Then, one target session per step, it asks
`Scorer.ranks` for the rank of every position's target against the full catalogue
(`model.metrics`; by default from `Scorer.score`, inside TensorFlow for a neural model), and
feeds the session through `Scorer.update`: a scored session becomes history for the user's
next one. Position 0 of a session (predicted from history alone) is
reported as `first_item`; positions >= 1 give the headline metrics, split into `repeat`
(target seen earlier in the user's history, context included, or earlier in the session)
and `new`, and by user into `returning_users` (the record has context sessions) and
`cold_users` (it has none). An unknown target (index 1) is never a repeat.

Usage:
  python -m model.evaluate --data DIR --split test --model sknn --output sknn.json
  python -m model.evaluate --data DIR --split valid --model-dir runs/hiertcn
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from typing import Collection, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from model import base, cli, malloc, metrics, quiet
from model.atomic import write_atomically, write_json
from model.base import Scorer
from pipeline import argtypes, schema, storage

EVAL_SPLITS = ("valid", "test")
# Users read ahead and reordered at once (`_most_events_first`).
SORT_WINDOW = 1024
# progress in a log file (not a terminal): a line this often, as `model.train`'s
LOG_FILE_SECONDS = 30.0
# a transient bar (`evaluate(transient=True)`: training's valid evaluations) shows on a
# terminal once an evaluation has taken this long
TRANSIENT_DELAY_SECONDS = 2.0


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A digest of the code an evaluation's figures can depend on: the modules of `model/`
    (`model/compare.py`, which only reports them, aside) and `pipeline/schema.py`, which
    reads the records. Written into each metrics file as `code`: `model.compare`
    evaluates a run again when its file carries another one (made before a code change),
    rather than mixing two versions' figures in one table."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(os.path.join(here, n) for n in os.listdir(here)
                   if n.endswith(".py") and n != "compare.py")
    files.append(os.path.join(os.path.dirname(here), "pipeline", "schema.py"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16]


def _pad(sessions: Sequence[np.ndarray]) -> np.ndarray:
    """int64 [rows, max length] with padding 0 at the end (at least one column)."""
    width = max([len(s) for s in sessions] + [1])
    out = np.zeros((len(sessions), width), dtype=np.int64)
    for r, s in enumerate(sessions):
        out[r, :len(s)] = s
    return out


def _most_events_first(users: Iterable[schema.UserRecord], window: int
                       ) -> Iterator[schema.UserRecord]:
    """The users in windows of `window`, each ordered by its users' target events, most
    first (stable), so that the rows scored side by side have sessions of similar lengths
    and less of each [rows, steps] batch is padding (MovieLens-1M valid: 182k scored
    positions instead of 458k for 26k events). The metrics are sums over events: the
    order does not change them."""
    it = iter(users)
    while chunk := list(itertools.islice(it, window)):
        chunk.sort(key=lambda u: -sum(len(s) for s in u.sessions[u.num_context_sessions:]))
        yield from chunk


def _user_batches(users: Iterable[schema.UserRecord], batch_size: int,
                  vocab_size: int) -> Iterator[list[schema.UserRecord]]:
    """Groups users into batches of at most `batch_size` rows whose scores fit the budget.

    A batch's scores are [rows, longest target session, vocab]; a user whose sessions would
    push that over `base.SCORE_BUDGET` starts the next batch (a batch always has one user,
    whose long sessions `Scorer.ranks` scores in blocks of positions).
    """
    batch: list[schema.UserRecord] = []
    longest = 0
    for user in users:
        length = max((len(s) for s in user.sessions[user.num_context_sessions:]), default=0)
        need = max(longest, length)
        if batch and (len(batch) == batch_size or (len(batch) + 1) * need * vocab_size > base.SCORE_BUDGET):
            yield batch
            batch, need = [], length
        batch.append(user)
        longest = need
    if batch:
        yield batch


def _repeat_flags(session: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """bool [len]: the item was seen before (in `seen` or earlier in the session), known."""
    _, first = np.unique(session, return_index=True)
    earlier = np.ones(len(session), dtype=bool)
    earlier[first] = False
    return (np.isin(session, seen) | earlier) & (session != schema.UNKNOWN_INDEX)


def _seen_after(seen: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Sorted known items of `seen` and `session`."""
    return np.union1d(seen, session[session >= schema.NUM_RESERVED])


def _evaluate_batch(scorer: Scorer, users: list[schema.UserRecord], vocab_size: int,
                    acc: metrics.MetricsAccumulator, first_user: int = 0,
                    rule_out_current: bool = False, rule_out_seen: bool = False) -> None:
    """History first, then target sessions in lock-step: score, accumulate, update (each
    event tagged with its user's index, `first_user` + row)."""
    state = scorer.initial_state([u.user_id for u in users])
    empty = np.zeros(0, dtype=np.int64)
    # (the known items of all a user's context sessions at once: one union, not one per step)
    seen = [_seen_after(empty, np.concatenate(u.sessions[:u.num_context_sessions]))
            if u.num_context_sessions else empty for u in users]
    for step in range(max(u.num_context_sessions for u in users)):
        rows = [u.sessions[step] if step < u.num_context_sessions else empty for u in users]
        state = scorer.update(state, _pad(rows))
    targets = [u.sessions[u.num_context_sessions:] for u in users]
    cold = np.array([u.num_context_sessions == 0 for u in users])
    for step in range(max(len(t) for t in targets)):
        rows = [t[step] if step < len(t) else empty for t in targets]
        sessions = _pad(rows)
        repeat = np.zeros(sessions.shape, dtype=bool)
        for r, row in enumerate(rows):
            if len(row):  # (a row whose target sessions have ended: padding, no flags)
                repeat[r, :len(row)] = _repeat_flags(row, seen[r])
        if rule_out_seen:  # (it holds the item the session is on: no `excluded` needed)
            rank = scorer.ranks(state, sessions, vocab_size,
                                seen=metrics.seen_items(seen, sessions))
        elif rule_out_current:
            rank = scorer.ranks(state, sessions, vocab_size,
                                excluded=metrics.previous_items(sessions))
        else:
            rank = scorer.ranks(state, sessions, vocab_size)
        seen = [_seen_after(s, r) if len(r) else s for s, r in zip(seen, rows)]
        first = np.zeros(sessions.shape, dtype=bool)
        first[:, 0] = True
        user = np.repeat(np.arange(first_user, first_user + len(users)), sessions.shape[1])
        acc.add_ranks(rank.reshape(-1), sessions.reshape(-1), repeat.reshape(-1),
                      first.reshape(-1), user, is_cold=np.repeat(cold, sessions.shape[1]))
        state = scorer.update(state, sessions)


def evaluate(scorer: Scorer, data_dir: str, split: str, *, batch_size: int = 64,
             max_users: int | None = None, user_ids: Collection[str] | None = None,
             progress: bool = True, users: Sequence[schema.UserRecord] | None = None,
             per_user_output: str | None = None, rule_out_current: bool = False,
             rule_out_seen: bool = False, transient: bool = False,
             progress_out=None) -> dict:
    """Evaluates a scorer online on the target sessions of a split.

    Args:
      scorer: the model (neural or baseline), already fitted.
      data_dir: a folder written by `python -m pipeline`.
      split: `valid` or `test`.
      batch_size: users evaluated side by side (fewer when long sessions would make the
        [rows, steps, vocab] scores exceed `base.SCORE_BUDGET` floats).
      max_users: evaluate only the first N users of the split (all when None).
      user_ids: evaluate only these users (all when None; see `sample_users`).
      progress: show a progress bar over users.
      transient: progress that leaves nothing behind for an evaluation whose caller says
        its result next (`model.train`'s valid evaluations): on a terminal, a bar shown
        once the evaluation has taken `TRANSIENT_DELAY_SECONDS` and cleared at its end; in
        a log file, a line every `LOG_FILE_SECONDS` (none for a shorter evaluation)
        without a last one at the end.
      progress_out: the stream the progress goes to (default sys.stderr, whose being a
        terminal or not chooses the bar or the lines).
      users: the split's user records, already read (`load_users`), instead of reading
        them from `data_dir` (`max_users` and `user_ids` still apply).
      per_user_output: also write each user's event count and metric sums here (an
        `.npz`, `write_per_user`), for paired comparisons between models.
      rule_out_current: rank each event without the item its session is on (the one
        before it) among the candidates, for every model alike: the pipeline collapses
        immediate repeats, so that item is never the next one (HierTCN's default head
        rules it out itself; this gives every other model the same knowledge, for a
        like-for-like comparison). A target equal to it would count as a miss.
      rule_out_seen: rank each event without any item the user has had before (in the
        user's earlier sessions, this split's included, and earlier in the session) among
        the candidates, for every model alike: the filter of "already rated" items for
        logs where an item is consumed once (MovieLens), which HierTCN's seen bias learns
        and the other models do not. A repeat target counts as a miss.

    Returns:
      The §6 metrics dict: `recall@K`, `mrr@K` (K in 1, 5, 10, 20), `events`,
      `unknown_targets`, objects `first_item`, `repeat`, `new`, `returning_users`,
      `cold_users` with the same keys, and `model`, `split`, `data`.

    Raises:
      schema.DataError: the folder is not a pipeline output or the split is unknown.
      ValueError: bad `batch_size`/`max_users`, or the scorer returned a bad shape.
    """
    if split not in EVAL_SPLITS:
        raise schema.DataError(f"cannot evaluate on split {split!r}: choose valid or test")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1, got {max_users}")
    vocab = schema.read_vocabulary(data_dir)
    schema.shard_files(data_dir, split)  # fails early with a clear message
    split_stats = schema.read_stats(data_dir).get("splits", {}).get(split, {})
    total, total_events = split_stats.get("users"), split_stats.get("events")
    if users is not None:
        total, total_events = len(users), sum(_target_events(u) for u in users)
    if user_ids is not None:
        total = len(user_ids) if total is None else min(total, len(user_ids))
        if users is None:
            total_events = None  # (not known before the users are read)
    if max_users is not None and (total is None or max_users < total):
        total, total_events = max_users, None

    from tqdm import tqdm

    users = schema.iter_users(data_dir, split) if users is None else iter(users)
    if user_ids is not None:
        users = (u for u in users if u.user_id in user_ids)
    users = itertools.islice(users, max_users)
    acc = metrics.MetricsAccumulator()
    ids: list[str] = []
    heaviest = (0, "")  # the user with the most of the headline events (a crawler's share)
    events = 0
    desc = f"evaluate {scorer.name} on {split}"
    # Progress and its time estimate go by target events where their total is known: the
    # users are taken most events first (`_most_events_first`), and one heavy user can hold
    # more of the work than a thousand light ones, so a count of users misleads (a log
    # with a few power users: "12 users of 1,593 (1%), about 1:06:55 left" after 30 s of a
    # 1 min 28 s evaluation).
    with (_BarProgress(tqdm, total, total_events, desc, disable=not progress,
                       transient=transient, out=progress_out)
          if not progress or sys.stderr.isatty() or argtypes.in_notebook()
          else LineProgress(total, desc, out=progress_out, total_events=total_events,
                            last_line=not transient)) as bar:
        for batch in _user_batches(_most_events_first(users, SORT_WINDOW), batch_size,
                                   vocab.size):
            _evaluate_batch(scorer, batch, vocab.size, acc, len(ids), rule_out_current,
                            rule_out_seen)
            ids.extend(u.user_id for u in batch)
            sizes = [(_scored_events(u), u.user_id) for u in batch]
            heaviest = max([heaviest, *sizes])
            events += sum(n for n, _ in sizes)
            bar.update(len(batch), sum(_target_events(u) for u in batch))
    out = acc.result()
    out.update(model=scorer.name, split=split, data=data_dir)
    if heaviest[0]:
        out["heaviest_user"] = {"user": heaviest[1], "events": heaviest[0],
                                "of_users": len(ids), "of_events": events}
    if rule_out_current:
        out["rule_out_current"] = True
    if rule_out_seen:
        out["rule_out_seen"] = True
    if per_user_output:
        try:
            write_per_user(per_user_output, ids, acc.per_user(len(ids)))
        except OSError as e:  # (the metrics go with the error: the caller can still say them)
            e.metrics = out
            raise
    return out


def heavy_user_note(result: dict) -> str | None:
    """A note on `evaluate`'s result where one user holds most of what it scored (a
    crawler: the metrics average over events, so they are mostly that user's; the
    pipeline's crawler note, for the users evaluated)."""
    heavy = result.get("heaviest_user") or {}
    n, total, users = (heavy.get(k, 0) for k in ("events", "of_events", "of_users"))
    if users < schema.HEAVY_USER_MIN_USERS or n <= schema.HEAVY_USER_SHARE * total:
        return None
    return (f"note: one user ({heavy['user']}) holds {argtypes.share(n, total)} of the "
            f"{total:,} events the metrics average over ({users:,} users): they are mostly "
            "that user's; a crawler? the pipeline's --exclude leaves a user out")


def _target_events(user: schema.UserRecord) -> int:
    """Events of a user's target sessions (what the evaluation ranks)."""
    return sum(len(s) for s in user.sessions[user.num_context_sessions:])


def _scored_events(user: schema.UserRecord) -> int:
    """A user's events in the headline metrics (`events`): its target sessions' events
    from each one's second on."""
    return sum(max(len(s) - 1, 0) for s in user.sessions[user.num_context_sessions:])


class LineProgress:
    """Progress for a log file, not a terminal: a line every `every` seconds (a bar
    redrawn with carriage returns shows nothing to `tail -f` until it ends), from a thread
    of its own while a batch takes longer (one heavy user's: minutes without a line).

    With `total_events` (the split's target events) the share done and the time left are
    those of the events, not of the users: users differ in size by orders of magnitude
    and are taken most events first. `last_line` False: no line at the end (the caller
    says the result next), so an evaluation shorter than `every` prints nothing."""

    def __init__(self, total: int | None, desc: str, every: float | None = None,
                 out=None, total_events: int | None = None, last_line: bool = True):
        self.total, self.desc = total, desc
        self.every = LOG_FILE_SECONDS if every is None else every
        self.total_events = total_events
        self.last_line = last_line
        self.out = out or sys.stderr
        self.done = self.events = 0
        self.start = self.last = time.monotonic()
        self._said = None  # (done, events) of the last line
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._beat = None

    def __enter__(self) -> "LineProgress":
        if self.every > 0:
            self._beat = threading.Thread(target=self._heartbeat, name="progress", daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._ended.set()
        if self._beat is not None:  # (a stop may have left the lock taken: a second then)
            self._beat.join(None if exc[0] is None else 1.0)
        if exc[0] is None and self.last_line and self._said != (self.done, self.events):
            self._line()

    def update(self, n: int, events: int = 0) -> None:
        with self._lock:  # (the heartbeat reads both counts, and says a line once)
            self.done += n
            self.events += events
            if time.monotonic() - self.last >= self.every:
                self._say()

    def _heartbeat(self) -> None:
        while not self._ended.wait(max(self.last + self.every - time.monotonic(), 0.01)):
            with self._lock:
                if time.monotonic() - self.last >= self.every:
                    self._say()

    def _line(self) -> None:
        with self._lock:
            self._say()

    def _say(self) -> None:
        self.last = now = time.monotonic()
        self._said = (self.done, self.events)
        elapsed = now - self.start
        of = ""
        if self.total_events and self.total:
            done, total = self.events, self.total_events
            of = (f" of {self.total:,}, {self.events:,} of {self.total_events:,} target "
                  f"events ({min(done / total, 1.0):.0%})")
        elif self.total:
            done, total = self.done, self.total
            of = f" of {self.total:,} ({done / total:.0%})"
        if self.total and 0 < done < total and self.done < self.total:
            of += f", about {cli.clock(elapsed * (total - done) / done)} left"
        print(f"{self.desc}: {self.done:,} users{of}, {cli.clock(elapsed)} elapsed",
              file=self.out, flush=True)


class _BarProgress:
    """A tqdm bar on a terminal: over target events when their total is known (its rate
    and time left are then the events'), with the users done beside it; else over users.
    `transient`: shown only after `TRANSIENT_DELAY_SECONDS`, and cleared at the end."""

    def __init__(self, tqdm, total: int | None, total_events: int | None, desc: str,
                 disable: bool, transient: bool = False, out=None):
        self.by_events = bool(total_events and total)
        self.total = total
        self.done = 0
        common = {"desc": desc, "disable": disable, "file": out}
        if transient:
            common.update(leave=False, delay=TRANSIENT_DELAY_SECONDS)
        self.bar = (tqdm(total=total_events, unit="event", unit_scale=True, **common)
                    if self.by_events else tqdm(total=total, unit="user", **common))

    def __enter__(self) -> "_BarProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, n: int, events: int = 0) -> None:
        self.done += n
        if self.by_events:
            self.bar.set_postfix_str(f"{self.done:,} of {self.total:,} users", refresh=False)
            self.bar.update(events)
        else:
            self.bar.update(n)


def write_per_user(path: str, user_ids: Sequence[str], sums: dict[str, np.ndarray]) -> None:
    """Writes per-user sums (`MetricsAccumulator.per_user`) as an `.npz` (atomically), the
    users sorted by id so that two models' files line up row by row; `user_id` holds the
    ids."""
    ids = np.asarray(list(user_ids), dtype=str)
    order = np.argsort(ids, kind="stable")
    arrays = {k: v[order] for k, v in sums.items()}
    arrays["user_id"] = ids[order]
    write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)


def read_per_user(path: str) -> dict[str, np.ndarray]:
    """The arrays of a `write_per_user` file."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_users(data_dir: str, split: str, user_ids: Collection[str] | None = None,
               max_events: int | None = None) -> list[schema.UserRecord] | None:
    """The records of a split's users (only `user_ids` when given), in file order, for
    repeated evaluations (`evaluate(users=...)`); None when they hold more than
    `max_events` events (then stream the split each time)."""
    kept, events = [], 0
    for user in schema.iter_users(data_dir, split):
        if user_ids is not None and user.user_id not in user_ids:
            continue
        events += sum(len(s) for s in user.sessions)
        if max_events is not None and events > max_events:
            return None
        kept.append(user)
    return kept


class UserSample(NamedTuple):
    """`sample_users`' choice: `ids` (None: every user of the split) and the sizes of the
    sample and of the split (users, target events); `over_budget`: the users passed over
    for holding more target events than the budget alone."""

    ids: frozenset[str] | None
    users: int
    events: int
    all_users: int
    all_events: int
    over_budget: int = 0


# `--sample-users`' hash salt (`sample_users`)
SAMPLE_SALT = "model.evaluate --sample-users:"


def sample_users(data_dir: str, split: str, count: int, max_events: int = 0,
                 salt: str = "") -> UserSample:
    """A split's users taken in the order of a hash of their ids
    (`batching.user_order_key`: the same users whatever order the pipeline wrote them in)
    until `count` users (0: no limit) or, before the user that would pass it, `max_events`
    target events (0: no limit). A user holding more than `max_events` alone (a crawler)
    is passed over, not taken nor stopped at: one such user first in the order made every
    valid evaluation of a training run that user's alone, and one later stopped the sample
    there (30 users of a split's 81, 863 of its 2,271 other events). Where every user
    holds more, the one with the fewest is taken (a sample is never empty). `salt`
    (prefixed to each id before hashing) gives another order: `model.evaluate
    --sample-users` uses one, so that its users are not the ones training takes first
    (training orders the train split's users by the unsalted hash)."""
    from model.batching import user_order_key

    users = [(u.user_id, _target_events(u)) for u in schema.iter_users(data_dir, split)]
    ordered = sorted(users, key=lambda u: (user_order_key(salt + u[0]), u[0]))
    chosen, events, over = [], 0, 0
    for user_id, n in ordered:
        if count and len(chosen) >= count:
            break
        if max_events and n > max_events:
            over += 1
            continue
        if max_events and events + n > max_events:
            break
        chosen.append(user_id)
        events += n
    if not chosen and ordered:  # the smallest (the first in the order of those)
        user_id, n = min(ordered, key=lambda u: u[1])
        chosen, events, over = [user_id], n, over - 1
    ids = None if len(chosen) == len(users) else frozenset(chosen)
    return UserSample(ids, len(chosen), events, len(users), sum(n for _, n in users), over)


def _check_writable(path: str) -> None:
    """Creates the folder of an output file and a file in it (removed at once), so that a
    file that cannot be written is said before the evaluation, not after it.

    Raises:
      OSError: the folder cannot be made or written.
    """
    folder = os.path.dirname(os.path.abspath(storage.link_target(path)))
    os.makedirs(folder, exist_ok=True)
    # (a short name: one made from the file's own name passed the 255-byte limit where the
    # file's did not, a traceback)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
        pass


def _baseline_name(text: str) -> str:
    """`--model`: a baseline's name; a neural model's gets where its figures come from."""
    import argparse

    from model import baselines, config as config_lib

    if text in baselines.NAMES:
        return text
    if text in config_lib.MODEL_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text} is trained, not fitted here: evaluate its run folder, --model-dir RUN "
            f"(python -m model.train --model {text} --model-dir RUN trains one)")
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                     f"{', '.join(map(repr, baselines.NAMES))})")


def main(argv: Sequence[str] | None = None, command: bool = False) -> int:
    """Command line: evaluate a trained run or a baseline; prints the metrics JSON.
    `command` (`python -m model.evaluate`): once the metrics are computed, Ctrl-C and
    SIGTERM are ignored (the files are written in moments, and an interrupt then would
    leave a half-replaced pair or say "no metrics were written" of written ones)."""
    from model import baselines

    parser = argtypes.Parser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0],
                     formatter_class=argtypes.DefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=argtypes.home_path,
                        help="folder written by `python -m pipeline`")
    parser.add_argument("--split", required=True, choices=EVAL_SPLITS,
                        help="valid to choose, test to report (once per model)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-dir", type=argtypes.tensorflow_folder,
                       help="a training run folder (python -m model.train)")
    which.add_argument("--model", type=_baseline_name, metavar="{%s}" % ",".join(baselines.NAMES),
                       help="a baseline, fitted here on the train split only: popularity (train "
                            "counts), sknn (V-SKNN session kNN), spop (counts in the session), "
                            "upop (the user's recency-weighted counts), mv (counts among the "
                            "user's last 10 events)")
    parser.add_argument("--no-remind", dest="remind", action="store_false",
                        help="with --model sknn: the session's own items get no neighbour "
                             "score (session-rec's remind=False), for logs where an item is "
                             "consumed once; choose it on --split valid")
    # (sizes are bounded as 32-bit, counts of users by islice's int64: --neighbour-sample
    # 10**30 was an OverflowError traceback, --max-users 10**30 islice's ValueError)
    size, count = argtypes.positive_size, argtypes.positive_count
    parser.add_argument("--neighbours", type=size, metavar="K",
                        help=f"with --model sknn: neighbour sessions per prediction (default "
                             f"{baselines.SKNN_K}); choose it on --split valid")
    parser.add_argument("--neighbour-sample", type=size, metavar="N",
                        help=f"with --model sknn: the neighbours are drawn from the N most "
                             f"recent train sessions sharing an item with the session so far "
                             f"(default {baselines.SKNN_SAMPLE_SIZE})")
    parser.add_argument("--checkpoint", choices=("best", "latest"),
                        help="with --model-dir: the best-on-valid weights (the latest when the "
                             "run never evaluated on valid; the default) or the latest")
    parser.add_argument("--output", type=argtypes.local_path,
                        help="write the metrics JSON here (atomically)")
    parser.add_argument("--per-user-output", metavar="FILE.npz", type=argtypes.local_path,
                        help="also write each user's events and metric sums here (for paired "
                             "significance tests between models, as model.compare does)")
    parser.add_argument("--batch-size", type=size, default=64,
                        help="users side by side")
    parser.add_argument("--max-users", type=count,
                        help="evaluate only the first N users (in the order of the files)")
    parser.add_argument("--sample-users", type=count, metavar="N",
                        help="evaluate N users chosen by a hash of their ids: the same users "
                             "for every model and pipeline run, not the first ones the files "
                             "hold (for a quicker figure on a large split)")
    parser.add_argument("--rule-out-current", action="store_true",
                        help="rank each event without the item its session is on among the "
                             "candidates, for any model (the pipeline collapses immediate "
                             "repeats, so it is never the next; HierTCN's default head rules "
                             "it out itself): a like-for-like comparison with it")
    parser.add_argument("--rule-out-seen", action="store_true",
                        help="rank each event without any item the user has had before "
                             "(earlier sessions and earlier in the session, the current item "
                             "included) among the candidates, for any model: the filter of "
                             "already-rated items for logs where an item is consumed once "
                             "(MovieLens); a repeat target counts as a miss")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.checkpoint and args.model:
        parser.error(f"--checkpoint applies to --model-dir, not to a baseline (--model "
                     f"{args.model} is fitted here)")
    for given, option in ((not args.remind, "--no-remind"), (args.neighbours, "--neighbours"),
                          (args.neighbour_sample, "--neighbour-sample")):
        if given and args.model != "sknn":
            parser.error(f"{option} is an option of --model sknn")
    if args.sample_users and args.max_users:
        parser.error("pass one of --sample-users and --max-users")
    if args.rule_out_seen and args.rule_out_current:
        parser.error("--rule-out-seen rules out the item the session is on as well: pass "
                     "one of --rule-out-seen and --rule-out-current")
    args.checkpoint = args.checkpoint or "best"
    if command:  # (full-catalogue scores over 32 MB a batch: no fresh pages every batch,
        # and one arena for TensorFlow's threads, whose blocks over 64 MB were mapped afresh)
        malloc.keep_freed_memory(one_arena=True)
    # TensorFlow loads once the command line and a local data folder are checked (their
    # errors are said at once), with its start-up notes held back where they are noise;
    # a remote folder is read through TensorFlow's file systems
    if schema.is_remote(args.data):
        quiet.import_tensorflow()
    user_errors: tuple[type[Exception], ...] = (schema.DataError, FileNotFoundError)
    result = per_user = run = None
    try:
        if not schema.is_folder(args.data):
            what = "is a file, not a folder" if os.path.isfile(args.data) else "no such folder"
            raise schema.DataError(f"--data {args.data}: {what} (pass the --output folder of "
                                   "`python -m pipeline`)")
        for option, path in (("--output", args.output),
                             ("--per-user-output", args.per_user_output)):
            if path and os.path.isdir(path):  # said now, not after the whole evaluation
                raise schema.DataError(f"{option} {path} is a folder: pass a file name")
            if path:
                _check_writable(path)
        if (args.output and args.per_user_output
                and os.path.abspath(args.output) == os.path.abspath(args.per_user_output)):
            raise schema.DataError(f"--per-user-output {args.per_user_output} is --output's "
                                   "file too: the one would replace the other; pass two names")
        code = code_digest()  # (of the code this process runs: read now, before a long run)
        catalogue = schema.read_vocabulary(args.data).num_items
        schema.shard_files(args.data, args.split)
        stats = schema.read_stats(args.data)
        users = stats.get("splits", {}).get(args.split, {}).get("users")
        older = schema.older_pipeline_note(args.data, stats)
        if older:
            print(older, file=sys.stderr)
        if users == 0:
            raise schema.DataError(f"the {args.split} split of {args.data} has no users (see "
                                   f"its {schema.STATS_FILE}): nothing to evaluate")
        if args.model_dir is not None and not os.path.isdir(args.model_dir):
            raise schema.DataError(f"--model-dir {args.model_dir}: no such folder; "
                                   "train one with `python -m model.train`")
        quiet.import_tensorflow(keras=args.model_dir is not None)
        if args.model_dir is not None:
            from model import config as config_lib, registry

            user_errors += (registry.RunError, config_lib.ConfigError)
            scorer = registry.load_scorer(args.model_dir, args.data, args.checkpoint)
            note = registry.training_note(args.model_dir, args.checkpoint)
            for said in (note, registry.older_config_note(args.model_dir)):
                if said:
                    print(said, file=sys.stderr)
            run = _run_identity(args.model_dir, scorer.model.restored_checkpoint, note)
        else:
            if stats.get("splits", {}).get("train", {}).get("events") == 0:
                # (every figure 0 with exit 0, where model.train refuses the folder)
                raise schema.DataError(f"the train split of {args.data} has no events (see its "
                                       f"{schema.STATS_FILE}): nothing to fit {args.model} on")
            sknn = ({"k": args.neighbours or baselines.SKNN_K,
                     "sample_size": args.neighbour_sample or baselines.SKNN_SAMPLE_SIZE}
                    if args.model == "sknn" else {})
            scorer = baselines.fit(args.model, args.data, remind=args.remind, **sknn)
        # the per-user sums go to a name of their own until the evaluation is done: a
        # failed or killed evaluation leaves the earlier pair as it was
        per_user = (None if not args.per_user_output else
                    f"{args.per_user_output}.partial-{os.getpid()}.npz")
        user_ids = None
        if args.sample_users:
            sample = sample_users(args.data, args.split, args.sample_users,
                                  salt=SAMPLE_SALT)
            user_ids = sample.ids
            print(f"evaluating {sample.users:,} of the {sample.all_users:,} {args.split} users "
                  f"({sample.events:,} of {sample.all_events:,} target events), chosen by a "
                  "hash of their ids", file=sys.stderr)
        result = evaluate(scorer, args.data, args.split, batch_size=args.batch_size,
                          max_users=args.max_users, user_ids=user_ids,
                          progress=not args.no_progress,
                          per_user_output=per_user,
                          rule_out_current=args.rule_out_current,
                          rule_out_seen=args.rule_out_seen)
        if command:
            from model import processes

            processes.ignore_stop_signals()
        _complete(result, args, sample if args.sample_users else None, code, run)
        note = heavy_user_note(result)
        if note:
            print(note, file=sys.stderr)
        if result["events"] and result.get("unknown_targets") == result["events"]:
            options = stats.get("options", {})
            print(f"note: every one of the {args.split} split's {result['events']:,} targets is "
                  "outside the training vocabulary (its items.tsv): the metrics are 0 for any "
                  "model, not a score"
                  + (" (a --min-item-count that kept no item of these?)"
                     if options.get("min_item_count", 5) > 1 else ""), file=sys.stderr)
        small = [k for k in metrics.KS if k >= catalogue]
        if result["events"] and small:  # (every known item within the cut-off: all hits)
            print(f"note: the catalogue holds {catalogue:,} item{'s' * (catalogue != 1)}, no "
                  f"more than the cut-off of recall@{small[0]}"
                  + (" and above" if len(small) > 1 else "")
                  + ": every item ranks within it for any model, so those recalls say "
                  "nothing of the ranking (the MRRs do)", file=sys.stderr)
        if not result["events"]:
            print(f"note: the {args.split} split has no event at position >= 2 to score (every "
                  "target session holds one item): the headline metrics are 0 by convention, "
                  "not a score; see first_item", file=sys.stderr)
        if per_user:
            if args.output and os.path.exists(args.output):
                # a pair: the old metrics go first, so a run that fails between putting the
                # new per-user file in place and writing the new metrics never leaves two
                # runs' files side by side
                os.remove(args.output)
            os.replace(per_user, args.per_user_output)
        if args.output:
            write_json(args.output, result)
    except user_errors as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        written = " and ".join(p for p in (args.per_user_output, args.output) if p)
        where = storage.path_error(e)
        reason = where or storage.reason_or_raise(e)
        if result is None and hasattr(e, "metrics"):  # (a per-user file that failed)
            result = _complete(e.metrics, args, sample if args.sample_users else None, code,
                               run)
        if result is not None:  # the metrics are not lost with the file: printed
            print(json.dumps(result, indent=2))
        print(f"{parser.prog}: error: cannot write {written or 'the results'}: {reason}"
              + ("; the metrics are printed above" if result is not None else ""),
              file=sys.stderr)
        return 2 if where else 1
    except Exception as e:
        if argtypes.interrupt_in_chain(e):  # a stop signal inside a TensorFlow call
            raise KeyboardInterrupt from None
        raise
    finally:
        if per_user and os.path.exists(per_user):  # (a failure before it was put in place)
            os.remove(per_user)
    print(json.dumps(result, indent=2))
    return 0


def _run_identity(model_dir: str, checkpoint: str, note: str | None) -> dict:
    """Which trained model the metrics are of (a scheduled evaluate after a killed training
    wrote metrics that nothing tied to a checkpoint): its run folder, checkpoint and step,
    and whether its training had finished (`note`: `registry.training_note`'s)."""
    from model import registry

    return {"model_dir": os.path.abspath(model_dir), "checkpoint": os.path.abspath(checkpoint),
            "step": registry.checkpoint_step(checkpoint), "training_finished": note is None}


def _complete(result: dict, args, sample, code, run: dict | None = None) -> dict:
    """The metrics as written and printed: with the run they are of (`_run_identity`; None:
    a baseline), the sample of users they cover (None: every user) and, for a file, the
    code's digest."""
    if run is not None:
        result["run"] = run
    if sample is not None:
        result["sample"] = {"users": sample.users, "of_users": sample.all_users,
                            "target_events": sample.events,
                            "of_target_events": sample.all_events}
    if args.output:
        result["code"] = code
    return result


if __name__ == "__main__":
    from model import processes

    _INTERRUPTED = "interrupted: no metrics were written (an earlier --output is as it was)"
    argtypes.survive_closed_output()  # (a full disk under `> log`: said at the end)
    argtypes.interrupts_in_one_line(_INTERRUPTED)
    argtypes.sigterm_until_handled()
    # (the metrics written and printed: a signal in the teardown changes nothing; and a
    # stop is said and ends the process at once: the interpreter's teardown waited up to a
    # minute for the TensorFlow call the stop left running)
    processes.exit_now(processes.interrupted_is(_INTERRUPTED, lambda: main(command=True)))
