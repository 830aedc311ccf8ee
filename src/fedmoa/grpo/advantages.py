"""Group-relative advantages for several reward objectives.

GRPO has no critic: a completion's advantage is its reward relative to the other
``G`` completions sampled for the same prompt. With several objectives FedMOA
normalises each objective inside its group first (``normalize_then_sum``), so an
objective's scale cannot drown the others and a saturated objective (zero spread
in every group) contributes exactly zero. The combined advantage is then linear in
the weights, ``A = Σ_i w_i Â_i``, which the hypergradient weighting relies on.
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageMode = Literal["normalize_then_sum", "sum_then_normalize"]
ScaleRewards = Literal["group", "batch", "none"]

EPS = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values exist (as TRL)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def _standardize(
    values: torch.Tensor, group_size: int, scale: ScaleRewards
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre ``values`` [N, ...] on their group mean and divide by the chosen std.

    Returns the standardised values (NaN where the input was NaN) and the std used,
    broadcast to ``values``' shape, so callers can report zero-spread groups.
    """
    grouped = values.view(-1, group_size, *values.shape[1:])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "batch":
        std = nanstd(values, dim=0, keepdim=True).unsqueeze(1).expand_as(grouped)
    elif group_size > 1:
        std = nanstd(grouped, dim=1, keepdim=True).expand_as(grouped)
    else:
        std = torch.zeros_like(grouped)
    centred = grouped - mean
    if scale != "none":
        centred = centred / (std + EPS)
    return centred.reshape(values.shape), std.reshape(values.shape)


def objective_advantages(
    rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group"
) -> torch.Tensor:
    """Per-objective group advantages ``Â`` [N, m] from raw rewards [N, m] (NaN = not applicable).

    Rows are ordered prompt-major: rows ``g*G .. g*G+G-1`` share a prompt. A NaN
    reward gets advantage 0 and is left out of its group's mean and std; a group
    with zero spread (all failed, or the objective is saturated) gets 0.
    """
    if rewards.dim() != 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [B*G, m] with G={group_size}, got {tuple(rewards.shape)}"
        )
    adv, _ = _standardize(rewards.float(), group_size, scale)
    return torch.nan_to_num(adv, nan=0.0)


def objective_zero_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[m]: per objective, the fraction of groups with zero reward spread (TRL's
    ``frac_reward_zero_std``, one objective at a time); a group with fewer than two
    applicable rewards has no spread either. An objective at 1.0 gives no signal."""
    grouped = rewards.float().view(-1, group_size, rewards.shape[1])
    std = nanstd(grouped, dim=1).nan_to_num(0.0)
    return torch.isclose(std, torch.zeros(())).float().mean(dim=0)


def combine_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    mode: AdvantageMode = "normalize_then_sum",
    scale: ScaleRewards = "group",
    whiten: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Combined advantage [N] from rewards [N, m] and objective weights [m].

    ``normalize_then_sum`` (default): ``A = Σ_i w_i Â_i``. With ``whiten=True`` the
    sum is also standardised over the batch, as TRL's ``normalize_then_sum`` does;
    that breaks linearity in ``w``, so FedMOA leaves it off.
    ``sum_then_normalize``: weight and sum the raw rewards, then normalise in the
    group (TRL's default aggregation).
    A completion that no objective applies to gets advantage 0.
    """
    weights = weights.to(rewards.device, torch.float32)
    rewards = rewards.float()
    unscorable = torch.isnan(rewards).all(dim=1)
    if mode == "normalize_then_sum":
        per_objective, std = _standardize(rewards, group_size, scale)
        combined = torch.nan_to_num(per_objective, nan=0.0) @ weights
        zero_std = torch.isclose(std.nan_to_num(0.0), torch.zeros(())).all(dim=1)
        if whiten:
            combined = combined.masked_fill(unscorable, float("nan"))
            std = nanstd(combined) if combined.numel() > 1 else torch.zeros(())
            combined = (combined - torch.nanmean(combined)) / (std + EPS)
    elif mode == "sum_then_normalize":
        total = (rewards * weights).nansum(dim=1).masked_fill(unscorable, float("nan"))
        combined, std = _standardize(total, group_size, scale)
        zero_std = torch.isclose(std, torch.zeros_like(std))
    else:
        raise ValueError(f"unknown advantage mode {mode!r}")
    combined = torch.nan_to_num(combined, nan=0.0)
    stats = {"frac_reward_zero_std": zero_std.float().mean().item()}
    return combined, stats
