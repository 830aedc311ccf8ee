"""Advantages and loss cross-checked against TRL's own GRPOTrainer code on identical inputs."""

from __future__ import annotations

import math
from types import MethodType

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import LoraConfig  # noqa: E402

from fedmoa.grpo.advantages import combine_advantages, objective_advantages  # noqa: E402
from fedmoa.grpo.loss import LossSettings, policy_loss  # noqa: E402
from fedmoa.models import tiny_random_model  # noqa: E402

GROUP = 4
PROMPTS = 3
PROMPT = [{"role": "user", "content": "What is 3+4?"}]


def _column_reward(index: int):
    def reward(prompts, completions, **columns):
        return columns[f"r{index}"]

    reward.__name__ = f"r{index}"
    return reward


def make_trl_trainer(tmp_path, *, num_rewards=1, reward_weights=None, **config) -> trl.GRPOTrainer:
    model, tokenizer = tiny_random_model("qwen2", seed=0)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=GROUP * PROMPTS,
        num_generations=GROUP,
        use_cpu=True,
        bf16=False,
        report_to="none",
        reward_weights=reward_weights,
        **{"max_completion_length": 8, **config},
    )
    trainer = trl.GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[_column_reward(i) for i in range(num_rewards)],
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": PROMPT}] * 4),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.model.train()
    return trainer


def reward_matrix(case: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = GROUP * PROMPTS
    rewards = torch.stack(
        [
            (torch.rand(n, generator=gen) > 0.5).float(),  # binary correctness
            torch.rand(n, generator=gen) * 3.0 - 1.0,  # dense, other scale
            torch.randint(0, 3, (n,), generator=gen).float() / 2,  # few levels, ties
        ],
        dim=1,
    )
    if case == "with_none":
        rewards[torch.rand(n, generator=gen) < 0.3, 1] = float("nan")
        rewards[5, :] = float("nan")  # a completion no objective applies to
    elif case == "saturated":
        rewards[:, 2] = 1.0  # auxiliary objective solved everywhere
        rewards[:GROUP, 0] = 0.0  # a group where every completion failed
    return rewards


def trl_advantages(trainer: trl.GRPOTrainer, rewards: torch.Tensor) -> torch.Tensor:
    rows = []
    for j in range(rewards.shape[0]):
        values = [None if math.isnan(v) else float(v) for v in rewards[j].tolist()]
        rows.append({"prompt": PROMPT, **{f"r{i}": v for i, v in enumerate(values)}})
    return trainer._generate_and_score_completions(rows)["advantages"]


@pytest.mark.parametrize("case", ["dense", "with_none", "saturated"])
@pytest.mark.parametrize("mode", ["normalize_then_sum", "sum_then_normalize"])
def test_advantages_match_trl(tmp_path, mode, case):
    weights = [1.0, 0.5, 0.25]
    trainer = make_trl_trainer(
        tmp_path, num_rewards=3, reward_weights=weights, multi_objective_aggregation=mode
    )
    rewards = reward_matrix(case, seed=len(case))
    expected = trl_advantages(trainer, rewards)
    # TRL's normalize_then_sum also whitens the weighted sum over the batch; FedMOA
    # keeps A = Σ w_i Â_i by default (whiten=False) and matches TRL with whiten=True.
    ours, _ = combine_advantages(
        rewards, torch.tensor(weights), GROUP, mode, whiten=(mode == "normalize_then_sum")
    )
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=0)


def test_normalize_then_sum_is_linear_in_weights():
    rewards = reward_matrix("with_none", seed=3)
    w1, w2 = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.1, 0.3])
    a1, _ = combine_advantages(rewards, w1, GROUP)
    a2, _ = combine_advantages(rewards, w2, GROUP)
    a12, _ = combine_advantages(rewards, w1 + w2, GROUP)
    torch.testing.assert_close(a12, a1 + a2, atol=1e-5, rtol=0)
    per_objective = objective_advantages(rewards, GROUP)
    torch.testing.assert_close(a1, per_objective @ w1, atol=1e-6, rtol=0)
    # A saturated objective and an all-failed group give exactly zero advantage.
    saturated = objective_advantages(reward_matrix("saturated", seed=1), GROUP)
    assert torch.count_nonzero(saturated[:, 2]) == 0
    assert torch.count_nonzero(saturated[:GROUP, 0]) == 0


def loss_inputs(seed: int, n: int = 6, width: int = 7):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, width, generator=gen) * 3
    old = logps + torch.randn(n, width, generator=gen) * 0.3  # large enough to clip
    ref = logps + torch.randn(n, width, generator=gen) * 0.5
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(n, generator=gen)
    return logps, old, ref, mask, advantages


def trl_loss(trainer, logps, old, ref, mask, advantages):
    """Run TRL's _compute_loss with its log-prob forward replaced by the given tensor."""
    n, width = logps.shape

    def fake_logps(self, *args, **kwargs):
        return logps, torch.zeros_like(logps), None

    trainer._get_per_token_logps_and_entropies = MethodType(fake_logps, trainer)
    trainer.current_gradient_accumulation_steps = 1
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("num_iterations_gt_1", [False, True])
@pytest.mark.parametrize(("beta", "kl_bias_correction"), [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_match_trl(
    tmp_path, loss_type, beta, kl_bias_correction, num_iterations_gt_1
):
    width = 7
    trainer = make_trl_trainer(
        tmp_path,
        loss_type=loss_type,
        beta=beta,
        epsilon=0.2,
        epsilon_high=0.28,
        max_completion_length=width,
        use_bias_correction_kl=kl_bias_correction,
    )
    base, old, ref, mask, advantages = loss_inputs(seed=7, width=width)
    old = old if num_iterations_gt_1 else None  # num_iterations == 1: old = current, detached

    theirs_logps = base.clone().requires_grad_(True)
    theirs = trl_loss(trainer, theirs_logps, old, ref, mask, advantages)
    theirs.backward()

    ours_logps = base.clone().requires_grad_(True)
    settings = LossSettings(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        max_completion_length=width,
        kl_bias_correction=kl_bias_correction,
    )
    ours_old = ours_logps.detach() if old is None else old
    ours, stats = policy_loss(ours_logps, ours_old, advantages, mask, settings, ref)
    ours.backward()

    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logps.grad, theirs_logps.grad, atol=1e-5, rtol=0)
    logged = trainer._metrics["train"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert stats[key] == pytest.approx(logged[key][-1], abs=1e-6)
    if beta:
        assert stats["kl"] == pytest.approx(logged["kl"][-1], abs=1e-6)
    if num_iterations_gt_1:
        assert stats["clip_ratio/region_mean"] > 0  # the case exercises the clip
