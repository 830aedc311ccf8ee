"""How a client mixes its reward objectives into one advantage.

A strategy owns the weight vector ``w`` (on the simplex) and may look at each
training step through ``StepSignals`` to move it. Strategies keep their whole
state in ``state_dict()`` so that it survives rounds, checkpoints and Flower's
``context.state``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepSignals:
    """What a step exposes to the weighting, after the loss graph is built and before backward.

    Given to ``observe_part`` for each micro-batch (its rows only, its part of the loss), then
    to ``observe`` for the step with ``objective_loss = None``: the parts were the graph.
    """

    objective_advantages: torch.Tensor  # [N, m] per-objective group advantages Â_i
    # advantages [N] -> the surrogate on this graph (this micro-batch's share of the batch's)
    objective_loss: Callable[[torch.Tensor], torch.Tensor] | None
    reward_means: torch.Tensor  # [m] (NaN where an objective applied to no sample)
    # The factor the step's backward multiplies the loss by (fp16 gradient scaling): gradients
    # taken from this graph should be taken at that scale and divided by it, not to underflow.
    loss_scale: float = 1.0


@dataclass
class RewardBatch:
    """A step's scored batch, shown to the weighting before its weights mix the advantages,
    so that statistics-based rules (SAW, variance) weight the batch they measured."""

    rewards: torch.Tensor  # [N, m] raw rewards, prompt-major groups of ``group_size``, NaN = n/a
    group_size: int
    zero_std: torch.Tensor  # [m] per objective, fraction of groups with zero spread


class RewardWeighting(ABC):
    """Base class: a named weight vector plus an update rule."""

    def __init__(self, names: Sequence[str], primary: str) -> None:
        if primary not in names:
            raise ValueError(f"primary objective {primary!r} is not among {list(names)}")
        self.names = list(names)
        self.primary_index = self.names.index(primary)

    @abstractmethod
    def weights(self) -> torch.Tensor:
        """Current weights [m], non-negative and summing to 1."""

    def observe_batch(self, batch: RewardBatch) -> dict[str, float]:
        """See the step's rewards before ``weights()`` mixes them; returns metrics to log."""
        del batch
        return {}

    def observe_part(self, signals: StepSignals) -> None:
        """See one micro-batch's graph (its rows' advantages and loss), before its backward.

        With micro-batches the trainer calls this once per micro-batch and then ``observe``
        once for the step, with ``signals.objective_loss = None``: a strategy that reads the
        graph gathers what it needs here. Static and statistics-based strategies ignore it.
        """
        del signals

    def observe(self, signals: StepSignals) -> dict[str, float]:
        """Update the weights from one step; returns metrics to log. Static strategies ignore it."""
        del signals
        return {}

    def begin_round(self) -> None:
        """Called by the federated engines at the start of each round (e.g. to drop caches)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def weight_metrics(self) -> dict[str, float]:
        return {f"weights/{n}": float(w) for n, w in zip(self.names, self.weights(), strict=True)}


def floored(shares: torch.Tensor, w_min: float) -> torch.Tensor:
    """``w = w_min + (1 − m·w_min)·shares``: shares on the simplex, every weight at least
    ``w_min``, so that no objective vanishes."""
    return w_min + (1.0 - shares.numel() * w_min) * shares


def check_floor(w_min: float, m: int) -> float:
    if not (math.isfinite(w_min) and w_min >= 0 and m * w_min < 1):
        raise ValueError(
            f"w_min must satisfy 0 <= w_min and m·w_min < 1 (m={m}), got w_min={w_min}"
        )
    return float(w_min)


def normalize_weights(weights: Sequence[float]) -> torch.Tensor:
    """Project configured non-negative weights onto the simplex."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    if w.numel() == 0 or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(
            f"weights must be finite, non-negative and not all zero, got {list(weights)}"
        )
    return w / w.sum()
