"""Model names → classes, and loading a trained run folder.

A run folder (`--model-dir RUN`) holds `config.json` (the resolved `RunConfig`),
`items.tsv` (the vocabulary it was trained on), `checkpoints/` (the latest ones, with the
optimizer and data position, for resuming), `best/` (the model weights with the best valid
Recall@20 so far and `best/best.json` naming them) and `train_summary.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re

import numpy as np
import tensorflow as tf

from model import config as config_lib, quiet
from model.gru4rec import GRU4Rec
from model.hiertcn import HierTCN
from model.hrnn import HRNN
from model.keras_scorer import KerasScorer
from model.sequence_model import SequenceModel
from model.tcn import FlatTCN
from pipeline import schema

MODELS: dict[str, type[SequenceModel]] = {"hiertcn": HierTCN, "hrnn": HRNN, "gru4rec": GRU4Rec,
                                          "tcn": FlatTCN}

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
CHECKPOINT_CHOICES = ("best", "latest")


class RunError(ValueError):
    """A run folder that is missing, incomplete or does not match the data."""


class CheckpointGone(RunError):
    """The checkpoint chosen was removed before it was read: a training run still writing
    the folder keeps only its newest ones (`--keep-checkpoints`)."""

    def __init__(self, checkpoint: str, run_dir: str):
        super().__init__(f"{checkpoint} was removed while it was read (a training run still "
                         f"writing {run_dir} keeps only its newest checkpoints): run the "
                         "command again, or once the training is done")


# tries of `load_model` at the checkpoint it chooses, where training removes them meanwhile
LOAD_TRIES = 3


def config_classes() -> dict[str, type]:
    return {name: cls.config_class for name, cls in MODELS.items()}


def build_model(name: str, config, vocab_size: int, item_counts: np.ndarray | None = None,
                load_pretrained: bool = True) -> SequenceModel:
    """Creates a model with all its variables.

    Raises:
      RunError: unknown model name.
    """
    if name not in MODELS:
        raise RunError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    check_keras()
    model = MODELS[name](config, vocab_size, item_counts=item_counts, load_pretrained=load_pretrained)
    model.build_weights()
    return model


def check_keras() -> None:
    """Raises RuntimeError when `tf.keras` is Keras 3 in this process: TensorFlow binds it
    at its first use, so `TF_USE_LEGACY_KERAS=1` (set by `import model`) comes too late
    in a notebook that used `tf.keras` before, and a checkpoint of these tf-keras models
    would restore into a Keras 3 model only in part, without an error."""
    if not tf.keras.layers.Layer.__module__.startswith("tf_keras"):
        version = getattr(tf.keras, "__version__", "3")
        env = quiet.keras_env_error()
        raise RuntimeError(
            f"tf.keras is Keras {version} in this process, and these models need tf-keras "
            "(Keras 2): `import model` (or set TF_USE_LEGACY_KERAS=1) before tf.keras is first "
            "used, e.g. in the notebook's first cell, and restart the process"
            + (f" ({env})" if env else ""))


def check_vocabulary(run_vocab: schema.Vocabulary, data_vocab: schema.Vocabulary,
                     run_dir: str, data_dir: str) -> None:
    """Raises RunError when a data folder's items.tsv differs from the run's."""
    if run_vocab.ids != data_vocab.ids:
        if run_vocab.size == data_vocab.size:  # (the sizes alone said "42 ... (42)")
            at = next(i for i, (a, b) in enumerate(zip(data_vocab.ids, run_vocab.ids)) if a != b)
            differ = (f"as many entries ({data_vocab.size}), but entry {at} is "
                      f"{data_vocab.ids[at]!r} there and {run_vocab.ids[at]!r} in the run")
            raise RunError(f"the vocabulary of {data_dir} does not match the one {run_dir} was "
                           f"trained on: {differ}; use the data folder the model was trained "
                           "on, or a new --model-dir")
        raise RunError(
            f"the vocabulary of {data_dir} ({data_vocab.size} entries) does not match the one "
            f"{run_dir} was trained on ({run_vocab.size}): use the data folder the model was "
            "trained on, or a new --model-dir")


SUMMARY_FILE = "train_summary.json"  # written by model.train at the end of a run


def read_best(run_dir: str) -> dict | None:
    """The record of a run's best-on-valid checkpoint (`RUN/best/best.json`), or None.

    Returns:
      {"step", "checkpoint" (path prefix inside RUN/best), "recall@20", "mrr@20", "events"}.
    """
    path = os.path.join(run_dir, BEST_DIR, BEST_FILE)
    if not os.path.exists(path):
        return None

    def damaged(why: str) -> RunError:
        return RunError(f"{path} is damaged ({why}): restore it, or remove it (evaluation and "
                        "export then use the latest checkpoint, and a resumed training "
                        "chooses the best again at its next valid evaluation)")

    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f)
    except ValueError as e:  # (not JSON, or not UTF-8: a traceback in evaluate and train)
        raise damaged(str(e).splitlines()[0][:120]) from None
    numbers = ("step", "recall@20", "mrr@20")  # (what training compares and reports)
    if not isinstance(best, dict) or not isinstance(best.get("checkpoint"), str) or not all(
            isinstance(best.get(key), (int, float)) for key in numbers):
        raise damaged("no checkpoint, step, recall@20 and mrr@20 in it")
    return best


def read_summary(run_dir: str) -> dict | None:
    """RUN/train_summary.json (written by model.train at the end of each process); None
    where there is none, {} where it cannot be read (not JSON, not a record: damaged)."""
    try:
        with open(os.path.join(run_dir, SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def training_note(run_dir: str, which: str = "best") -> str | None:
    """One line for a command about to use a run whose training did not finish (interrupted,
    killed or still running), saying also when it holds no best-on-valid checkpoint yet;
    None for a finished run (one that never evaluates on valid, `--eval-every 0`, uses
    its last weights as documented)."""
    if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
        return None  # not a run folder: loading it says so
    notes = []
    summary = read_summary(run_dir)
    if summary is None:
        notes.append("its training has not finished (no train_summary.json: still running, "
                     "or killed)")
    elif not summary:  # (not JSON, not a record: it was a traceback)
        notes.append("its train_summary.json cannot be read: whether its training finished "
                     "is unknown (the same model.train command writes it again)")
    elif summary.get("stopped_by") == "interrupted":
        notes.append(f"its training was interrupted at step {summary.get('steps')} (the same "
                     "model.train command resumes it)")
    if notes and which == "best" and read_best(run_dir) is None:
        notes.append("it has no best-on-valid checkpoint yet, so the latest is used")
    return f"note: {run_dir}: " + "; ".join(notes) if notes else None


def checkpoint_path(run_dir: str, which: str = "best") -> str:
    """The checkpoint prefix to load: the best on valid when recorded, else the latest.

    Args:
      run_dir: a run folder.
      which: `best` (falls back to `latest` for a run without a valid evaluation) or
        `latest`.

    Raises:
      RunError: unknown `which`, or no checkpoint.
    """
    if which not in CHECKPOINT_CHOICES:
        raise RunError(f"unknown checkpoint {which!r}: choose from {', '.join(CHECKPOINT_CHOICES)}")
    best = read_best(run_dir) if which == "best" else None
    if best is not None:
        return os.path.join(run_dir, BEST_DIR, os.path.basename(best["checkpoint"]))
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    latest = named_checkpoint(folder)
    if latest is None:
        raise RunError(f"no checkpoint in {folder}: train first")
    if not tf.io.gfile.exists(latest + ".index"):
        raise checkpoint_missing(latest, run_dir)
    return latest


def named_checkpoint(folder: str) -> str | None:
    """The checkpoint prefix that FOLDER's `checkpoint` file (TensorFlow's CheckpointState)
    names as the latest, its files there or not; None where the folder has no such file.

    Read here, not by `tf.train.latest_checkpoint`, which logs an ERROR line for a
    checkpoint whose files are missing and says None as for none at all; and a damaged
    `checkpoint` file is an error, not "no checkpoint": a resumed training took it for a
    new run, started again from step 0 and deleted the checkpoints it did not see.

    Raises:
      RunError: a `checkpoint` file that does not parse or names no checkpoint.
    """
    state_file = os.path.join(folder, "checkpoint")
    if not tf.io.gfile.exists(state_file):
        return None
    # (without its ParseError and "Checkpoint ignored" warnings)
    with _tensorflow_warnings_held(collect=False):
        try:
            state = tf.train.get_checkpoint_state(folder)
        except (tf.errors.OpError, ValueError):
            state = None
    if state is None or not state.model_checkpoint_path:
        steps = [int(m.group(1)) for m in (re.fullmatch(r"ckpt-(\d+)\.index", name)
                                           for name in tf.io.gfile.listdir(folder)) if m]
        fix = (f"restore it, or write the line model_checkpoint_path: \"ckpt-{max(steps)}\" "
               "into it (the newest checkpoint there)" if steps else
               "restore it, or remove it to train from step 0")
        raise RunError(f"{state_file} is damaged (it names the latest checkpoint, and does "
                       f"not parse): {fix}")
    return os.path.join(folder, os.path.basename(state.model_checkpoint_path))


def checkpoint_missing(checkpoint: str, run_dir: str) -> RunError:
    """The checkpoint a run folder names has no files (removed by hand, or a copy of the
    folder without them)."""
    return RunError(f"{checkpoint}, the checkpoint {run_dir} names, has no files (removed, "
                    "or the folder copied without them): restore them, or train again")


def checkpoint_unreadable(checkpoint: str, error: BaseException, model_name: str) -> RunError:
    """A checkpoint whose files are there but cannot be restored into the model built from
    the run's config.json: damaged or truncated files (TensorFlow's DataLossError, an
    index that is not one, a short read), or weights of other shapes (a config.json
    edited since, or saved by another version)."""
    line = (getattr(error, "message", None) or str(error) or type(error).__name__)
    line = line.strip().splitlines()[0][:200] if line.strip() else type(error).__name__
    if isinstance(error, ValueError) and not isinstance(error, tf.errors.OpError):
        return RunError(f"{checkpoint} does not match the {model_name} model its run's "
                        f"{CONFIG_FILE} describes ({line}): was {CONFIG_FILE} edited, or the "
                        "run saved by another version? Restore its config.json, or train again")
    return RunError(f"{checkpoint} cannot be read ({line}): its files are damaged or "
                    "truncated; restore them from a copy, or train again")


@contextlib.contextmanager
def _tensorflow_warnings_held(collect: bool = True):
    """TensorFlow's Python log at ERROR and above only: a restore that failed leaves a
    half-restored object whose deletion logs a warning per value it did not read (COLLECT:
    they are deleted before the log's level is given back)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        if collect:
            gc.collect()  # (the half-restored objects go now, their warnings unheard)
        logger.setLevel(level)


def load_saved_config(path: str) -> dict:
    """A run folder's config.json as a dict, with the keys of options added since (absent
    from older run folders) set as those runs were trained: without them."""
    saved = config_lib.load_json(path)
    model_keys = saved.get("model")
    if saved.get("model_name") == "hiertcn" and isinstance(model_keys, dict):
        # runs saved before the option existed were trained without it (exclude_current:
        # before 2026-12-03 midday; evaluation and export took this version's default, on,
        # and scored such a run as another model)
        model_keys.setdefault("transition_bias", False)
        model_keys.setdefault("chunk_context", False)
        model_keys.setdefault("exclude_current", False)
    return saved


def older_config_keys(saved: dict) -> dict:
    """{key: this version's default} of the model options that a run's config.json (as
    `load_saved_config` reads it) lacks: a run of an older version, saved before they
    existed, whose training they may not describe; {} for an unknown model."""
    cls = config_classes().get(saved.get("model_name"))
    model_keys = saved.get("model")
    if cls is None or not isinstance(model_keys, dict):
        return {}
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls) if f.name not in model_keys}


