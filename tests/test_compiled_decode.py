"""The compiled decode (``[model] decode = "compiled"``) draws from the same distribution as the
eager one: same logits within 1e-4 (fp32 tiny model), same greedy tokens, same sampled tokens
and sampling log-probs for the same seed; and a compile that fails falls back to eager once."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from conftest import needs_cxx
from fedmoa.eval.evaluate import greedy_generate
from fedmoa.grpo import decode
from fedmoa.grpo.rollout import SamplingSettings, encode_prompts, generate_rollouts
from fedmoa.weighting import HypergradientWeighting
from test_trainer import PROMPTS, tiny_policy

MORE_PROMPTS = [
    *PROMPTS,
    [{"role": "user", "content": "Name three prime numbers greater than one hundred, please."}],
]


def adapted_policy(seed: int = 0):
    """A tiny policy whose LoRA update is not zero, so the adapter shapes every logit."""
    policy, tokenizer = tiny_policy(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy, tokenizer


class RecordScores(LogitsProcessor):
    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def reset(self) -> None:
        self.scores = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores.float().clone())
        return scores


def greedy_scores(policy, tokenizer, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    decode.set_decode(policy, mode)
    encoded = encode_prompts(tokenizer, MORE_PROMPTS, torch.device("cpu"))
    config = GenerationConfig(
        do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=tokenizer.pad_token_id
    )
    recorder = RecordScores()
    policy.eval()
    with torch.no_grad():
        tokens = decode.generate(
            policy,
            encoded["input_ids"],
            encoded["attention_mask"],
            config,
            LogitsProcessorList([recorder]),
        )
    return tokens, torch.stack(recorder.scores, 1)


@needs_cxx
def test_compiled_decode_gives_the_eager_logits_and_greedy_tokens():
    policy, tokenizer = adapted_policy()
    eager_tokens, eager_scores = greedy_scores(policy, tokenizer, "eager")
    compiled_tokens, compiled_scores = greedy_scores(policy, tokenizer, "compiled")
    assert decode.decode_mode(policy) == "compiled"  # it did not fall back
    assert torch.equal(compiled_tokens, eager_tokens)
    torch.testing.assert_close(compiled_scores, eager_scores, rtol=0, atol=1e-4)

    # The adapter is live in the graph: a changed LoRA weight changes the compiled logits.
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).mul_(3.0)
    _, eager_after = greedy_scores(policy, tokenizer, "eager")
    _, compiled_after = greedy_scores(policy, tokenizer, "compiled")
    assert (eager_after - eager_scores).abs().max() > 1e-3
    torch.testing.assert_close(compiled_after, eager_after, rtol=0, atol=1e-4)


@needs_cxx
def test_compiled_sampling_and_evaluation_match_eager():
    policy, tokenizer = adapted_policy(1)
    # A FedMOA client's probe hooks sit on the policy's Linear modules while it samples.
    weighting = HypergradientWeighting.for_model(policy, ["a", "b"], "a", [0.5, 0.5])
    assert weighting._hooks
    settings = SamplingSettings(group_size=3, max_new_tokens=10, temperature=0.8, top_p=0.95)
    runs = {}
    for mode in ("eager", "compiled"):
        decode.set_decode(policy, mode)
        torch.manual_seed(7)
        runs[mode] = generate_rollouts(policy, tokenizer, MORE_PROMPTS, settings)
    assert decode.decode_mode(policy) == "compiled"
    eager, compiled = runs["eager"], runs["compiled"]
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert compiled.completions == eager.completions
    torch.testing.assert_close(compiled.sampling_logps, eager.sampling_logps, rtol=0, atol=1e-4)

    greedy = {}
    for mode in ("eager", "compiled"):
        decode.set_decode(policy, mode)
        greedy[mode] = greedy_generate(policy, tokenizer, MORE_PROMPTS, 8, batch_size=2)
    assert greedy["compiled"].token_ids == greedy["eager"].token_ids


def test_a_failed_compile_falls_back_to_eager_once(monkeypatch, caplog):
    policy, tokenizer = adapted_policy(2)
    settings = SamplingSettings(group_size=2, max_new_tokens=6)
    decode.set_decode(policy, "eager")
    torch.manual_seed(3)
    eager = generate_rollouts(policy, tokenizer, PROMPTS, settings)

    def broken_backend(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    real_config = decode._compile_config

    def broken_config(device):
        config = real_config(device)
        config.backend = broken_backend
        return config

    monkeypatch.setattr(decode, "_compile_config", broken_config)

    decode.set_decode(policy, "compiled")
    with caplog.at_level(logging.WARNING, logger="fedmoa.grpo.decode"):
        torch.manual_seed(3)
        first = generate_rollouts(policy, tokenizer, PROMPTS, settings)
        torch.manual_seed(3)
        second = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    warnings = [r for r in caplog.records if "compiled decode failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0].getMessage()
    assert decode.decode_mode(policy) == "eager"
    for rollout in (first, second):  # the retry starts from the same random state
        assert torch.equal(rollout.completion_ids, eager.completion_ids)
        assert torch.equal(rollout.sampling_logps, eager.sampling_logps)


def test_prompts_are_bucketed_so_that_a_run_compiles_few_graphs():
    ids = torch.arange(1, 71).reshape(2, 35)
    mask = torch.ones_like(ids)
    padded, padded_mask = decode.bucket_prompts(ids, mask, pad_id=0)
    assert padded.shape == (2, decode.PROMPT_BUCKET) and torch.equal(padded[:, -35:], ids)
    assert padded_mask[:, : decode.PROMPT_BUCKET - 35].eq(0).all()
    same, _ = decode.bucket_prompts(padded, padded_mask, pad_id=0)
    assert same is padded


@pytest.mark.parametrize(
    ("mode", "device", "expected"),
    [
        ("auto", "cpu", "eager"),
        ("auto", "cuda", "compiled"),
        ("compiled", "cpu", "compiled"),
        ("eager", "cuda", "eager"),
    ],
)
def test_auto_is_what_measured_faster(mode, device, expected):
    assert decode.resolve_decode(mode, torch.device(device)) == expected


def test_an_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode 'fast'"):
        decode.resolve_decode("fast", torch.device("cpu"))
