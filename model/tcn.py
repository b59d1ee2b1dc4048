"""Flat TCN: one causal TCN over the user's whole event sequence across sessions, truncated
to the last N tokens — the memory-hungry model of the HierTCN paper's comparison.

The sequence is each session in turn as [SEP, a_1 .. a_m] (SEP, a separator token with its
own embedding row, tells the model that a session starts); the output at SEP predicts a_1,
the output at a_t predicts a_{t+1}. Blocks are `layers.TemporalBlock`s with dilation 2**i
and the widths in `channels` (the authors: 6 blocks, 128 x 4 + 256 x 2).

State (evaluation and serving): the user's last N tokens (items and separators) as float32
indices, left-padded with 0 — exact while the vocabulary has fewer than 2**24 entries.
`update_state` appends [SEP, session]; `user_embeddings(state, prefix)` runs the TCN over
buffer ++ [SEP] ++ prefix. With N >= receptive field - 1 (the default) the truncation does
not change any output.

Training on the queue batches: the cache holds each row's last N tokens (int64; the part
of the current user only). A step runs the TCN over buffer ++ the S slots of the batch,
and the loss is on the new events only. A row can switch users inside a batch: each
user's part of a row is packed into its own sequence (left-aligned, right-padded, so the
causal convolutions never see another user or the padding). A session that the generator
split into chunks continues without a separator (the cache remembers that the row's last
slot ended inside a session; its first item is predicted from the output at the cache's
last token, which sees the N tokens alone). So while N >= receptive field, training
computes exactly the outputs that evaluation and serving compute (`model.train` refuses a
smaller N). Data memory per batch:
B x (N + S (L + 1)) indices, against HierTCN's B x S x L indices + B x H floats.

Not XLA-compilable (`--jit-compile`): the packing has data-dependent shapes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from model import layers
from model.config import ConfigBase, _check, check_loss
from model.sequence_model import SequenceModel

MAX_EXACT_INDEX = 2 ** 24  # float32 holds every integer below this exactly


@dataclasses.dataclass(frozen=True)
class TCNConfig(ConfigBase):
    """Flat TCN hyper-parameters.

    Attributes:
      embedding_dim: item embedding width E.
      channels: width of each residual block (block i has dilation 2**i); the last one is
        the user embedding width D.
      kernel_size: causal convolution kernel width.
      convs_per_block: causal convolutions per block.
      dropout: dropout rate after each convolution (training only).
      history_length: N, tokens of history kept (the state width); the default covers the
        receptive field of the default blocks (253).
      loss: `auto`, `softmax` or `sampled` (see `model.losses`).
      num_negatives: negatives per batch for the sampled loss.
      negative_exponent: the sampled loss draws its negatives with probability
        proportional to train count ** this (1: popularity, towards 0: uniform over the
        items with a count; word2vec's negative sampling uses 0.75).
      output_bias: a per-item bias in the scores.
    """

    embedding_dim: int = 128
    channels: tuple[int, ...] = (128, 128, 128, 128, 256, 256)
    kernel_size: int = 5
    convs_per_block: int = 1
    dropout: float = 0.0
    history_length: int = 256
    loss: str = "auto"
    num_negatives: int = 256
    negative_exponent: float = 0.5
    output_bias: bool = True

    def validate(self) -> None:
        for key in ("embedding_dim", "kernel_size", "convs_per_block", "history_length",
                    "num_negatives"):
            _check(getattr(self, key) >= 1, f"model.{key} must be >= 1, got {getattr(self, key)}")
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
               f"model.channels must be a non-empty list of positive widths, got {list(self.channels)}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        check_loss(self.loss, self.negative_exponent)

    @property
    def receptive_field(self) -> int:
        """Tokens one output sees: 1 + (k - 1) * convs * sum of dilations."""
        return 1 + (self.kernel_size - 1) * self.convs_per_block * (2 ** len(self.channels) - 1)


def last_tokens(tokens: tf.Tensor, keep: tf.Tensor, n: int) -> tf.Tensor:
    """Each row's last `n` kept tokens, in order, right-aligned and left-padded with 0.

    Args:
      tokens: int64 [B, T].
      keep: bool [B, T], which tokens count.
      n: output width.

    Returns:
      int64 [B, n].
    """
    after = tf.cumsum(tf.cast(keep, tf.int64), axis=1, reverse=True)  # kept tokens at or after t
    where = tf.where(keep & (after <= n))
    dest = tf.stack([where[:, 0], n - tf.gather_nd(after, where)], axis=1)
    return tf.scatter_nd(dest, tf.gather_nd(tokens, where), tf.stack([tf.shape(tokens, tf.int64)[0], n]))


class FlatTCN(SequenceModel):
    """The flat TCN; see the module docstring and `SequenceModel` for the API."""

    config_class = TCNConfig

    def __init__(self, config: TCNConfig, vocab_size: int,
                 item_counts: np.ndarray | None = None, load_pretrained: bool = True, **kwargs):
        """Creates the layers.

        Args:
          config: the hyper-parameters.
          vocab_size: V from items.tsv (including the reserved indices 0 and 1); the
            separator token is index V.
          item_counts: int [V] train counts, needed by the sampled loss.
          load_pretrained: accepted for the registry's common signature (no pretrained
            vectors here).

        Raises:
          ValueError: a vocabulary too large for float32 indices in the state.
        """
        del load_pretrained
        super().__init__(config, vocab_size, item_counts, **kwargs)
        if vocab_size + 1 > MAX_EXACT_INDEX:
            raise ValueError(f"the flat TCN keeps item indices in a float32 state: vocab_size "
                             f"{vocab_size} must be below {MAX_EXACT_INDEX - 1}")
        c = config
        self.sep = vocab_size
        self.item_embedding = layers.item_embedding(vocab_size + 1, c.embedding_dim)
        self.blocks = [layers.TemporalBlock(width, c.kernel_size, 2 ** i, c.convs_per_block,
                                            c.dropout, name=f"tcn_block_{i}")
                       for i, width in enumerate(c.channels)]
        self.scorer = layers.ItemScorer(vocab_size, use_bias=c.output_bias, dtype="float32",
                                        name="item_scorer")

    @property
    def state_size(self) -> int:
        return self.config.history_length

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    def _run(self, tokens: tf.Tensor, rowids: tf.Tensor, training) -> tf.Tensor:
        """The TCN over packed sequences.

        Args:
          tokens: int64 [n] the tokens of all sequences, each sequence's in order.
          rowids: int [n] non-decreasing sequence number of each token.

        Returns:
          float32 [n, D]: the output at each token (it sees only its own sequence).
        """
        packed = tf.RaggedTensor.from_value_rowids(tokens, rowids)
        x = self.item_embedding(packed.to_tensor())  # left-aligned: right padding is unseen
        for block in self.blocks:
            x = block(x, training=training)
        return tf.cast(tf.RaggedTensor.from_tensor(x, lengths=packed.row_lengths()).flat_values,
                       tf.float32)

    def _outputs(self, tokens, keep, key, training) -> tf.Tensor:
        """int64 [B, T] tokens -> [B, T, D]: the output at each position's last kept token
        (itself when kept), which sees the kept tokens before it in its row with the same
        `key` (non-decreasing along a row)."""
        where = tf.where(keep)
        _, rowids = tf.unique(tf.gather_nd(key, where))
        out = self._run(tf.gather_nd(tokens, where), rowids, training)
        kept = tf.cast(keep, tf.int64)
        before_row = tf.cumsum(tf.reduce_sum(kept, axis=1), exclusive=True)[:, None]
        return tf.gather(out, tf.maximum(before_row + tf.cumsum(kept, axis=1) - 1, 0))

    def update_state(self, state, session_items):
        state, items = self.checked_inputs(state, session_items)
        buffer = tf.cast(state, tf.int64)
        sep = tf.where(tf.reduce_any(items > 0, axis=1, keepdims=True), self.sep, 0)
        tokens = tf.concat([buffer, tf.cast(sep, tf.int64), items], axis=1)
        return tf.cast(last_tokens(tokens, tokens > 0, self.config.history_length), tf.float32)

    def user_embeddings(self, state, prefix, training=False):
        state, prefix = self.checked_inputs(state, prefix, "prefix")
        buffer = tf.cast(state, tf.int64)
        sep = tf.fill([tf.shape(prefix)[0], 1], tf.constant(self.sep, tf.int64))
        tokens = tf.concat([buffer, sep, prefix], axis=1)
        rows = tf.range(tf.shape(tokens, tf.int64)[0])[:, None] * tf.ones_like(tokens)
        return self._outputs(tokens, tokens > 0, rows, training)[:, self.config.history_length:]

    def output_weights(self):
        return self.scorer.item_vectors(), self.scorer.bias

    def item_logits(self, user):
        return self.scorer(user)

    def train_cache(self, batch_size: int):
        """(the row's last N tokens of its current user int64 [B, N], the row's last slot
        ended inside a session bool [B])."""
        return (tf.zeros([batch_size, self.config.history_length], tf.int64),
                tf.zeros([batch_size], tf.bool))

    def encode(self, batch, cache, training):
        """Runs the TCN over buffer ++ the S slots of each row, each user's part of a row as
        its own sequence (the buffer belongs to the user before the row's first `reset`).

        A slot is [SEP, items] (L + 1 tokens; 0 = dropped): a later chunk of a session has
        no SEP and its first item is predicted from the previous chunk's last item.

        Returns:
          (user vectors [B * S, L, D], the cache after the batch).
        """
        items = tf.cast(batch["items"], tf.int64)
        reset, end, valid = batch["reset"], batch["session_end"], batch["valid"]
        b, s, l = tf.shape(items)[0], items.shape[1], tf.shape(items)[2]
        n = self.config.history_length
        buffer, open_ = cache
        buffer = tf.where(reset[:, :1], tf.constant(0, tf.int64), buffer)
        opened = tf.concat([open_[:, None], valid[:, :-1] & ~end[:, :-1]], axis=1)
        sep = tf.where(valid & ~(opened & ~reset), self.sep, 0)
        slots = tf.concat([tf.cast(sep, tf.int64)[..., None], items], axis=2)  # [B, S, L + 1]
        tokens = tf.concat([buffer, tf.reshape(slots, [b, -1])], axis=1)      # [B, N + S (L + 1)]
        user = tf.cumsum(tf.cast(reset, tf.int64), axis=1)                    # user number per slot
        user = tf.concat([tf.zeros([b, n], tf.int64), tf.repeat(user, l + 1, axis=1)], axis=1)
        keep = tokens > 0
        out = self._outputs(tokens, keep, tf.range(tf.cast(b, tf.int64))[:, None] * (s + 1) + user,
                            training)[:, n:]
        u = tf.reshape(out, [b * s, l + 1, self.config.channels[-1]])[:, :-1]
        new_buffer = last_tokens(tokens, keep & (user == user[:, -1:]), n)
        return u, (new_buffer, tf.where(valid[:, -1], ~end[:, -1], open_))
