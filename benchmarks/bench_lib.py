"""Shared parts of the training benchmarks (`train_speed`, `data_memory`, `scale`): the
synthetic data, the models at equal sizes, the real training step timed, FLOPs per event
from the layer shapes and the peak matmul rate of this machine.

Importing it puts the repository root on `sys.path`; `start` imports `model` (TensorFlow).
"""
from __future__ import annotations

import functools
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from pipeline.argtypes import non_negative_int, positive_float, positive_int  # noqa: E402,F401
from pipeline.argtypes import INT32_MAX, INT64_MAX, at_most, non_empty, number  # noqa: E402,F401
from pipeline.argtypes import positive_count  # noqa: E402
from pipeline.argtypes import Parser  # noqa: E402,F401 - one-line usage errors
from pipeline.synthetic import MAX_USERS  # noqa: E402

# argparse types of the benchmarks' sizes, bounded so that a value past what the code can
# hold is one usage line at once, not a traceback (or hours of work) after the start:
# synthetic users as `pipeline.synthetic --users` takes them, but at least 2: one user's
# sessions all fall in the pipeline's valid and test splits (its time split), and an empty
# train split has no batch to train on
user_count = number(int, 2, high=MAX_USERS)
# a tensor's dimension (batch rows, sessions, items per session, negatives, a catalogue):
# TensorFlow holds shapes in 32 bits
dimension = number(int, 1, high=INT32_MAX)
# steps (a Python count, which the training step's counter holds in 64 bits)
step_count = positive_count
non_negative_step_count = at_most(INT64_MAX, non_negative_int)
MODEL_NAMES = ("hiertcn", "hrnn", "gru4rec", "tcn")
HIDDEN = 128  # item embedding, every GRU layer and every TCN channel width
_START = time.perf_counter()


def session_range(text: str) -> tuple[int, int]:
    """MIN,MAX sessions per user, 1 <= MIN <= MAX, as `pipeline.synthetic --sessions` takes
    them (an argparse type: `data_memory.py --long-sessions`, `pipeline_throughput.py
    --sessions`)."""
    import argparse

    from pipeline import synthetic

    try:
        low, high = synthetic.parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 1 <= low <= high <= synthetic.MAX_SESSIONS:
        raise argparse.ArgumentTypeError(
            f"must be MIN,MAX with 1 <= MIN <= MAX <= {synthetic.MAX_SESSIONS:,}, got {text!r}")
    return low, high


def quick_values(parser, argv, args, **values) -> None:
    """--quick's small sizes, for the options the command line did not give (a value the
    user passed is kept)."""
    import argparse

    unset = object()  # argparse leaves a namespace's value where the command line gives none
    seen = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(values, unset)))
    for key, value in values.items():
        if getattr(seen, key) is unset:
            setattr(args, key, value)


def check_data(parser, option: str, data_dir: str) -> None:
    """A data folder the command line gave (`--data DIR`) is a pipeline output, checked
    before any other work: `parser.error` (one usage line) where it is not."""
    from model import cli as model_cli
    from pipeline import schema

    try:
        model_cli.check_data_folder(data_dir)  # (a file: "FILE/stats.json not found")
        schema.read_stats(data_dir)
        schema.read_vocabulary(data_dir)
    except schema.DataError as e:
        parser.error(f"{option}: {e}")


def check_log_size(parser, option: str, users: int, sessions: tuple[int, int] = (5, 30)) -> None:
    """A synthetic log of `users` users that `pipeline.synthetic` would hold in memory
    (its `MAX_LOG_EVENTS`), or `parser.error` naming `option`."""
    from pipeline import synthetic

    events = synthetic.expected_events(users, sessions)
    if events > synthetic.MAX_LOG_EVENTS:
        parser.error(f"{option} {users} makes a synthetic log of about {events:,} events, over "
                     f"the {synthetic.MAX_LOG_EVENTS:,} that pipeline.synthetic holds in memory")


