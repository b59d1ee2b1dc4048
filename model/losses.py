"""Output losses over the item catalogue, on user vectors gathered at non-padding targets.

* `softmax`: full softmax cross-entropy over every item (the authors' choice).
* `sampled`: sampled softmax for large catalogues: negatives drawn from the train
  popularity (unigram counts of items.tsv), the logits corrected by log Q (the expected
  count of each candidate, done by `tf.nn.sampled_softmax_loss`), accidental hits of the
  target removed. The reserved indices 0 and 1 are never sampled.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from pipeline import schema

LossFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, bool], tf.Tensor]


def make_loss(kind: str, vocab_size: int, num_negatives: int = 256,
              item_counts: np.ndarray | None = None) -> LossFn:
    """Returns loss(user [N, D], targets [N], item_vectors [V, D], bias [V], training) -> [N].

    Args:
      kind: `softmax` or `sampled`.
      vocab_size: V, including the reserved indices.
      num_negatives: sampled negatives per batch (clamped below the number of items).
      item_counts: int [V] train counts (items.tsv); required for `sampled`.

    Raises:
      ValueError: unknown kind, or `sampled` without counts.
    """
    if kind == "softmax":
        return _softmax_loss
    if kind != "sampled":
        raise ValueError(f"unknown loss {kind!r}: choose 'softmax' or 'sampled'")
    if item_counts is None or len(item_counts) != vocab_size:
        raise ValueError(f"the sampled loss needs item counts of length {vocab_size}")
    unigrams = np.asarray(item_counts, dtype=np.float64).copy()
    unigrams[:schema.NUM_RESERVED] = 0.0
    unigrams = np.maximum(unigrams, 0.0)
    num_items = int((unigrams > 0).sum())
    num_sampled = max(1, min(int(num_negatives), num_items - 1))
    unigram_list = unigrams.tolist()

    def loss(user, targets, item_vectors, bias, training):
        if not training:
            return _softmax_loss(user, targets, item_vectors, bias, training)
        labels = tf.cast(targets, tf.int64)[:, None]
        sampled = tf.random.fixed_unigram_candidate_sampler(
            true_classes=labels, num_true=1, num_sampled=num_sampled, unique=True,
            range_max=vocab_size, unigrams=unigram_list)
        return tf.nn.sampled_softmax_loss(
            weights=tf.cast(item_vectors, tf.float32), biases=bias, labels=labels,
            inputs=tf.cast(user, tf.float32), num_sampled=num_sampled, num_classes=vocab_size,
            sampled_values=sampled, remove_accidental_hits=True)

    return loss


def _softmax_loss(user, targets, item_vectors, bias, training):
    del training
    logits = tf.matmul(tf.cast(user, tf.float32), tf.cast(item_vectors, tf.float32),
                       transpose_b=True) + bias
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
