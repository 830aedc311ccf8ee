"""The step's faster paths give what the plain paths give (docs/performance.md, "Whole step").

* the LM head gets contiguous hidden states (training forward and ``generate``'s prefill):
  the same logits up to float32's last bit, so the same tokens drawn;
* ``selective_log_softmax`` is one fused ``log_softmax`` per row: equal to ``x − logsumexp(x)``
  and to TRL's own ``selective_log_softmax`` within the TRL cross-check's 1e-5, gradients too;
* the rollout draws tokens by inverting the cumulative distribution (``_Sampler``) instead of
  ``torch.multinomial``: the same distribution (temperature, top-k, top-p), checked against
  the exact probabilities on many draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fedmoa.grpo.logprobs as logprobs
import fedmoa.grpo.rollout as rollout
from fedmoa.grpo.logprobs import selective_log_softmax
from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer
from fedmoa.weighting import RewardWeighting, StaticWeighting
from test_trainer import PROMPTS, tiny_policy


def logsumexp_reference(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The plain form: ``x[index] − logsumexp(x)`` in float32, all rows at once."""
    x = logits.float()
    return x.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


@contextlib.contextmanager
def plain_paths() -> Iterator[None]:
    """The step as it was before the fast paths: no head hook, logsumexp log-probs."""
    saved = (logprobs.contiguous_head_input, rollout.contiguous_head_input)
    saved_lsm = logprobs.selective_log_softmax
    logprobs.contiguous_head_input = rollout.contiguous_head_input = lambda _model: (
        contextlib.nullcontext()
    )
    logprobs.selective_log_softmax = logsumexp_reference
    try:
        yield
    finally:
        logprobs.contiguous_head_input, rollout.contiguous_head_input = saved
        logprobs.selective_log_softmax = saved_lsm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_matches_logsumexp_and_trl(dtype):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    gen = torch.Generator().manual_seed(0)
    base = (4 * torch.randn(3, 9, 4096, generator=gen)).to(dtype)
    index = torch.randint(0, 4096, (3, 9), generator=gen)
    results = {}
    for name, fn in (
        ("fast", selective_log_softmax),
        ("plain", logsumexp_reference),
        # TRL computes a bf16 input's log-softmax in bf16 (0.06 off here); ours is float32.
        ("trl", lambda x, i: trl_utils.selective_log_softmax(x.float(), i)),
    ):
        logits = base.clone().requires_grad_(True)
        out = fn(logits, index).float()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = (out.detach(), logits.grad.float())
    for other in ("plain", "trl"):
        torch.testing.assert_close(results["fast"][0], results[other][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(results["fast"][1], results[other][1], atol=1e-5, rtol=0)
    assert results["fast"][0].dtype == torch.float32


def test_generation_with_a_contiguous_head_input_draws_the_same_tokens():
    policy, tokenizer = tiny_policy()
    settings = SamplingSettings(group_size=3, max_new_tokens=8)
    torch.manual_seed(4)
    fast = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    with plain_paths():
        torch.manual_seed(4)
        plain = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    # float32: a matmul and a batched matmul may round the prefill's logits differently in the
    # last bit (bf16 SmolLM2 gave bit-identical rollouts); the tokens drawn are the same.
    torch.testing.assert_close(fast.sampling_logps, plain.sampling_logps, atol=1e-6, rtol=0)


def closeness(prompts, completions, **_):
    return [sum(ch == "7" for ch in c[0]["content"]) / 8 for c in completions]


def brevity(prompts, completions, **_):
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]


def seven_short_trainer(
    policy: Any, tokenizer: Any, weighting: RewardWeighting, settings: GRPOSettings
) -> LocalTrainer:
    """A trainer on ``PROMPTS`` with the objectives ``seven`` (closeness) and ``short``."""
    rows = [{"prompt": p} for p in PROMPTS]
    funcs = [("seven", closeness), ("short", brevity)]
    return LocalTrainer(policy, tokenizer, rows, funcs, weighting, settings, seed=0)


def two_steps(
    settings: GRPOSettings,
) -> tuple[list[dict[str, float]], list[list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Two trainer steps: their logs, the gradient each optimizer step applied, the adapter."""
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    weighting = StaticWeighting(["seven", "short"], "seven", [1.0, 0.5])
    trainer = seven_short_trainer(policy, tokenizer, weighting, settings)
    gradients: list[list[torch.Tensor]] = []

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        gradients.append(
            [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        )

    handle = register_optimizer_step_pre_hook(record)
    try:
        history = trainer.train(2)
    finally:
        handle.remove()
    return history, gradients, get_peft_model_state_dict(policy)


@pytest.mark.parametrize(("beta", "num_iterations"), [(0.0, 1), (0.04, 1), (0.0, 2), (0.04, 2)])
def test_a_step_on_the_fast_paths_matches_the_plain_step(beta, num_iterations):
    """Compared where the paths differ: the loss and the gradients, not AdamW's output.

    AdamW divides each entry by its own gradient scale, so an entry whose gradient is near its
    ``eps`` (1e-8) turns a last-bit difference of float32 into a step difference of a fraction
    of ``lr``: after 4 steps at lr 0.05 one adapter entry differed by 6.9e-5 on an AMD EPYC and
    by 1.36e-4 on an Intel Xeon with AMX, whose kernels round differently, while the gradients
    agreed to 1.5e-6 of their scale. Hence a per-entry bound on the gradients and a norm bound
    on the whole update.
    """
    settings = GRPOSettings(
        batch_size=2,
        group_size=4,
        max_new_tokens=8,
        lr=0.05,
        beta=beta,
        num_iterations=num_iterations,
    )
    torch.manual_seed(0)
    initial = get_peft_model_state_dict(tiny_policy()[0])
    fast, fast_grads, fast_adapter = two_steps(settings)
    with plain_paths():
        plain, plain_grads, plain_adapter = two_steps(settings)
    for a, b in zip(fast, plain, strict=True):
        # Same completions, rewards and advantages (sampling and scoring are unchanged)...
        for key in ("completions/mean_length", "reward", "reward_std", "rewards/seven/mean"):
            assert a[key] == b[key], key
        # ...and the same loss within the TRL cross-check's tolerance.
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        if beta > 0:
            assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    assert len(fast_grads) == len(plain_grads) == 2 * num_iterations
    for step_fast, step_plain in zip(fast_grads, plain_grads, strict=True):
        scale = max(g.abs().max().item() for g in step_fast)
        for g_fast, g_plain in zip(step_fast, step_plain, strict=True):
            torch.testing.assert_close(g_fast, g_plain, atol=2e-5 * scale, rtol=0)
    difference = torch.cat([(fast_adapter[k] - plain_adapter[k]).flatten() for k in initial])
    update = torch.cat([(fast_adapter[k] - initial[k]).flatten() for k in initial])
    assert update.norm() > 0.1  # the steps did move the adapter
    assert difference.norm() <= 1e-4 * update.norm()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 2, 1.0), (0.7, 0, 0.6)]
)
def test_sampler_draws_from_the_warped_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    rows = 40_000
    logits = probs.log().expand(rows, -1).contiguous()  # one draw per row
    ids = torch.zeros(rows, 1, dtype=torch.long)
    sampler = rollout._Sampler(temperature, top_k, top_p)
    scores = sampler(ids, logits)
    drawn = scores.argmax(1)
    assert torch.equal(scores.isfinite().sum(1), torch.ones(rows, dtype=torch.long))  # one-hot
    # The exact distribution, through HF's own warpers in HF's order.
    warped = TemperatureLogitsWarper(temperature)(ids[:1], logits[:1])
    if top_k:
        warped = TopKLogitsWarper(top_k)(ids[:1], warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(ids[:1], warped)
    expected = torch.softmax(warped, -1)[0]
    observed = torch.bincount(drawn, minlength=5).double() / rows
    sigma = (expected.double() * (1 - expected.double()) / rows).sqrt()
    assert (observed - expected.double()).abs().le(4 * sigma + 1e-12).all(), (observed, expected)
    assert observed[expected == 0].eq(0).all()  # never a token the warpers removed
    # The recorded log-prob is the untruncated tempered one, as the training forward computes.
    torch.testing.assert_close(
        sampler.finish()[:, 0],
        torch.log_softmax(logits / temperature, -1).gather(1, drawn[:, None])[:, 0],
    )