def check_batch(parser, batch_size: int, sessions_per_batch: int, max_session_length: int) -> None:
    """A batch of at most 2**30 positions (B x S x L), as `model.train` takes (TensorFlow
    computes a batch's shapes in 32 bits), or `parser.error`."""
    positions = batch_size * sessions_per_batch * max_session_length
    if positions > 2**30:
        parser.error(f"--batch-size x --sessions-per-batch x --max-session-length must be at "
                     f"most 2**30 positions a batch, got {positions:,}")


def log(message: str) -> None:
    """Progress on stderr with the seconds since start (stdout ends with the JSON line)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def start(args, probe=None) -> bool:
    """The common start of a benchmark's `main`: makes the repository importable, imports
    `model` first (it sets TF_USE_LEGACY_KERAS before TensorFlow loads) and, in a
    `--probe` child process (`args.probe` set), prints `probe(args)` as its JSON line.

    Returns:
      True when this process was a probe and its work is done.
    """
    import json

    sys.path.insert(0, REPO)
    from model import malloc, quiet  # (the `model` package sets TF_USE_LEGACY_KERAS first)

    malloc.keep_freed_memory()  # as `model.train` and `model.evaluate` run
    quiet.import_tensorflow(keras=True)  # without its start-up notes
    # Every `Trainer` traces a step function of its own from `model.train`'s one Python
    # function, which TensorFlow's retracing detector reports as a retracing loop.
    import tensorflow as tf

    tf.get_logger().addFilter(
        lambda record: "triggered tf.function retracing" not in record.getMessage())

    if probe is not None and args.probe:
        print(json.dumps(probe(args)))
        return True
    return False


# Beam's runner in this process, for --quick's small logs: no worker processes to start
IN_MEMORY = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]


def make_synthetic(out_dir: str, users: int, max_events: int | None = None, seed: int = 0,
                   sessions: tuple[int, int] = (5, 30), in_memory: bool = False) -> dict:
    """Writes a `pipeline.synthetic` log and runs `python -m pipeline` on it.

    Args:
      out_dir: the pipeline output folder (created; the raw log goes beside it).
      users: synthetic users.
      max_events: stop the log after this many raw events.
      seed: generator seed.
      sessions: (fewest, most) sessions per user.
      in_memory: run Beam in this process (`IN_MEMORY`; small logs, --quick).

    Returns:
      The pipeline's stats.json.
    """
    import json

    from pipeline import synthetic

    log = out_dir.rstrip("/") + ".csv"
    synthetic.write_csv(log, synthetic.generate_arrays(users=users, seed=seed,
                                                        max_events=max_events, sessions=sessions))
    cmd = [sys.executable, "-m", "pipeline", "--input", log, "--output", out_dir, "--overwrite",
           *(IN_MEMORY if in_memory else [])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    os.remove(log)
    with open(os.path.join(out_dir, "stats.json"), encoding="utf-8") as f:
        return json.load(f)


def load_users(data_dir: str, split: str = "train") -> list[list[np.ndarray]]:
    """All users' sessions of a split, in memory (the benchmarks' data is small)."""
    from pipeline import schema

    return [u.sessions for u in schema.iter_users(data_dir, split)]


def model_config(name: str, loss: str, num_negatives: int):
    """The model's config at the benchmarks' common sizes: width 128 everywhere, a
    256-wide cross-session state for both hierarchical models (2 x 128 GRU layers; HierTCN
    as published, without the repeat head or dropout, in both loss settings alike), the
    flat TCN with 6 blocks of 128 channels (receptive field 253) over the last 256 tokens."""
    from model import registry

    common = {"embedding_dim": HIDDEN, "loss": loss, "num_negatives": num_negatives}
    extra = {"hiertcn": {"gru_units": HIDDEN, "gru_layers": 2, "channels": HIDDEN,
                         "repeat_head": False, "dropout": 0.0},
             "hrnn": {"session_units": HIDDEN, "user_units": HIDDEN, "user_layers": 2},
             "gru4rec": {"units": HIDDEN},
             "tcn": {"channels": [HIDDEN] * 6, "history_length": 256}}[name]
    return registry.config_classes()[name]().replace({**common, **extra})


def gru_flops(inputs: int, units: int) -> int:
    """Forward multiply-add FLOPs of one Keras GRU step (3 gates, input and recurrent
    kernels): 2 * 3 * (inputs + units) * units."""
    return 6 * (inputs + units) * units


def output_flops(d: int, vocab: int, loss: str, num_negatives: int) -> int:
    """Forward FLOPs of the output layer per event: full softmax 2 D V; sampled softmax
    2 D (negatives + 1) (the negatives are shared by the batch)."""
    return 2 * d * (vocab if loss == "softmax" else num_negatives + 1)


def flops_per_event(name: str, config, vocab: int, sessions_per_event: float,
                    reach: list[float] | None = None) -> float:
    """Training FLOPs per event from the layer shapes: 3 x the forward matmul FLOPs
    (backward = 2 x forward), useful work only (padding positions are not counted).

    Per event (one position of a session): HierTCN 2 E C (input projection) + sum over
    convs and taps 2 C_in C_out x the share of events the tap reaches (`reach`: a tap
    reading s positions back of an event at position < s reads the zero left padding, is
    not computed by the packed encoder and is not counted; all k taps without `reach`);
    GRU4Rec and HRNN one GRU step 6 (E + D) D; flat TCN per token
    the conv stack, with (1 + sessions/event) tokens per event (a separator per session),
    each tap likewise x the share of tokens it reaches (`reach`, `batch_stats`'
    `user_reach`: a tap reading s tokens back of a token among its user's first s reads
    the zero left padding; Keras's causal Conv1D computes it, but on padding);
    all plus the output layer. Per session (times `sessions_per_event`): HierTCN the
    high-level GRU (6 (in + units) units per layer) and the state projection 2 H C;
    HRNN the user GRU, the session init 2 H D and the session GRU's step over the
    session's last item (its output is no target's, but its state is the user GRU's
    input: [start, a1 .. am] is m + 1 steps for m events).
    """
    c = config
    out = output_flops(HIDDEN, vocab, c.loss, c.num_negatives)
    if name == "hiertcn":
        taps = c.num_blocks * c.kernel_size * conv_taps_reached(c, reach)
        per_event = 2 * c.embedding_dim * c.channels + c.convs_per_block * taps * (
            2 * c.channels * c.channels)
        state = c.gru_units * c.gru_layers
        per_session = (gru_flops(c.embedding_dim, c.gru_units)
                       + (c.gru_layers - 1) * gru_flops(c.gru_units, c.gru_units)
                       + 2 * state * c.channels)
    elif name == "hrnn":
        per_event = gru_flops(c.embedding_dim, c.session_units)
        state = c.user_units * c.user_layers
        per_session = (gru_flops(c.session_units, c.user_units)
                       + (c.user_layers - 1) * gru_flops(c.user_units, c.user_units)
                       + 2 * state * c.session_units
                       + gru_flops(c.embedding_dim, c.session_units))
    elif name == "gru4rec":
        per_event, per_session = gru_flops(c.embedding_dim, c.units), 0
    else:
        widths = [c.embedding_dim, *c.channels]
        taps = [c.kernel_size * conv_taps_reached(c, reach, blocks=[i])
                for i in range(len(c.channels))]
        per_token = sum(2 * taps[i] * widths[i] * widths[i + 1] * c.convs_per_block
                        + (2 * widths[i] * widths[i + 1] if widths[i] != widths[i + 1] else 0)
                        for i in range(len(c.channels)))
        per_event, per_session = per_token, per_token
    return 3.0 * (per_event + out + sessions_per_event * per_session)


def conv_taps_reached(config, reach: list[float] | None, blocks=None) -> float:
    """HierTCN (flat TCN): the mean over its causal-conv taps (block i reads j 2^i
    positions back, j < k) of the share of events (tokens) the tap reaches, from
    `batch_stats`' `reach` (`user_reach`); 1.0 without `reach` (every tap counted).
    `blocks`: these blocks' taps only (default all)."""
    if reach is None:
        return 1.0
    if blocks is None:
        blocks = range(config.num_blocks if hasattr(config, "num_blocks") else len(config.channels))
    shifts = [j * 2 ** i for i in blocks for j in range(config.kernel_size)]
    return sum(reach[s] if s < len(reach) else 0.0 for s in shifts) / len(shifts)


