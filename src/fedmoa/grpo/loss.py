"""The clipped GRPO surrogate with an optional k3 KL penalty.

Same formulas as TRL's ``GRPOTrainer`` for ``grpo``, ``bnpo``, ``dr_grpo`` and
``dapo`` at token-level importance sampling, so results can be cross-checked
against TRL itself (tests/test_grpo_vs_trl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


@dataclass(frozen=True)
class LossSettings:
    loss_type: LossType = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    # Weight the k3 term by the importance ratio (DeepSeek-V3.2; TRL's default), which
    # keeps its gradient unbiased when the batch was sampled by an older policy.
    kl_bias_correction: bool = True
    # dr_grpo divides by a constant: the generation budget per completion.
    max_completion_length: int | None = None


@dataclass(frozen=True)
class BatchTotals:
    """Whole-batch counts that a micro-batch's loss and statistics are divided by.

    With them, :func:`policy_loss` on a slice of rows returns that slice's *share* of the
    whole batch's loss and statistics, so the shares of consecutive micro-batches add up to
    the whole batch's values (and their gradients to its gradient): ``grpo`` sums the
    per-sequence means and divides by the batch's ``N``, ``bnpo``/``dapo`` divide the masked
    token sum by the batch's token count, ``dr_grpo`` by ``N·max_completion_length``.
    """

    sequences: int  # N, the rows of the whole batch
    tokens: float  # completion tokens of the whole batch (its mask's sum, at least 1)

    @classmethod
    def of(cls, mask: torch.Tensor) -> BatchTotals:
        return cls(mask.shape[0], max(float(mask.float().sum().item()), 1.0))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(π_θ‖π_ref)`` estimate ``exp(r) - r - 1`` with ``r = log π_ref - log π_θ``."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def reduce_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    totals: BatchTotals | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [N, T] to a scalar the way ``loss_type`` prescribes.

    ``totals``: these rows are a micro-batch of a larger batch; the result is their share of
    the whole batch's loss (see :class:`BatchTotals`).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if totals is not None:
        return _reduce_share(masked, mask, settings, totals)
    if settings.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if settings.loss_type in ("bnpo", "dapo"):
        # Identical for one batch; they differ only in how TRL accumulates micro-batches.
        return masked.sum() / mask.sum().clamp(min=1.0)
    if settings.loss_type == "dr_grpo":
        length = settings.max_completion_length or per_token.shape[1]
        return masked.sum() / (per_token.shape[0] * length)
    raise ValueError(f"unknown loss_type {settings.loss_type!r}")


def _reduce_share(
    masked: torch.Tensor, mask: torch.Tensor, settings: LossSettings, totals: BatchTotals
) -> torch.Tensor:
    if settings.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / totals.sequences
    if settings.loss_type in ("bnpo", "dapo"):
        return masked.sum() / totals.tokens
    if settings.loss_type == "dr_grpo":
        length = settings.max_completion_length or masked.shape[1]
        return masked.sum() / (totals.sequences * length)
    raise ValueError(f"unknown loss_type {settings.loss_type!r}")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    ref_logps: torch.Tensor | None = None,
    totals: BatchTotals | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss for per-token log-probs [N, T] and per-sequence advantages [N].

    ``old_logps`` are those of the policy that sampled the batch (``logps.detach()``
    when ``num_iterations == 1``); ``ref_logps`` are needed only when ``beta > 0``.
    Returns the scalar loss and TRL-named statistics (``kl``, ``clip_ratio/*``).

    ``totals``: the rows are a micro-batch of a batch with these totals; the loss and the
    statistics are then this micro-batch's shares, which add up over the micro-batches to
    the whole batch's loss and statistics (:class:`BatchTotals`).
    """
    adv = advantages.to(logps.device, logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - settings.epsilon_low, 1 + settings.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, float] = {}
    if settings.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        if settings.kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + settings.beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask, totals)
    loss = reduce_tokens(per_token, mask, settings, totals)
    stats.update(clip_stats(ratio.detach(), adv.detach(), mask, settings, totals))
    return loss, stats


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, totals: BatchTotals | None = None) -> float:
    """Mean over the masked tokens; with ``totals``, these tokens' share of the whole batch's."""
    mask = mask.to(x.dtype)
    if totals is not None:
        return (x * mask).sum().item() / totals.tokens
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def clip_stats(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    totals: BatchTotals | None = None,
) -> dict[str, float]:
    """Fractions of tokens whose update the clip switched off, as TRL logs them."""
    low = (ratio < 1 - settings.epsilon_low) & (adv < 0)
    high = (ratio > 1 + settings.epsilon_high) & (adv > 0)
    low_f, high_f = low.to(ratio.dtype), high.to(ratio.dtype)
    return {
        "clip_ratio/low_mean": _masked_mean(low_f, mask, totals),
        "clip_ratio/high_mean": _masked_mean(high_f, mask, totals),
        "clip_ratio/region_mean": _masked_mean((low | high).to(ratio.dtype), mask, totals),
    }
