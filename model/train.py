"""Trains a model on a pipeline data folder: `python -m model.train --data DIR --model-dir RUN`.

Batches come from the queue-based generator (`model.batching`), the per-row state cache is
carried from batch to batch without gradient, and everything needed to continue is in the
checkpoint: model, optimizer, step, state cache and the generator's position. Rerunning
the same command resumes where the last checkpoint left off.

RUN/ gets `config.json` (resolved config), `items.tsv` (the vocabulary), `checkpoints/`,
`logs/` (TensorBoard) and, at the end, `train_summary.json`. Model selection: at every valid
evaluation (`--eval-every`, and once at the end) the weights with the best valid Recall@20
so far (MRR@20 breaks ties; the earlier step wins a full tie) are kept in `best/`, recorded
in `best/best.json` (written after the checkpoint, atomically, so it always names a complete
checkpoint) and in the summary's `best`; `model.registry.load_model` loads them.
"""
from __future__ import annotations

# what a stop before the training loop (whose stop saves a checkpoint) leaves behind
INTERRUPTED = ("interrupted: the run folder keeps its last checkpoint, if any; the same command "
               "resumes")

if __name__ == "__main__":
    import sys

    from model import cli, malloc, processes, quiet
    from pipeline import argtypes

    # the stop path saves a checkpoint even where the reader of the output is gone (`| tee`
    # stopped by the same Ctrl-C, model.compare killed)
    processes.survive_closed_output()
    # a usage error, --help or a missing local data folder at once, before TensorFlow loads
    cli.exit_on_data_error(cli.train_args(sys.argv[1:]).data)
    argtypes.interrupts_in_one_line(INTERRUPTED)
    argtypes.sigterm_until_handled()  # (TensorFlow's import: seconds)
    malloc.keep_freed_memory()  # (a step's large tensors: no fresh pages every step)
    quiet.import_tensorflow(keras=True)  # its start-up notes held back where they are noise

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from model import batching
from model import cli
from model import config as config_lib
from model import losses
from model import processes
from model import registry
from model.atomic import write_json, write_text
from model.keras_scorer import KerasScorer
from pipeline import argtypes, schema, storage

EVALUATION_DUE = "evaluation_due_at"  # key of a checkpoint's position: see `save`
# key of a checkpoint's position: the run's training up to it, over every process that
# trained it ({"seconds", "step_seconds", "events", "timed_events"}: see `save`)
TRAINED = "trained"
SUMMARY_FILE = registry.SUMMARY_FILE
# RUN/logs: TensorBoard's event files.
LOGS_DIR = "logs"
LOG_EVERY = 10


def _scalar(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar with the core `tf.summary.write` (no tensorboard package needed)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=metadata)


# With stdout not a terminal, the progress bar writes one line this often.
LOG_FILE_SECONDS = 30.0


class TrainingError(RuntimeError):
    """Training cannot go on (for example a NaN loss)."""


parse_args = cli.train_args  # (the command line is read before TensorFlow loads)


def _update_bar(bar, current: int, values: list, texts: dict[str, str | None]) -> None:
    """`bar.update(current, values)` of a Keras progress bar, with `texts` ({name: text})
    shown after the values as they are (Keras prints any value with four decimals:
    `events/s: 19194.0000`); a text None takes its name off the bar."""
    for name, text in texts.items():
        if text is None and name in bar._values_order:
            bar._values_order.remove(name)
            bar._values.pop(name, None)
    texts = {k: v for k, v in texts.items() if v is not None}
    for name in [n for n, _ in values] + list(texts):
        if name not in bar._values_order:
            bar._values_order.append(name)
    bar._values.update(texts)
    bar.update(current, values=values)


def _time_left_text(seconds: float) -> str:
    """The training time left under --max-minutes, as the bar shows it: "7:05 left",
    "1:02:03 left"."""
    return f"{cli.clock(seconds)} left"


def resolve_config(args: argparse.Namespace) -> config_lib.RunConfig:
    """Defaults <- --config FILE <- --preset <- command-line options (all strict)."""
    values = config_lib.load_json(args.config) if args.config else {}
    if args.model and "model_name" in values and values["model_name"] != args.model:
        raise config_lib.ConfigError(
            f"{args.config} is for model {values['model_name']!r}, but --model is {args.model!r}")
    values = {**values, "model_name": args.model or values.get("model_name", "hiertcn")}
    classes = registry.config_classes()
    config = config_lib.RunConfig.from_dict(values, classes)
    model, train = {}, {}
    if args.preset == "deep":
        model.update(config_lib.DEEP_PRESET)
    for key, _, value in _MODEL_OPTIONS:
        if (given := value(args)) is not None:
            model[key] = given
    _check_model_options(model, config.model_name, classes, "deep" if args.preset else None)
    _check_options_take_effect(args, model)
    flags = {"steps": args.steps, "epochs": args.epochs, "max_minutes": args.max_minutes,
             "batch_size": args.batch_size, "sessions_per_batch": args.sessions_per_batch,
             "max_session_length": args.max_session_length, "learning_rate": args.learning_rate,
             "optimizer": args.optimizer, "seed": args.seed, "eval_every": args.eval_every,
             "eval_users": args.eval_users, "eval_events": args.eval_events,
             "checkpoint_every": args.checkpoint_every,
             "keep_checkpoints": args.keep_checkpoints,
             "strategy": args.strategy, "patience": args.patience}
    train.update({k: v for k, v in flags.items() if v is not None})
    if args.epochs is not None:
        train["steps"] = 0
    if args.mixed_precision:
        train["mixed_precision"] = True
    if args.jit_compile:
        train["jit_compile"] = True
    config = config.replace({"model": model, "train": train})
    if args.patience and config.train.eval_every == 0:
        raise config_lib.ConfigError(
            f"--patience {args.patience} stops on valid evaluations, which --eval-every 0 "
            "turns off: leave one of them out")
    if config.train.steps == 0 and config.train.epochs == 0:
        config = config.replace({"train": {"steps": config_lib.DEFAULT_STEPS}})
    _check_high_level_trains(config)
    _check_tcn_history(config)
    return config


# A checkpoint at least this often (seconds of the run, evaluations included) besides
# every --checkpoint-every steps: a kill (the OOM killer, a preempted VM) loses at most
# this much of a slow run (500 steps of 2.3 s each, the full softmax over 200k items, are
# 19 minutes)
CHECKPOINT_SECONDS = 600.0
# --max-minutes: the note that the cap ends the run before its last step comes after this
# much of timed steps (or a tenth of the cap, if less)
CAP_NOTE_SECONDS = 30.0
# ... and names --loss sampled where the full softmax is over at least this many items (a
# Last.fm-shaped log's 41,285: 4.7 s a step, 1.0k events/s against 13.3k sampled, on one core)
SLOW_SOFTMAX_ITEMS = 20_000

# A note where a valid evaluation takes at least this many seconds and more than this share
# of the time of the --eval-every steps between two (a large catalogue under the sampled
# loss: the steps' cost does not grow with it, each evaluation's does; an audit's 164k
# items: 58 s an evaluation against 24 s for its 100 steps, 70% of the run's time), naming
# an --eval-every that would spend about EVAL_TARGET_SHARE of the time on them
EVAL_NOTE_SECONDS = 10.0
EVAL_NOTE_SHARE = 0.5
EVAL_TARGET_SHARE = 0.2

# Below this share of slots that train the GRU over sessions, model.train says so.
HIGH_LEVEL_SHARE_NOTE = 0.1

# `estimate_steps` replays the generator's fill over at most this many users (passes x
# users; about 3.5 s a million): `--epochs 20` over 1M users counts 2 passes, the rest
# of the run in full batches
COUNTED_USERS = 2_000_000


def _has_high_level(config: config_lib.RunConfig) -> bool:
    """Whether the model has a GRU over sessions that training must reach."""
    return {"hiertcn": getattr(config.model, "high_level", False),
            "hrnn": True}.get(config.model_name, False)


def _about_share(share: float) -> str:
    """A share for a note: "none", "under 0.1%" or "about 2.4%" (never "about 0.0%")."""
    return "none" if share == 0 else "under 0.1%" if share < 0.0005 else f"about {share:.1%}"


def _note_high_level_share(config: config_lib.RunConfig, users: batching.CachedUsers,
                           data_dir: str) -> None:
    """Says when few slots train the GRU over sessions: sessions long against S x L leave
    few batches that hold a session after an earlier one's end (none at all where every
    session takes exactly S slots), or few sessions after a user's first, whatever S (a
    session log: the user column holds session ids). Only for a train split kept in
    memory (a larger one is not read for it)."""
    tc = config.train
    events = schema.read_stats(data_dir)["splits"]["train"].get("events", 0)
    if not _has_high_level(config) or events > tc.cache_events:
        return
    share = users.high_level_share(tc.sessions_per_batch, tc.max_session_length)
    if share is None or share >= HIGH_LEVEL_SHARE_NOTE:
        return
    # with every slot of a row in one batch: the chunks of the sessions after a user's first
    ceiling = users.high_level_share(2 ** 62, tc.max_session_length)
    if ceiling < HIGH_LEVEL_SHARE_NOTE:
        print(f"note: {_about_share(ceiling)} of the train split's session chunks belong to "
              f"a session after an earlier one of the same user, the only ones the "
              f"{config.model_name} GRU over sessions can learn from, whatever "
              "--sessions-per-batch: most train events are in their user's first session (a "
              "log whose user column holds session ids is a session log: gru4rec and sknn "
              "suit it)",
              file=sys.stderr)
    else:
        print(f"note: {_about_share(share)} of the train split's session chunks follow a "
              f"session end in their batch, the only ones the {config.model_name} GRU over "
              f"sessions learns from (S = {tc.sessions_per_batch} chunks of L = "
              f"{tc.max_session_length} items a row per batch): this log's sessions are "
              "long for them; a larger --sessions-per-batch trains it more", file=sys.stderr)


def _check_high_level_trains(config: config_lib.RunConfig) -> None:
    """The state cache carries each row's high-level state from batch to batch without
    gradient, so a GRU over a user's sessions learns only where a batch holds a session
    after the end of an earlier one: with one session per row per batch it never does (its
    weights stayed at their initial values while the rest trained)."""
    if _has_high_level(config) and config.train.sessions_per_batch < 2:
        ablation = (", or --no-high-level for the session-only ablation"
                    if config.model_name == "hiertcn" else "")
        raise config_lib.ConfigError(
            f"--sessions-per-batch 1 never trains {config.model_name}'s GRU over sessions (its "
            "state is carried between batches without gradient, so it learns only from a "
            f"batch that holds a session after an earlier one): use 2 or more, the more the "
            f"longer the sessions (the default is 10){ablation}")


