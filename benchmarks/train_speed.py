"""Training speed of HierTCN vs HRNN, GRU4Rec and the flat TCN, side by side (issue 6).

Workload: the train split of a pipeline folder (`--data DIR`, default: a fresh
`pipeline.synthetic` log of 2,300 users, ~210k train events, through `python -m pipeline`;
100 users and B = 16, S = 2 with `--quick`: HRNN's and GRU4Rec's first step traces one
recurrent loop per slot, over a second each on 2 cores). Every model trains on the same
queue-generator batches (B = 32 rows, S = 10 sessions, L = 20 items by default), at width
128 everywhere (see `bench_lib.model_config`), with the real training step of
`model.train` (Adam, state cache carried), in two output settings: full softmax over the
catalogue and sampled softmax with 256 negatives (drawn ∝ train count^0.5, the default).
After warm-up (tracing) steps, the models take turns in rounds over the same pre-built
batches, so machine noise hits all of them alike.

Reported per setting and model: training events/s (target events per second of step
time), FLOPs per event (3 x forward matmul FLOPs from the layer shapes, padding not
counted, nor the causal-conv taps that read the zero left padding: of a slot for
HierTCN (its packed encoder skips them), of the user's token sequence for the flat TCN
(computed, on padding); formula in `bench_lib.flops_per_event`) and MFU = events/s x FLOPs per event /
the peak float32 matmul FLOP/s measured in the same run (the best square `tf.matmul`
of three sizes, at the start and at the end of the run). The speed
choices are measured on HierTCN in the sampled setting: packed events vs the padded
[B * S, L] encoder, XLA (`jit_compile`, padded fixed shapes), bfloat16 mixed precision,
oneDNN off and on (subprocesses with TF_ENABLE_ONEDNN_OPTS=0 / 1), one thread per op
(a subprocess with TF_NUM_INTRAOP_THREADS=1), and input from the tf.data queue
generator (each step fetching its batch from the dataset's iterator inside the compiled
step, as `model.train`'s do) vs from pre-built batches on the same batches (pairs of blocks of 10 steps,
the pre-built block first in half of them, `--input-pairs` pairs over the spans of the
timed batches; `generator_overhead` is the median of the pairs' ratios, with a bootstrap
95% interval, `generator_overhead_total` the ratio of the sums): `input` with the train
split in memory (as `model.train` keeps one of up to train.cache_events events, this one),
`input_streamed` with it read from its files on every pass (a larger split).

Large catalogue (`large_catalogue`): HierTCN and HRNN in the sampled setting with the
item tables grown to `--catalogue` items (default 500,000; the vocabulary padded with
unseen long-tail items of train count 1, so the batches and the sequence models are the
same and only the embedding and output tables grow), with the default optimizer (lazy
Adam: a table's rows are updated only when in the step's sparse gradient) and with
Keras's Adam (`train.optimizer` = `adam`: every row and both moments every step).

The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import bench_lib
from pipeline.synthetic import MAX_ITEMS

SETTINGS = ("softmax", "sampled")


def parse_args(argv):
    p = bench_lib.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=bench_lib.non_empty,
                   help="pipeline output folder (default: a fresh synthetic log)")
    p.add_argument("--quick", action="store_true", help="small data and few steps (< 2 min)")
    p.add_argument("--users", type=bench_lib.user_count, default=2300,
                   help="synthetic users without --data")
    p.add_argument("--steps", type=bench_lib.step_count,
                   help="timed steps per model and setting (default 120)")
    p.add_argument("--rounds", type=bench_lib.positive_int,
                   help="turns the timed steps are split into (default 6)")
    p.add_argument("--warmup", type=bench_lib.non_negative_step_count, default=3,
                   help="untimed steps first (tracing)")
    p.add_argument("--batch-size", type=bench_lib.dimension, default=32)
    p.add_argument("--sessions-per-batch", type=bench_lib.dimension, default=10)
    p.add_argument("--max-session-length", type=bench_lib.dimension, default=20)
    p.add_argument("--num-negatives", type=bench_lib.dimension, default=256)
    # (the item tables of this many rows, 128 wide, and their optimizer's moments)
    p.add_argument("--catalogue", type=bench_lib.number(int, 1, high=MAX_ITEMS),
                   help="items of the large-catalogue setting (default 500,000; 20,000 with --quick)")
    p.add_argument("--input-pairs", type=bench_lib.step_count,
                   help="pairs of 10-step blocks of the input measurement (default 48; "
                        "2 with --quick)")
    p.add_argument("--probe", action="store_true",
                   help="only HierTCN, sampled: print its events/s (used for the oneDNN run)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 6 if args.quick else 120
    if args.rounds is None:
        args.rounds = 1 if args.quick else 6
    if args.steps < args.rounds:  # (each round times steps // rounds of them)
        p.error(f"--steps {args.steps} must be at least --rounds {args.rounds}")
    if args.input_pairs is None:
        args.input_pairs = 2 if args.quick else 48
    if args.catalogue is None:
        args.catalogue = 20_000 if args.quick else 500_000
    if args.quick:  # small geometry: the point is that the script runs, not the figures
        # (S = 2: each slot of HRNN and GRU4Rec costs over a second of tracing per setting)
        bench_lib.quick_values(p, argv, args, users=100, warmup=1, batch_size=16,
                               sessions_per_batch=2)
    bench_lib.check_batch(p, args.batch_size, args.sessions_per_batch, args.max_session_length)
    if args.data is None:
        bench_lib.check_log_size(p, "--users", args.users)
    else:  # a bad folder is said here, before TensorFlow's start
        bench_lib.check_data(p, "--data", args.data)
    return args


class Bench:
    """The data and geometry one run measures on."""

    def __init__(self, args, data_dir: str):
        from model import batching
        from model import config as config_lib
        from pipeline import schema

        self.args = args
        vocab = schema.read_vocabulary(data_dir)
        self.vocab_size, self.counts = vocab.size, vocab.counts
        self.train_events = schema.read_stats(data_dir)["splits"]["train"]["events"]
        # The training loop's users factory (`model.train` builds the same): one pass here
        # reads the users and, for a split within train.cache_events, fills its cache.
        self.train_users = batching.CachedUsers(data_dir, "train",
                                                config_lib.TrainConfig().cache_events)
        users = list(self.train_users())
        # (the input measurement runs the generator `lead` batches ahead of its timed ones)
        self.lead = batching.dataset_lead(config_lib.TrainConfig().prefetch)
        self.batches = bench_lib.prebuilt_batches(
            users, args.batch_size, args.sessions_per_batch, args.max_session_length,
            args.warmup + args.steps + self.lead)
        # (of the timed batches only: `lead` more are built for the input measurement)
        timed = args.warmup + (args.steps // args.rounds) * args.rounds
        self.stats = bench_lib.batch_stats(self.batches[args.warmup:timed],
                                           before=self.batches[:args.warmup])

    def trainer(self, name: str, loss: str, vocab_size: int | None = None,
                **kwargs) -> bench_lib.Trainer:
        """`name` at the common sizes; `vocab_size` > the data's pads the vocabulary with
        unseen items of count 1."""
        import numpy as np

        config = bench_lib.model_config(name, loss, self.args.num_negatives)
        vocab, counts = self.vocab_size, self.counts
        if vocab_size and vocab_size > vocab:
            vocab, counts = vocab_size, np.concatenate(
                [counts, np.ones(vocab_size - len(counts), counts.dtype)])
        return bench_lib.Trainer(name, config, vocab, counts, self.args.batch_size,
                                 longest_session=self.train_users.longest_session(),
                                 max_session_length=self.args.max_session_length, **kwargs)

    def run(self, trainers: dict) -> dict:
        """Warm-up, then the timed steps in rounds of turns; returns events/s per name."""
        w, steps, rounds = self.args.warmup, self.args.steps, self.args.rounds
        bench_lib.log(f"warm-up of {', '.join(trainers)}")
        for t in trainers.values():
            for batch in self.batches[:w]:
                t.step(batch, timed=False)
        per_round = max(1, steps // rounds)
        bench_lib.log(f"{rounds} round(s) of {per_round} timed steps each")
        for r in range(rounds):
            for t in trainers.values():
                for batch in self.batches[w + r * per_round:w + (r + 1) * per_round]:
                    t.step(batch)
        return {name: t.events_per_s for name, t in trainers.items()}


def generator_overhead(bench: Bench, trainer: bench_lib.Trainer, users, batches) -> dict:
    """Step time per event from pre-built `batches` vs from the tf.data queue generator over
    the users factory `users` (`model.train`'s input), on the same batches, in
    pairs of blocks of 10 steps, each step timed from the fetch of its batch to the end of
    the step (so a generator that cannot keep up shows as waiting for its batch); the
    generator's steps fetch their batch from the dataset's iterator inside the compiled
    step, as `model.train`'s do (`model.train.make_train_step`). Before a
    timed generator block, the generator has fed as many untimed steps as it can run ahead
    (`batching.dataset_lead`): its buffer is then as full as in a long run, not filled
    while the process idled; the pre-built block gets the same untimed run-in on the same
    batches, so that both start equally warm. A fresh generator per pair; which block goes
    first alternates, half of the pairs each way, so that the machine's drift and an order
    effect hit both alike; the overhead is the median over pairs of the generator block's
    time per event over the pre-built block's (its 95% interval: the 2.5th and 97.5th
    percentiles of the median over 2,000 resamples of the pairs). The pairs cycle over the
    spans of `per` timed batches, each span as often first as second (with an even number
    of spans and of passes)."""
    import numpy as np

    from model import batching

    a = bench.args
    w, lead = a.warmup, bench.lead
    k = min(a.steps, len(batches) - w - lead)
    per = min(10, k)
    spans = max(1, k // per)  # distinct spans of `per` batches
    times = {"prebuilt": [0.0, 0], "generator": [0.0, 0]}
    ratios = []

    def timed(source, key, block):
        """`per` steps, on the batches of a list or of a dataset iterator (fetched by the step)."""
        batches = iter(source) if isinstance(source, list) else None
        for _ in range(per):
            t0 = time.perf_counter()
            n = trainer.step(next(batches) if batches is not None else source, timed=False)
            block[key][0] += time.perf_counter() - t0
            block[key][1] += n

    for i in range(max(a.input_pairs, 1)):
        span, rep = i % spans, i // spans
        start = w + span * per
        block = {"prebuilt": [0.0, 0], "generator": [0.0, 0]}
        batcher = batching.QueueBatcher(users, a.batch_size, a.sessions_per_batch,
                                        a.max_session_length, seed=0)
        it = iter(batching.make_dataset(batcher))
        for _ in range(start):  # the batches before the run-in: fetched, not stepped
            next(it)
        # even passes over the spans put the pre-built block first in their even spans,
        # odd passes in their odd ones: each span as often each way, half of the pairs each
        order = ["prebuilt", "generator"]
        for key in (order if (span + rep) % 2 == 0 else order[::-1]):
            # the generator's thread refills its buffer, so that none of it runs into the
            # next block (the run-in below then sets the buffer to its steady state)
            time.sleep(0.2)
            if key == "prebuilt":  # the same run-in, so that both blocks start as warm
                for batch in batches[start:start + lead]:
                    trainer.step(batch, timed=False)
                timed(batches[start + lead:start + lead + per], key, block)
                continue
            for j in range(lead):
                if i == 0 and j == 0:  # (one batch fetched here, to check it)
                    batch = next(it)
                    if not np.array_equal(batch["items"].numpy(), batches[start]["items"].numpy()):
                        raise SystemExit("the generator's batches are not the pre-built ones")
                    trainer.step(batch, timed=False)
                    continue
                trainer.step(it, timed=False)
            timed(it, key, block)
        del it
        for key, (sec, n) in block.items():
            times[key][0] += sec
            times[key][1] += n
        ratios.append((block["generator"][0] / block["generator"][1])
                      / (block["prebuilt"][0] / block["prebuilt"][1]))
    per_event = {key: sec / max(n, 1) for key, (sec, n) in times.items()}
    rng = np.random.default_rng(0)
    medians = np.median(np.asarray(ratios)[rng.integers(len(ratios), size=(2000, len(ratios)))],
                        axis=1)
    return {"prebuilt_us_per_event": round(1e6 * per_event["prebuilt"], 2),
            "generator_us_per_event": round(1e6 * per_event["generator"], 2),
            "generator_overhead": round(float(np.median(ratios)) - 1, 4),
            "generator_overhead_ci95": [round(float(q) - 1, 4)
                                        for q in np.percentile(medians, [2.5, 97.5])],
            "pairs": len(ratios),
            "generator_overhead_total": round(per_event["generator"] / per_event["prebuilt"] - 1, 4),
            "generator_overhead_blocks": [round(r - 1, 3) for r in ratios]}


def large_catalogue(bench: Bench) -> dict:
    """HierTCN vs HRNN (sampled) with `--catalogue` items, per optimizer."""
    v = max(bench.args.catalogue, bench.vocab_size)
    out = {"vocab_size": v}
    # (--quick: the lazy Adam only, the default; each pair costs two traces)
    optimizers = ("lazy_adam",) if bench.args.quick else ("lazy_adam", "adam")
    out.update({"adam": None, "hiertcn_lazy_vs_adam": None})
    for optimizer in optimizers:
        bench_lib.log(f"large catalogue ({v} items), {optimizer}")
        trainers = {name: bench.trainer(name, "sampled", v, optimizer=optimizer)
                    for name in ("hiertcn", "hrnn")}
        rates = bench.run(trainers)
        out[optimizer] = {"hiertcn_events_per_s": round(rates["hiertcn"]),
                          "hrnn_events_per_s": round(rates["hrnn"]),
                          "hiertcn_vs_hrnn": round(rates["hiertcn"] / rates["hrnn"], 2)}
        del trainers  # the tables of one pair at a time
    if out["adam"]:
        out["hiertcn_lazy_vs_adam"] = round(out["lazy_adam"]["hiertcn_events_per_s"]
                                            / out["adam"]["hiertcn_events_per_s"], 2)
    return out


def speed_choices(bench: Bench, data_dir: str) -> dict:
    """HierTCN (sampled) events/s under each speed choice, measured in turns."""
    import tensorflow as tf

    from model import batching

    quick = bench.args.quick
    variants = {"packed": bench.trainer("hiertcn", "sampled"),
                "padded": bench.trainer("hiertcn", "sampled", packed=False)}
    if not quick:
        variants["padded_xla"] = bench.trainer("hiertcn", "sampled", jit_compile=True)
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            variants["packed_bfloat16"] = bench.trainer("hiertcn", "sampled")
        finally:
            tf.keras.mixed_precision.set_global_policy("float32")
    out = {k: round(v) for k, v in bench.run(variants).items()}
    bench_lib.log("input: generator vs pre-built")
    out["input"] = generator_overhead(bench, variants["packed"], bench.train_users,
                                      bench.batches)
    # A split over train.cache_events is read from its files on every pass, in the
    # generator's thread (in file order: the pre-built batches of this one are built from
    # that order).
    bench_lib.log("input: generator over the split streamed from its files vs pre-built")
    streamed = batching.CachedUsers(data_dir, "train", 0)
    a = bench.args
    out["input_streamed"] = generator_overhead(
        bench, variants["packed"], streamed, bench_lib.prebuilt_batches(
            list(streamed()), a.batch_size, a.sessions_per_batch, a.max_session_length,
            len(bench.batches)))
    for key in ("padded_xla", "packed_bfloat16", "onednn_off", "onednn_on", "intra_op_1"):
        out.setdefault(key, None)  # skipped by --quick (each costs a trace or a process)
    if not quick:
        bench_lib.log("oneDNN and thread-pool probes")
        out["onednn_off"] = _probe(bench.args, data_dir, {"TF_ENABLE_ONEDNN_OPTS": "0"})
        out["onednn_on"] = _probe(bench.args, data_dir, {"TF_ENABLE_ONEDNN_OPTS": "1"})
        # one thread per op (TensorFlow's default: all cores), ops still run side by side
        out["intra_op_1"] = _probe(bench.args, data_dir, {"TF_NUM_INTRAOP_THREADS": "1"})
    return out


def _probe(args, data_dir: str, env: dict) -> float:
    """HierTCN sampled events/s in a fresh process with `env` (for process-wide switches)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", "--data", data_dir,
           "--steps", str(args.steps), "--rounds", "1", "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--sessions-per-batch", str(args.sessions_per_batch),
           "--max-session-length", str(args.max_session_length),
           "--num-negatives", str(args.num_negatives)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(f"probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["events_per_s"]


def measure(args, data_dir: str) -> dict:
    bench = Bench(args, data_dir)
    bench_lib.log(f"{len(bench.batches)} batches ready")
    if args.probe:
        rate = bench.run({"hiertcn": bench.trainer("hiertcn", "sampled")})["hiertcn"]
        return {"events_per_s": round(rate)}
    peak_seconds = 1.0 if args.quick else 3.0
    # The peak is measured at the start and at the end of the run and the higher one
    # counts: a VM's slow spell during one measurement would otherwise inflate every MFU.
    peaks = [bench_lib.peak_matmul_flops(seconds=peak_seconds)]
    result = {"benchmark": "train_speed"}
    rates, flops = {}, {}
    for loss in SETTINGS:
        trainers = {name: bench.trainer(name, loss) for name in bench_lib.MODEL_NAMES}
        rates[loss] = bench.run(trainers)
        flops[loss] = {name: bench_lib.flops_per_event(
            name, t.model.config, bench.vocab_size, bench.stats["sessions_per_event"],
            {"hiertcn": bench.stats["reach"], "tcn": bench.stats["user_reach"]}.get(name))
            for name, t in trainers.items()}
        del trainers
    result["large_catalogue"] = large_catalogue(bench)
    choices = speed_choices(bench, data_dir)
    peaks.append(bench_lib.peak_matmul_flops(seconds=peak_seconds))
    peak = max(peaks)
    for loss in SETTINGS:
        r = rates[loss]
        models = {name: {"events_per_s": round(r[name]), "flops_per_event": round(fpe),
                         "mfu": round(r[name] * fpe / peak, 4)}
                  for name, fpe in flops[loss].items()}
        result[loss] = {"hiertcn_vs_hrnn": round(r["hiertcn"] / r["hrnn"], 2),
                        "hiertcn_vs_gru4rec": round(r["hiertcn"] / r["gru4rec"], 2),
                        "hiertcn_vs_tcn": round(r["hiertcn"] / r["tcn"], 2),
                        "mfu": models["hiertcn"]["mfu"], "models": models}
    result["choices_sampled_hiertcn_events_per_s"] = choices
    result["peak_matmul_gflops"] = round(peak / 1e9, 1)
    result["peak_matmul_gflops_start_end"] = [round(p / 1e9, 1) for p in peaks]
    a = args
    result["workload"] = {
        "data": data_dir if a.data else f"pipeline.synthetic --users {a.users} through the pipeline",
        "train_events": bench.train_events, "vocab_size": bench.vocab_size,
        "batch": [a.batch_size, a.sessions_per_batch, a.max_session_length],
        "timed_steps_per_model": (a.steps // a.rounds) * a.rounds, "warmup_steps": a.warmup,
        "padding_fraction": round(bench.stats["padding_fraction"], 3),
        "sessions_per_event": round(bench.stats["sessions_per_event"], 4),
        "hiertcn_conv_taps_reached": round(bench_lib.conv_taps_reached(
            bench_lib.model_config("hiertcn", "sampled", a.num_negatives), bench.stats["reach"]), 3),
        "tcn_conv_taps_reached": round(bench_lib.conv_taps_reached(
            bench_lib.model_config("tcn", "sampled", a.num_negatives), bench.stats["user_reach"]), 3),
        "num_negatives": a.num_negatives, "width": bench_lib.HIDDEN, **bench_lib.machine()}
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_lib.start(args)

    if args.data is not None:
        result = measure(args, args.data)
    else:
        with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
            data = os.path.join(tmp, "data")
            bench_lib.log(f"synthetic log of {args.users} users through the pipeline")
            bench_lib.make_synthetic(data, args.users, in_memory=args.quick)
            result = measure(args, data)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(bench_lib.run(main))
