"""The field's statistics-based dynamic weightings, as baselines for FedMOA's hypergradient.

Both read only the scored batch (no gradients) and weight the very batch they measured:

* **SAW** (He et al., arXiv 2606.07705): each objective's coefficient of variation over
  the batch, ``CV_i = std_i / (|mean_i| + 1e-8)`` (Bessel-corrected std over every
  applicable completion), as a scale-free measure of how informative it still is;
  ``w_i ∝ w0_i·CV_i``. The authors' code (github.com/Zhaolutuan/SAW, ``compute_advantage``)
  uses ``CV_i / Σ_j CV_j`` with no preference weights; ``w0`` uniform is exactly that.
* **Variance** weighting in the spirit of DVAO (Jiang et al., arXiv 2605.25604), which
  weights each objective by its within-group reward spread: ``w_i ∝ w0_i·σ̄_i`` with
  ``σ̄_i`` the mean over groups of the population std. DVAO does this per group
  (``w_ig ∝ w0_i·σ_ig``); our weightings give one vector per step, so this is the
  batch-level version, said so in docs/design.md.

GDPO is ``normalize_then_sum`` with static weights (``method = "static"``).
Shares are floored at ``w_min`` like every dynamic weighting here; when no objective has any
spread the configured weights are kept. ``smoothing`` > 0 takes an EMA of the statistic
across steps instead of the batch's alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmoa.weighting.base import (
    RewardBatch,
    RewardWeighting,
    check_floor,
    floored,
    normalize_weights,
)

_CV_EPS = 1e-8  # as the SAW authors' code


def coefficient_of_variation(rewards: torch.Tensor) -> torch.Tensor:
    """[m]: ``std/(|mean| + 1e-8)`` of each column over its non-NaN entries (0 with < 2)."""
    columns = []
    for column in rewards.double().T:
        values = column[~torch.isnan(column)]
        if values.numel() < 2:
            columns.append(torch.zeros((), dtype=torch.float64))
            continue
        columns.append(values.std() / (values.mean().abs() + _CV_EPS))
    return torch.stack(columns)


def mean_group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[m]: per objective, the mean over groups of the population std within the group
    (NaN entries left out; a group with fewer than two applicable rewards counts as 0)."""
    grouped = rewards.double().view(-1, group_size, rewards.shape[1])
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)
    mean = torch.nansum(grouped, dim=1) / count.clamp(min=1)
    centred = torch.where(valid, grouped - mean.unsqueeze(1), torch.zeros_like(grouped))
    std = ((centred**2).sum(dim=1) / count.clamp(min=1)).sqrt()
    return torch.where(count >= 2, std, torch.zeros_like(std)).mean(dim=0)


class BatchStatisticWeighting(RewardWeighting):
    """``w = w_min + (1 − m·w_min)·normalise(w0 ⊙ s)`` for a per-objective batch statistic
    ``s``; subclasses say which statistic."""

    def __init__(
        self,
        names: Sequence[str],
        primary: str,
        initial: Sequence[float],
        w_min: float = 0.02,
        smoothing: float = 0.0,
    ) -> None:
        super().__init__(names, primary)
        if len(initial) != len(self.names):
            raise ValueError(f"{len(self.names)} objectives but {len(initial)} initial weights")
        if not (0 <= smoothing < 1):
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.w0 = normalize_weights(initial).double()
        self.w_min = check_floor(w_min, len(self.names))
        self.smoothing = float(smoothing)
        self.statistic_ema: torch.Tensor | None = None
        self._weights = self.w0.clone()

    def statistic(self, batch: RewardBatch) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> torch.Tensor:
        return self._weights.float()

    def observe_batch(self, batch: RewardBatch) -> dict[str, float]:
        value = self.statistic(batch).double().cpu().nan_to_num(0.0).clamp(min=0.0)
        if self.statistic_ema is not None and self.smoothing > 0:
            value = self.smoothing * self.statistic_ema + (1 - self.smoothing) * value
        self.statistic_ema = value
        scores = self.w0 * value
        if scores.sum() > 0:
            self._weights = floored(scores / scores.sum(), self.w_min)
        else:
            self._weights = self.w0.clone()  # no objective has spread: nothing to go by
        return {
            f"weighting_statistic/{n}": float(v) for n, v in zip(self.names, value, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        m = len(self.names)
        return {
            "weights": self._weights.clone(),
            "statistic_ema": torch.zeros(m) if self.statistic_ema is None else self.statistic_ema,
            "has_statistic": int(self.statistic_ema is not None),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        m = len(self.names)
        weights = torch.as_tensor(state["weights"], dtype=torch.float64).clone()
        if weights.shape != (m,):
            raise ValueError(f"state has weights of shape {tuple(weights.shape)}, expected ({m},)")
        self._weights = weights
        ema = torch.as_tensor(state["statistic_ema"], dtype=torch.float64).clone()
        self.statistic_ema = ema if int(state["has_statistic"]) else None


class SAWWeighting(BatchStatisticWeighting):
    """SAW: weight by the coefficient of variation over the batch (arXiv 2606.07705)."""

    def statistic(self, batch: RewardBatch) -> torch.Tensor:
        return coefficient_of_variation(batch.rewards)


class VarianceWeighting(BatchStatisticWeighting):
    """DVAO-style: weight by the mean within-group reward std (arXiv 2605.25604)."""

    def statistic(self, batch: RewardBatch) -> torch.Tensor:
        return mean_group_std(batch.rewards, batch.group_size)
