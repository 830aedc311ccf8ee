"""Deterministic train/validation/test splits."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from fedmoa.errors import ConfigError

T = TypeVar("T")


def split_rows(
    rows: Sequence[T],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed`` and cut into (train, val, test): disjoint, covering all rows, and
    the same for the same inputs. Cuts are rounded cumulatively so sizes match the fractions to
    within one row and nothing is dropped."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1):
        raise ConfigError(
            f"split fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train = round(fractions[0] * len(rows))
    n_train_val = round((fractions[0] + fractions[1]) * len(rows))
    train, val, test = order[:n_train], order[n_train:n_train_val], order[n_train_val:]
    return ([rows[i] for i in train], [rows[i] for i in val], [rows[i] for i in test])
