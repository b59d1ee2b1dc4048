"""Tiny pipeline-format data folders written directly with the schema module (for model tests)."""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import tensorflow as tf

from pipeline import schema

Sessions = Sequence[Sequence[int]]


def write_data(path: str, num_items: int, train: Sequence[Sessions],
               valid: Sequence[tuple[int, Sessions]] = (), test: Sequence[tuple[int, Sessions]] = ()
               ) -> str:
    """Writes a data folder: items.tsv with `num_items` real items (indices 2..), one
    shard per split, a minimal stats.json. valid/test users are (num_context, sessions)."""
    os.makedirs(path, exist_ok=True)
    counts = {i: 0 for i in range(2, num_items + 2)}
    for user in train:
        for session in user:
            for i in session:
                counts[i] += 1
    schema.write_vocabulary(os.path.join(path, schema.ITEMS_FILE),
                            [(f"item{i}", max(counts[i], 1)) for i in range(2, num_items + 2)])
    splits = {"train": [(0, u) for u in train], "valid": list(valid), "test": list(test)}
    import pipeline

    # (as this version's pipeline writes it: an older one's gets a note)
    stats = {"pipeline_version": pipeline.__version__, "splits": {}, "items": num_items}
    for split, users in splits.items():
        os.makedirs(os.path.join(path, split), exist_ok=True)
        opts = tf.io.TFRecordOptions(compression_type=schema.COMPRESSION)
        with tf.io.TFRecordWriter(os.path.join(path, split, "part-00000" + schema.SHARD_SUFFIX),
                                  opts) as w:
            for n, (context, sessions) in enumerate(users):
                times = [[1000 * k + j for j in range(len(s))] for k, s in enumerate(sessions)]
                w.write(schema.make_sequence_example(f"{split}{n}", context, sessions, times))
        stats["splits"][split] = {"users": len(users),
                                  "sessions": sum(len(s) for _, s in users),
                                  "events": sum(len(x) for _, s in users for x in s)}
    with open(os.path.join(path, schema.STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f)
    return path


def planted_users(num_users: int, num_items: int = 20, sessions: int = 6, length: int = 5,
                  seed: int = 0) -> list[list[list[int]]]:
    """Users whose sessions all walk a user-specific cycle of items: the next item follows
    from the current one within a group, and the group is fixed per user (cross-session)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = 4
    per = num_items // groups
    users = []
    for _ in range(num_users):
        g = int(rng.integers(groups))
        user = []
        for _ in range(sessions):
            start = int(rng.integers(per))
            user.append([2 + g * per + (start + k) % per for k in range(length)])
        users.append(user)
    return users


# Run as `python -c _LIMITED N CMD...`: sets the limit, then becomes CMD.
_LIMITED = ("import os, resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (its default kills the process)\n"
            "n = int(sys.argv[1])\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n")


def file_size_limited(max_bytes: int, cmd: Sequence[str]) -> list[str]:
    """`cmd` (its program an absolute path) run under a limit past which a write in any one
    file fails with EFBIG ("File too large"), as writes on a full disk fail with ENOSPC: a
    real failed write, without the mount a full disk would take.

    A command line, not a `preexec_fn`: a preexec_fn makes subprocess fork the test process
    itself, and in a pytest worker whose earlier tests ran gRPC in-process the fork restarts
    gRPC's poller thread in the child, which, when the child's descriptors are closed before
    its exec, writes "epoll_wait error: Bad file descriptor" into the command's stderr."""
    return [sys.executable, "-c", _LIMITED, str(max_bytes), *cmd]
