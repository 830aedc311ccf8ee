"""Rollouts and greedy evaluation sample the configured distribution, whatever the model's own
``generation_config`` says (a hub Qwen2.5-Instruct sets ``repetition_penalty = 1.05``)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import GenerationConfig

import fedmoa.eval.evaluate as evaluate
import fedmoa.grpo.rollout as rollout
from fedmoa.eval.evaluate import greedy_generate
from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts
from test_trainer import PROMPTS, tiny_policy


def with_generation_config(**fields: object) -> tuple[object, object]:
    policy, tokenizer = tiny_policy()
    base = policy.get_base_model()
    base.generation_config = GenerationConfig(
        eos_token_id=base.generation_config.eos_token_id,
        pad_token_id=base.generation_config.pad_token_id,
        **fields,
    )
    return policy, tokenizer


OPINIONATED = {
    "repetition_penalty": 1.8,
    "no_repeat_ngram_size": 2,
    "min_new_tokens": 6,
    "top_k": 3,
    "temperature": 0.3,
    "do_sample": True,
}


def test_rollouts_ignore_the_models_generation_config() -> None:
    settings = SamplingSettings(group_size=4, max_new_tokens=12, temperature=1.0)
    rollouts = []
    for fields in ({}, OPINIONATED):
        policy, tokenizer = with_generation_config(**fields)
        saved = copy.deepcopy(policy.get_base_model().generation_config.to_dict())
        torch.manual_seed(7)
        rollouts.append(generate_rollouts(policy, tokenizer, PROMPTS, settings))
        assert policy.get_base_model().generation_config.to_dict() == saved  # restored
    plain, opinionated = rollouts
    assert torch.equal(plain.completion_ids, opinionated.completion_ids)
    assert torch.equal(plain.sampling_logps, opinionated.sampling_logps)


def test_the_model_config_would_change_the_samples_without_the_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tests here can fail: the same config, applied, does change what is drawn."""
    settings = SamplingSettings(group_size=4, max_new_tokens=12, temperature=1.0)
    policy, tokenizer = with_generation_config(**OPINIONATED)
    prompts = [[{"role": "user", "content": "Say a number."}]] * 2
    torch.manual_seed(7)
    guarded = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    greedy = greedy_generate(policy, tokenizer, prompts, max_new_tokens=12).token_ids
    monkeypatch.setattr(rollout, "configured_generation", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(evaluate, "configured_generation", lambda *_: contextlib.nullcontext())
    torch.manual_seed(7)
    unguarded = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    assert not torch.equal(guarded.completion_ids, unguarded.completion_ids)
    assert greedy != greedy_generate(policy, tokenizer, prompts, max_new_tokens=12).token_ids


def test_greedy_evaluation_ignores_the_models_generation_config() -> None:
    texts = []
    for fields in ({}, OPINIONATED):
        policy, tokenizer = with_generation_config(**fields)
        texts.append(greedy_generate(policy, tokenizer, PROMPTS, max_new_tokens=12).token_ids)
    assert texts[0] == texts[1]
