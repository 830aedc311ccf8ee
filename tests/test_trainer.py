"""Rollouts, the local GRPO step and a learning test on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from fedmoa.errors import RewardError
from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.rollout import SamplingSettings, generate_rollouts
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer, PromptSampler
from fedmoa.models import LoraSettings, attach_lora, tiny_random_model
from fedmoa.weighting import StaticWeighting

PROMPTS = [
    [{"role": "user", "content": "Say a number."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Another one, please?"},
    ],
]


def tiny_policy(seed: int = 0, r: int = 8):
    model, tokenizer = tiny_random_model("qwen2", seed=seed)
    return attach_lora(model, LoraSettings(r=r, alpha=2 * r)), tokenizer


def test_rollout_shapes_masks_and_sampling_logps():
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    settings = SamplingSettings(group_size=3, max_new_tokens=10, temperature=0.8, top_p=0.95)
    rollout = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    n = len(PROMPTS) * 3
    assert rollout.completion_ids.shape[0] == n and len(rollout.completions) == n
    # Prompt-major grouping: the G copies of a prompt are adjacent and identical.
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2])
    assert not torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[3])
    assert rollout.prompt_mask[0, 0] == 0  # left padding on the shorter prompt
    lengths = rollout.completion_mask.sum(1)
    assert torch.equal(lengths, rollout.completion_lengths)
    assert (
        torch.equal(rollout.truncated, lengths == settings.max_new_tokens)
        or rollout.truncated.any()
    )
    # The recorded sampling log-probs are the policy's log-probs at temperature T.
    forward = completion_logps(
        policy,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        settings.temperature,
    )
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(
        rollout.sampling_logps[mask], forward.detach()[mask], atol=1e-4, rtol=0
    )


def test_rollout_flags_and_masks_truncated_completions():
    torch.manual_seed(1)
    policy, tokenizer = tiny_policy()
    settings = SamplingSettings(group_size=4, max_new_tokens=3, mask_truncated=True)
    rollout = generate_rollouts(policy, tokenizer, PROMPTS, settings)
    assert rollout.truncated.any(), "3 tokens from a random model should truncate"
    assert torch.all(rollout.completion_mask[rollout.truncated] == 0)
    assert all(
        len(text) > 0 for text, t in zip(rollout.completions, rollout.truncated, strict=True) if t
    )


def closeness_to_seven(prompts, completions, **kwargs):
    """Dense, reachable reward: how close each character is to '7' (1.0 for '7' itself)."""
    texts = [c[0]["content"] for c in completions]
    return [
        sum(max(0.0, 1 - abs(ord(ch) - ord("7")) / 64) for ch in t) / max(len(t), 1) for t in texts
    ]


def away_from_seven(prompts, completions, **kwargs):
    return [-r for r in closeness_to_seven(prompts, completions)]


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_trainer(settings: GRPOSettings, reward=closeness_to_seven, seed: int = 0) -> LocalTrainer:
    torch.manual_seed(seed)
    model, tokenizer = tiny_random_model("qwen2", seed=seed)
    policy = attach_lora(model, LoraSettings(r=8, alpha=16, target_modules=ALL_LINEAR))
    rows = [{"prompt": [{"role": "user", "content": f"Answer {i}:"}]} for i in range(8)]
    weighting = StaticWeighting(["sevens"], "sevens", [1.0])
    return LocalTrainer(policy, tokenizer, rows, [("sevens", reward)], weighting, settings, seed)


@pytest.mark.parametrize(("reward", "direction"), [(closeness_to_seven, 1), (away_from_seven, -1)])
def test_grpo_moves_the_reward_in_the_right_direction(reward, direction):
    """Gradient sign and plumbing: "answer 7" must become more (or, negated, less) likely.

    Top-k 50 keeps the random model's samples on few enough tokens that 32 steps show it."""
    settings = GRPOSettings(batch_size=4, group_size=8, max_new_tokens=6, lr=3e-2, top_k=50)
    trainer = make_trainer(settings, reward=reward)
    history = trainer.train(32)
    closeness = [direction * m["reward"] for m in history]
    first, last = sum(closeness[:8]) / 8, sum(closeness[-8:]) / 8
    assert direction * (last - first) > 0.05, f"closeness to '7' {first:.3f} -> {last:.3f}"
    assert history[-1]["weights/sevens"] == 1.0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_step_logs_trl_metrics_with_kl_and_iterations(loss_type):
    settings = GRPOSettings(
        batch_size=2,
        group_size=4,
        max_new_tokens=5,
        lr=1e-2,
        beta=0.1,
        num_iterations=2,
        loss_type=loss_type,
    )
    trainer = make_trainer(settings)
    first = trainer.step()
    second = trainer.step()
    for key in (
        "reward",
        "reward_std",
        "rewards/sevens/mean",
        "rewards/sevens/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "step_time",
        "grad_norm",
        "timing/generate",
        "timing/reward",
        "timing/forward_backward",
        "timing/optimizer",
    ):
        assert key in second, key
    # The reference is the adapter-disabled model: KL is 0 before any update, then positive.
    assert first["kl"] < 1e-6 or first["kl"] >= 0
    assert second["kl"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in second.values())