def _check_tcn_history(config: config_lib.RunConfig) -> None:
    """The flat TCN trains over its cached last N tokens followed by the batch's slots, so
    a position there sees up to receptive field - 1 tokens before it, and a session chunk
    that continues at a batch's first slot is predicted from the output at the cache's
    last token, computed from the N tokens alone: evaluation and serving compute the same
    outputs only while N >= the receptive field."""
    model = config.model
    if config.model_name == "tcn" and model.history_length < model.receptive_field:
        raise config_lib.ConfigError(
            f"model.history_length {model.history_length} is below the flat TCN's receptive "
            f"field ({model.receptive_field}: kernel_size {model.kernel_size}, "
            f"{model.convs_per_block} conv(s) per block, {len(model.channels)} blocks of "
            f"dilations 1 to {2 ** (len(model.channels) - 1)}): training would not compute "
            f"what evaluation and serving compute; raise history_length, or lower "
            f"kernel_size, convs_per_block or the number of blocks (entries in channels)")


# The command-line options that set a model config key (`resolve_config`): (the key, the
# option as said in an error, its value from the parsed arguments or None where not given).
_MODEL_OPTIONS = (
    ("loss", "--loss", lambda a: a.loss or None),
    ("num_negatives", "--num-negatives", lambda a: a.num_negatives),
    ("negative_exponent", "--negative-exponent", lambda a: a.negative_exponent),
    ("dropout", "--dropout", lambda a: a.dropout),
    ("repeat_head", "--repeat-head/--no-repeat-head",
     lambda a: bool(a.repeat_head) if a.repeat_head or a.no_repeat_head else None),
    ("start_items", "--start-items", lambda a: a.start_items),
    ("seen_bias", "--no-seen-bias", lambda a: False if a.no_seen_bias else None),
    ("transition_bias", "--transition-bias/--no-transition-bias",
     lambda a: bool(a.transition_bias) if a.transition_bias or a.no_transition_bias else None),
    ("exclude_current", "--keep-current", lambda a: False if a.keep_current else None),
    ("high_level", "--no-high-level", lambda a: False if a.no_high_level else None),
    ("chunk_context", "--no-chunk-context", lambda a: False if a.no_chunk_context else None),
)


def _check_options_take_effect(args: argparse.Namespace, model: dict) -> None:
    """An option given on the command line that another one given with it switches off is
    refused: the run trained exactly as without it while config.json recorded it."""
    off = {"--no-repeat-head": model.get("repeat_head") is False,
           "--no-high-level": model.get("high_level") is False}
    needs = ((args.start_items is not None and args.start_items > 0, "--start-items",
              ("--no-repeat-head", "--no-high-level"),
              "the repeat head points at the first items of the user's sessions, which the "
              "high-level state carries"),
             (bool(args.transition_bias), "--transition-bias", ("--no-repeat-head",),
              "a bias of the repeat head"),
             (bool(args.no_seen_bias), "--no-seen-bias", ("--no-repeat-head",),
              "the seen bias is the repeat head's"))
    for given, option, switches, why in needs:
        for switch in switches:
            if given and off[switch]:
                raise config_lib.ConfigError(f"{option} has no effect with {switch} ({why}): "
                                             f"leave one of them out")
    if model.get("loss") == "softmax":
        for key, option in (("num_negatives", "--num-negatives"),
                            ("negative_exponent", "--negative-exponent")):
            if key in model:
                raise config_lib.ConfigError(f"{option} has no effect with --loss softmax (the "
                                             "full softmax has no negatives to draw): leave "
                                             "one of them out")


def _check_model_options(model: dict, name: str, classes: dict, preset: str | None) -> None:
    """A model option the chosen model does not have is named as the option, with the
    models that have it (not as the config class's unknown key)."""
    if name not in classes:
        return  # said by the config's own check
    have = {f.name for f in dataclasses.fields(classes[name])}
    for key in model:
        if key in have:
            continue
        option = ({k: o for k, o, _ in _MODEL_OPTIONS}.get(key)
                  or (f"--preset {preset}" if preset else key))
        owners = [m for m, c in classes.items() if key in {f.name for f in dataclasses.fields(c)}]
        raise config_lib.ConfigError(f"{option} applies to {', '.join(owners)}, not to "
                                     f"--model {name}")


def resolve_loss(config: config_lib.RunConfig, vocab_size: int) -> config_lib.RunConfig:
    """The config with `model.loss` `auto` replaced by the loss it means for this
    vocabulary (`model.losses.resolve_loss`), so that the run folder records it."""
    loss = getattr(config.model, "loss", None)
    if loss is None:
        return config
    return config.replace({"model": {"loss": losses.resolve_loss(loss, vocab_size)}})


check_data = cli.check_data  # (in the light module with the prelude's folder check)


RESUMES_FILE = "resumes.jsonl"


def prepare_run_dir(run_dir: str, config: config_lib.RunConfig, data_dir: str,
                    vocab: schema.Vocabulary) -> dict:
    """Creates RUN or checks that a resumed RUN matches this data, model config and batch
    geometry; returns the other training options this command changes
    ({option: [was, now]}; e.g. a lower learning rate after a NaN loss).

    Only a RUN that holds a model (`_holds_a_model`) is held to its vocabulary and config:
    one whose earlier command was refused or stopped before its first checkpoint (a
    damaged shard found while reading the train split, a kill at start-up) trained
    nothing, and takes this command's data and options as a new RUN would."""
    os.makedirs(run_dir, exist_ok=True)
    trained = _holds_a_model(run_dir)
    items_path = os.path.join(run_dir, schema.ITEMS_FILE)
    if trained and os.path.exists(items_path):
        registry.check_vocabulary(schema.read_vocabulary(run_dir), vocab, run_dir, data_dir)
    else:
        with schema.open_text(os.path.join(data_dir, schema.ITEMS_FILE)) as f:
            write_text(items_path, f.read())
    config_path = os.path.join(run_dir, registry.CONFIG_FILE)
    if trained and not os.path.exists(config_path):
        # (its folder removed while it trained: TensorFlow made a new one for the later
        # checkpoints, without the config evaluation and export read)
        raise registry.RunError(
            f"{run_dir} holds checkpoints but no {registry.CONFIG_FILE} (was it removed while "
            "the run trained?): the config they were trained with is unknown; train into a "
            "new --model-dir")
    if trained:
        saved = registry.load_saved_config(config_path)
        fixed = ("batch_size", "sessions_per_batch", "max_session_length")
        now = config.to_dict()
        older = (registry.older_config_keys(saved)
                 if saved.get("model_name") == now["model_name"] else {})
        differences = _differences({"model_name": saved.get("model_name"),
                                    "model": saved.get("model"),
                                    "train": {k: saved.get("train", {}).get(k) for k in fixed}},
                                   {"model_name": now["model_name"],
                                    "model": {k: v for k, v in now["model"].items()
                                              if k not in older},
                                    "train": {k: now["train"][k] for k in fixed}})
        # another model: its config's keys all differ, and are not the point
        differences = [d for d in differences if d.startswith("model_name ")] or differences
        # each with the option that sets it (an older run's chunk_context False -> True
        # did not say --no-chunk-context)
        flags = {f"model.{key}": flag for key, flag, _ in _MODEL_OPTIONS}
        flags.update({f"train.{key}": "--" + key.replace("_", "-") for key in fixed})
        differences = [f"{d} ({flags[d.split(' ', 1)[0]]})" if d.split(" ", 1)[0] in flags
                       else d for d in differences]
        if older:
            # (a run of an older version: no option gives a value its config.json lacks)
            raise registry.RunError(
                f"{run_dir} holds a run of an older version: its {registry.CONFIG_FILE} lacks "
                f"the model option(s) {', '.join('model.' + k for k in older)}, added since"
                + (f" (and differs: {'; '.join(differences)})" if differences else "")
                + f"; add each to its {registry.CONFIG_FILE} with the value the run was "
                "trained with (the option's off value where it did not exist then) to resume "
                "it, or use a new --model-dir")
        if differences:
            raise registry.RunError(
                f"{run_dir} holds a run with another model config or batch geometry "
                f"({'; '.join(differences)}; see its {registry.CONFIG_FILE}): use a new "
                "--model-dir or the same options")
        changed = {k: [saved["train"][k], v] for k, v in now["train"].items()
                   if k in saved.get("train", {}) and saved["train"][k] != v}
        _check_valid_sample(run_dir, changed)
        return changed
    return {}


# training options that choose the valid events each evaluation scores
VALID_SAMPLE_OPTIONS = ("eval_users", "eval_events")


def _check_valid_sample(run_dir: str, changed: dict) -> None:
    """Refuses a resume that changes which valid events are scored while the run holds a
    best checkpoint: its figure, measured on the other sample, would be compared with the
    new ones (16 events' Recall@20 0.50 replaced 351 events' 0.36 as the best)."""
    moved = [k for k in VALID_SAMPLE_OPTIONS if k in changed]
    best = registry.read_best(run_dir) if moved else None
    if not best or "recall@20" not in best:
        return
    told = ", ".join(f"--{k.replace('_', '-')} {changed[k][1]} (the run's: {changed[k][0]})"
                     for k in moved)
    was = " ".join(f"--{k.replace('_', '-')} {changed[k][0]}" for k in moved)
    raise registry.RunError(
        f"{run_dir}: {told} would score other valid events than its best checkpoint's (step "
        f"{best.get('step')}, recall@20 {best['recall@20']:.4f} on {best.get('events', 0):,} "
        f"events), and the two figures would not compare: resume with {was}, or train into "
        "a new --model-dir")


def _holds_a_model(run_dir: str) -> bool:
    """Whether RUN holds a training checkpoint, or a best one (or its record): evaluation
    and export load `best/` alone, as in a folder whose checkpoints/ was deleted to save
    room, so such a folder is a trained run too."""
    if registry.named_checkpoint(os.path.join(run_dir, registry.CHECKPOINT_DIR)):
        return True  # (its files there or not: the resume says which)
    best = os.path.join(run_dir, registry.BEST_DIR)
    return os.path.isdir(best) and any(name.endswith(".index") or name == registry.BEST_FILE
                                       for name in os.listdir(best))


def _differences(was, now, where: str = "") -> list[str]:
    """`key: was -> now` for each value that differs between two nested dicts."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [d for k in sorted(set(was) | set(now), key=str)
                for d in _differences(was.get(k), now.get(k), f"{where}{k}.")]
    return [] if was == now else [f"{where.rstrip('.')} {was!r} -> {now!r}"]


def rate_change(train: config_lib.TrainConfig, changed: dict, step: int, total_steps: int) -> str:
    """"; the learning rate from step N is X (Y under the earlier options): ..." where options
    changed on resuming move the step schedule's rate at `step` (its decay points are
    fractions of the run's length: more --steps put them later), else ""."""
    keys = {"steps", "epochs", "learning_rate", "lr_schedule", "lr_decay_at", "lr_decay_factor"}
    if not keys & set(changed):
        return ""

    def rate(tc: config_lib.TrainConfig, total: int) -> float:
        schedule = learning_rate(tc, total)
        return float(schedule(step) if callable(schedule) else schedule)

    was = {k: tuple(a) if isinstance(a, list) else a for k, (a, _) in changed.items()
           if k in keys}
    before = dataclasses.replace(train, **was)
    now = rate(train, total_steps)
    then = rate(before, before.steps) if before.steps or before.lr_schedule == "constant" else None
    if then is not None and math.isclose(now, then, rel_tol=1e-6):
        return ""
    return (f"; the learning rate from step {step + 1} is {now:.4g}"
            + (f" ({then:.4g} under the earlier options)" if then is not None else "")
            + (": the schedule's decay points are fractions of the run's length"
               if train.lr_schedule != "constant" and train.lr_decay_at else ""))


