"""Fixed reward weights: the FedAvg-style baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoa.weighting.base import RewardWeighting, normalize_weights


class StaticWeighting(RewardWeighting):
    """``w = w0 / Σ w0`` for the whole run.

    Weights are normalised so that static and adaptive runs move the policy by
    comparable step sizes for the same learning rate. ``normalize=False`` keeps
    them as given (the centralized baseline normalises per source client instead).
    """

    def __init__(
        self, names: Sequence[str], primary: str, initial: Sequence[float], normalize: bool = True
    ) -> None:
        super().__init__(names, primary)
        weights = normalize_weights(initial)
        self._weights = weights if normalize else weights * float(sum(initial))

    def weights(self) -> torch.Tensor:
        return self._weights.clone()