def older_config_note(run_dir: str) -> str | None:
    """One line for a command about to use a run whose config.json lacks model options
    (`older_config_keys`): they take this version's defaults, which it names; or None."""
    try:
        missing = older_config_keys(load_saved_config(os.path.join(run_dir, CONFIG_FILE)))
    except (OSError, ValueError, config_lib.ConfigError):
        return None
    if not missing:
        return None
    taken = ", ".join(f"{key} = {value!r}" for key, value in missing.items())
    return (f"note: {run_dir}: its {CONFIG_FILE}, an older version's, lacks the model "
            f"option(s) added since, taken as this version's defaults ({taken}): where the run "
            f"was trained otherwise, add them to its {CONFIG_FILE} as it was")


def checkpoint_step(checkpoint: str) -> int | None:
    """The step a checkpoint path prefix (`.../ckpt-200`) was saved at, or None."""
    step = checkpoint.rsplit("-", 1)[-1]
    return int(step) if step.isdigit() else None


def load_model(run_dir: str, which: str = "best"
               ) -> tuple[SequenceModel, config_lib.RunConfig, schema.Vocabulary]:
    """Restores a run folder's model (`model.restored_checkpoint` says from which one).

    Args:
      run_dir: a folder written by `python -m model.train`.
      which: `best` = the checkpoint with the best valid Recall@20 seen during training
        (the latest when the run never evaluated on valid), or `latest`.

    Returns:
      (model, resolved config, vocabulary of the run).

    Raises:
      RunError: no run folder, config or checkpoint, or an unknown `which`.
      CheckpointGone: the checkpoints chosen in `LOAD_TRIES` tries were each removed
        before they were read (a training run keeps only its newest ones).
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{path} not found: is {run_dir} a folder written by `python -m model.train`?")
    saved = load_saved_config(path)
    config = config_lib.RunConfig.from_dict(saved, config_classes())
    vocab = schema.read_vocabulary(run_dir)
    model = build_model(config.model_name, config.model, vocab.size, item_counts=vocab.counts,
                        load_pretrained=False)
    chosen, failure = set(), None
    with _tensorflow_warnings_held():
        for attempt in range(1, LOAD_TRIES + 1):
            checkpoint = checkpoint_path(run_dir, which)
            chosen.add(checkpoint)
            try:
                status = tf.train.Checkpoint(model=model).restore(checkpoint)
                break
            except tf.errors.NotFoundError:  # training removed it since it was chosen
                if attempt == LOAD_TRIES:
                    # the same one each time: its files are missing, not replaced by a run
                    failure = (checkpoint_missing(checkpoint, run_dir) if len(chosen) == 1
                               else CheckpointGone(checkpoint, run_dir))
            except (tf.errors.OpError, IndexError, ValueError) as e:
                failure = checkpoint_unreadable(checkpoint, e, config.model_name)
                break
    if failure is not None:
        raise failure
    status.expect_partial()  # (a training checkpoint also holds the optimizer's slots)
    try:  # every variable of the model, though: none may keep its initial value
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise RunError(f"{checkpoint} does not hold every variable of the "
                       f"{config.model_name} model this code builds (saved by another "
                       f"version?): {str(e).splitlines()[0][:200]}") from None
    model.restored_checkpoint = checkpoint  # (which one it is: a report names it)
    return model, config, vocab


def load_scorer(run_dir: str, data_dir: str, which: str = "best") -> KerasScorer:
    """A `Scorer` for a trained run (`which` checkpoint, see `load_model`), after checking
    it matches the data's vocabulary."""
    model, config, vocab = load_model(run_dir, which)
    check_vocabulary(vocab, schema.read_vocabulary(data_dir), run_dir, data_dir)
    return KerasScorer(model, name=config.model_name)