def save_config(run_dir: str, config: config_lib.RunConfig, step: int, changed: dict,
                rate_note: str = "") -> None:
    """Records the config of the run once it is known that this command trains: config.json
    is the latest command's; training options changed on resuming are said on stderr (with
    `rate_change`'s note) and kept in RUN/resumes.jsonl (`{"step": N, "changed": {option:
    [was, now]}}`), so that the run's history stays readable."""
    if changed:
        told = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        print(f"resuming {run_dir} at step {step} with other training options: {told}"
              f"{rate_note}", file=sys.stderr)
        with open(os.path.join(run_dir, RESUMES_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "changed": changed}) + "\n")
    config_lib.save_json(config, os.path.join(run_dir, registry.CONFIG_FILE))


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy named in the config.

    The per-row state cache lives with the rows of one replica's batch, so training runs
    on one replica (one GPU or the CPU); `mirrored` is accepted when it has one replica.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name.startswith("one_device:"):
        device = name.split(":", 1)[1]
        try:
            strategy = tf.distribute.OneDeviceStrategy(device)
        except ValueError as e:
            raise config_lib.ConfigError(f"strategy {name!r}: {device!r} is not a device "
                                         f"({str(e).splitlines()[0]}); try one_device:/gpu:0 "
                                         "or one_device:/cpu:0") from None
        # TensorFlow places ops on a device it lacks (a GPU CUDA cannot see) on the CPU
        # without a word: a run meant for a GPU would train for hours on the CPU
        spec = tf.DeviceSpec.from_string(strategy.extended.worker_devices[0])
        have = [tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices()]
        if not any(d.device_type == spec.device_type and d.device_index == spec.device_index
                   for d in have):
            names = ", ".join(f"/{d.device_type.lower()}:{d.device_index}" for d in have)
            raise config_lib.ConfigError(f"strategy {name!r}: this machine has no {device} "
                                         f"(TensorFlow sees {names})")
        return strategy
    strategy = tf.distribute.MirroredStrategy()
    if strategy.num_replicas_in_sync > 1:
        raise config_lib.ConfigError(
            f"strategy 'mirrored' has {strategy.num_replicas_in_sync} replicas; the state cache "
            "needs one replica: use 'one_device:/gpu:0'")
    return strategy


