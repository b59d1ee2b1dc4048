"""Data memory of HierTCN vs a flat TCN over the user's whole history (issue 6).

Data memory = the bytes of the input tensors (and cached state) that must be resident to
train on one batch. Both models see the same users, in the queue generator's order,
B = 32 at a time:

* HierTCN: one queue-generator batch (`items` int64 [B, S, L] and the bool flags
  [B, S]) plus the state cache carried between batches (`HierTCN.train_cache`: state
  [B, H] float32, the running AGG sum [B, E] and count [B], and the chunk context, each
  row's last `receptive_field` session items, int64 [B, K]); the same for every batch,
  whatever the users' history lengths.
* HierTCN with the repeat head (the default model; `hiertcn_repeat_head_bytes`, beside
  the headline): also each row's last N = 200 items (`history` int64 [B, N]) and the
  start items in the state and cache (float32 [B, R + 2]).
* Flat TCN as the paper's baseline trains it: each batch of B users is one int64
  [B, N] tensor of their whole train histories (items plus one separator per session),
  N = the longest history in the batch, truncated at `--truncation` (default: none, i.e.
  whole histories). Reported as the mean over the batches of those users.
* The same whole-history batches with each history cut at the TCN baseline's last
  `history_length` = 256 tokens (`tcn_truncated_bytes`; issue 6's "up to the same
  truncation as the TCN baseline" read literally): a TCN that never sees further back.
* Flat TCN as `model/tcn.py` trains it here (streaming, for comparison): the same
  queue batch with one separator per slot plus the cached last `history_length` = 256
  tokens per row: B x (N + S (L + 1)) int64. It is not the paper's setting: it trades the
  whole-history input for recomputing the cached history every step.

`data_memory_reduction` = 1 - HierTCN / whole-history flat TCN, per data set (the headline
figure: the ml-1m pipeline output; beside it the default synthetic log and a long-history
synthetic log, the same generator with `--sessions 400,600` (about 3,500 events per user,
the scale of the paper's XING and Pinterest histories)), and
`width_for_90_percent`: the mean whole-history batch width N at which the reduction
reaches 90% (HierTCN bytes / (0.1 x 8 B)). Peak process
memory: a fresh process per model runs a fixed number of training steps (HierTCN and the
streaming flat TCN through `model.train`'s step on queue batches; the whole-history flat
TCN on its [B, N] batches with the same blocks and loss) and reports its peak RSS and the
RSS before the first step.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import bench_lib

ML1M = os.path.join(os.path.dirname(bench_lib.REPO), "shared", "data", "ml-1m")
PROBES = ("hiertcn", "tcn_streaming", "tcn_whole_history")


def parse_args(argv):
    p = bench_lib.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--ml1m", type=bench_lib.non_empty,
                   help="pipeline output of ml-1m (default: built from ../shared/data/ml-1m; "
                        "--quick: its first 30,000 rows)")
    p.add_argument("--synthetic", type=bench_lib.non_empty,
                   help="pipeline output of a synthetic log (default: built)")
    p.add_argument("--quick", action="store_true", help="small data, few steps (< 2 min)")
    p.add_argument("--users", type=bench_lib.user_count, default=2000,
                   help="synthetic users when built")
    p.add_argument("--long-users", type=bench_lib.user_count, default=200,
                   help="users of the long-history synthetic log when built")
    p.add_argument("--long-sessions", type=bench_lib.session_range, default="400,600", metavar="MIN,MAX",
                   help="sessions per user of the long-history synthetic log")
    p.add_argument("--batch-size", type=bench_lib.dimension, default=32)
    p.add_argument("--sessions-per-batch", type=bench_lib.dimension, default=10)
    p.add_argument("--max-session-length", type=bench_lib.dimension, default=20)
    p.add_argument("--truncation", type=bench_lib.at_most(bench_lib.INT32_MAX,
                                                          bench_lib.non_negative_int), default=0,
                   help="flat TCN history cap in tokens (0: whole histories)")
    p.add_argument("--steps", type=bench_lib.step_count,
                   help="training steps of each peak-memory probe (default 20)")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.quick:
        bench_lib.quick_values(p, argv, args, users=150, long_users=8)
    bench_lib.check_batch(p, args.batch_size, args.sessions_per_batch, args.max_session_length)
    if args.probe is None:
        if args.data is not None:  # (the probes' own option)
            p.error("unrecognized arguments: --data (the data folders are --ml1m DIR and "
                    "--synthetic DIR)")
        # the given folders before the minutes of building the others (a bad one was said
        # only when it was read, after them)
        for option, data_dir in (("--ml1m", args.ml1m), ("--synthetic", args.synthetic)):
            if data_dir is not None:
                bench_lib.check_data(p, option, data_dir)
        if args.synthetic is None:
            bench_lib.check_log_size(p, "--users", args.users)
        bench_lib.check_log_size(p, "--long-users", args.long_users, args.long_sessions)
    return args


def history_tokens(sessions) -> int:
    """Tokens of a user's whole history for the flat TCN: items + one separator per session."""
    return sum(len(s) + 1 for s in sessions)


