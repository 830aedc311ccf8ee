"""Fixed reward weights: the FedAvg-style baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoa.weighting.base import RewardWeighting, normalize_weights


class StaticWeighting(RewardWeighting):
    """``w = w0 / Σ w0`` for the whole run.

    Weights are normalised so that static and adaptive runs move the policy by
    comparable step sizes for the same learning rate.
    """

    def __init__(self, names: Sequence[str], primary: str, initial: Sequence[float]) -> None:
        super().__init__(names, primary)
        self._weights = normalize_weights(initial)

    def weights(self) -> torch.Tensor:
        return self._weights.clone()