def estimate_steps(data_dir: str, train: config_lib.TrainConfig,
                   users: batching.CachedUsers | None = None) -> int:
    """Steps for `train.epochs` passes (where the learning rate decays; the progress bar's
    end). When the split fits `train.cache_events` and `users` is given (its first pass is
    then read now): the batches the queue generator will make, counted from each user's
    slots by replaying its shuffles and its rows (`batching.count_batches`: a user's slots
    all go to one row, so a heavy user's row drains last, and the next pass's users fill
    the rows that drain), over as many passes as `COUNTED_USERS` users allow (at least
    one), plus the full batches of the passes beyond (every session of n items is
    ceil(n / L) slots). Else from `stats.json`: at least one slot per session, at most L
    items each, over the B x S slots of a batch."""
    split = schema.read_stats(data_dir)["splits"]["train"]
    per_batch = train.batch_size * train.sessions_per_batch
    counts = None
    if users is not None and split.get("events", 0) <= train.cache_events:
        counts = users.slot_counts(train.max_session_length)
    if counts is None:
        slots = max(split["sessions"], math.ceil(split["events"] / train.max_session_length))
        return max(1, math.ceil(train.epochs * slots / per_batch))
    passes = min(train.epochs, max(1, COUNTED_USERS // max(1, len(counts))))
    counted = batching.count_batches(counts, train.batch_size, train.sessions_per_batch,
                                     seed=train.seed, shuffle_buffer=train.shuffle_buffer,
                                     epochs=passes)
    return max(1, counted + math.ceil((train.epochs - passes) * sum(counts) / per_batch))


def _passes_text(data_dir: str, train: config_lib.TrainConfig, total_steps: int,
                 start_step: int = 0) -> str:
    """` (about N epochs)` for a run of `train.steps` steps (nothing for a run in epochs),
    ` (about N more epochs)` for the steps after `start_step` of a resumed one:
    the train split's events trained on over and over, as the run's summary counts them,
    with a hint when that is less than one pass over the train split (a large log). The
    slots of a pass, from `stats.json`: a session of n items takes ceil(n / L) slots, which
    lies between max(sessions, events / L) and sessions + events / L; their midpoint, or
    the sessions where the longest session fits one slot."""
    if not train.steps:
        return ""
    stats = schema.read_stats(data_dir)
    split = stats["splits"]["train"]
    sessions, chunks = split.get("sessions", 0), split.get("events", 0) / train.max_session_length
    slots = (max(sessions, chunks) + sessions + chunks) / 2
    if 0 < stats.get("max_session_events", {}).get("train", 0) <= train.max_session_length:
        slots = sessions  # (every session fits one slot: exact)
    if not slots:
        return ""
    steps_per_pass = slots / (train.batch_size * train.sessions_per_batch)
    passes = (total_steps - start_step) / steps_per_pass
    # a user's slots all go to one row, S a step, while the other rows go on to the next
    # pass's users: a pass over every user lasts at least as long as the heaviest user's
    # row (one user of 3,000 sessions among 300 of one: a pass took 242 steps, where the
    # events of one took 10), its slots at least its events over the longest a slot holds
    heaviest = stats.get("max_user_events", {}).get("train", 0)
    longest = stats.get("max_session_events", {}).get("train", 0)
    every_user = steps_per_pass
    if isinstance(heaviest, int) and heaviest > 0:
        per_slot = min(train.max_session_length, longest) if longest > 0 else \
            train.max_session_length
        every_user = max(steps_per_pass, heaviest / per_slot / train.sessions_per_batch)
    row = (f"; a pass over every user takes about {_about(every_user)} steps, the heaviest "
           f"user's {heaviest:,} events filling one row" if every_user > 1.5 * steps_per_pass
           else "")
    hint = "; --epochs 1 for one pass" if total_steps < every_user else ""
    return f" ({_epochs_phrase(passes, more=start_step > 0)}{row}{hint})"


def _epochs_phrase(passes: float, more: bool = False) -> str:
    """`about 6.9 epochs of the train split` (`more`: `about 6.9 more epochs ...`)."""
    about = _about(passes)
    return (f"about {about} {'more ' * more}epoch{'' if about == '1' else 's'} of the train "
            "split")


def _epochs_text(data_dir: str, events: int) -> str:
    """`about N epochs of the train split` for `events` trained ('' where stats.json has no
    train events)."""
    total = schema.read_stats(data_dir)["splits"]["train"].get("events", 0)
    return _epochs_phrase(events / total) if total else ""


def _cap_note(tc: config_lib.TrainConfig, step: int, total_steps: int, seconds_left: float,
              per_step: float, events_done: int, events_per_step: float, data_dir: str,
              full_softmax_items: int | None) -> str | None:
    """The note that --max-minutes will end the run before its last step, with the
    step and the epochs it reaches at this rate (None where it does not cut the run)."""
    reach = step + int(max(seconds_left, 0.0) / max(per_step, 1e-9))
    if reach >= total_steps:
        return None
    epochs = _epochs_text(data_dir, events_done + round((reach - step) * events_per_step))
    text = (f"note: at {per_step:.2g} s a step, --max-minutes {tc.max_minutes:g} ends the run "
            f"near step {reach:,} of {total_steps:,}" + (f" ({epochs})" if epochs else ""))
    if full_softmax_items and full_softmax_items >= SLOW_SOFTMAX_ITEMS:
        text += (f"; the full softmax over {full_softmax_items:,} items is a large part of "
                 "each step: --loss sampled trains faster (README § Repeat consumption "
                 "compares the two)")
    return text


def _eval_note(tc: config_lib.TrainConfig, eval_s: float, per_step: float, events: int,
               items: int, total_steps: int | None = None) -> str | None:
    """The note that valid evaluations take most of the run's time (an evaluation of
    `eval_s` seconds that ranked `events` events against `items` items, steps of
    `per_step` seconds), with an --eval-every that would spend EVAL_TARGET_SHARE on them;
    None where they do not."""
    interval = per_step * tc.eval_every
    if eval_s < EVAL_NOTE_SECONDS or eval_s <= EVAL_NOTE_SHARE * interval:
        return None
    share = eval_s / (eval_s + interval)
    # the steps whose time is (1 - target) / target times an evaluation's, rounded up to
    # 1, 2 or 5 times a power of ten
    every = max(eval_s * (1 - EVAL_TARGET_SHARE) / EVAL_TARGET_SHARE / max(per_step, 1e-9),
                tc.eval_every + 1)
    power = 10 ** math.floor(math.log10(every))
    every = next(m * power for m in (1, 2, 5, 10) if m * power >= every)
    return (f"note: a valid evaluation took {eval_s:.0f} s ({events:,} events ranked against "
            f"{items:,} items) against {interval:.0f} s for the {tc.eval_every:,} steps "
            f"between two: evaluations are {share:.0%} of this run's time"
            + (", and --max-minutes does not count them" if tc.max_minutes else "")
            + f"; --eval-every {every:,} would make them about {EVAL_TARGET_SHARE:.0%}"
            + (f" (a run of {total_steps:,} steps then evaluates at its end alone: more "
               "--steps or --epochs go with it)" if total_steps and every >= total_steps else "")
            + ", and a smaller --eval-events less (fewer events: a noisier choice of the "
            "best step)")


def _about(number: float) -> str:
    """Two significant figures in plain notation: 0.0042, 0.35, 4.2, 42, 420, 4,200."""
    if number >= 10:
        return f"{float(f'{number:.2g}'):,.0f}"
    return f"{number:.2g}" if number >= 1e-4 else f"{number:.6f}".rstrip("0")


def learning_rate(train: config_lib.TrainConfig, total_steps: int):
    """Adam's learning rate: constant, or the authors' step decay at fractions of the run.
    The schedule is read at the optimizer's iteration count, the steps done before the one
    it updates: a decay at 30% of 700 steps starts at step 211 (it started at 212)."""
    if train.lr_schedule == "constant" or not train.lr_decay_at:
        return train.learning_rate
    bounds = sorted({max(0, int(f * total_steps) - 1) for f in train.lr_decay_at})
    values = [train.learning_rate / train.lr_decay_factor ** i for i in range(len(bounds) + 1)]
    return tf.keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)


def make_optimizer(train: config_lib.TrainConfig, total_steps: int):
    """Adam (`train.optimizer`: `lazy_adam`, the default, or `adam`), with decoupled weight
    decay (AdamW, Loshchilov & Hutter) when `train.weight_decay` > 0."""
    options = {"global_clipnorm": train.clipnorm} if train.clipnorm else {}
    if train.weight_decay:
        options["weight_decay"] = train.weight_decay
    cls = LazyAdam if train.optimizer == "lazy_adam" else Adam
    return cls(learning_rate(train, total_steps), **options)


class _ExactGlobalClip:
    """`global_clipnorm` over the gradients as applied: a sparse gradient's duplicate rows
    (an item twice in a batch) are summed before the norm is taken (Keras clips first and
    sums after, so its norm counts ‖a‖² + ‖b‖² for a row whose gradient is a + b)."""

    def _clip_gradients(self, grads):
        if not self.global_clipnorm:
            return super()._clip_gradients(grads)
        grads = self._deduplicate_sparse_grad(grads)
        return tf.clip_by_global_norm(grads, self.global_clipnorm)[0]


class Adam(_ExactGlobalClip, tf.keras.optimizers.Adam):
    """Keras's Adam (`train.optimizer` `adam`), with the exact global-norm clip."""


class LazyAdam(_ExactGlobalClip, tf.keras.optimizers.Adam):
    """Adam whose sparse updates touch only the rows in the gradient.

    An embedding table's gradient is `tf.IndexedSlices` over the items of the batch (and,
    with the sampled softmax, the sampled negatives). Keras's Adam then still decays the
    moments of every row and moves every row with its momentum: about ten passes over each
    [V, D] table per step, whatever the batch; with a 500,000-item catalogue that is 95% of
    a HierTCN step (`benchmarks/train_speed.py --catalogue`). Here the rows in the gradient
    get exactly Adam's update from their own moments, and the other rows (and their
    moments) stay as they are until their items appear again: the "lazy" Adam of TF
    Addons and `tf.compat.v1`'s LazyAdamOptimizer. Dense gradients get Keras's Adam, its
    arithmetic in one fused op per variable (`_dense_update`). With `weight_decay`, the
    decoupled decay of a sparse-gradient table applies to the same rows only (as TF
    Addons' AdamW does for sparse gradients).
    """

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        grads_and_vars = list(grads_and_vars)
        # the tables with sparse gradients this step: decayed in `update_step`, row-wise
        self._sparse_keys = {self._var_key(v) for g, v in grads_and_vars
                             if isinstance(g, tf.IndexedSlices)}
        return super().apply_gradients(grads_and_vars, *args, **kwargs)

    def _use_weight_decay(self, variable):
        if self._var_key(variable) in getattr(self, "_sparse_keys", ()):
            return False
        return super()._use_weight_decay(variable)

    def update_step(self, gradient, variable):
        if self.amsgrad:
            return super().update_step(gradient, variable)
        if not isinstance(gradient, tf.IndexedSlices):
            return self._dense_update(gradient, variable)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        epsilon = self.epsilon * tf.sqrt(1 - tf.pow(beta_2, step)) if self.adaptive_epsilon \
            else self.epsilon
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        # (`apply_gradients` has summed duplicate indices)
        rows, g = gradient.indices, tf.cast(gradient.values, dtype)
        m_rows = tf.gather(m, rows) * beta_1 + g * (1 - beta_1)
        v_rows = tf.gather(v, rows) * beta_2 + tf.square(g) * (1 - beta_2)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        delta = m_rows * alpha / (tf.sqrt(v_rows) + epsilon)
        if self.weight_decay and super()._use_weight_decay(variable):
            delta += tf.gather(variable, rows) * (lr * tf.cast(self.weight_decay, dtype))
        variable.scatter_sub(tf.IndexedSlices(delta, rows))

    def _dense_update(self, gradient, variable):
        """Keras's dense Adam update in TensorFlow's fused kernel (`ResourceApplyAdam`: the
        same arithmetic, m += (g - m)(1 - beta_1), v += (g² - v)(1 - beta_2), variable -=
        lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)) as one op per
        variable instead of about fifteen: a HierTCN step has ~30 dense variables, and the
        ops' dispatch, not their arithmetic, is most of their cost on a CPU."""
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        beta_2_power = tf.pow(beta_2, step)
        epsilon = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon \
            else self.epsilon
        key = self._var_key(variable)
        m = self._momentums[self._index_dict[key]]
        v = self._velocities[self._index_dict[key]]
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
            beta2_power=beta_2_power, lr=tf.cast(self.learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(epsilon, dtype), grad=tf.cast(gradient, dtype))


class TrainState(tf.Module):
    """What a checkpoint holds besides model and optimizer: step, state cache, data position."""

    def __init__(self, cache: Sequence[tf.Tensor]):
        super().__init__(name="train_state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.cache = [tf.Variable(c, trainable=False, name=f"cache_{i}") for i, c in enumerate(cache)]
        self.position = tf.Variable("", dtype=tf.string, trainable=False, name="position")


def longest_train_session(data_dir: str, tc, users: batching.CachedUsers) -> int | None:
    """The most events of one train session: from `stats.json` (pipelines since
    2026-12-04 write it), else read from a split kept in memory (within
    `train.cache_events`; a larger one is not read one more time before training: None)."""
    stats = schema.read_stats(data_dir)
    longest = stats.get("max_session_events", {}).get("train")
    if isinstance(longest, int):
        return longest
    if stats["splits"]["train"].get("events", 0) <= tc.cache_events:
        return users.longest_session()
    return None


def deep_dilations_note(config, longest: int | None) -> str | None:
    """A note for a HierTCN whose dilations reach far past the longest train session
    (`longest` events): block i's dilation 2^i beyond every session reads only padding and
    costs memory in proportion to it (num_blocks 16 on 5-event sessions: 6 GB to evaluate
    25 users; 40 ran out of memory with a message that named the batch size). None when
    the blocks are of use, or the longest session is not known."""
    if not longest or not config.num_blocks > 1:
        return None
    useful = next((k for k in range(1, config.num_blocks + 1)
                   if config.replace({"num_blocks": k}).receptive_field >= longest), None)
    if useful is None or config.num_blocks <= useful + 1:  # (one more than needed: fair)
        return None
    return (f"note: model.num_blocks {config.num_blocks} gives the TCN a receptive field of "
            f"{config.receptive_field:,} positions, and the longest train session has "
            f"{longest:,} events: {useful} blocks see all of it, and each further one reads "
            "only padding at a memory cost that doubles with every block")


# the chunk length beyond which the repeat head's memory is noted (one step of the default
# batch took 1.7 GB at L = 200, 5 GB at 500, 17 GB at 1,000 on a 40-item catalogue)
LONG_CHUNKS = 200


def long_chunks_note(config, max_session_length: int) -> str | None:
    """A note for a HierTCN with the repeat head on chunks longer than `LONG_CHUNKS`: the
    head attends, at each position, over the session so far, so a step's memory grows with
    L^2 (a user who raised L to 30,000 saw the process killed at 24 GB without a word)."""
    if not config.uses_repeat_head or max_session_length <= LONG_CHUNKS:
        return None
    return (f"note: --max-session-length {max_session_length:,} with the repeat head: it "
            "attends over the session so far at every position, so a step's memory grows "
            "with the square of L (the default batch took 1.7 GB at L = 200, 5 GB at 500, "
            "17 GB at 1,000); a longer session is trained in chunks of L in any case")


def make_train_step(model, optimizer, state: TrainState, strategy, mixed_float16: bool,
                    jit_compile: bool = False):
    """A compiled step: loss, gradients, Adam update, state cache carried without gradient.

    The step takes a batch (a dict of tensors) or an iterator over batches: then the fetch
    of the batch is an op of the compiled step (as Keras's `fit` does it) instead of an
    eager call before it, which costs about 0.8 ms a step on a CPU (measured by
    `benchmarks/train_speed.py`'s input overhead), and the end of the data raises
    `tf.errors.OutOfRangeError` without running a step. It returns the loss and the number
    of target events.
    """
    encode = tf.function(model.encode, jit_compile=True) if jit_compile else None
    # Adam's moments made now: created by the first trace, they would make TensorFlow
    # trace the step a second time (variables may only be created on a function's first
    # trace, which it then repeats without them)
    with strategy.scope():
        optimizer.build(model.trainable_variables)

    def step_fn(batch):
        # Every op of the step waits for the batch: fetched in the step, the end of the data
        # then changes nothing (the step counter's and the optimizer's increments, which do
        # not read the batch, would otherwise run before the fetch fails).
        with tf.control_dependencies(tf.nest.flatten(batch)):
            with tf.GradientTape() as tape:
                loss, new_cache, n = model.train_loss(batch, tuple(c.value() for c in state.cache),
                                                      training=True, encode=encode)
                scaled = optimizer.get_scaled_loss(loss) if mixed_float16 else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            if mixed_float16:
                grads = optimizer.get_unscaled_gradients(grads)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            for var, value in zip(state.cache, new_cache):
                var.assign(tf.stop_gradient(value))
            state.step.assign_add(1)
        return loss, n

    @tf.function(autograph=False)  # plain TensorFlow code: traced faster without conversion
    def train_step(batch):
        if not isinstance(batch, dict):  # an iterator: its next batch, fetched in the step
            batch = next(batch)
        return strategy.run(step_fn, args=(batch,))

    return train_step


def evaluate_valid(model, data_dir: str, user_ids=None, scorer=None, users=None,
                   progress_out=None) -> dict:
    """Valid metrics of the in-memory model through `model.evaluate` (imported lazily), on
    the users `user_ids` (all when None); `scorer` (a `KerasScorer` of `model`, whose
    compiled functions read the current weights) and `users` (their records,
    `evaluate.load_users`) can be kept from one evaluation to the next. With
    `progress_out` (a stream), an evaluation that takes long shows its progress there
    and leaves nothing of it behind (`evaluate.evaluate`'s `transient`)."""
    from model import evaluate

    scorer = scorer or KerasScorer(model, name=type(model).__name__.lower())
    return evaluate.evaluate(scorer, data_dir, "valid", user_ids=user_ids,
                             progress=progress_out is not None, users=users,
                             transient=True, progress_out=progress_out)


class _LeadOnce:
    """stderr for a valid evaluation's progress inside training: `lead` (the newline that
    ends the training bar's line) is written before the first progress output, once;
    `rest` is what a line after the evaluation still needs of it."""

    def __init__(self, lead: str, stream=None):
        self.lead, self.used = lead, False
        self._stream = stream or sys.stderr

    def write(self, text: str) -> int:
        if not self.used and text:
            self.used = True
            self._stream.write(self.lead)
        return self._stream.write(text)

    @property
    def rest(self) -> str:
        return "" if self.used else self.lead

    def __getattr__(self, name):  # flush, isatty, encoding: the stream's
        return getattr(self._stream, name)


def train(data_dir: str, run_dir: str, config: config_lib.RunConfig, progress: bool = True) -> dict:
    """Trains (or resumes) a run; returns the summary written to RUN/train_summary.json.
    Keras's global dtype policy (set by `mixed_precision`) is the caller's again afterwards;
    the process's random generators (Python's, NumPy's and TensorFlow's global ones) are
    seeded with `train.seed`, as `tf.keras.utils.set_random_seed` does. A config with
    neither `steps` nor `epochs` trains `DEFAULT_STEPS` steps, as the command line does.

    Raises:
      DataError, ConfigError, RunError: bad data folder, option or run folder.
      TrainingError: the loss became NaN (the last good checkpoint is kept).
    """
    if config.train.steps == 0 and config.train.epochs == 0:
        config = config.replace({"train": {"steps": config_lib.DEFAULT_STEPS}})
    policy = tf.keras.mixed_precision.global_policy()
    lock = RunLock(run_dir)
    try:
        return _train(data_dir, run_dir, config, progress, lock)
    finally:
        lock.release()
        tf.keras.mixed_precision.set_global_policy(policy)


class RunLock:
    """Holds a run folder for this process while it trains: an advisory lock (flock) on
    the folder itself, released by the system however the process ends, and nothing
    written into the folder. A second `model.train` into the same folder would train
    beside the first and overwrite its checkpoints with its own."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._fd = None

    def acquire(self) -> None:
        """Creates the folder if missing and locks it.

        Raises:
          RunError: another process holds it.
        """
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except FileNotFoundError:  # a link to nothing on the way, a file system that refuses
            parent = os.path.dirname(os.path.abspath(self.run_dir))
            while not os.path.lexists(parent):
                parent = os.path.dirname(parent)
            why = (f": {parent} is a link to nothing" if not os.path.exists(parent) else "")
            raise registry.RunError(f"cannot create the run folder {self.run_dir}{why}") from None
        try:
            self._fd = storage.lock_folder(self.run_dir)
        except BlockingIOError:
            raise registry.RunError(
                f"{self.run_dir} is being trained by another process"
                f"{storage.lock_holder(self.run_dir)}: wait for it to end, or pass another "
                "--model-dir") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing the last descriptor releases the lock)
            self._fd = None


REPEAT_CHECK_USERS = 1000


def check_current_rule(data_dir: str, model_config) -> None:
    """Raises `ConfigError` (one line) when the model rules out the item a session is on
    (`exclude_current`) but the first `REPEAT_CHECK_USERS` train users' sessions hold an
    item twice in a row: records written by another tool, which the pipeline's would not
    be (it collapses immediate repeats). Trained on, such targets would get probability 0
    in evaluation and serving."""
    if not (getattr(model_config, "exclude_current", False)
            and getattr(model_config, "uses_repeat_head", False)):
        return
    users = repeats = 0
    example = None
    for user in schema.user_reader(data_dir, "train")():
        for items in user.sessions:
            same = (items[1:] == items[:-1]) & (items[1:] >= schema.NUM_RESERVED)
            if same.any():
                repeats += int(same.sum())
                example = example or (user.user_id, int(items[1:][same][0]))
        users += 1
        if users >= REPEAT_CHECK_USERS:
            break
    if repeats:
        older = "pipeline_version" not in schema.read_stats(data_dir)
        raise config_lib.ConfigError(
            f"{data_dir}: train events that repeat the item before them: {repeats:,} in the "
            f"first {users:,} users (user {example[0]!r}, item index {example[1]}); the model "
            "rules out the item a session is on as its next (the pipeline collapses immediate "
            "repeats): "
            + ("the folder's stats.json has no pipeline_version (an older pipeline, which "
               "kept the repeats that dropping unknown items leaves, or another tool): "
               "`python -m pipeline ... --overwrite` writes it again; or " if older else "")
            + "pass --keep-current to train on such records")


def _remove_partial_saves(run_dir: str) -> None:
    """Removes what a save that did not finish left in the run's checkpoint folders (TF
    writes a checkpoint into PREFIX_temp and moves it in place when complete; a full disk
    or a kill leaves the folder)."""
    for folder in (registry.CHECKPOINT_DIR, registry.BEST_DIR):
        for path in glob.glob(os.path.join(glob.escape(run_dir), folder, "*_temp")):
            shutil.rmtree(path, ignore_errors=True)


def _train(data_dir: str, run_dir: str, config: config_lib.RunConfig, progress: bool,
           lock: RunLock) -> dict:
    cls = registry.MODELS.get(config.model_name)
    if config.train.jit_compile and cls is not None and not cls.xla_ready:
        raise config_lib.ConfigError(
            f"train.jit_compile (--jit-compile): model {config.model_name!r} does not compile "
            f"with XLA; only {', '.join(n for n, c in registry.MODELS.items() if c.xla_ready)} "
            "does")
    vocab = check_data(data_dir)
    asked = getattr(config.model, "loss", None)
    config = resolve_loss(config, vocab.size)
    if asked == "auto" and config.model.loss == "softmax":
        defaults = type(config.model)()
        unused = [o for k, o in (("num_negatives", "--num-negatives"),
                                 ("negative_exponent", "--negative-exponent"))
                  if getattr(config.model, k) != getattr(defaults, k)]
        if unused:
            print(f"note: {' and '.join(unused)} unused: the loss is the full softmax (--loss "
                  f"auto samples above {losses.AUTO_SOFTMAX_MAX_ITEMS:,} items; this catalogue "
                  f"has {vocab.num_items:,}); --loss sampled uses them", file=sys.stderr)
    check_current_rule(data_dir, config.model)
    strategy = make_strategy(config.train.strategy)
    lock.acquire()  # (after the checks of the data: a refused command makes no folder)
    changed = prepare_run_dir(run_dir, config, data_dir, vocab)
    tc = config.train
    tf.keras.utils.set_random_seed(tc.seed)
    mixed_float16 = False
    if tc.mixed_precision:
        mixed_float16 = bool(tf.config.list_physical_devices("GPU"))
        tf.keras.mixed_precision.set_global_policy("mixed_float16" if mixed_float16 else "mixed_bfloat16")
    users = batching.CachedUsers(data_dir, "train", tc.cache_events)
    total_steps = tc.steps or estimate_steps(data_dir, tc, users)
    _note_high_level_share(config, users, data_dir)
    with strategy.scope():
        model = registry.build_model(config.model_name, config.model, vocab.size, item_counts=vocab.counts)
        optimizer = make_optimizer(tc, total_steps)
        if mixed_float16:
            optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
        state = TrainState(model.train_cache(tc.batch_size))
    if hasattr(model, "skip_chunk_context"):  # (HierTCN: no context work on short sessions)
        longest = longest_train_session(data_dir, tc, users)
        model.skip_chunk_context(longest, tc.max_session_length)
        for note in (deep_dilations_note(model.config, longest),
                     long_chunks_note(model.config, tc.max_session_length)):
            if note:
                print(note, file=sys.stderr)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, train_state=state)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(run_dir, registry.CHECKPOINT_DIR),
                                         max_to_keep=tc.keep_checkpoints)
    # Two kept: the one best.json names survives until best.json names the next.
    best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                              os.path.join(run_dir, registry.BEST_DIR), max_to_keep=2)
    # the run's folders made here, as the umask says (TensorFlow makes them 0755 whatever it
    # says: a group sharing the run with umask 002 could not resume it); best/ when a best
    # is saved (none: no folder)
    for folder in (registry.CHECKPOINT_DIR, LOGS_DIR):
        os.makedirs(os.path.join(run_dir, folder), exist_ok=True)
    _remove_partial_saves(run_dir)
    if manager.latest_checkpoint and not tf.io.gfile.exists(manager.latest_checkpoint + ".index"):
        # (removed by hand, or a copy without them: a kill while saving leaves the index on the
        # one before) refused before anything of the run's is changed for it
        raise registry.checkpoint_missing(manager.latest_checkpoint, run_dir)
    best = registry.read_best(run_dir)
    if best is not None and not manager.latest_checkpoint:
        # the training that chose it is gone (its first checkpoint never completed, or the
        # checkpoints were deleted): this run starts from step 0 and chooses its own
        print(f"note: {run_dir} holds a best checkpoint of step {best['step']} but no training "
              "checkpoint to resume: that training is lost, so its best is discarded and the "
              "run starts from step 0", file=sys.stderr)
        shutil.rmtree(os.path.join(run_dir, registry.BEST_DIR))
        best = None
    elif best is not None and not tf.io.gfile.exists(os.path.join(
            run_dir, registry.BEST_DIR, os.path.basename(best["checkpoint"]) + ".index")):
        # best.json was not rewritten after a newer best's save, which deleted the one it
        # names (two kills at those moments): its record goes, the next evaluation chooses
        print(f"note: {run_dir}'s best.json names checkpoint {best['checkpoint']} of step "
              f"{best['step']}, which is gone (a newer best was being recorded when the run "
              "stopped): that record is discarded, and the next valid evaluation chooses "
              "the best again", file=sys.stderr)
        os.remove(os.path.join(run_dir, registry.BEST_DIR, registry.BEST_FILE))
        best = None
    batcher = batching.QueueBatcher(
        users, tc.batch_size, tc.sessions_per_batch, tc.max_session_length,
        seed=tc.seed, shuffle_buffer=tc.shuffle_buffer, epochs=tc.epochs if not tc.steps else None,
        keep_positions=4 * batching.dataset_lead(tc.prefetch) + 16,
        history_size=model.history_size)
    restored, position = None, {}
    if manager.latest_checkpoint:
        try:
            restored = ckpt.restore(manager.latest_checkpoint)
            restored.assert_existing_objects_matched()
        except tf.errors.NotFoundError:
            raise registry.checkpoint_missing(manager.latest_checkpoint, run_dir) from None
        except (tf.errors.OpError, IndexError) as e:  # damaged or truncated files
            raise registry.checkpoint_unreadable(manager.latest_checkpoint, e,
                                                 config.model_name) from None
        except (AssertionError, ValueError) as e:
            if restored is not None:
                restored.expect_partial()  # no warning per unread value at exit
            raise registry.RunError(
                f"{run_dir}: its checkpoint does not match the {config.model_name} model this code "
                f"builds (saved by another version?); train into another --model-dir") from e
        if isinstance(optimizer.learning_rate, tf.Variable):
            # a constant rate is a variable the checkpoint restored: this command's rate
            # applies (a resumed run may lower it, `save_config`)
            optimizer.learning_rate.assign(tc.learning_rate)
        position = json.loads(state.position.numpy().decode("utf-8"))
        batcher.restore(position)
    start_step = int(state.step.numpy())
    # The checkpoint was saved before an evaluation of its step, which may not have been
    # done (killed, interrupted or failed in between; a summary of that step is written
    # after every evaluation): done first, so no evaluation is skipped by a resume.
    current = _summary_is_current(run_dir, start_step)
    evaluation_due = bool(tc.eval_every and start_step and not current
                          and position.get(EVALUATION_DUE) == start_step)
    stalled = _stalled(tc, best, start_step)
    # a run resumed with --epochs E whose generator is already into a pass after the E-th
    # (trained in steps before, or with more epochs): nothing left to train
    passes_done = bool(not tc.steps and tc.epochs and position and (
        position["epoch"] > tc.epochs
        or (position["epoch"] == tc.epochs and position["consumed"] > 0)))
    # a run that stopped at its --max-minutes (the whole run's training time) and is
    # resumed with the same limit: no time left (a larger --max-minutes trains on)
    out_of_time = bool(tc.max_minutes and position.get(TRAINED, {}).get("seconds", 0)
                       > 60 * tc.max_minutes)
    finished = (bool(tc.steps and start_step >= tc.steps) or stalled or passes_done
                or out_of_time)
    if finished and current:
        print(f"{run_dir} already holds {start_step} step{'s' * (start_step != 1)}"
              + (f", {_stall_text(tc, best)}" if stalled else "")
              + (f", more than --epochs {tc.epochs}" if passes_done else "")
              + (f", trained for its --max-minutes {tc.max_minutes:g}" if out_of_time else "")
              + "; nothing to do", file=sys.stderr)
        restored.expect_partial()  # Adam's slots are made by a step: none was run
        return registry.read_summary(run_dir) or {}

    train_step = make_train_step(model, optimizer, state, strategy, mixed_float16, tc.jit_compile)
    # the run's first line, with or without the progress bar
    head = ""
    if model.history_size:
        mc = config.model
        window = getattr(mc, "attention_size", model.history_size)
        head = f", repeat head over the user's last {window} items"
        starts = getattr(model, "num_start_items", 0)
        head += f" and the first items of their last {starts} sessions" if starts else ""
        if getattr(mc, "seen_bias", False):
            head += f", seen bias over the last {model.history_size}"
    items = vocab.size - schema.NUM_RESERVED
    asked = getattr(config.model, "num_negatives", None)
    if model.sampler is None:
        output = f"full softmax over {items:,} items"
    elif model.sampler.exact:
        output = (f"sampled softmax: --num-negatives {asked:,} is every item, so the exact "
                  f"softmax over {model.sampler.num_sampled:,} items")
    else:
        negatives = model.sampler.num_sampled
        output = (f"sampled softmax, {negatives} negative{'s' * (negatives != 1)} of "
                  f"{items:,} items")
    steps = (f"steps {start_step + 1}-{total_steps}"
             f"{_passes_text(data_dir, tc, total_steps, start_step)}"
             if not finished else
             f"its {start_step} steps are trained; writing the summary it lacks")
    if tc.max_minutes and not finished:  # (the bar's ETA is the steps' end: the cap is said)
        steps += f" or --max-minutes {tc.max_minutes:g} of training, whichever comes first"
    print(f"training {config.model_name} ({output}){head}: "
          f"{steps}, batches of {tc.batch_size} x {tc.sessions_per_batch} x {tc.max_session_length}, "
          f"{data_dir} -> {run_dir}", file=sys.stderr)
    writer = tf.summary.create_file_writer(os.path.join(run_dir, LOGS_DIR))
    # The bar counts this process's steps (its time estimate assumes it started at 0) and
    # goes to stderr with the rest of the progress: stdout holds the summary JSON alone.
    bar = tf.keras.utils.Progbar(total_steps - start_step, stateful_metrics=["loss"],
                                 verbose=1 if progress else 0, unit_name="step")
    # the line a step or an interruption line starts with: ends the bar's line
    after_bar = "\n" if progress else ""
    if not (sys.stderr.isatty() or argtypes.in_notebook()):
        # a log file, not a terminal: a line every LOG_FILE_SECONDS instead of one
        # line redrawn with \r and \b (Keras redraws on any POSIX system)
        bar._dynamic_display, bar.interval = False, LOG_FILE_SECONDS
    dataset = batching.make_dataset(batcher, tc.prefetch)
    # every step's events; those of the steps timed in step_seconds (not a process's
    # first, which traces), the rate's
    events, timed_events, step_seconds, last_loss, valid = 0, 0, 0.0, float("nan"), None
    wall_start, stop_reason, eval_seconds = time.perf_counter(), "epochs", 0.0
    # what the processes before this one trained, up to the checkpoint resumed from: a
    # run's time limit and its reported time and rate are the whole run's
    before = {"seconds": 0.0, "step_seconds": 0.0, "events": 0, **position.get(TRAINED, {})}
    if TRAINED not in position and start_step:
        # a checkpoint of a version before 2026-12-03 records no totals: the summary of the
        # run that ended at its step has them (else this process's alone are counted)
        ended = registry.read_summary(run_dir) or {}
        if ended.get("steps") == start_step:
            before.update({key: ended[key] for key in ("seconds", "step_seconds", "events")
                           if isinstance(ended.get(key), (int, float))})
        else:
            print(f"note: {run_dir}'s checkpoint of step {start_step} (an older version's) "
                  "records no training totals: the summary's events, seconds and "
                  "--max-minutes count this command's steps alone", file=sys.stderr)
    # (a checkpoint of an older version counted the timed steps' events alone)
    before.setdefault("timed_events", before["events"])
    # (and the loss of its last step: the summary's of a run resumed with no step left)
    if before.get("loss") is not None:
        last_loss = float(before["loss"])

    def wall_per_step(now: float) -> float:
        """Wall seconds a step of this process since its first (which traces), up to `now`,
        as --max-minutes counts them: the loop's and the checkpoints' time included, the
        valid evaluations' not (for the cap's and the evaluations' notes)."""
        return (now - cap_clock[0] - (eval_seconds - cap_clock[1])) / (step - start_step - 1)

    def trained() -> dict:
        return {"seconds": before["seconds"] + time.perf_counter() - wall_start - eval_seconds,
                "step_seconds": before["step_seconds"] + step_seconds,
                "events": before["events"] + events,
                "timed_events": before["timed_events"] + timed_events,
                "loss": last_loss if math.isfinite(last_loss) else None}
    # The batch index of this process's first step: the batcher's next batch, since only
    # the dataset draws from it. Each step consumes one batch, in order.
    first_index, last_saved = batcher.batch_index, start_step
    last_saved_at = time.monotonic()
    config_saved = False  # whether this command's config is recorded (at its first step)
    last_trained = None  # what the last checkpoint of this process recorded (`trained`)
    valid_users = None  # the users of every valid evaluation (None: all)
    told_no_targets = False
    evaluated_step = None  # the step of this process's last valid evaluation
    # Kept from one evaluation to the next: the scorer (traced once) and, within
    # train.cache_events events, the evaluated users' records (read once).
    valid_scorer = valid_records = None
    if tc.eval_every:
        from model import evaluate  # (lazily, as in `evaluate_valid`)

        budget = config_lib.eval_event_budget(tc.eval_events, items)
        if tc.eval_users or budget:
            sample = evaluate.sample_users(data_dir, "valid", tc.eval_users, budget)
            valid_users = sample.ids
            if sample.ids is not None:  # which limit bound, and what the evaluations skip
                limit = (f"--eval-users {tc.eval_users:,}" if 0 < tc.eval_users <= sample.users
                         else f"--eval-events {budget:,}")
                over = (f"; {sample.over_budget:,} user{'s' * (sample.over_budget != 1)} "
                        f"holding over {budget:,} valid events alone left out: a crawler?"
                        if sample.over_budget else "")
                if budget and sample.events > budget:  # (every user holds more)
                    over = (f"; every valid user holds over {budget:,} events: the one with "
                            "the fewest is evaluated")
                print(f"valid evaluations: {sample.users:,} of {sample.all_users:,} users, "
                      f"{sample.events:,} of {sample.all_events:,} target events ({limit}"
                      f"{over}; each target event is ranked against {items:,} items; the "
                      "metrics average over those after each session's first)",
                      file=sys.stderr)
        valid_scorer = KerasScorer(model, name=config.model_name)
        valid_records = evaluate.load_users(data_dir, "valid", valid_users, tc.cache_events)

    def save(step: int, evaluation_follows: bool, trained_now: dict | None = None) -> None:
        nonlocal last_saved, last_trained, last_saved_at
        steps_done = int(state.step.numpy()) - start_step
        if steps_done > 0:
            record_config()
            # each step consumed one batch, in order: exact even when an interrupt lands
            # between a step and the bookkeeping after it
            last_index = first_index + steps_done - 1
            after = batcher.position_after(last_index)
            after[EVALUATION_DUE] = step if evaluation_follows else None
            last_trained = after[TRAINED] = trained_now or trained()
            state.position.assign(json.dumps(after))
        writer.flush()  # first: once a checkpoint exists, the curve up to it is on disk
        manager.save(checkpoint_number=step)
        last_saved, last_saved_at = step, time.monotonic()

    def record_config() -> None:
        """Records this command's config once it has trained a step (`save_config`)."""
        nonlocal config_saved, best
        if not config_saved:
            save_config(run_dir, config, start_step, changed,
                        rate_change(tc, changed, start_step, total_steps))
            if not tc.eval_every and best is not None:
                # --eval-every 0 means the last weights are used: an earlier process's best
                # would otherwise go on being what evaluate and export load, the steps
                # trained from here on ignored; kept aside, not deleted
                kept = os.path.join(run_dir, f"{registry.BEST_DIR}-until-step-{start_step}")
                if os.path.exists(kept):
                    shutil.rmtree(kept)
                os.rename(os.path.join(run_dir, registry.BEST_DIR), kept)
                print(f"note: --eval-every 0: the last weights are used from now on, not the "
                      f"best on valid of the earlier steps (step {best['step']}), which is "
                      f"kept in {kept}", file=sys.stderr)
                best = None
            # an earlier process's summary no longer describes the run (its checkpoint is
            # about to be replaced): gone until this one writes its own, so a kill from
            # here on leaves a run that says it did not finish (`registry.training_note`)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, SUMMARY_FILE))
            config_saved = True

    def evaluate_and_select(step: int) -> dict:
        nonlocal best, told_no_targets, evaluated_step
        # (a long evaluation's progress ends the bar's line: the lines after it do not)
        out = _LeadOnce(after_bar) if progress else None
        metrics = _log_valid(model, data_dir, valid_users, step, valid_scorer, valid_records,
                             lead=after_bar, progress_out=out)
        lead = after_bar if out is None else out.rest
        if metrics["events"] <= metrics["unknown_targets"]:
            # nothing to select on: keep no best, so the last weights are the ones used
            if not told_no_targets:
                valid_split = schema.read_stats(data_dir).get("splits", {}).get("valid", {})
                why = (f"no known valid targets in {data_dir}" if metrics["events"] else
                       f"the valid split of {data_dir} has no users (the pipeline's "
                       "--valid-fraction 0?)" if valid_split.get("users") == 0 else
                       f"no valid position to score in {data_dir} (every valid session holds "
                       "one item: positions from a session's second item on are scored; the "
                       "pipeline's --min-session-length 1 keeps such sessions)")
                print(f"{lead}{why}: no model selection, the last weights are used",
                      file=sys.stderr)
                told_no_targets = True
        elif is_better(metrics, best):
            os.makedirs(os.path.join(run_dir, registry.BEST_DIR), exist_ok=True)  # (umask's)
            path = best_manager.save(checkpoint_number=step)
            best = {"step": step, "checkpoint": os.path.basename(path), **metrics}
            write_json(os.path.join(run_dir, registry.BEST_DIR, registry.BEST_FILE), best)
        # done once its selection is recorded: a stop signal before that leaves it due in
        # the stop's checkpoint, so the rerun evaluates it again
        evaluated_step = step
        return metrics

    with writer.as_default():
        try:
            if evaluation_due:
                t1 = time.perf_counter()
                valid = evaluate_and_select(start_step)
                eval_seconds += time.perf_counter() - t1
            # the step fetches its batch from the iterator itself (`make_train_step`)
            batches = iter(dataset) if not finished else None
            traced = cap_noted = eval_noted = False
            while batches is not None:
                if _stop_signal[0] is not None:  # taken, and its KeyboardInterrupt lost
                    raise KeyboardInterrupt(f"signal {_stop_signal[0]}")
                t0 = time.perf_counter()
                _counting_step[0] = traced
                try:
                    loss, n = train_step(batches)
                except tf.errors.OutOfRangeError:  # the last epoch is done
                    batching.raise_producer_error(batcher)  # (unless the batcher failed)
                    break
                traced = True
                record_config()
                last_loss = float(loss.numpy())
                step = int(state.step.numpy())
                step_events = int(n.numpy())
                events += step_events
                if step > start_step + 1:  # the first step of a process includes tracing
                    step_seconds += time.perf_counter() - t0
                    timed_events += step_events
                else:  # (where the steps after it start, for the cap's note)
                    cap_clock = (time.perf_counter(), eval_seconds)
                if not math.isfinite(last_loss):
                    kept = (f"the last good checkpoint in {manager.directory} is kept"
                            if manager.latest_checkpoint else "no checkpoint was written yet")
                    raise TrainingError(f"loss is {last_loss} at step {step}: stopped; {kept} "
                                        "(try a lower --learning-rate)")
                rate = timed_events / max(step_seconds, 1e-9)
                if step - start_step == 1 and total_steps - start_step > 1:
                    # the bar's first line waits for the second step, since Keras
                    # estimates the time left at step 1 from that step, whose tracing
                    # takes 100 times a step ("1/2000 ... ETA: 5:33:07" for a run of 3
                    # minutes, in a log file for the 30 s until the next line; on a
                    # terminal "1/80 ... ETA: 8:15 - events/s: 0" of a run of 40 s, until
                    # the next step); from step 2 on it times the steps after the first
                    bar._time_after_first_step = time.time()
                else:
                    with contextlib.redirect_stdout(sys.stderr):
                        # (Keras's ETA is the time per step so far: the valid
                        # evaluations are in it once one has run among this process's
                        # steps; one owed at the start is not)
                        untimed = (bool(tc.eval_every) and step < total_steps
                                   and (evaluated_step or 0) <= start_step)
                        _update_bar(bar, step - start_step, [("loss", last_loss)],
                                    {"events/s": f"{rate:,.0f}",
                                     "valid": "not in the ETA yet" if untimed else None,
                                     # (the ETA is the steps' end, which the cap may cut)
                                     "--max-minutes": _time_left_text(
                                         60 * tc.max_minutes - trained()["seconds"])
                                     if tc.max_minutes else None})
                if (tc.max_minutes and not cap_noted and step - start_step > 1
                        and step_seconds >= min(CAP_NOTE_SECONDS, 6 * tc.max_minutes)):
                    cap_noted = True
                    timed_steps = step - start_step - 1
                    note = _cap_note(tc, step, total_steps,
                                     60 * tc.max_minutes - trained()["seconds"],
                                     wall_per_step(time.perf_counter()), trained()["events"],
                                     timed_events / timed_steps, data_dir,
                                     items if model.sampler is None else None)
                    if note:
                        print(f"{after_bar}{note}", file=sys.stderr)
                if step % LOG_EVERY == 0:
                    _scalar("loss", last_loss, step=step)
                    _scalar("events_per_s", rate, step=step)
                _counting_step[0] = False
                if _stop_signal[0] is not None:  # (noted while the step was counted)
                    raise KeyboardInterrupt(f"signal {_stop_signal[0]}")
                if (step % tc.checkpoint_every == 0
                        or time.monotonic() - last_saved_at >= CHECKPOINT_SECONDS):
                    save(step, bool(tc.eval_every) and (step % tc.eval_every == 0 or
                                                        bool(tc.steps and step >= tc.steps)))
                if tc.eval_every and step % tc.eval_every == 0:
                    t1 = time.perf_counter()
                    valid = evaluate_and_select(step)
                    took = time.perf_counter() - t1
                    # (after a whole interval of this process's steps)
                    if (not eval_noted and step - start_step > tc.eval_every
                            and step < total_steps and valid.get("events")):
                        eval_noted = True
                        note = _eval_note(tc, took, wall_per_step(t1), valid["events"], items,
                                          total_steps)
                        if note:
                            print(f"{after_bar}{note}", file=sys.stderr)
                    eval_seconds += took
                    if _stalled(tc, best, step) and not (tc.steps and step >= tc.steps):
                        print(f"stopping at step {step}: {_stall_text(tc, best)}",
                              file=sys.stderr)
                        stop_reason = "no_improvement"
                        break
                if tc.steps and step >= tc.steps:
                    stop_reason = "steps"
                    break
                if tc.max_minutes and trained()["seconds"] > 60 * tc.max_minutes:
                    stop_reason = "time"
                    break
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`main`): keep what was trained
            stop_reason = "interrupted"
        except tf.errors.OpError:
            batching.raise_producer_error(batcher)  # the batcher's own error, when it is one
            raise
        finally:
            _counting_step[0] = False
            batching.stop_feeds(batcher)  # (done with the dataset: its iterator goes quickly)
        if _stop_signal[0] is not None:  # (a stop whose KeyboardInterrupt was lost)
            stop_reason = "interrupted"
        step = int(state.step.numpy())
        if stop_reason == "time" and step > start_step:
            # said, as the other early stops are: the bar's last line (up to 30 s old in
            # a log file) shows an earlier step and the time left to the steps' end
            epochs = _epochs_text(data_dir, trained()["events"])
            print(f"{after_bar}stopping at step {step}: --max-minutes {tc.max_minutes:g} "
                  f"reached ({trained()['seconds']:.0f} s of training"
                  + (f", {epochs}" if epochs else "") + "); the latest "
                  "weights are checkpointed, a larger --max-minutes trains on",
                  file=sys.stderr)
        if stop_reason == "interrupted":
            print(f"{after_bar}interrupted at step {step}: "
                  + ("saving a checkpoint; the same command resumes from it" if step > last_saved
                     else "no step since the last checkpoint, nothing to save; the same "
                          "command resumes"), file=sys.stderr)
        if step == start_step:  # no step in this process: nothing to save or to report
            if restored is not None:
                restored.expect_partial()  # Adam's slots are made by a step: none was run
            if stop_reason == "interrupted":
                return {"model": config.model_name, "steps": step, "steps_this_run": 0,
                        "stopped_by": stop_reason}
            if start_step and evaluated_step is None and _summary_is_current(run_dir, step):
                print(f"{run_dir} already holds {start_step} step{'s' * (start_step != 1)}, "
                      "all its epochs; nothing "
                      "to do", file=sys.stderr)
                return registry.read_summary(run_dir) or {}
            if finished:
                stop_reason = ("no_improvement" if stalled else "epochs" if passes_done else "steps")
        # The summary says what the last checkpoint records (its figures taken as it
        # began), so a resumed run's figures add up to its processes' exactly.
        if step > last_saved:
            whole = trained()
            while True:
                try:
                    save(step, bool(tc.eval_every) and evaluated_step != step
                         and (step % tc.eval_every == 0 or stop_reason != "interrupted"), whole)
                    break
                except KeyboardInterrupt:  # the first stop signal, during this save: it is
                    # written all the same (the signals after it are noted and ignored)
                    stop_reason = "interrupted"
                    print(f"{after_bar}interrupted at step {step}: saving a checkpoint; the "
                          "same command resumes from it", file=sys.stderr)
        else:
            whole = last_trained or trained()
        seconds = whole["seconds"] - before["seconds"]
        if _stop_signal[0] is not None and stop_reason != "interrupted":  # (lost in the save)
            stop_reason = "interrupted"
            print(f"{after_bar}interrupted at step {step}: its checkpoint is written; the "
                  "same command resumes from it", file=sys.stderr)
        # the last evaluation, unless interrupted (a stop signal's grace period is short)
        if tc.eval_every and step and evaluated_step != step and stop_reason != "interrupted":
            t1 = time.perf_counter()
            valid = evaluate_and_select(step)
            eval_seconds += time.perf_counter() - t1
            if _stop_signal[0] is not None:  # (its KeyboardInterrupt lost in the evaluation)
                raise KeyboardInterrupt(f"signal {_stop_signal[0]}")
    summary = {
        "model": config.model_name, "steps": step, "steps_this_run": step - start_step,
        "stopped_by": stop_reason, "seconds": round(whole["seconds"], 3),
        "seconds_this_run": round(seconds, 3),
        # this process's time from its first step, and its valid evaluations' (not
        # in `seconds`)
        "wall_seconds_this_run": round(time.perf_counter() - wall_start, 3),
        "eval_seconds_this_run": round(eval_seconds, 3),
        "step_seconds": round(whole["step_seconds"], 3),
        "events": whole["events"],
        # (null where no step was timed: a process's first step includes tracing)
        "events_per_s": (round(whole["timed_events"] / max(whole["step_seconds"], 1e-9), 1)
                         if whole["timed_events"] else None),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "final_loss": last_loss if math.isfinite(last_loss) else None,  # strict JSON
        "valid": valid, "best": best}
    writer.flush()  # (the last evaluation's scalars: the command skips the teardown)
    if not os.path.exists(os.path.join(run_dir, registry.CONFIG_FILE)):
        raise TrainingError(f"{run_dir} was removed while this run trained (its "
                            f"{registry.CONFIG_FILE} is gone, and evaluation and export need "
                            "it): train again into a new --model-dir")
    write_json(os.path.join(run_dir, SUMMARY_FILE), summary)
    return summary


