"""Command lines that are read before TensorFlow loads, so that a usage error or `--help`
is answered at once rather than after TensorFlow's seconds of start-up: the module holds
no TensorFlow import. `python -m model.train` reads its options here first."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from model import config as config_lib
from pipeline import argtypes


def clock(seconds: float) -> str:
    """A duration as a progress line shows it: "0:05", "7:05", "1:02:03" (none below 0)."""
    minutes, seconds = divmod(max(0, int(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 \
        else f"{minutes}:{seconds:02d}"


TRAIN = config_lib.TrainConfig()  # the defaults --help names
# model.train's integers: sizes (tensor shapes, 32-bit) and counts of steps or events
# (int64), bounded when read (`--batch-size 10**30` was a traceback after TensorFlow's
# start); their lower bounds are the config's, named by key (`config.TrainConfig.validate`)
SIZE, COUNT = argtypes.at_most(argtypes.INT32_MAX), argtypes.at_most(argtypes.INT64_MAX)
POSITIVE_SIZE, POSITIVE_COUNT = argtypes.positive_size, argtypes.positive_count
TRAIN_DESCRIPTION = ("Trains a model on a pipeline data folder: `python -m model.train --data DIR "
                     "--model-dir RUN`.")


def train_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`python -m model.train`'s options; exits with a usage error (status 2) or the help."""
    p = argtypes.Parser(prog="python -m model.train", description=TRAIN_DESCRIPTION)
    p.add_argument("--data", required=True, type=argtypes.home_path,
                   help="pipeline output folder")
    p.add_argument("--model", type=argtypes.non_empty,
                   help=f"model name ({', '.join(config_lib.MODEL_NAMES)}; default: the "
                        "--config file's model_name, else hiertcn)")
    p.add_argument("--model-dir", required=True, type=argtypes.tensorflow_folder,
                   help="run folder (created; reused to resume)")
    p.add_argument("--config", type=argtypes.non_empty,
                   help="JSON config file (see model/config.py)")
    p.add_argument("--preset", choices=["deep"],
                   help="deep: 2 blocks x 2 convs, receptive field 25 >= L = 20")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=POSITIVE_COUNT,
                        help=f"training steps (default {config_lib.DEFAULT_STEPS})")
    budget.add_argument("--epochs", type=POSITIVE_SIZE,
                        help="passes over the training users")
    p.add_argument("--max-minutes", type=float,
                   help="stop (with a checkpoint) after this much wall time of training "
                        "(valid evaluations not counted); the steps (default "
                        f"{config_lib.DEFAULT_STEPS}) or epochs still end a faster run and size "
                        "the learning-rate decay (0: no time limit, the default)")
    p.add_argument("--batch-size", type=SIZE, help=f"B rows (default {TRAIN.batch_size})")
    p.add_argument("--sessions-per-batch", type=SIZE,
                   help=f"S sessions per row per batch (default {TRAIN.sessions_per_batch})")
    p.add_argument("--max-session-length", type=SIZE,
                   help=f"L items per session chunk (default {TRAIN.max_session_length})")
    p.add_argument("--learning-rate", type=float,
                   help=f"Adam's initial rate, divided by {TRAIN.lr_decay_factor:g} at "
                        + " and ".join(f"{x:.0%}%" for x in TRAIN.lr_decay_at)  # %% for argparse
                        + f" of the steps (default {TRAIN.learning_rate:g})")
    p.add_argument("--optimizer", choices=["lazy_adam", "adam"],
                   help="lazy_adam (default: embedding rows updated only when in the batch) "
                        "or adam")
    p.add_argument("--loss", choices=list(config_lib.LOSSES),
                   help="softmax (full), sampled (sampled softmax over --num-negatives) or "
                        f"auto (default: full up to {config_lib.AUTO_SOFTMAX_MAX_ITEMS:,} items)")
    p.add_argument("--num-negatives", type=POSITIVE_SIZE,
                   help="negatives per batch of the sampled loss (256)")
    p.add_argument("--negative-exponent", type=float,
                   help="the sampled loss draws negatives by train count ** this (0.5; "
                        "1: popularity)")
    p.add_argument("--dropout", type=float,
                   help="dropout rate of the model (hiertcn: after each convolution, default "
                        "0.3; hrnn, gru4rec: on the GRU outputs, default 0; tcn: 0)")
    p.add_argument("--seed", type=int,
                   help=f"initial weights and batch order (default {TRAIN.seed})")
    p.add_argument("--eval-every", type=COUNT,
                   help="steps between valid evaluations, and one at the end; the best valid "
                        f"weights are kept (default {TRAIN.eval_every}; 0: off, the last "
                        "weights are used)")
    p.add_argument("--patience", type=COUNT,
                   help="stop once the best valid evaluation is this many evaluations old "
                        f"(default {TRAIN.patience}; 0: run every step)")
    p.add_argument("--eval-users", type=COUNT,
                   help="valid users per evaluation, the same each time, chosen by a hash of "
                        f"their ids (0: all; default {TRAIN.eval_users:,})")
    p.add_argument("--eval-events", type=COUNT,
                   help="and only as many of them as hold this many valid events (0: no limit; "
                        f"default {config_lib.EVAL_EVENTS:,}, fewer above "
                        f"{config_lib.EVAL_SCORES // config_lib.EVAL_EVENTS:,} items: each event "
                        f"is ranked against the whole catalogue, {config_lib.EVAL_SCORES:,} "
                        f"event-item pairs at most, and at least {config_lib.EVAL_EVENTS_MIN:,} "
                        "events)")
    p.add_argument("--checkpoint-every", type=POSITIVE_COUNT,
                   help=f"steps between checkpoints (default {TRAIN.checkpoint_every}; "
                        "and one at least every 10 minutes)")
    p.add_argument("--keep-checkpoints", type=POSITIVE_SIZE,
                   help="periodic checkpoints kept, the newest (default "
                        f"{TRAIN.keep_checkpoints}; each holds the weights and the optimizer's "
                        "two slots: three times the weights; best/ holds the best weights apart)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--repeat-head", action="store_true",
                      help="hiertcn: mix in attention over the user's last items (RepeatNet-style; "
                           "the default)")
    head.add_argument("--no-repeat-head", action="store_true",
                      help="hiertcn: the published model, without the repeat head")
    p.add_argument("--start-items", type=SIZE,
                   help="hiertcn: first items of the user's last N sessions the repeat head also "
                        "points at (default 20; 0: off)")
    p.add_argument("--no-seen-bias", action="store_true",
                   help="hiertcn: no learned bias on the catalogue scores of the items the user "
                        "has already seen (the repeat head's seen bias)")
    transition = p.add_mutually_exclusive_group()
    transition.add_argument("--transition-bias", action="store_true",
                            help="hiertcn: a learned bias of the repeat head toward the items that "
                                 "came right after the current item earlier in the user's "
                                 "history (the user's own transitions)")
    transition.add_argument("--no-transition-bias", action="store_true",
                            help="hiertcn: without that bias")
    p.add_argument("--keep-current", action="store_true",
                   help="hiertcn: do not rule out the item a session is on as its next item "
                        "(ruled out by default: the pipeline collapses immediate repeats; keep "
                        "it for session records with them, made some other way)")
    p.add_argument("--no-chunk-context", action="store_true",
                   help="hiertcn: a later chunk of a session longer than L starts from the "
                        "start vector in training, without the items before it")
    p.add_argument("--no-high-level", action="store_true",
                   help="the high-level state stays zero (with --no-repeat-head: the "
                        "session-only ablation; the repeat head reads the user's history)")
    p.add_argument("--mixed-precision", action="store_true",
                   help="float16 compute on a GPU (bfloat16 on a CPU), float32 weights; "
                        "training's valid evaluations run so, model.evaluate and exports in "
                        "float32 (their metrics can differ in the third digit)")
    p.add_argument("--jit-compile", action="store_true",
                   help="XLA-compile the model's encoder (hiertcn only: the baselines' "
                        "recurrent loops and ragged packing do not compile)")
    p.add_argument("--strategy", help="default (the default), mirrored or one_device:DEVICE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_data_folder(data_dir: str) -> None:
    """Raises `schema.DataError` (one line) when `data_dir` is not a folder."""
    from pipeline import schema

    if not schema.is_folder(data_dir):
        what = "is a file, not a folder" if os.path.isfile(data_dir) else "not found"
        raise schema.DataError(f"data folder {data_dir} {what}: pass the --output folder of "
                               "`python -m pipeline`")


def check_data(data_dir: str):
    """Checks a pipeline folder for training; returns its `schema.Vocabulary`
    (`schema.DataError` with one line if not)."""
    from pipeline import schema

    check_data_folder(data_dir)
    vocab = schema.read_vocabulary(data_dir)
    stats = schema.read_stats(data_dir)
    schema.shard_files(data_dir, "train")
    train = stats.get("splits", {}).get("train") if isinstance(stats.get("splits"), dict) else None
    if not (isinstance(train, dict) and all(isinstance(train.get(k), int) and train[k] >= 0
                                            for k in ("users", "sessions", "events"))):
        raise schema.DataError(f"{data_dir}/{schema.STATS_FILE} has no counts of the train split "
                               "(splits.train: users, sessions, events): not a pipeline's "
                               "output, or edited; run `python -m pipeline` again")
    if not train["events"]:
        raise schema.DataError(f"the train split of {data_dir} has no events (see its "
                               f"{schema.STATS_FILE}): nothing to train on")
    return vocab


def exit_on_data_error(data: str) -> None:
    """`python -m model.train`'s prelude: a local --data that is not a folder (a typo, the
    wrong machine) is said (status 2) before TensorFlow loads; the rest of `check_data`,
    and a remote folder (TensorFlow's file systems), are checked after."""
    from pipeline import schema

    if schema.is_remote(data):
        return
    try:
        check_data_folder(data)
    except schema.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
