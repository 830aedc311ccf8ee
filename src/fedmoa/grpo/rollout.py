"""Sampling ``G`` completions for each of ``B`` prompts in one batched ``generate``.

The sampling log-probs are recorded while decoding (one [N, V] slice alive at a
time), so the trainer never needs an extra forward pass to know what the sampler
did.

Long prompts: a prompt and its completion must fit the model's context
(``config.max_position_embeddings``), so a prompt longer than
``context - max_new_tokens`` tokens keeps only its last that many tokens (left
truncation, as TRL's ``max_prompt_length``): the end holds the question and the
assistant header that generation continues from, the start usually the system
prompt. Each batch with truncated prompts logs a warning with their number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from fedmoa.errors import ConfigError
from fedmoa.grpo.logprobs import contiguous_head_input

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class SamplingSettings:
    group_size: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off, as in TRL's GRPOConfig
    mask_truncated: bool = False


@dataclass
class Rollout:
    """One generation batch, prompt-major: rows ``j*G .. j*G+G-1`` share prompt ``j``."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] right-padded
    completion_mask: torch.Tensor  # [N, T] 1 up to and including EOS (0 for masked truncations)
    completion_lengths: torch.Tensor  # [N] generated tokens through EOS, before truncation masking
    sampling_logps: torch.Tensor  # [N, T] float32, log π_old(token) at temperature T
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    completions: list[str]  # decoded text, special tokens removed
    group_size: int

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]


class _SampledLogpRecorder(LogitsProcessor):
    """Records ``log softmax(logits / T)`` of each sampled token.

    HF applies user processors before the temperature and top-p warpers, so this sees
    the model's raw logits. At step ``t`` the token chosen at ``t-1`` is the last
    column of ``input_ids``, so only the previous step's log-probs are kept.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._collect(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _collect(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, tokens.unsqueeze(1)).squeeze(1))

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._collect(last_tokens)
        self.previous = None
        return torch.stack(self.picked, dim=1)


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a completion: the generation config's EOS list plus the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def _mask_through_eos(completion_ids: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    width = completion_ids.shape[1]
    first_eos = torch.where(
        is_eos.any(1),
        is_eos.int().argmax(1),
        torch.full_like(is_eos[:, 0], width, dtype=torch.long),
    )
    return (torch.arange(width, device=completion_ids.device) <= first_eos.unsqueeze(1)).long()


def prompt_budget(model: Any, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for ``max_new_tokens`` in the model's context
    (``config.max_position_embeddings``); None when the model does not say."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return None
    if max_new_tokens >= context:
        raise ConfigError(
            f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in the model's "
            f"{context}-token context (max_position_embeddings)"
        )
    return context - max_new_tokens


def encode_prompts(
    tokenizer: Any, prompts: list[Messages], device: torch.device, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Apply the chat template and left-pad, as batched decoding needs.

    A prompt longer than ``max_length`` tokens (see ``prompt_budget``) keeps its last
    ``max_length`` tokens; the batch logs how many were cut (module docstring).
    """
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    if max_length is not None:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths = [len(x) for x in ids]
        cut = sum(n > max_length for n in lengths)
        if cut:
            logger.warning(
                "%d of %d prompts exceed the %d-token prompt budget (model context minus "
                "max_new_tokens; longest %d tokens): kept their last %d tokens",
                cut,
                len(ids),
                max_length,
                max(lengths),
                max_length,
            )
            return _left_padded([x[-max_length:] for x in ids], tokenizer, device)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _left_padded(
    ids: list[list[int]], tokenizer: Any, device: torch.device
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token lists, left-padded to the longest."""
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def generate_rollouts(
    model: Any, tokenizer: Any, prompts: list[Messages], settings: SamplingSettings
) -> Rollout:
    """Sample ``settings.group_size`` completions per prompt with the current policy."""
    device = next(model.parameters()).device
    budget = prompt_budget(model, settings.max_new_tokens)
    encoded = encode_prompts(tokenizer, prompts, device, budget)
    prompt_ids = encoded["input_ids"].repeat_interleave(settings.group_size, dim=0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(settings.group_size, dim=0)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,  # 0 disables top-k; None would inherit the model's default (50)
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
    )
    recorder = _SampledLogpRecorder(settings.temperature)
    was_training = model.training
    model.eval()
    try:
        with contiguous_head_input(model):
            output = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
            )
    finally:
        model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1] :]
    logps = recorder.finish(completion_ids[:, -1])
    through_eos = _mask_through_eos(completion_ids, eos_ids)
    lengths = through_eos.sum(1)
    truncated = ~torch.isin(completion_ids, torch.tensor(eos_ids, device=device)).any(1)
    mask = (
        through_eos * (~truncated).long().unsqueeze(1) if settings.mask_truncated else through_eos
    )
    # Rewards still see truncated text; only the loss drops it when masking is on.
    texts = tokenizer.batch_decode(
        [ids[:n] for ids, n in zip(completion_ids, lengths.tolist(), strict=True)],
        skip_special_tokens=True,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        completion_lengths=lengths,
        sampling_logps=logps * through_eos,
        truncated=truncated,
        completions=texts,
        group_size=settings.group_size,
    )
