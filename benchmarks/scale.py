"""HierTCN training throughput and peak memory as the number of users grows (issue 6).

Workload: a base population of synthetic users (`pipeline.synthetic --users 1000`, 300
with `--quick`) through `python -m pipeline`; a population of U users is the stream
user k = base user (k mod base), so every size has exactly the same per-user behaviour.
For each U (default 10k, 100k, 1M) a fresh process streams the U users lazily into the
real queue generator and its `tf.data` wrapper (`model.batching`), skips to the middle of
the stream (user U / 2, so the batches come from deep inside a U-user stream; the skip
walks the stream without keeping it), and runs HierTCN's real training step (`model.train`;
the published model, without the repeat head, at the benchmarks' common sizes, full
softmax) for a fixed number of steps after warm-up. Reported per size:
training events/s (generator included) and the process's peak RSS, each the mean (peak:
the max) of two processes run in the order small..large, large..small so that a drift in
machine load cancels; `memory_growth` = peak RSS at the largest size / at the smallest.

What it shows: nothing in training is per user (the state cache is per row of the batch,
the generator holds one user's pending sessions per row and a bounded shuffle buffer), so
cost per event and memory stay flat. What it does not: the pipeline run on U users (its
own benchmark is `benchmarks/pipeline_throughput.py`); the U users are not all trained on.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import bench_lib


def user_counts(text: str) -> list[int]:
    """`--sizes`: comma-separated user counts, each from 1 to `pipeline.synthetic`'s
    most users (a stream of more would take hours to walk to its middle)."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > bench_lib.MAX_USERS:
        raise argparse.ArgumentTypeError(
            f"every size must be from 1 to {bench_lib.MAX_USERS}, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"each size once, got {text!r}")
    return sorted(sizes)  # memory_growth and the rate ratio: the largest over the smallest


def parse_args(argv):
    p = bench_lib.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=user_counts, default="10000,100000,1000000",
                   help="users per size, comma-separated")
    p.add_argument("--base-users", type=bench_lib.user_count, default=1000,
                   help="synthetic users in the base population")
    p.add_argument("--data", type=bench_lib.non_empty,
                   help="pipeline folder of the base population (default: built)")
    p.add_argument("--steps", type=bench_lib.step_count, help="timed steps per size (default 40)")
    p.add_argument("--warmup", type=bench_lib.non_negative_step_count, default=3)
    p.add_argument("--repeats", type=int, choices=[1, 2], default=2,
                   help="processes per size (2: sizes in order, then in reverse)")
    p.add_argument("--quick", action="store_true", help="sizes 1k, 10k; few steps (< 2 min)")
    p.add_argument("--probe", type=bench_lib.number(int, 1, high=bench_lib.MAX_USERS),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.quick else 40
    if args.quick:
        bench_lib.quick_values(p, argv, args, sizes=[1000, 10000], base_users=300, warmup=1,
                               repeats=1)
    if args.data is None:
        bench_lib.check_log_size(p, "--base-users", args.base_users)
    elif args.probe is None:
        bench_lib.check_data(p, "--data", args.data)
    return args


def population(base, users: int):
    """The users factory of a U-user population: user k = base[k mod len(base)], lazily."""
    def users_factory():
        return (base[k % len(base)] for k in range(users))

    return users_factory


def probe(args) -> dict:
    """Trains HierTCN on the middle of a `args.probe`-user stream in this process."""
    import psutil

    from model import batching
    from model import config as config_lib
    from pipeline import schema

    tc = config_lib.TrainConfig()
    vocab = schema.read_vocabulary(args.data)
    base = bench_lib.load_users(args.data)
    batcher = batching.QueueBatcher(population(base, args.probe), tc.batch_size,
                                    tc.sessions_per_batch, tc.max_session_length, seed=0,
                                    shuffle_buffer=tc.shuffle_buffer)
    batcher.restore({"epoch": 0, "consumed": args.probe // 2, "finished": False,
                     "batch_index": 0, "rows": [[] for _ in range(tc.batch_size)]})
    trainer = bench_lib.Trainer("hiertcn", bench_lib.model_config("hiertcn", "softmax", 256),
                                vocab.size, vocab.counts, tc.batch_size,
                                longest_session=max((len(s) for u in base for s in u), default=0),
                                max_session_length=tc.max_session_length)
    # each step fetches its batch from the iterator, as `model.train`'s do
    it = iter(batching.make_dataset(batcher, tc.prefetch))
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.step(it, timed=False)
    skip_and_warmup = time.perf_counter() - t0
    start = time.perf_counter()
    events = sum(trainer.step(it) for _ in range(args.steps))
    seconds = time.perf_counter() - start
    return {"events_per_s": round(events / seconds), "peak_rss_mb": round(bench_lib.peak_rss_mb()),
            "rss_end_mb": round(psutil.Process().memory_info().rss / 2 ** 20),
            "skip_and_warmup_s": round(skip_and_warmup, 1), "events": events,
            "pending_slots": sum(len(r) for r in batcher.rows)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if bench_lib.start(args, probe):
        return 0
    sizes = args.sizes
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        data = args.data
        if data is None:
            bench_lib.log(f"base population: {args.base_users} synthetic users through the pipeline")
            data = os.path.join(tmp, "base")
            bench_lib.make_synthetic(data, args.base_users, in_memory=args.quick)
        runs = {}
        order = sizes + (sizes[::-1] if args.repeats == 2 else [])  # palindrome: drift cancels
        for users in order:
            bench_lib.log(f"{users} users")
            cmd = [sys.executable, os.path.abspath(__file__), "--probe", str(users), "--data", data,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"probe for {users} users failed:\n{proc.stderr[-3000:]}")
            runs.setdefault(str(users), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {size: {"events_per_s": round(sum(r["events_per_s"] for r in rs) / len(rs)),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": rs}
               for size, rs in runs.items()}
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    print(json.dumps({
        "benchmark": "scale", "sizes": results,
        "memory_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "events_per_s_ratio": round(large["events_per_s"] / small["events_per_s"], 3),
        "workload": {
            "users": sizes, "base": args.data or f"pipeline.synthetic --users {args.base_users} "
                                               "through the pipeline; user k = base user k mod base",
            "model": "hiertcn as published (no repeat head, dropout 0; the benchmarks' "
                     "common sizes, bench_lib.model_config), B=32, S=10, L=20, softmax",
            "timed_steps": args.steps,
            "warmup_steps": args.warmup, "start": "user U/2 of the stream",
            "processes_per_size": args.repeats,
            **bench_lib.machine()}}))
    return 0


if __name__ == "__main__":
    sys.exit(bench_lib.run(main))