def whole_history_batches(users, batch_size: int, truncation: int) -> list[int]:
    """N (padded width) of each [B, N] whole-history batch, users in the given order."""
    widths = []
    for k in range(0, len(users), batch_size):
        n = max(history_tokens(u) for u in users[k:k + batch_size])
        widths.append(min(n, truncation) if truncation else n)
    return widths


def data_memory(users, args) -> dict:
    """Bytes per batch of each model's resident input tensors (see the module docstring)."""
    from model.config import HierTCNConfig

    b, s, l = args.batch_size, args.sessions_per_batch, args.max_session_length
    cfg = bench_lib.model_config("hiertcn", "softmax", 256)
    state_floats = cfg.gru_units * cfg.gru_layers + cfg.embedding_dim + 1
    context = b * cfg.receptive_field * 8 if cfg.chunk_context else 0
    hier = b * s * l * 8 + 3 * b * s + b * state_floats * 4 + context
    widths = whole_history_batches(users, b, args.truncation)
    flat = 8 * b * float(np.mean(widths))
    tcn_cfg = bench_lib.model_config("tcn", "softmax", 256)
    streaming = 8 * b * (tcn_cfg.history_length + s * (l + 1)) + 3 * b * s + b
    # the same batches with each history cut at the TCN baseline's last N tokens
    truncated = 8 * b * float(np.mean(whole_history_batches(users, b, tcn_cfg.history_length)))
    lengths = [history_tokens(u) for u in users]
    # The default model (repeat head) also carries each row's last N items (`history`
    # [B, N] int64) and its start items in the state, plus the unfinished session's first
    # item in the cache ([B, 2] float32).
    head = HierTCNConfig()
    head_bytes = hier + b * head.history_size * 8 + b * (head.start_items + 2) * 4
    return {"hiertcn_bytes": hier, "tcn_whole_history_bytes": round(flat),
            "tcn_streaming_bytes": streaming,
            "data_memory_reduction": round(1 - hier / flat, 4),
            "hiertcn_repeat_head_bytes": head_bytes,
            "reduction_repeat_head": round(1 - head_bytes / flat, 4),
            "reduction_vs_streaming_tcn": round(1 - hier / streaming, 4),
            "tcn_truncated_bytes": round(truncated),
            "reduction_vs_truncated_tcn": round(1 - hier / truncated, 4),
            "users": len(users), "history_tokens_mean": round(float(np.mean(lengths)), 1),
            "history_tokens_max": int(max(lengths)), "whole_history_width_mean": round(float(np.mean(widths)), 1),
            "width_for_90_percent": round(hier / (0.1 * 8 * b))}


def probe(args) -> dict:
    """One model's training steps in this (fresh) process; RSS before and peak after."""
    import psutil
    import tensorflow as tf

    from pipeline import schema

    vocab = schema.read_vocabulary(args.data)
    users = bench_lib.load_users(args.data)
    b = args.batch_size
    if args.probe == "tcn_whole_history":
        config = bench_lib.model_config("tcn", "softmax", 256)
        trainer = bench_lib.Trainer("tcn", config, vocab.size, vocab.counts, b)
        step = whole_history_step(trainer.model, bench_lib.make_optimizer())
        batches = []
        for k in range(0, min(len(users), b * args.steps), b):
            tokens = [np.concatenate([[trainer.model.sep, *s] for s in u]) for u in users[k:k + b]]
            if args.truncation:
                tokens = [t[-args.truncation:] for t in tokens]
            width = max(len(t) for t in tokens)
            batches.append(tf.constant(np.stack([np.pad(t, (0, width - len(t))) for t in tokens]),
                                       tf.int64))
    else:
        name = "hiertcn" if args.probe == "hiertcn" else "tcn"
        trainer = bench_lib.Trainer(name, bench_lib.model_config(name, "softmax", 256),
                                    vocab.size, vocab.counts, b)
        step = trainer.step
        batches = bench_lib.prebuilt_batches(users, b, args.sessions_per_batch,
                                             args.max_session_length, args.steps)
    before = psutil.Process().memory_info().rss / 2 ** 20
    for batch in batches:
        step(batch)
    return {"rss_before_steps_mb": round(before), "peak_rss_mb": round(bench_lib.peak_rss_mb()),
            "steps": len(batches)}


