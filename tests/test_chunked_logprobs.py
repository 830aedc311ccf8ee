"""``grpo.logprob_chunk``: the LM head and log-softmax in chunks, recomputed in the backward.

The values and the gradients must be those of the whole-completion path (fp32 tiny model,
within 1e-5), and a training step with the hypergradient must go through it.
"""

from __future__ import annotations

import pytest
import torch

from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.weighting import HypergradientWeighting
from test_fast_paths import seven_short_trainer
from test_trainer import PROMPTS, tiny_policy


@pytest.mark.parametrize(("chunk", "temperature"), [(1, 1.0), (3, 0.7), (64, 1.0)])
def test_chunked_logps_and_their_gradients_equal_the_whole_path(chunk, temperature):
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    rollout = generate_rollouts(
        policy, tokenizer, PROMPTS, SamplingSettings(group_size=3, max_new_tokens=7)
    )
    inputs = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(1))

    def values_and_grads(chunk_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logps = completion_logps(policy, *inputs, temperature, chunk_tokens)
        (logps * weights * rollout.completion_mask).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        policy.zero_grad(set_to_none=True)
        return logps.detach(), grads

    whole, whole_grads = values_and_grads(0)
    chunked, chunked_grads = values_and_grads(chunk)
    assert chunked.shape == whole.shape and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    scale = max(g.abs().max().item() for g in whole_grads)
    assert scale > 0
    for a, b in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)
    with torch.no_grad(), policy.disable_adapter():  # the reference pass takes it too
        torch.testing.assert_close(
            completion_logps(policy, *inputs, temperature, chunk),
            completion_logps(policy, *inputs, temperature, 0),
            atol=1e-5,
            rtol=0,
        )


def test_a_hypergradient_step_runs_on_chunked_logps():
    """The hypergradient's probe reads the loss's graph: it must see the same one."""
    torch.manual_seed(0)
    runs = {}
    for chunk in (0, 2):
        torch.manual_seed(0)
        policy, tokenizer = tiny_policy()
        settings = GRPOSettings(
            batch_size=2, group_size=4, max_new_tokens=6, lr=0.05, logprob_chunk=chunk
        )
        weighting = HypergradientWeighting.for_model(
            policy, ["seven", "short"], "seven", [1.0, 0.5], rule="persistent"
        )
        trainer = seven_short_trainer(policy, tokenizer, weighting, settings)
        runs[chunk] = trainer.train(2)
    for whole, chunked in zip(runs[0], runs[2], strict=True):
        assert chunked["loss"] == pytest.approx(whole["loss"], abs=1e-5)
        for key in whole:
            if key.startswith(("weights/", "alignment/")):
                assert chunked[key] == pytest.approx(whole[key], abs=1e-4), key


def test_the_setting_takes_the_chunked_path_in_every_pass(monkeypatch):
    """``grpo.logprob_chunk`` reaches the loss, the reference pass and the old log-probs."""
    from fedmoa.grpo import logprobs

    calls = []
    original = logprobs.chunked_head_logps

    def counting(*args, **kwargs):
        calls.append(args[-1])  # chunk_tokens
        return original(*args, **kwargs)

    monkeypatch.setattr(logprobs, "chunked_head_logps", counting)
    for chunk, expected in ((0, []), (3, [3, 3, 3, 3])):
        calls.clear()
        torch.manual_seed(0)
        policy, tokenizer = tiny_policy()
        settings = GRPOSettings(
            batch_size=2,
            group_size=2,
            max_new_tokens=4,
            beta=0.04,
            num_iterations=2,
            logprob_chunk=chunk,
        )
        weighting = HypergradientWeighting.for_model(
            policy, ["seven", "short"], "seven", [1.0, 0.5], rule="persistent"
        )
        seven_short_trainer(policy, tokenizer, weighting, settings).train(1)
        # reference, old log-probs, then the loss twice (num_iterations = 2)
        assert calls == expected
