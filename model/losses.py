"""Output losses over the item catalogue, on user vectors gathered at non-padding targets.

* `softmax`: full softmax cross-entropy over every item (the authors' choice).
* `sampled`: sampled softmax for large catalogues: negatives drawn with probability
  proportional to train count ** `negative_exponent` (unigram counts of items.tsv), the
  logits corrected by log Q (the expected count of each candidate, done by
  `tf.nn.sampled_softmax_loss`), accidental hits of the target removed. The reserved
  indices 0 and 1 are never sampled.
* `auto` (the models' default): `softmax` for a catalogue of at most
  `AUTO_SOFTMAX_MAX_ITEMS` items, `sampled` above (`resolve_loss`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from model.config import AUTO_SOFTMAX_MAX_ITEMS, LOSSES
from model.layers import reserved_mask
from pipeline import schema

LossFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, bool], tf.Tensor]


def resolve_loss(kind: str, vocab_size: int) -> str:
    """`softmax` or `sampled`: `kind` itself, or what `auto` means for V = `vocab_size`
    entries (the reserved indices included).

    Raises:
      ValueError: an unknown kind.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}: choose {', '.join(LOSSES)}")
    if kind != "auto":
        return kind
    return "softmax" if vocab_size - schema.NUM_RESERVED <= AUTO_SOFTMAX_MAX_ITEMS else "sampled"


def make_loss(kind: str, vocab_size: int, num_negatives: int = 256,
              item_counts: np.ndarray | None = None, negative_exponent: float = 1.0) -> LossFn:
    """Returns loss(user [N, D], targets [N], item_vectors [V, D], bias [V], training) -> [N]
    (for `sampled`, with its `Sampler` as the attribute `sampler`).

    Args:
      kind: `softmax`, `sampled` or `auto` (`resolve_loss`).
      vocab_size: V, including the reserved indices.
      num_negatives: sampled negatives per batch (all the other items or more: the exact
        softmax).
      item_counts: int [V] train counts (items.tsv); required for `sampled`.
      negative_exponent: negatives are drawn with probability proportional to
        count ** this (1: popularity, towards 0: uniform over the items with a
        count).

    Raises:
      ValueError: unknown kind, or `sampled` without counts.
    """
    if resolve_loss(kind, vocab_size) == "softmax":
        return _softmax_loss
    sampler = make_sampler(vocab_size, num_negatives, item_counts, negative_exponent)

    def loss(user, targets, item_vectors, bias, training):
        if not training or sampler.exact:
            return _softmax_loss(user, targets, item_vectors, bias, training)
        labels = tf.cast(targets, tf.int64)[:, None]
        sampled = sampler.candidates(labels)
        return tf.nn.sampled_softmax_loss(
            weights=tf.cast(item_vectors, tf.float32), biases=bias, labels=labels,
            inputs=tf.cast(user, tf.float32), num_sampled=sampler.num_sampled,
            num_classes=vocab_size, sampled_values=sampled, remove_accidental_hits=True)

    loss.sampler = sampler
    return loss