def test_reward_errors_name_the_function():
    def broken(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    trainer = make_trainer(
        GRPOSettings(batch_size=1, group_size=2, max_new_tokens=3), reward=broken
    )
    with pytest.raises(RewardError, match=r"reward 'sevens' returned 1 values, expected 2"):
        trainer.step()


def test_prompt_sampler_is_reproducible_and_covers_an_epoch():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    draws = [a.next(4) for _ in range(5)]
    assert draws == [b.next(4) for _ in range(5)]
    assert sorted(draws[0] + draws[1] + draws[2][:2]) == list(range(10))
    state = a.state_dict()
    c = PromptSampler(10, seed=99)
    c.load_state_dict(state)
    assert c.next(7) == a.next(7)


def test_rollout_samples_with_only_the_configured_warpers(monkeypatch):
    """No hidden top-k: ``top_k=None`` would inherit the model's default of 50."""
    from transformers import LogitsProcessorList

    seen: list[str] = []
    original = LogitsProcessorList.__call__

    def spy(self, input_ids, scores, **kwargs):
        seen.extend(type(p).__name__ for p in self)
        return original(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(LogitsProcessorList, "__call__", spy)
    policy, tokenizer = tiny_policy()
    generate_rollouts(
        policy, tokenizer, PROMPTS[:1], SamplingSettings(group_size=2, max_new_tokens=2)
    )
    assert seen and "TopKLogitsWarper" not in seen
    seen.clear()
    settings = SamplingSettings(group_size=2, max_new_tokens=2, temperature=0.7, top_p=0.9)
    generate_rollouts(policy, tokenizer, PROMPTS[:1], settings)
    assert {"TemperatureLogitsWarper", "TopPLogitsWarper"} <= set(seen)
    assert "TopKLogitsWarper" not in seen
    seen.clear()
    generate_rollouts(policy, tokenizer, PROMPTS[:1], SamplingSettings(group_size=2, top_k=5))
    assert "TopKLogitsWarper" in seen


def test_gradient_checkpointing_changes_memory_not_results():
    """Same losses, alignments and adapter with activations recomputed in backward."""
    from fedmoa.weighting.hypergradient import HypergradientWeighting

    def length(prompts, completions, **kwargs):
        return [-abs(len(c[0]["content"]) - 5) / 10 for c in completions]

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy, tokenizer = tiny_policy()
        weighting = HypergradientWeighting.for_model(policy, ["a", "b"], "a", [1.0, 0.5])
        rows = [{"prompt": [{"role": "user", "content": f"Q {i}"}]} for i in range(4)]
        settings = GRPOSettings(
            batch_size=2,
            group_size=4,
            max_new_tokens=6,
            lr=1e-2,
            beta=0.04,
            gradient_checkpointing=checkpointing,
            # Whole sequences on both sides: checkpointing would otherwise also switch the
            # training forward off prompt_once, a different (equal within rounding) computation.
            prompt_once=False,
        )
        funcs = [("a", closeness_to_seven), ("b", length)]
        trainer = LocalTrainer(policy, tokenizer, rows, funcs, weighting, settings, seed=0)
        history = trainer.train(3)
        assert policy.is_gradient_checkpointing == checkpointing
        assert weighting.last_path == "per_sample"
        adapter = {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}
        results.append(([x for m in history for x in (m["loss"], m["alignment/b"])], adapter))
    (history_off, adapter_off), (history_on, adapter_on) = results
    assert history_off == pytest.approx(history_on, abs=1e-6)
    for name, tensor in adapter_off.items():
        torch.testing.assert_close(tensor, adapter_on[name], atol=1e-6, rtol=0)
