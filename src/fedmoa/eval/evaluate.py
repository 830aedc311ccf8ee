"""Greedy pass@1 and per-objective reward means on held-out rows.

Used for the accuracy ``a_k`` a client reports to the server (validation split)
and for global and personalized test accuracy. Decoding is greedy so that the
figure depends on the adapter only, not on sampling luck.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig

from fedmoa.grpo import decode
from fedmoa.grpo.rollout import (
    configured_generation,
    encode_prompts,
    eos_token_ids,
    prompt_budget,
)
from fedmoa.rewards import RewardFunc, compute_rewards

Row = dict[str, Any]


@dataclass
class Generations:
    """Greedy completions with what decoding knew about them: token counts and truncation."""

    texts: list[str]
    num_tokens: list[int]  # generated tokens per row, the closing EOS included
    token_ids: list[list[int]]  # those tokens: what rewards get as ``completion_ids``
    truncated: list[bool]  # hit ``max_new_tokens`` before an EOS
    seconds: float  # wall time spent in ``generate``


@dataclass
class EvalResult:
    accuracy: float  # mean of the primary objective over rows it applies to (NaN if none)
    reward_means: dict[str, float] = field(default_factory=dict)
    num_rows: int = 0
    accuracy_rows: int = 0  # rows the primary scored (not None): the evidence behind ``accuracy``
    # evaluation-only checks of the same completions (``[[clients]] checks``): name -> mean
    check_means: dict[str, float] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    # Per-row detail for reports (``fedmoa eval``); the federation only reads the means above.
    rewards: torch.Tensor | None = None  # [num_rows, m], NaN where an objective does not apply
    num_tokens: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    generation_s: float = 0.0

    @property
    def hypervolume(self) -> float:
        return hypervolume(self.reward_means.values())

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/hypervolume": self.hypervolume}
        out.update({f"{prefix}/rewards/{k}": v for k, v in self.reward_means.items()})
        out.update({f"{prefix}/checks/{k}": v for k, v in self.check_means.items()})
        return out


def hypervolume(reward_means: Iterable[float]) -> float:
    """Hypervolume of one mean-reward vector against the origin: the volume of the box it
    dominates, ``prod(max(r_i, 0))``.

    One number for multi-objective balance: it is 0 as soon as any objective is at 0, so a
    client that maximises its auxiliaries and fails its primary scores 0. Objectives that
    applied to no row (NaN) are left out; with none left the result is NaN.
    """
    values = [v for v in reward_means if not math.isnan(v)]
    return math.prod(max(v, 0.0) for v in values) if values else math.nan


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> Generations:
    """Decode each prompt greedily, ``batch_size`` prompts per ``generate`` call.

    ``on_batch(n)`` is called after every batch with the number of prompts it held, so a caller
    can drive a progress bar without the decoding loop knowing about one.
    """
    device = next(model.parameters()).device
    budget = prompt_budget(model, max_new_tokens)  # longer prompts keep their end (rollout.py)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos),
        pad_token_id=pad,
    )
    was_training = model.training
    model.eval()
    out = Generations(texts=[], num_tokens=[], token_ids=[], truncated=[], seconds=0.0)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            encoded = encode_prompts(tokenizer, batch, device, budget)
            began = time.perf_counter()
            with configured_generation(model, eos, pad):
                generated = decode.generate(
                    model, encoded["input_ids"], encoded["attention_mask"], config
                )
            out.seconds += time.perf_counter() - began
            out.texts.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
            # A row without EOS ran to max_new_tokens: generate only stops early once every
            # row has ended, and then each has its EOS. Tokens after the EOS are padding.
            is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device))
            ended = is_eos.any(dim=1)
            lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, generated.shape[1])
            out.num_tokens.extend(lengths.tolist())
            out.token_ids.extend(
                ids[:n].tolist() for ids, n in zip(generated, lengths, strict=True)
            )
            out.truncated.extend((~ended).tolist())
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return out


def greedy_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, Any]]],
    max_new_tokens: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The texts of ``greedy_generate``: each prompt decoded greedily, batch by batch."""
    return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch).texts


def evaluate_rows(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    primary: str,
    max_new_tokens: int,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    checks: Sequence[tuple[str, RewardFunc]] = (),
) -> EvalResult:
    """Greedy completions for ``rows`` scored by every objective; accuracy is the primary's mean.

    ``checks`` score the same completions for the report only: they are in ``check_means``,
    not in ``reward_means`` or the hypervolume.
    """
    if not rows:
        return EvalResult(accuracy=math.nan)
    prompts = [row["prompt"] for row in rows]
    gen = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch)
    completions = [[{"role": "assistant", "content": t}] for t in gen.texts]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    columns["completion_ids"] = gen.token_ids  # as in training: ``length`` counts tokens in both
    scored = compute_rewards([*reward_funcs, *checks], prompts, completions, columns)
    rewards = scored[:, : len(reward_funcs)]
    means = {name: _nanmean(rewards[:, i]) for i, (name, _) in enumerate(reward_funcs)}
    column = [name for name, _ in reward_funcs].index(primary)
    offset = len(reward_funcs)
    return EvalResult(
        accuracy=means[primary],
        check_means={name: _nanmean(scored[:, offset + i]) for i, (name, _) in enumerate(checks)},
        reward_means=means,
        num_rows=len(rows),
        accuracy_rows=int((~torch.isnan(rewards[:, column])).sum()),
        completions=gen.texts,
        rewards=rewards,
        num_tokens=gen.num_tokens,
        truncated=gen.truncated,
        generation_s=gen.seconds,
    )


def _nanmean(column: torch.Tensor) -> float:
    kept = column[~torch.isnan(column)]
    return kept.mean().item() if kept.numel() else math.nan
