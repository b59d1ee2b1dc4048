"""Typed, nested configuration of a training run: model hyper-parameters and training.

A run's configuration is a `RunConfig` = model name + that model's config dataclass +
`TrainConfig`. Overrides are strict: an unknown key is an error, so a typo in a JSON file
or on the command line never passes silently. The resolved configuration is written to
`RUN/config.json` and read back by `model.registry.load_model`.

JSON layout (`--config FILE`; every key optional):

    {"model_name": "hiertcn",
     "model": {"embedding_dim": 128, "num_blocks": 2, ...},
     "train": {"batch_size": 32, "learning_rate": 0.01, ...}}
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from typing import Any, Mapping

import numpy as np

from model import atomic


class ConfigError(ValueError):
    """An unknown key or an out-of-range value in a configuration."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


LOSSES = ("auto", "softmax", "sampled")
# `auto`: the full softmax up to this many items, sampled above (`model.losses.resolve_loss`).
# The full softmax's step grows with the catalogue (with HierTCN's default head on a 2-core
# CPU: 0.11 s at 4,800 items, 0.6 s at 50,000), the sampled loss's does not (0.07 s); the
# full softmax ranks better where it is affordable (MovieLens-1M valid R@20 0.27 vs 0.20).
AUTO_SOFTMAX_MAX_ITEMS = 50_000
# The default valid-evaluation budget during training (`eval_event_budget`): 50,000
# target events, fewer above 25,000 items so that an evaluation ranks at most 1.25 billion
# (event, item) pairs, and never fewer than 1,000 events. Its time depends on the model and
# the log as much as on the pairs: about 8 s on a 2-core CPU when it was set, but with
# the default head on a clickstream of short sessions (25,690 items, 48,657 events: the
# head's mixture over the catalogue for each scored event, one update per history session)
# 65 s with another job on the cores, 1.3 ms an event (an audit of 2026-12-06):
# `--eval-events` sets it.
EVAL_EVENTS, EVAL_SCORES, EVAL_EVENTS_MIN = 50_000, 1_250_000_000, 1_000


