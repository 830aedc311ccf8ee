"""Deterministic train/validation/test splits, and a data owner's rows loaded and split."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fedmoa.data.config import DataConfig, SplitConfig
from fedmoa.data.sources import load_rows
from fedmoa.errors import ConfigError, DataError

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


@dataclass
class ClientData:
    """One data owner's rows: what trains, what it reports accuracy on, what it is tested on."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]


def load_split(data: DataConfig, split: SplitConfig, owner: str) -> ClientData:
    """``data``'s rows split by ``split`` (seeded by ``data.seed``): disjoint and the same in
    every process. Every error starts with ``owner`` (e.g. "client 'a' (clients[2].data)"); no
    rows, an empty partition or an empty train split is an error."""
    try:
        rows = load_rows(data)
    except DataError as err:
        raise DataError(f"{owner}: {err}") from err
    train, validation, test = split_rows(
        rows, (split.train, split.validation, split.test), seed=data.seed
    )
    if not train:
        raise DataError(
            f"{owner}: empty train split: split.train = {split.train} "
            f"of {len(rows)} rows rounds to 0; load more rows or raise split.train"
        )
    return ClientData(train, validation, test)
