"""Item vocabulary from the training split (pure function, DESIGN.md §6 step 6)."""
from __future__ import annotations

from typing import Iterable

from pipeline import schema


def build_vocabulary(counts: Iterable[tuple[str, int]], min_count: int) -> list[tuple[str, int]]:
    """Items kept in the vocabulary, in index order.

    Args:
      counts: (item id, train event count) pairs, each item once.
      min_count: items with fewer train events are left out (they become unknown).

    Returns:
      (item id, count) pairs in descending count, ties by item id; the first gets index
      `schema.NUM_RESERVED` (2).
    """
    return sorted(((item, int(n)) for item, n in counts if n >= min_count),
                  key=lambda pair: (-pair[1], pair[0]))


def index_of(vocabulary: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Raw id → index for a vocabulary from `build_vocabulary`."""
    return {item: i for i, (item, _) in enumerate(vocabulary, start=schema.NUM_RESERVED)}