def eval_event_budget(eval_events: int | None, items: int) -> int:
    """`train.eval_events`, or for None the default for a catalogue of `items` items."""
    if eval_events is not None:
        return eval_events
    return max(EVAL_EVENTS_MIN, min(EVAL_EVENTS, EVAL_SCORES // max(items, 1)))


MAX_LEARNING_RATE = 1.0  # (`TrainConfig.validate`)

MODEL_NAMES = ("hiertcn", "hrnn", "gru4rec", "tcn")  # model.registry.MODELS' names, in order


def check_loss(loss: str, negative_exponent: float) -> None:
    """The loss options of every neural model's config (`model.losses`)."""
    _check(loss in LOSSES, f"model.loss must be 'auto', 'softmax' or 'sampled', got {loss!r}")
    _check(0.0 < negative_exponent <= 1.0,
           f"model.negative_exponent must be in (0, 1], got {negative_exponent}")


class ConfigBase:
    """Strict dict conversion and validation shared by every config dataclass."""

    # the section its keys are named by in messages (`model.channels`, `train.steps`)
    SECTION = "model"
    # Integer keys that count steps or events (< 2**63: TensorFlow's and numpy's int64);
    # every other integer key is a size (< 2**31: tensor shapes and Keras' layer sizes are
    # 32-bit). A larger value was a traceback after TensorFlow's start ("Can't convert
    # Python sequence with out-of-range integer to Tensor").
    INT64_KEYS: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # built directly (`HierTCNConfig(channels=64)`) as `from_dict` builds it: each value
        # of its field's type (a list becomes a tuple), in range, or a ConfigError now
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, ConfigBase):
                value = _coerce(field.name, value, hints[field.name])
                object.__setattr__(self, field.name, value)
            if isinstance(value, int) and not isinstance(value, bool):
                bits = 63 if field.name in self.INT64_KEYS else 31
                _check(value < 2**bits, f"{self.SECTION}.{field.name} must be < 2**{bits}, "
                       f"got {value}")
        self.validate()

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Builds the config from defaults updated by `values` (strict: unknown keys fail)."""
        return cls().replace(values)

    def replace(self, values: Mapping[str, Any]):
        """Returns a copy with `values` applied; nested configs take nested dicts.

        Raises:
          ConfigError: unknown key, wrong type or value out of range.
        """
        fields = {f.name: f for f in dataclasses.fields(self)}
        updates = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown {type(self).__name__} key {key!r}: choose from {', '.join(fields)}")
            current = getattr(self, key)
            if isinstance(current, ConfigBase):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{key!r} must be an object, got {value!r}")
                updates[key] = current.replace(value)
            else:
                updates[key] = value
        return dataclasses.replace(self, **updates)  # typed and checked by __post_init__

    def validate(self) -> None:
        """Raises ConfigError for a value out of range (overridden per config)."""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks a value against a field's type (ints are accepted for floats, numpy numbers too)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):  # X | None
        if value is None:
            return None
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
        origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key!r} must be a list, got {value!r}")
        return tuple(_coerce(key, v, typing.get_args(hint)[0]) for v in value)
    if hint is bool and isinstance(value, np.bool_):
        return bool(value)
    if hint in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral) or hint is float:
            return hint(value)  # numpy numbers too
    if hint in (int, float, str, bool) and (
            not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key!r} must be {hint.__name__}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class HierTCNConfig(ConfigBase):
    """HierTCN hyper-parameters; defaults follow the authors' XING code.

    Attributes:
      embedding_dim: item embedding width E (must equal the width of
        `pretrained_item_vectors` when set).
      gru_units: units per high-level GRU layer.
      gru_layers: stacked high-level GRU layers; the state H = gru_units * gru_layers
        (all layers' states concatenated).
      channels: TCN channel width C = user embedding width D.
      kernel_size: causal convolution kernel width.
      num_blocks: residual TCN blocks; block i uses dilation 2**i.
      convs_per_block: causal convolutions per block (authors: 1; Bai et al.: 2).
      dropout: dropout rate after each convolution (training only). 0.3 by default, chosen
        on valid: small logs are memorised within a few hundred steps, and 0.3 raised the
        best valid Recall@20 by 12% on MovieLens-latest-small and 6% on `make demo`'s
        data, and left MovieLens-1M level (-1%).
      high_level: False disables the high-level state (session-only ablation: the state
        stays zero).
      loss: `softmax` (full softmax cross-entropy over the catalogue), `sampled`
        (sampled softmax with log-Q correction, popularity-sampled negatives) or `auto`
        (the full softmax up to `AUTO_SOFTMAX_MAX_ITEMS` items, sampled above;
        `python -m model.train` saves what it chose).
      num_negatives: negatives per batch for the sampled loss.
      negative_exponent: the sampled loss draws its negatives with probability
        proportional to train count ** this (1: popularity, towards 0: uniform over the
        items with a count; word2vec's negative sampling uses 0.75).
      tied_output: score items with the input item embeddings (needs
        embedding_dim == channels) instead of a separate output matrix.
      output_bias: a per-item bias in the scores.
      pretrained_item_vectors: optional `.npy` [vocab, E] aligned with items.tsv; used as
        a frozen input embedding (the paper's Pinterest mode).
      repeat_head: the repeat-aware head (RepeatNet-style, `layers.RepeatHead`): the
        next-item distribution mixes the catalogue softmax with attention over the
        user's last `history_size` items and the session so far. On by default: chosen on
        valid data, where it led on the synthetic log (many repeats) and, with its seen
        bias, on MovieLens-1M (none), with either loss (the sampled loss estimates the
        mixture's catalogue normaliser, `HierTCN._sampled_log_norm`). False gives the
        published HierTCN. None (run folders of older versions) = on with the full
        softmax, off with the sampled loss; `uses_repeat_head` is the resolved value.
      history_size: N, the user's recent items the repeat head sees (the bounded buffer
        carried with the state): the seen bias covers all N, the attention the newest
        `repeat_window`.
      repeat_window: A, the newest known items of the history and the session so far that
        the repeat head's attention points at (at most N: `attention_size`).
      seen_bias: the repeat head's learned bias on the catalogue logits of the items
        already seen (the newest N of the history and the session so far): lets the model
        learn how often consumed items come back (never, on MovieLens). Chosen on valid
        data: MovieLens-1M R@20 0.261 vs 0.206 without, synthetic level (0.526 / 0.522 vs
        0.530 / 0.531 on two seeds).
      transition_bias: the repeat head's learned bias toward the items that came right
        after an earlier occurrence of the item the session is on, in the user's history
        and the session so far (the user's own transitions: back to B after A, as before).
        Off by default: small and mixed on the synthetic and Retailrocket valid splits
        (README § Repeat consumption).
      session_summary: every TCN input also gets the mean embedding of all the session's
        items before it, projected to C (the convolutions see the last `receptive_field`
        items; the summary the whole session, across the chunks the generator splits a
        long session into).
      start_items: R, the first items of the user's last R sessions, which the repeat head
        also points at (how the user's sessions tend to start, however long ago; weighted
        by a learned bias per session age and by the position in the session): carried as
        item indices after the GRU state (H grows by R; like the GRU state, updated when
        a session ends). 0: off. Only with the repeat head and the high level; chosen on
        synthetic valid data (first items R@20 0.556 vs 0.522 without, overall level).
      exclude_current: with the repeat head, the next-item distribution is conditioned
        on the next item not being the one the session is on (the pipeline collapses
        immediate repeats, so it never is): that item gets probability 0, the others
        p / (1 - p(current)), in training (the likelihood), evaluation and serving alike.
        Without it the head points at the session's newest item most of all. False
        (`--keep-current`) for session records with immediate repeats.
      chunk_context: in training, a session longer than L is split into chunks of L
        items (`model.batching`); each later chunk's convolutions then also read the
        session's `receptive_field` items before it (carried per row in the state cache,
        across batches), so that every training position sees what evaluation and
        serving, which run whole sessions, show it. False (`--no-chunk-context`; run
        folders of older versions): a later chunk starts from the start vector as if
        the session began there.
    """

    embedding_dim: int = 128
    gru_units: int = 128
    gru_layers: int = 2
    channels: int = 128
    kernel_size: int = 5
    num_blocks: int = 2
    convs_per_block: int = 1
    dropout: float = 0.3
    high_level: bool = True
    loss: str = "auto"
    num_negatives: int = 256
    negative_exponent: float = 0.5
    tied_output: bool = False
    output_bias: bool = True
    pretrained_item_vectors: str = ""
    repeat_head: bool | None = True
    history_size: int = 200
    repeat_window: int = 50
    seen_bias: bool = True
    transition_bias: bool = False
    session_summary: bool = False
    start_items: int = 20
    exclude_current: bool = True
    chunk_context: bool = True

    def validate(self) -> None:
        for key in ("embedding_dim", "gru_units", "gru_layers", "channels", "kernel_size",
                    "num_blocks", "convs_per_block", "num_negatives", "history_size",
                    "repeat_window"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.start_items >= 0, f"model.start_items must be >= 0, got {self.start_items}")
        check_loss(self.loss, self.negative_exponent)
        _check(not self.tied_output or self.embedding_dim == self.channels,
               f"model.tied_output needs embedding_dim == channels, got "
               f"{self.embedding_dim} and {self.channels}")

    @property
    def attention_size(self) -> int:
        """The repeat head's attention window: min(repeat_window, history_size)."""
        return min(self.repeat_window, self.history_size)

    @property
    def uses_repeat_head(self) -> bool:
        """Whether the model has the repeat head (`repeat_head`; None: not with `sampled`)."""
        return self.loss != "sampled" if self.repeat_head is None else self.repeat_head

    @property
    def receptive_field(self) -> int:
        """Positions one TCN output sees: 1 + (k - 1) * convs * sum of dilations."""
        return 1 + (self.kernel_size - 1) * self.convs_per_block * (2 ** self.num_blocks - 1)


# A deeper TCN whose receptive field (25) covers the default session cap L = 20
# (the authors' default, 2 blocks x 1 conv, sees 13 positions).
DEEP_PRESET = {"num_blocks": 2, "convs_per_block": 2}


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Training options.

    Attributes:
      batch_size: B, rows of the queue generator.
      sessions_per_batch: S, sessions (chunks) per row per batch.
      max_session_length: L, items per chunk; longer sessions are split into chunks.
      learning_rate: Adam's initial learning rate (the authors' 1e-2; best of 1e-3 and 1e-2 on
        synthetic valid).
      lr_schedule: `step` (authors: divide by `lr_decay_factor` at each fraction of the
        run in `lr_decay_at`; their run: 1e-2, /5 at epochs 60 and 120 of 200) or
        `constant`.
      lr_decay_at: fractions of the total steps where the step schedule decays.
      lr_decay_factor: divisor applied at each decay point.
      clipnorm: gradient clipping by global norm (0 = off), a sparse gradient's duplicate
        rows summed first.
      optimizer: `lazy_adam` (Adam whose embedding-table updates touch only the rows in
        the batch's gradient; `model.train.LazyAdam`) or `adam` (Keras's Adam, which also
        decays and moves every other row of the tables, every step).
      weight_decay: decoupled weight decay (AdamW; 0 = plain Adam): every step multiplies
        the weights by 1 - learning rate * weight_decay (with `lazy_adam`, the rows of a
        table that are in the step's sparse gradient).
      steps: training steps (0 = use `epochs`).
      epochs: passes over the training users (used when steps == 0).
      max_minutes: stop after this wall time (0 = no limit); a checkpoint is written.
      seed: seeds the weights, the shuffle and dropout.
      shuffle_buffer: users in the bounded shuffle buffer.
      cache_events: keep the train split in memory after the first epoch when it has at
        most this many events (about 8 bytes per event and 150 per session), so later
        epochs skip parsing; a larger split is streamed from its files every epoch in
        bounded memory. 0 = always stream.
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: checkpoints kept by the CheckpointManager.
      eval_every: steps between valid evaluations, with one more at the end of the run;
        the weights with the best valid Recall@20 are kept and used (0 = no evaluation: the
        last weights are used, even where they overfit a small log).
      patience: stop once the best valid evaluation is this many evaluations old (0 = run
        all the steps): a small log is memorised within a few hundred steps, and the rest
        of a fixed budget only makes valid worse.
      eval_users: valid users evaluated at each interval (0 = all): the same users each
        time, taken in the order of a hash of their ids (`evaluate.sample_users`); it
        bounds the context the evaluations replay (each user's earlier sessions). 1,000
        until 2026-12-02: on a log of one-session users that was 5,022 of 124,332 valid
        events, too few to tell checkpoints apart.
      eval_events: and no more users than hold this many valid target events (0 = no
        limit; at least one user; None: `eval_event_budget`'s default for the catalogue):
        the cost of an evaluation grows with its events times the catalogue, and a log of
        heavy users holds thousands of events per user.
      mixed_precision: float16 (GPU) / bfloat16 (CPU) compute with float32 variables.
      jit_compile: XLA-compile the model's encoder part of the train step (a model whose
        class says `xla_ready`: HierTCN; the others are refused).
      strategy: `default`, `mirrored` or `one_device:DEVICE` (tf.distribute).
      prefetch: batches prepared ahead of the training step.
    """

    batch_size: int = 32
    sessions_per_batch: int = 10
    max_session_length: int = 20
    learning_rate: float = 1e-2
    lr_schedule: str = "step"
    lr_decay_at: tuple[float, ...] = (0.3, 0.6)
    lr_decay_factor: float = 5.0
    clipnorm: float = 0.0
    optimizer: str = "lazy_adam"
    weight_decay: float = 0.0
    steps: int = 0
    epochs: int = 0
    max_minutes: float = 0.0
    seed: int = 0
    shuffle_buffer: int = 1000
    cache_events: int = 20_000_000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 100
    patience: int = 5
    eval_users: int = 10_000
    eval_events: int | None = None
    mixed_precision: bool = False
    jit_compile: bool = False
    strategy: str = "default"
    prefetch: int = 4

    SECTION = "train"
    # (epochs, a size: epochs x batches per pass must still fit the int64 step counter)
    INT64_KEYS = ("steps", "seed", "shuffle_buffer", "cache_events", "checkpoint_every",
                  "eval_every", "patience", "eval_users", "eval_events")

    def validate(self) -> None:
        for key in ("batch_size", "sessions_per_batch", "max_session_length", "shuffle_buffer",
                    "checkpoint_every", "keep_checkpoints", "prefetch"):
            _check(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "epochs", "eval_every", "eval_users", "seed", "cache_events",
                    "patience"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        positions = self.batch_size * self.sessions_per_batch * self.max_session_length
        # (TensorFlow computes a batch's shapes in 32 bits: B x S or S x L past 2**31 was a
        # traceback, "Dimension size ... must be non-negative but is -32"; 2**30 leaves room
        # for the next-item shift)
        _check(positions <= 2**30, f"train.batch_size x sessions_per_batch x "
               f"max_session_length must be at most 2**30 positions a batch, got "
               f"{self.batch_size} x {self.sessions_per_batch} x {self.max_session_length}")
        _check(self.seed < 2**32, f"train.seed must be < 2**32 (TensorFlow's and numpy's "
               f"seeds are 32-bit), got {self.seed}")
        _check(self.eval_events is None or self.eval_events >= 0,
               f"train.eval_events must be >= 0 (or null: the default), got {self.eval_events}")
        # Adam moves each weight by about the rate at every step: above 1 (ten times the
        # largest rate this project has tried, 0.1) a run diverges at once; inf, nan and
        # 1e30 were accepted and trained to nan
        _check(0 < self.learning_rate <= MAX_LEARNING_RATE,
               f"train.learning_rate must be > 0 and <= {MAX_LEARNING_RATE:g}, got "
               f"{self.learning_rate}")
        # (inf was accepted as no limit, which 0 says, and written to config.json as
        # Infinity, which strict JSON readers refuse)
        _check(0 <= self.max_minutes < math.inf,
               f"train.max_minutes must be >= 0 (0: no limit) and finite, got {self.max_minutes}")
        # (inf was accepted: a weight decay of inf trains to nan, a decay factor of inf sets
        # the rate to 0 at the first decay point; clipnorm inf is no clipping, which 0 says)
        _check(0 <= self.clipnorm < math.inf,
               f"train.clipnorm must be >= 0 and finite, got {self.clipnorm}")
        _check(0 <= self.weight_decay < math.inf,
               f"train.weight_decay must be >= 0 and finite, got {self.weight_decay}")
        _check(self.optimizer in ("lazy_adam", "adam"),
               f"train.optimizer must be 'lazy_adam' or 'adam', got {self.optimizer!r}")
        _check(self.lr_schedule in ("step", "constant"),
               f"train.lr_schedule must be 'step' or 'constant', got {self.lr_schedule!r}")
        _check(all(0 < f < 1 for f in self.lr_decay_at),
               f"train.lr_decay_at must be fractions in (0, 1), got {list(self.lr_decay_at)}")
        _check(1 <= self.lr_decay_factor < math.inf,
               f"train.lr_decay_factor must be >= 1 and finite, got {self.lr_decay_factor}")
        _check(self.strategy in ("default", "mirrored") or self.strategy.startswith("one_device:"),
               f"train.strategy must be 'default', 'mirrored' or 'one_device:DEVICE', got {self.strategy!r}")


DEFAULT_STEPS = 2000


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run: which model, its config, and the training options."""

    model_name: str
    model: Any
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "model": self.model.to_dict(),
                "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], config_classes: Mapping[str, type]) -> "RunConfig":
        """Builds a run config; `config_classes` maps model names to their config class.

        Raises:
          ConfigError: unknown model name or key, or a value out of range.
        """
        unknown = set(values) - {"model_name", "model", "train"}
        _check(not unknown, f"unknown config key(s) {sorted(unknown)}: choose from model_name, model, train")
        name = values.get("model_name", "hiertcn")
        _check(name in config_classes, f"unknown model {name!r}: choose from {', '.join(config_classes)}")
        return cls(model_name=name,
                   model=config_classes[name]().replace(values.get("model", {})),
                   train=TrainConfig().replace(values.get("train", {})))

    def replace(self, values: Mapping[str, Any]) -> "RunConfig":
        """Applies nested overrides {"model": {...}, "train": {...}} strictly."""
        unknown = set(values) - {"model", "train"}
        _check(not unknown, f"unknown config key(s) {sorted(unknown)}: choose from model, train")
        return dataclasses.replace(self, model=self.model.replace(values.get("model", {})),
                                   train=self.train.replace(values.get("train", {})))


def load_json(path: str) -> dict:
    """Reads a JSON config file.

    Raises:
      ConfigError: missing file or invalid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError of a non-UTF-8 file
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"cannot read config file {path}: {os.strerror(e.errno)}") from None
    _check(isinstance(values, dict), f"config file {path} must hold a JSON object")
    return values


def save_json(config: RunConfig, path: str) -> None:
    """Writes the resolved config (atomically)."""
    atomic.write_json(path, config.to_dict(), sort_keys=True)
