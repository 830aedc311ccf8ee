"""``grpo.prompt_once``: each group's shared prompt runs through the model once.

The log-probs and the LoRA gradients must be those of the whole-sequence forward (fp32 tiny
models, within 1e-5), chunked or not, through the reference pass, with a fallback under
gradient checkpointing, and the hypergradient's probe gradients must not change.
"""

from __future__ import annotations

import pytest
import torch

from fedmoa.grpo import logprobs
from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.loss import LossSettings, policy_loss
from fedmoa.grpo.trainer import set_gradient_checkpointing
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer
from fedmoa.weighting import HypergradientWeighting, StepSignals

B, G, PROMPT, WIDTH = 3, 4, 7, 6
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora_policy(arch: str):
    """A tiny random model with a LoRA whose B matrices are random, so the adapter matters."""
    model, tokenizer = load_model_and_tokenizer(f"tiny-random-{arch}", dtype="float32")
    policy = attach_lora(model, LoraSettings(r=4, alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=gen)
    policy.train()
    return policy, tokenizer


def grouped_batch(pad_id: int, width: int = WIDTH, seed: int = 0):
    """B left-padded prompts of different lengths, each repeated G times (prompt-major, as
    ``Rollout.prompt_ids``), and completions some of which stop early (right padding)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 200, (B, PROMPT), generator=gen)
    prompt_mask = torch.ones(B, PROMPT, dtype=torch.long)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    prompt_ids[prompt_mask == 0] = pad_id
    n = B * G
    completion_ids = torch.randint(3, 200, (n, width), generator=gen)
    completion_mask = torch.ones(n, width)
    for row, length in ((1, 2), (4, 1), (6, width - 1), (11, 3)):
        completion_mask[row, length:] = 0
    completion_ids[completion_mask == 0] = pad_id
    return (
        prompt_ids.repeat_interleave(G, dim=0),
        prompt_mask.repeat_interleave(G, dim=0),
        completion_ids,
        completion_mask,
    )


def values_and_grads(policy, inputs, weights, temperature, chunk, group_size):
    params = [p for p in policy.parameters() if p.requires_grad]
    logps = completion_logps(policy, *inputs, temperature, chunk, group_size=group_size)
    (logps * inputs[3] * weights).sum().backward()
    grads = [p.grad.detach().clone() for p in params]
    policy.zero_grad(set_to_none=True)
    return logps.detach(), grads


def assert_same(got, expected) -> None:
    (logps, grads), (want_logps, want_grads) = got, expected
    assert logps.shape == want_logps.shape and logps.dtype == torch.float32
    torch.testing.assert_close(logps, want_logps, atol=1e-5, rtol=0)
    scale = max(g.abs().max().item() for g in want_grads)
    assert scale > 0
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("chunk", "temperature"), [(0, 1.0), (0, 0.7), (4, 1.0), (2, 0.7)])
def test_shared_prompt_logps_and_gradients_equal_the_whole_sequence(arch, chunk, temperature):
    policy, tokenizer = random_lora_policy(arch)
    inputs = grouped_batch(tokenizer.pad_token_id)
    weights = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(1))
    whole = values_and_grads(policy, inputs, weights, temperature, chunk, 1)
    shared = values_and_grads(policy, inputs, weights, temperature, chunk, G)
    assert_same(shared, whole)
    with torch.no_grad(), policy.disable_adapter():  # the reference pass takes it too
        torch.testing.assert_close(
            completion_logps(policy, *inputs, temperature, chunk, group_size=G),
            completion_logps(policy, *inputs, temperature, chunk),
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("width", [1, 2])
def test_one_and_two_completion_tokens(chunk, width):
    policy, tokenizer = random_lora_policy("qwen2")
    inputs = grouped_batch(tokenizer.pad_token_id, width=width)
    weights = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(1))
    assert_same(
        values_and_grads(policy, inputs, weights, 1.0, chunk, G),
        values_and_grads(policy, inputs, weights, 1.0, chunk, 1),
    )


def test_gradient_checkpointing_falls_back_to_whole_sequences(monkeypatch):
    """transformers drops the KV cache in a checkpointed forward that builds a graph: the
    training pass takes the whole sequences, the no-grad passes still share the prompt."""
    policy, tokenizer = random_lora_policy("llama")
    inputs = grouped_batch(tokenizer.pad_token_id)
    weights = torch.randn(inputs[2].shape, generator=torch.Generator().manual_seed(1))
    expected = values_and_grads(policy, inputs, weights, 0.7, 0, 1)
    calls = []
    original = logprobs.shared_prompt_logps
    monkeypatch.setattr(
        logprobs, "shared_prompt_logps", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    set_gradient_checkpointing(policy, True)
    policy.train()
    assert_same(values_and_grads(policy, inputs, weights, 0.7, 0, G), expected)
    assert calls == []
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(
            completion_logps(policy, *inputs, 0.7, group_size=G),
            completion_logps(policy, *inputs, 0.7),
            atol=1e-5,
            rtol=0,
        )
    assert calls == [1]


def test_rows_that_are_not_groups_of_one_prompt_are_refused():
    policy, tokenizer = random_lora_policy("qwen2")
    prompt_ids, prompt_mask, completion_ids, completion_mask = grouped_batch(tokenizer.pad_token_id)
    other = prompt_ids.clone()
    other[G - 1, -1] += 1  # the last row of group 0 has another prompt
    with pytest.raises(ValueError, match="differ within a group"):
        completion_logps(policy, other, prompt_mask, completion_ids, completion_mask, group_size=G)
    shifted = prompt_mask.clone()
    shifted[1, :] = 1  # same ids, another mask (row 0's prompt is padded)
    with pytest.raises(ValueError, match="prompt_mask differ"):
        completion_logps(policy, prompt_ids, shifted, completion_ids, completion_mask, group_size=G)
    with pytest.raises(ValueError, match="not groups of 5"):
        completion_logps(policy, *grouped_batch(tokenizer.pad_token_id), group_size=5)


def probe_signals(policy, inputs, group_size: int) -> StepSignals:
    """The step's forward and surrogate, as the trainer builds them, on ``inputs``."""
    logps = completion_logps(policy, *inputs, group_size=group_size)
    with torch.no_grad(), policy.disable_adapter():
        ref = completion_logps(policy, *inputs, group_size=group_size)
    settings = LossSettings(loss_type="grpo", beta=0.04)
    adv = torch.randn(inputs[0].shape[0], 3, generator=torch.Generator().manual_seed(5))
    adv[:, -1] = 0.0  # a saturated objective

    def objective_loss(a: torch.Tensor) -> torch.Tensor:
        return policy_loss(logps, logps.detach(), a, inputs[3], settings, ref)[0]

    return StepSignals(adv, objective_loss, torch.zeros(3))


@pytest.mark.parametrize("probe", ["last2", "all"])
def test_the_hypergradient_probe_sees_the_same_gradients(probe):
    """The per-sample probe hooks expect every hooked forward to have N rows; the prompt pass
    has B, so it falls back to one backward per objective, with the same gradients."""
    policy, tokenizer = random_lora_policy("qwen2")
    inputs = grouped_batch(tokenizer.pad_token_id)
    names = ["p", "a", "s"]
    hooked = HypergradientWeighting.for_model(policy, names, "p", [1, 1, 1], probe=probe)
    whole = hooked.probe_gradients(probe_signals(policy, inputs, 1))
    whole_path = hooked.last_path
    shared = hooked.probe_gradients(probe_signals(policy, inputs, G))
    shared_path = hooked.last_path
    print(f"probe paths: whole {whole_path}, prompt_once {shared_path}")
    assert whole_path == "per_sample"
    assert shared_path in ("per_sample", "per_objective")
    assert whole[0].norm() > 0 and torch.count_nonzero(whole[2]) == 0
    scale = whole.abs().max().item()
    torch.testing.assert_close(shared, whole, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampling_prefills_each_prompt_once_and_draws_the_same_tokens(arch):
    """``SamplingSettings.prompt_once``: the prefill runs each prompt but its last token once,
    its cache repeated for the group; prompts of different lengths (left padding), same seed:
    the same completions and sampling log-probs as the whole prefill."""
    from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts

    policy, tokenizer = random_lora_policy(arch)
    prompts = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Reply with one line."}, {"role": "user", "content": "7?"}],
    ]
    runs = {}
    for once in (False, True):
        torch.manual_seed(11)
        settings = SamplingSettings(
            group_size=3, max_new_tokens=8, temperature=0.9, prompt_once=once
        )
        runs[once] = generate_rollouts(policy, tokenizer, prompts, settings)
    plain, once = runs[False], runs[True]
    assert plain.prompt_mask[0, 0] == 0 or plain.prompt_mask[3, 0] == 0  # left padding present
    assert torch.equal(once.completion_ids, plain.completion_ids)
    assert once.completions == plain.completions
    torch.testing.assert_close(once.sampling_logps, plain.sampling_logps, rtol=0, atol=1e-5)
    assert policy.training  # restored


def test_the_prefill_cache_holds_each_prompt_once_before_repeating():
    policy, _ = random_lora_policy("llama")
    prompt_ids, prompt_mask, *_ = grouped_batch(0)
    calls = []
    decoder = policy.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            cache = logprobs.prompt_prefix_cache(policy, prompt_ids, prompt_mask, G)
    finally:
        handle.remove()
    assert calls == [torch.Size([B, prompt_ids.shape[1] - 1])]
    assert cache.get_seq_length() == prompt_ids.shape[1] - 1
    assert cache.layers[0].keys.shape[0] == B * G


def test_a_model_without_a_repeatable_cache_falls_back_to_whole_sequences(monkeypatch, caplog):
    """``prompt_once`` is on by default, so a model whose forward returns no usable KV cache
    must still train: whole sequences and whole prefills, said once."""
    from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts

    policy, tokenizer = random_lora_policy("llama")
    inputs = grouped_batch(tokenizer.pad_token_id)
    expected = completion_logps(policy, *inputs, 1.0, 0, group_size=1).detach()
    torch.manual_seed(5)
    settings = SamplingSettings(group_size=2, max_new_tokens=5, prompt_once=True)
    prompts = [[{"role": "user", "content": "2 + 2?"}]]
    sampled = generate_rollouts(policy, tokenizer, prompts, settings)

    def no_cache(output, group_size):
        raise logprobs.NoPromptCache("SomeOutput holds no KV cache with batch_repeat_interleave")

    monkeypatch.setattr(logprobs, "repeated_cache", no_cache)
    monkeypatch.setattr(logprobs, "_WARNED", set())
    with caplog.at_level("WARNING", logger="fedmoa.grpo.logprobs"):
        got = completion_logps(policy, *inputs, 1.0, 0, group_size=G)
        torch.manual_seed(5)
        again = generate_rollouts(policy, tokenizer, prompts, settings)
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-5)
    assert torch.equal(again.completion_ids, sampled.completion_ids)
    warnings = [r for r in caplog.records if "prompt_once" in r.getMessage()]
    assert len(warnings) == 1 and "whole sequences" in warnings[0].getMessage()
