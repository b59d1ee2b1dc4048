"""Model names → classes, and loading a trained run folder.

A run folder (`--model-dir RUN`) holds `config.json` (the resolved `RunConfig`),
`items.tsv` (the vocabulary it was trained on), `checkpoints/` and `train_summary.json`.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from model import config as config_lib
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


class RunError(ValueError):
    """A run folder that is missing, incomplete or does not match the data."""


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
    model = MODELS[name](config, vocab_size, item_counts=item_counts, load_pretrained=load_pretrained)
    model.build_weights()
    return model


def check_vocabulary(run_vocab: schema.Vocabulary, data_vocab: schema.Vocabulary,
                     run_dir: str, data_dir: str) -> None:
    """Raises RunError when a data folder's items.tsv differs from the run's."""
    if run_vocab.ids != data_vocab.ids:
        raise RunError(
            f"the vocabulary of {data_dir} ({data_vocab.size} entries) does not match the one "
            f"{run_dir} was trained on ({run_vocab.size}): use the data folder the model was "
            "trained on, or a new --model-dir")


def load_model(run_dir: str) -> tuple[SequenceModel, config_lib.RunConfig, schema.Vocabulary]:
    """Restores the latest checkpoint of a run folder.

    Returns:
      (model, resolved config, vocabulary of the run).

    Raises:
      RunError: no run folder, config or checkpoint.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{path} not found: is {run_dir} a folder written by `python -m model.train`?")
    config = config_lib.RunConfig.from_dict(config_lib.load_json(path), config_classes())
    vocab = schema.read_vocabulary(run_dir)
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR))
    if latest is None:
        raise RunError(f"no checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)}: train first")
    model = build_model(config.model_name, config.model, vocab.size, item_counts=vocab.counts,
                        load_pretrained=False)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model, config, vocab


def load_scorer(run_dir: str, data_dir: str) -> KerasScorer:
    """A `Scorer` for a trained run, after checking it matches the data's vocabulary."""
    model, config, vocab = load_model(run_dir)
    check_vocabulary(vocab, schema.read_vocabulary(data_dir), run_dir, data_dir)
    return KerasScorer(model, name=config.model_name)