def _stalled(tc: config_lib.TrainConfig, best: dict | None, step: int) -> bool:
    """Whether the best valid evaluation is `patience` evaluations old at `step`."""
    return bool(tc.patience and tc.eval_every and best
                and step - best["step"] >= tc.patience * tc.eval_every)


def _stall_text(tc: config_lib.TrainConfig, best: dict) -> str:
    evaluations = "evaluation" if tc.patience == 1 else "evaluations"
    return (f"valid has not improved (recall@20, then mrr@20) for {tc.patience} {evaluations} "
            f"{tc.eval_every} step{'s' * (tc.eval_every != 1)} apart since its best, at step {best['step']} (recall@20 "
            f"{best['recall@20']:.4f}), whose weights are used (--patience 0 trains every "
            "step)")


def is_better(metrics: dict, best: dict | None) -> bool:
    """Whether valid `metrics` beat the `best` record: Recall@20, then MRR@20, strictly."""
    if best is None:
        return True
    return (metrics["recall@20"], metrics["mrr@20"]) > (best["recall@20"], best["mrr@20"])


def _log_valid(model, data_dir: str, user_ids, step: int, scorer=None, users=None,
               lead: str = "", progress_out: _LeadOnce | None = None) -> dict:
    """Evaluates on valid and prints `step N: valid recall@20 R mrr@20 M` (after `lead`),
    saying so when most targets are items outside the vocabulary (misses by the protocol).
    `progress_out`: an evaluation that takes long shows its progress there meanwhile
    (after its lead; the line then starts with what is left of that lead, `rest`, instead
    of `lead`), cleared when it ends."""
    metrics = evaluate_valid(model, data_dir, user_ids, scorer, users, progress_out)
    if progress_out is not None:
        lead = progress_out.rest
    events, unknown = metrics["events"], metrics["unknown_targets"]
    if events:  # (no curve of zeros where nothing was scored)
        for key in ("recall@20", "mrr@20"):
            _scalar(f"valid/{key}", metrics[key], step=step)
    note = ""
    if events and unknown > schema.UNKNOWN_NOTE_SHARE * events:
        count = schema.read_stats(data_dir).get("options", {}).get("min_item_count", 5)
        note = (f" ({unknown:,} of {events:,} targets are items outside the vocabulary, "
                f"misses for every model: recall@20 can reach {1 - unknown / events:.4f} at "
                "most; " + ("see the pipeline's --min-item-count)" if count > 1 else
                            "items that train never holds, --min-item-count is 1)"))
    if events:  # (nothing scored: the caller says why, once)
        print(f"{lead}step {step}: valid recall@20 {metrics['recall@20']:.4f} "
              f"mrr@20 {metrics['mrr@20']:.4f}{note}", file=sys.stderr)
    return {k: metrics[k] for k in ("recall@20", "mrr@20", "events", "unknown_targets")}


