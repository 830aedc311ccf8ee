"""Greedy pass@1 and per-objective reward means on held-out rows.

Used for the accuracy ``a_k`` a client reports to the server (validation split)
and for global and personalized test accuracy. Decoding is greedy so that the
figure depends on the adapter only, not on sampling luck.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmoa.grpo.rollout import encode_prompts, eos_token_ids
from fedmoa.rewards import RewardFunc, compute_rewards

Row = dict[str, Any]


@dataclass
class EvalResult:
    accuracy: float  # mean of the primary objective over rows it applies to (NaN if none)
    reward_means: dict[str, float] = field(default_factory=dict)
    num_rows: int = 0
    completions: list[str] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy}
        out.update({f"{prefix}/rewards/{k}": v for k, v in self.reward_means.items()})
        return out


@torch.no_grad()
def greedy_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Decode each prompt greedily, ``batch_size`` prompts per ``generate`` call."""
    device = next(model.parameters()).device
    eos = list(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = encode_prompts(tokenizer, list(prompts[start : start + batch_size]), device)
            output = model.generate(
                **encoded,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            texts.extend(
                tokenizer.batch_decode(
                    output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
                )
            )
    finally:
        model.train(was_training)
    return texts


def evaluate_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    primary: str,
    max_new_tokens: int,
    batch_size: int = 8,
) -> EvalResult:
    """Greedy completions for ``rows`` scored by every objective; accuracy is the primary's mean."""
    if not rows:
        return EvalResult(accuracy=math.nan)
    prompts = [row["prompt"] for row in rows]
    texts = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    rewards = compute_rewards(reward_funcs, prompts, completions, columns)
    means = {name: _nanmean(rewards[:, i]) for i, (name, _) in enumerate(reward_funcs)}
    return EvalResult(
        accuracy=means[primary], reward_means=means, num_rows=len(rows), completions=texts
    )


def _nanmean(column: torch.Tensor) -> float:
    kept = column[~torch.isnan(column)]
    return kept.mean().item() if kept.numel() else math.nan