def whole_history_step(model, optimizer):
    """A flat TCN training step on whole histories [B, N] (the paper's setting): the TCN's
    blocks over every token, the loss at every next item (separators and padding are not
    targets), Adam."""
    import tensorflow as tf

    optimizer.build(model.trainable_variables)  # (as `model.train.make_train_step` does)

    @tf.function
    def step(tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with tf.GradientTape() as tape:
            x = model.item_embedding(inputs)
            for block in model.blocks:
                x = block(x, training=True)
            where = tf.where((targets > 0) & (targets != model.sep))
            item_vectors, bias = model.output_weights()
            per_event = model.loss_fn(tf.gather_nd(x, where), tf.gather_nd(targets, where),
                                      item_vectors, bias, True)
            loss = tf.reduce_mean(per_event)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return lambda batch: float(step(batch).numpy())


def run_probe(name: str, data_dir: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", name, "--data", data_dir,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--sessions-per-batch", str(args.sessions_per_batch),
           "--max-session-length", str(args.max_session_length),
           "--truncation", str(args.truncation)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"probe {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ml1m_data(tmp: str, quick: bool) -> str:
    """Runs the pipeline on ../shared/data/ml-1m (quick: the train file's first 30,000 rows)."""
    out = os.path.join(tmp, "ml1m")
    inputs = [os.path.join(ML1M, "ml-1m.train.rating"), os.path.join(ML1M, "ml-1m.test.rating")]
    if quick:
        head = os.path.join(tmp, "ml1m-head.tsv")
        with open(inputs[0], encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
            for _, line in zip(range(30_000), src):
                dst.write(line)
        inputs = [head]
    cmd = [sys.executable, "-m", "pipeline", "--output", out, "--format", "tsv",
           "--columns", "user,item,rating,time", *(bench_lib.IN_MEMORY if quick else [])]
    for path in inputs:
        cmd += ["--input", path]
    proc = subprocess.run(cmd, cwd=bench_lib.REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pipeline on ml-1m failed:\n{proc.stderr[-3000:]}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if bench_lib.start(args, probe):
        return 0
    result = {"benchmark": "data_memory"}
    with tempfile.TemporaryDirectory(prefix="data-memory-") as tmp:
        bench_lib.log("data")
        sets = {"ml1m": args.ml1m if args.ml1m is not None else ml1m_data(tmp, args.quick)}
        if args.synthetic is not None:
            sets["synthetic"] = args.synthetic
        else:
            sets["synthetic"] = os.path.join(tmp, "syn")
            bench_lib.make_synthetic(sets["synthetic"], args.users, in_memory=args.quick)
        sets["synthetic_long"] = os.path.join(tmp, "syn-long")
        bench_lib.log("data: long-history synthetic log")
        bench_lib.make_synthetic(sets["synthetic_long"], args.long_users,
                                 sessions=args.long_sessions, in_memory=args.quick)
        for name, data_dir in sets.items():
            result[name] = data_memory(bench_lib.load_users(data_dir), args)
        for name in PROBES:
            bench_lib.log(f"peak memory probe: {name}")
            result.setdefault("peak_memory", {})[name] = run_probe(name, sets["ml1m"], args)
    result["data_memory_reduction"] = result["ml1m"]["data_memory_reduction"]
    result["workload"] = {
        "ml1m": args.ml1m or ("pipeline on ../shared/data/ml-1m" +
                              (", first 30,000 train rows" if args.quick else "")),
        "synthetic": args.synthetic or f"pipeline.synthetic --users {args.users} through the pipeline",
        "synthetic_long": (f"pipeline.synthetic --users {args.long_users} --sessions "
                           f"{','.join(map(str, args.long_sessions))} through the pipeline"),
        "split": "train", "batch": [args.batch_size, args.sessions_per_batch, args.max_session_length],
        "truncation": args.truncation or "whole history", "index_bytes": 8, "state_bytes": 4,
        "peak_memory_data": "ml1m", "peak_memory_steps": args.steps, "loss": "softmax",
        **bench_lib.machine()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(bench_lib.run(main))