def _summary_is_current(run_dir: str, step: int) -> bool:
    """Whether RUN/train_summary.json is that of a run that ended at `step` (not one left
    by an earlier, interrupted process when the last one failed before writing its own)."""
    summary = registry.read_summary(run_dir) or {}
    return summary.get("steps") == step and summary.get("stopped_by") != "interrupted"


def read_scalars(run_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps int64 [n], values float64 [n]) of a scalar the training loop logged to
    RUN/logs for TensorBoard, in step order: `loss` and `events_per_s` (the rate of the
    process that logged it, as its progress bar shows it; `train_summary.json`'s is the
    whole run's) every `LOG_EVERY` steps, `valid/<metric>` at each valid evaluation. A step
    logged by more than one process (a resumed run repeats the steps after its last
    checkpoint) keeps its latest value.

    Raises:
      FileNotFoundError: RUN/logs holds no event file.
    """
    files = tf.io.gfile.glob(os.path.join(run_dir, LOGS_DIR, "events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event file in {os.path.join(run_dir, 'logs')}")
    latest: dict[int, tuple[float, float]] = {}  # step -> (wall time, value)
    for path in files:
        for event in _events(path):
            for value in event.summary.value:
                if value.tag != tag:
                    continue
                number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                          else float(value.simple_value))
                if event.wall_time >= latest.get(event.step, (-math.inf, 0.0))[0]:
                    latest[event.step] = (event.wall_time, number)
    steps = np.array(sorted(latest), np.int64)
    return steps, np.array([latest[s][1] for s in steps], np.float64)


@argtypes.noting
def _interrupt(signum, frame):
    """The first Ctrl-C or SIGTERM: stops training; the signals that follow while the
    checkpoint is written are noted and ignored (a second Ctrl-C, or a scheduler's signal to
    the process group and to the process, arrives within milliseconds: it used to land
    between the stop and the save and lose every step since the last checkpoint)."""
    _stop_signal[0] = signum
    for stop in _STOP_SIGNALS:
        if signal.getsignal(stop) is _interrupt:
            signal.signal(stop, _already_stopping)
    if _counting_step[0]:
        return  # (the training loop stops once the step is counted)
    raise KeyboardInterrupt(f"signal {signum}")


def _lost_interrupts_unsaid(unraisable) -> None:
    """`sys.unraisablehook` while `main` runs in the main thread (where stop signals are
    handled): a stop signal's KeyboardInterrupt raised in a finalizer, which Python drops,
    is not printed as "Exception ignored" with a traceback (`_stop_signal` keeps it);
    anything else goes to the hook before."""
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _stop_signal[0] is not None):
        _previous_unraisablehook[0](unraisable)


_previous_unraisablehook = [sys.unraisablehook]


@argtypes.noting
def _already_stopping(signum, frame):
    print("already stopping: the checkpoint is being written (SIGKILL stops without it)",
          file=sys.stderr)


# SIGHUP: the terminal closed (an ssh session dropped) stops a run as Ctrl-C does, with a
# checkpoint, unless the run was started to outlive it (nohup: ignored, and left so)
_HANGUP = getattr(signal, "SIGHUP", None)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((_HANGUP,) if _HANGUP else ())
# The stop signal `_interrupt` took since `main` began (None: none). Its KeyboardInterrupt
# can be lost: raised while Python runs a finalizer (a `__del__`), it is printed and
# dropped, and the run went on to its last step with every later stop signal only noted
# (`_already_stopping`); the training loop looks here between steps as well.
_stop_signal: list[int | None] = [None]
# While a traced training step runs and is counted, a stop signal only notes itself: the
# loop stops right after the count (a KeyboardInterrupt raised as the step returned lost
# its events, loss and logged scalar: an interrupted run's totals came out a batch short).
# Not while the first step of a process traces: a stop then is taken at once.
_counting_step = [False]


def _events(path: str):
    """The `Event`s of one TensorBoard file; a record cut short by a killed writer ends it."""
    from tensorflow.core.util import event_pb2

    try:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield event_pb2.Event.FromString(record)
    except tf.errors.DataLossError:
        return


def main(argv: Sequence[str] | None = None, restore_signals: bool = True) -> int:
    """Entry point; returns the exit status (2: a usage or data error, 130: interrupted by
    Ctrl-C or SIGTERM, after a checkpoint of the steps done).

    It takes SIGTERM and SIGINT while it runs and gives the caller's handlers back when it
    returns (a notebook, a service); `restore_signals=False` (the command line) keeps its
    own until the process ends, so that a second stop signal after the checkpoint is
    still a note, not a traceback or a kill."""
    args = parse_args(argv)
    handlers = {}  # the caller's, given back on return
    relay = None
    _stop_signal[0] = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        if restore_signals:
            handlers = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
        signal.signal(signal.SIGTERM, _interrupt)  # a preempted job saves, as on Ctrl-C
        if _HANGUP and signal.getsignal(_HANGUP) in (signal.SIG_DFL, _interrupt,
                                                     _already_stopping):
            signal.signal(_HANGUP, _interrupt)  # (not where nohup ignores it)
        # Ctrl-C too, except where it is ignored (a background job); a second `main` in
        # one process (a notebook) takes it back from an earlier stop's `_already_stopping`
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _interrupt,
                                               _already_stopping):
            signal.signal(signal.SIGINT, _interrupt)
    previous_hook = sys.unraisablehook
    hooked = in_main_thread and previous_hook is not _lost_interrupts_unsaid
    if hooked:
        _previous_unraisablehook[0] = previous_hook
        sys.unraisablehook = _lost_interrupts_unsaid
    try:
        if in_main_thread:  # (a signal that another thread took reaches the main thread)
            relay = argtypes.MainThreadRelay.start(_STOP_SIGNALS)
        return _main(args, command=not restore_signals)
    except Exception as e:
        # a stop signal during the set-up, raised inside TensorFlow's Python calls, can come
        # out as another error (SystemError, ValueError) with the interrupt as its context
        if not argtypes.interrupt_in_chain(e):
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        if hooked and sys.unraisablehook is _lost_interrupts_unsaid:
            sys.unraisablehook = previous_hook
        try:
            if relay is not None:
                relay.close()
        finally:
            for sig, handler in handlers.items():
                if handler is not None:  # (None: not set from Python; left as it is)
                    signal.signal(sig, handler)


def _main(args: argparse.Namespace, command: bool = False) -> int:
    try:
        if os.path.exists(args.model_dir) and not os.path.isdir(args.model_dir):
            raise TrainingError(f"--model-dir {args.model_dir} is a file: pass a run folder "
                                "(created if missing)")
        wrong = storage.output_folder_error("--model-dir", args.model_dir, args.data,
                                            "a model.train run folder", "a run folder")
        if wrong:
            raise TrainingError(wrong)
        config = resolve_config(args)
        summary = train(args.data, args.model_dir, config, progress=not args.no_progress)
    except (schema.DataError, config_lib.ConfigError, registry.RunError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except tf.errors.ResourceExhaustedError as e:  # (a native bad_alloc aborts instead)
        if storage.storage_error(e) or storage.path_error(e):
            return _storage_failure(args, e)  # (a full disk or a quota: TensorFlow's same class)
        shape = re.search(r"shape ?\[[\d, ]+\]", str(e.message))
        kept = tf.train.latest_checkpoint(os.path.join(args.model_dir, registry.CHECKPOINT_DIR))
        print("error: out of memory in training"
              + (f" (a tensor of {shape.group(0)})" if shape else "")
              + ": lower --batch-size (or --sessions-per-batch, --max-session-length); with "
              "the full softmax each of the B x S x L positions scores the whole catalogue, "
              "--loss sampled needs far less"
              + (f" (another batch geometry than its {os.path.basename(kept)}'s: a new "
                 "--model-dir)" if kept else ""), file=sys.stderr)
        return 1
    except (OSError, tf.errors.OpError) as e:
        return _storage_failure(args, e)
    if command:  # done: a stop signal now would only say "interrupted" of a finished run
        processes.ignore_stop_signals()
    print(json.dumps(summary))
    return 130 if summary.get("stopped_by") == "interrupted" else 0


def _storage_failure(args: argparse.Namespace, e: BaseException) -> int:
    """The one line (and status) of a write that failed in the run folder; any other
    error is raised again."""
    where = storage.path_error(e)
    if where:
        print(f"error: cannot write to {args.model_dir}: {where}", file=sys.stderr)
        return 2
    reason = storage.reason_or_raise(e)
    _remove_partial_saves(args.model_dir)
    kept = tf.train.latest_checkpoint(os.path.join(args.model_dir, registry.CHECKPOINT_DIR))
    fix = storage.remedy(reason)
    try:
        best = None if kept else registry.read_best(args.model_dir)
    except (OSError, ValueError):
        best = None
    if kept:
        said = (f"it keeps its last complete checkpoint ({os.path.basename(kept)}): {fix} "
                "and rerun the same command to resume")
    elif best is not None:  # (the best-on-valid copy was saved, the training one was not)
        said = (f"no training checkpoint was complete, so a rerun of the same command starts "
                f"again from step 0 ({fix} first); until then best/ holds the best-on-valid "
                f"weights of step {best.get('step')}, which model.evaluate and serving.export "
                "read")
    elif storage.read_only(args.model_dir):
        said = f"nothing could be written there: {fix} and rerun the same command"
    else:
        said = (f"no checkpoint was complete, so any steps trained are lost: {fix} and "
                "rerun the same command to start again")
    print(f"error: cannot write to {args.model_dir}: {reason}; {said}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    _status = processes.interrupted_is(INTERRUPTED, lambda: main(restore_signals=False))
    processes.exit_now(_status)