class Sampler:
    """Negatives for a batch: `num_sampled` distinct items drawn with probability
    proportional to train count ** `exponent` (never the reserved indices), shared by every
    target of the batch."""

    exact = False  # (`WholeCatalogue`: every item, each with probability 1)

    def __init__(self, vocab_size: int, num_sampled: int, unigrams: list[float],
                 exponent: float = 1.0):
        self.vocab_size = vocab_size
        self.num_sampled = num_sampled
        self.exponent = float(exponent)
        self._unigrams = unigrams

    def candidates(self, labels: tf.Tensor):
        """`tf.random.fixed_unigram_candidate_sampler`'s triple for int64 [N, 1] labels:
        (sampled int64 [k], true expected counts [N, 1], sampled expected counts [k])."""
        return tf.random.fixed_unigram_candidate_sampler(
            true_classes=labels, num_true=1, num_sampled=self.num_sampled, unique=True,
            range_max=self.vocab_size, unigrams=self._unigrams, distortion=self.exponent)

    def __call__(self, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(sampled items int64 [k], log of each one's inclusion probability float32 [k]):
        exp(logit - log inclusion) summed over the sample estimates the sum over the
        catalogue (importance sampling). Nearly without bias: the inclusion probabilities
        are TF's, 1 - (1 - p)^tries given the draws it took to find k distinct items,
        which overstate the exact ones a little when k is a large share of the items (an
        independent check: Z 3.5% low with 5 negatives of 20 items)."""
        sampled, _, expected = self.candidates(tf.cast(targets, tf.int64)[:, None])
        return sampled, tf.math.log(tf.cast(expected, tf.float32))


class WholeCatalogue(Sampler):
    """The "sample" when the negatives asked for are all the other items: every item with a
    train count, each with inclusion probability 1, so that the sampled loss is the exact
    softmax over them (drawn, it was off: the sample was clamped to one item fewer, and
    TensorFlow's inclusion probabilities overstate the exact ones where the sample is most
    of the catalogue; 1,000 negatives of 10 items: Z 6-7% high on average)."""

    exact = True

    def __init__(self, vocab_size: int, unigrams: list[float]):
        self._ids = np.flatnonzero(np.asarray(unigrams) > 0).astype(np.int64)
        super().__init__(vocab_size, len(self._ids), unigrams)

    def candidates(self, labels: tf.Tensor):
        raise NotImplementedError("the whole catalogue is the exact softmax: no candidates")

    def __call__(self, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.constant(self._ids), tf.zeros([len(self._ids)], tf.float32)


def make_sampler(vocab_size: int, num_negatives: int, item_counts: np.ndarray | None,
                 exponent: float = 1.0) -> Sampler:
    """The sampled loss's negatives: `num_negatives` drawn with probability proportional to
    count ** `exponent` among the items with a train count; as many as there are items
    but one or more: every item (`WholeCatalogue`, the exact softmax).

    Raises:
      ValueError: no counts, or counts of another length.
    """
    if item_counts is None or len(item_counts) != vocab_size:
        raise ValueError(f"the sampled loss needs item counts of length {vocab_size}")
    unigrams = np.asarray(item_counts, dtype=np.float64).copy()
    unigrams[:schema.NUM_RESERVED] = 0.0
    unigrams = np.maximum(unigrams, 0.0)
    num_items = int((unigrams > 0).sum())
    if num_negatives >= num_items - 1:
        return WholeCatalogue(vocab_size, unigrams.tolist())
    return Sampler(vocab_size, max(1, int(num_negatives)), unigrams.tolist(), exponent)


# The full softmax runs over this many slices of the batch's rows: independent ops, which
# TensorFlow's inter-op threads run at once (one [N, V] matmul and its cross-entropy kept
# a 2-core VM's second core idle for part of each step: HierTCN's full-softmax training
# step, 4,793 items, 24.0k/25.1k events/s in one piece, 27.1k/26.6k in 4, 26.5k/27.3k in
# 8, on an Intel Xeon VM on 2026-12-06).
SOFTMAX_PARTS = 4
# ... up to this many items: each slice's gradient of the output matrix is a [V, D] tensor
# of its own, summed afterwards (4 x 256 MB at 500,000 items and D = 128), and the gain was
# measured at 4,793 (the `auto` loss is the full softmax up to 50,000 items)
SOFTMAX_SPLIT_MAX_ITEMS = 65_536


def _softmax_loss(user, targets, item_vectors, bias, training):
    """Full-softmax cross-entropy [N] of each row's target over the whole catalogue (the
    reserved indices left out, as evaluation ranks: they were in the normaliser)."""
    del training
    user = tf.cast(user, tf.float32)
    item_vectors = tf.cast(item_vectors, tf.float32)
    bias = tf.cast(bias, tf.float32) + reserved_mask(tf.shape(bias)[0])
    rows = tf.shape(user)[0]
    items = item_vectors.shape[0]
    parts = SOFTMAX_PARTS if items is not None and items <= SOFTMAX_SPLIT_MAX_ITEMS else 1
    losses = []
    for part in range(parts):
        lo, hi = rows * part // parts, rows * (part + 1) // parts
        logits = tf.matmul(user[lo:hi], item_vectors, transpose_b=True) + bias
        losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets[lo:hi], logits=logits))
    return tf.concat(losses, axis=0)