def peak_matmul_flops(sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 3.0) -> float:
    """Measured float32 matmul FLOP/s of this machine: the best of repeated square
    [n, n] x [n, n] `tf.matmul`s over `sizes` (all cores, oneDNN as configured),
    `seconds` in all. Several sizes, because the fastest one differs between machines
    (on a 2-core AVX2 VM: 1024 151, 2048 130, 3072 161 GFLOP/s); the best of them keeps
    MFU conservative."""
    import tensorflow as tf

    @tf.function
    def mm(x, y):
        return tf.reduce_sum(tf.matmul(x, y))

    best = 0.0
    for size in sizes:
        a = tf.random.normal([size, size])
        b = tf.random.normal([size, size])
        mm(a, b).numpy()
        end = time.perf_counter() + seconds / len(sizes)
        while True:
            t0 = time.perf_counter()
            mm(a, b).numpy()
            t1 = time.perf_counter()
            best = max(best, 2.0 * size ** 3 / (t1 - t0))
            if t1 >= end:
                break
    return best


def machine() -> dict:
    """What a figure was measured on: the CPU count, the CPU's model name and its widest
    vector instructions (matmul and GRU speeds, and so the models' ratios, differ between
    an AVX-512 and an AVX2 machine of the same core count)."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the count alone
        pass
    isa = next((x for x in ("amx_tile", "avx512f", "avx2", "avx") if x in flags), None)
    return {"cpus": os.cpu_count(), "cpu": name, "vector_isa": isa}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_optimizer(name: str | None = None):
    """The training loop's optimizer (`model.train.make_optimizer`; `name`: its
    `train.optimizer`, default the default) at a constant learning rate of 1e-3."""
    from model import config as config_lib
    from model import train as train_lib

    options = {"learning_rate": 1e-3, "lr_schedule": "constant"}
    if name:
        options["optimizer"] = name
    return train_lib.make_optimizer(config_lib.TrainConfig().replace(options), 1)


class Trainer:
    """One model and its real training step (`model.train.make_train_step`: loss, the
    optimizer's update (`model.train.make_optimizer`: the default lazy Adam, or `optimizer`),
    state cache carried without gradient), timed step by step."""

    def __init__(self, name: str, config, vocab: int, item_counts: np.ndarray, batch_size: int,
                 jit_compile: bool = False, packed: bool = True, optimizer: str | None = None,
                 longest_session: int | None = None, max_session_length: int = 20):
        import tensorflow as tf

        from model import registry
        from model import train as train_lib

        self.name = name
        cls = registry.MODELS[name] if packed else _padded_models()[name]
        self.model = cls(config, vocab, item_counts=item_counts)
        self.model.build_weights()
        if hasattr(self.model, "skip_chunk_context"):  # as `model.train` does, from the data
            self.model.skip_chunk_context(longest_session, max_session_length)
        optimizer = make_optimizer(optimizer)
        self.state = train_lib.TrainState(self.model.train_cache(batch_size))
        self.step_fn = train_lib.make_train_step(self.model, optimizer, self.state,
                                                 tf.distribute.get_strategy(), False, jit_compile)
        self.seconds, self.events, self.steps = 0.0, 0, 0

    def step(self, batch, timed: bool = True) -> int:
        """Runs one training step; returns its number of target events."""
        t0 = time.perf_counter()
        loss, n = self.step_fn(batch)
        n = int(n.numpy())
        float(loss.numpy())
        if timed:
            self.seconds += time.perf_counter() - t0
            self.events += n
            self.steps += 1
        return n

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.seconds, 1e-9)


@functools.lru_cache(maxsize=None)
def _padded_models() -> dict:
    """HierTCN with the base class's training encoder (`encode` on [B * S, L], then the
    gather at the targets): the padded computation the packed one replaces."""
    from model.hiertcn import HierTCN
    from model.sequence_model import SequenceModel

    class PaddedHierTCN(HierTCN):
        encode_events = SequenceModel.encode_events

    return {"hiertcn": PaddedHierTCN}


def prebuilt_batches(users, batch_size: int, sessions: int, length: int, count: int, seed: int = 0):
    """The first `count` batches of the queue generator as TF tensors (for timing the
    model without the input pipeline)."""
    import tensorflow as tf

    from model import batching

    from pipeline import schema

    batcher = batching.QueueBatcher(lambda: users, batch_size, sessions, length, seed=seed)
    out = []
    for _ in range(count):
        batch = batcher.next_batch()
        if batch is None:  # (an epoch without a session item: so are all the others)
            raise schema.DataError("the train split has no session items: no batch to train on")
        out.append({k: tf.constant(v) for k, v in batch.items()})
    return out


def batch_stats(batches, before=(), max_shift: int = 256) -> dict:
    """Events, non-empty slots, padding share, `reach` and `user_reach` of a list of
    batches.

    `reach[s]` is the share of events at position >= s of their slot (s = 0 .. L - 1):
    the events that a causal convolution tap reading s positions back reaches.
    `user_reach[s]` (s = 0 .. `max_shift`) is the same for the flat TCN's new tokens (the
    items, and a separator before each session's first chunk) over their user's token
    sequence: the share at position >= s of it. The positions are tracked from the first
    of `before` (the generator's batches before `batches`, from its first one, where each
    row starts a user) on.
    """
    events = sum(int(np.count_nonzero(b["items"].numpy())) for b in batches)
    slots = sum(int(np.count_nonzero(b["valid"].numpy())) for b in batches)
    cells = sum(int(np.prod(b["items"].shape)) for b in batches)
    at_position = sum(np.count_nonzero(b["items"].numpy() > 0, axis=(0, 1)) for b in batches)
    at_least = np.cumsum(np.asarray(at_position)[::-1])[::-1] if batches else []
    tokens_at_least = np.zeros(max_shift + 1)
    shifts = np.arange(max_shift + 1)
    done, opened = None, None  # the row's user's tokens so far; the row's session is open
    for i, b in enumerate([*before, *batches]):
        items, reset = b["items"].numpy(), b["reset"].numpy()
        end, valid = b["session_end"].numpy(), b["valid"].numpy()
        if done is None:
            done, opened = np.zeros(len(items), np.int64), np.zeros(len(items), bool)
        for s in range(items.shape[1]):  # as `model.tcn.FlatTCN.encode` builds the tokens
            done[reset[:, s]] = 0
            new = np.count_nonzero(items[:, s] > 0, axis=1) + (valid[:, s] & ~(opened & ~reset[:, s]))
            if i >= len(before):
                tokens_at_least += np.clip(done[:, None] + new[:, None] - shifts[None], 0,
                                           new[:, None]).sum(axis=0)
            done += new
            opened = np.where(valid[:, s], ~end[:, s], opened)
    return {"events": events, "slots": slots, "sessions_per_event": slots / max(events, 1),
            "padding_fraction": 1.0 - events / max(cells, 1),
            "reach": [float(x) / max(events, 1) for x in at_least],
            "user_reach": [float(x) / max(tokens_at_least[0], 1) for x in tokens_at_least]}


def run(main) -> int:
    """A benchmark's `main()`, its data errors (a --data that is not a pipeline's output, a
    failed probe process) one `error:` line on stderr (status 2) instead of a traceback."""
    from pipeline import schema

    try:
        return main()
    except schema.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
