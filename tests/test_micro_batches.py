"""``grpo.micro_batch_size`` (gradient accumulation) and fp16 gradient scaling.

Micro-batches must give the whole batch's loss, metrics, gradients and hypergradient probe
gradients (fp32 tiny model, within 1e-5); one micro-batch of the whole batch must be today's
path bit for bit. A float16 model trains under a ``GradScaler`` whose overflowing steps are
skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedmoa.errors import ConfigError
from fedmoa.federation.config import load_experiment
from fedmoa.grpo.loss import BatchTotals, LossSettings, policy_loss
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer, micro_batches
from fedmoa.models import LoraSettings, attach_lora, tiny_random_model
from fedmoa.weighting import HypergradientWeighting, StaticWeighting
from test_cli import TINY_CONFIG, run_cli, write_config
from test_fast_paths import brevity, closeness, seven_short_trainer, two_steps
from test_federation_config import EXPERIMENT
from test_trainer import PROMPTS, tiny_policy
from test_weighting import tiny_batch_signals, tiny_peft

UNTIMED = ("timing/", "step_time")


def logged(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in history]


def test_micro_batches_are_consecutive_rows():
    assert micro_batches(8, 0) == [slice(0, 8)]
    assert micro_batches(8, 8) == [slice(0, 8)]
    assert micro_batches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_micro_batch_shares_add_up_to_the_batch_loss_and_statistics(loss_type):
    gen = torch.Generator().manual_seed(0)
    n, t = 6, 5
    logps = (-torch.rand(n, t, generator=gen)).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(n, t, generator=gen)  # some ratios clip
    ref = logps.detach() - 0.1 * torch.rand(n, t, generator=gen)
    adv = torch.randn(n, generator=gen)
    mask = (torch.rand(n, t, generator=gen) > 0.3).float()
    mask[2] = 0.0  # a completion with no tokens left in the loss
    settings = LossSettings(loss_type=loss_type, beta=0.1, max_completion_length=7)
    whole, whole_stats = policy_loss(logps, old, adv, mask, settings, ref)
    (whole_grad,) = torch.autograd.grad(whole, logps)
    totals = BatchTotals.of(mask)
    loss, stats = torch.zeros(()), dict.fromkeys(whole_stats, 0.0)
    for span in (slice(0, 1), slice(1, 4), slice(4, 6)):
        part, part_stats = policy_loss(
            logps[span], old[span], adv[span], mask[span], settings, ref[span], totals
        )
        loss = loss + part
        for key, value in part_stats.items():
            stats[key] += value
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(loss, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, whole_grad, atol=1e-7, rtol=0)
    assert stats == pytest.approx(whole_stats, abs=1e-6)
    assert whole_stats["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize(
    ("loss_type", "beta", "num_iterations"),
    [("grpo", 0.0, 1), ("bnpo", 0.04, 1), ("dapo", 0.0, 2), ("dr_grpo", 0.04, 2)],
)
def test_micro_batches_give_the_whole_batch_step(loss_type, beta, num_iterations):
    """B = 2, G = 4: micro-batches of 2 rows, half a group each. Same samples (generation does
    not depend on the setting), same loss, metrics and gradient at every optimizer step.

    The adapters are compared by a norm bound: AdamW turns a last-bit difference of a
    gradient entry near its ``eps`` into a fraction of ``lr`` (see test_fast_paths)."""
    settings = GRPOSettings(
        batch_size=2,
        group_size=4,
        max_new_tokens=8,
        lr=0.05,
        beta=beta,
        num_iterations=num_iterations,
        loss_type=loss_type,
    )
    whole, whole_grads, whole_adapter = two_steps(settings)
    micro, micro_grads, micro_adapter = two_steps(dataclasses.replace(settings, micro_batch_size=2))
    for a, b in zip(logged(whole), logged(micro), strict=True):
        assert a.keys() == b.keys()
        assert a["completions/mean_length"] == b["completions/mean_length"]
        assert b == pytest.approx(a, abs=1e-5)
        if beta > 0:
            assert "kl" in a
    assert len(whole_grads) == len(micro_grads) == 2 * num_iterations
    for step_whole, step_micro in zip(whole_grads, micro_grads, strict=True):
        scale = max(g.abs().max().item() for g in step_whole)
        assert scale > 0
        for g_whole, g_micro in zip(step_whole, step_micro, strict=True):
            torch.testing.assert_close(g_micro, g_whole, atol=1e-5 * scale, rtol=0)
    difference = torch.cat([(micro_adapter[k] - whole_adapter[k]).flatten() for k in whole_adapter])
    update = torch.cat([whole_adapter[k].flatten() for k in whole_adapter if "lora_B" in k])
    assert update.norm() > 0.1  # lora_B starts at zero: the steps moved it
    assert difference.norm() <= 1e-4 * update.norm()


def test_one_micro_batch_of_the_whole_batch_is_the_plain_path_bit_for_bit():
    settings = GRPOSettings(
        batch_size=2, group_size=4, max_new_tokens=8, lr=0.05, beta=0.04, num_iterations=2
    )
    whole, whole_grads, whole_adapter = two_steps(settings)
    same, same_grads, same_adapter = two_steps(dataclasses.replace(settings, micro_batch_size=8))
    assert logged(same) == logged(whole)
    for step_whole, step_same in zip(whole_grads, same_grads, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step_whole, step_same, strict=True))
    assert all(torch.equal(same_adapter[k], whole_adapter[k]) for k in whole_adapter)


def hypergradient_run(micro_batch_size: int, per_sample: bool, prompt_once: bool = False):
    """Two steps with the hypergradient: logs, and its probe gradients after each step (the
    cosine rule caches the step's own)."""
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    weighting = HypergradientWeighting.for_model(
        policy, ["seven", "short"], "seven", [1.0, 0.5], per_sample=per_sample
    )
    settings = GRPOSettings(
        batch_size=2,
        group_size=4,
        max_new_tokens=6,
        lr=0.05,
        beta=0.04,
        micro_batch_size=micro_batch_size,
        prompt_once=prompt_once,
    )
    trainer = seven_short_trainer(policy, tokenizer, weighting, settings)
    probes: list[torch.Tensor] = []
    history = trainer.train(2, lambda _: probes.append(weighting.cached.clone()))
    return history, probes, weighting


@pytest.mark.parametrize("per_sample", [True, False])
def test_the_hypergradient_probe_sums_the_micro_batches(per_sample):
    whole, whole_probes, _ = hypergradient_run(0, per_sample)
    micro, micro_probes, weighting = hypergradient_run(2, per_sample)
    assert weighting.last_path == ("per_sample" if per_sample else "per_objective")
    for a, b in zip(logged(whole), logged(micro), strict=True):
        assert a["hypergrad/per_sample"] == b["hypergrad/per_sample"] == float(per_sample)
        assert b == pytest.approx(a, abs=1e-5)
    for a, b in zip(whole_probes, micro_probes, strict=True):
        scale = a.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(b, a, atol=1e-5 * scale, rtol=0)
    assert weighting._summed is None  # nothing carried into the next step


@pytest.mark.parametrize("per_sample", [True, False])
def test_probe_gradients_taken_at_a_loss_scale_are_divided_by_it(per_sample):
    """A power-of-two scale is exact in float32: the same gradients, the scale divided out."""
    policy, _ = tiny_peft(("q_proj", "v_proj"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    weighting = HypergradientWeighting.for_model(
        policy, ["p", "a", "s"], "p", [1, 1, 1], per_sample=per_sample
    )
    signals = tiny_batch_signals(policy, "grpo", 0.1)
    plain = weighting.probe_gradients(signals)
    scaled = weighting.probe_gradients(dataclasses.replace(signals, loss_scale=1024.0))
    assert weighting.last_path == ("per_sample" if per_sample else "per_objective")
    assert plain[0].norm() > 0
    torch.testing.assert_close(scaled, plain, atol=1e-7 * plain.abs().max().item(), rtol=0)


def fp16_trainer(regularizer=None) -> LocalTrainer:
    torch.manual_seed(0)
    model, tokenizer = tiny_random_model("qwen2", seed=0, dtype=torch.float16)
    policy = attach_lora(model, LoraSettings(r=8, alpha=16))
    settings = GRPOSettings(
        batch_size=2, group_size=4, max_new_tokens=6, lr=0.05, micro_batch_size=4
    )
    weighting = StaticWeighting(["seven", "short"], "seven", [1.0, 0.5])
    return LocalTrainer(
        policy,
        tokenizer,
        [{"prompt": p} for p in PROMPTS],
        [("seven", closeness), ("short", brevity)],
        weighting,
        settings,
        seed=0,
        regularizer=regularizer,
    )


def adapter(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.named_parameters() if v.requires_grad}


def test_a_float16_model_trains_with_a_scaled_loss():
    trainer = fp16_trainer()
    assert trainer.scaler.is_enabled()
    assert {p.dtype for p in adapter(trainer).values()} == {torch.float32}  # PEFT's LoRA
    before = adapter(trainer)
    history = trainer.train(3)
    for metrics in history:
        assert metrics["grad_scale"] > 1
        assert metrics["skipped_step"] in (0.0, 1.0)
    taken = [m for m in history if m["skipped_step"] == 0.0]
    assert taken, "every step overflowed"
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in taken)
    after = adapter(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_an_overflowing_float16_step_is_skipped():
    """A loss term with an infinite gradient: no optimizer step, and the scale backs off."""
    holder: list[LocalTrainer] = []

    def infinite_gradient() -> torch.Tensor:
        params = [p for p in holder[0].policy.parameters() if p.requires_grad]
        return sum(p.sum() for p in params) * float("inf")

    trainer = fp16_trainer(infinite_gradient)
    holder.append(trainer)
    before = adapter(trainer)
    first = trainer.step()
    assert first["skipped_step"] == 1.0 and first["grad_scale"] == 2.0**16
    assert all(torch.equal(before[k], v) for k, v in adapter(trainer).items())
    assert not trainer.optimizer.state  # AdamW never stepped
    assert trainer.step()["grad_scale"] == 2.0**15


def test_float32_and_bfloat16_models_are_not_scaled():
    policy, tokenizer = tiny_policy()
    weighting = StaticWeighting(["seven"], "seven", [1.0])
    settings = GRPOSettings(batch_size=2, group_size=2, max_new_tokens=4)
    rows = [{"prompt": p} for p in PROMPTS]
    trainer = LocalTrainer(policy, tokenizer, rows, [("seven", closeness)], weighting, settings)
    assert not trainer.scaler.is_enabled()
    metrics = trainer.step()
    assert "grad_scale" not in metrics and "skipped_step" not in metrics
    model, tokenizer = tiny_random_model("qwen2", dtype=torch.bfloat16)
    policy = attach_lora(model, LoraSettings(r=4, alpha=8))
    trainer = LocalTrainer(policy, tokenizer, rows, [("seven", closeness)], weighting, settings)
    assert not trainer.scaler.is_enabled()


def test_a_micro_batch_size_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ValidationError, match="3 does not divide batch_size × group_size"):
        GRPOSettings(batch_size=2, group_size=4, micro_batch_size=3)
    assert GRPOSettings(batch_size=2, group_size=4, micro_batch_size=4).micro_batch_size == 4


def test_the_cli_refuses_it_in_one_line_naming_the_field(tmp_path):
    text = TINY_CONFIG.replace("group_size = 2", "group_size = 2\nmicro_batch_size = 3", 1)
    config = write_config(tmp_path, text)
    result = run_cli("train-local", str(config), "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert "grpo.micro_batch_size: 3 does not divide batch_size × group_size = 2 × 2 = 4" in (
        message
    )


def test_a_client_override_is_checked_against_the_merged_settings(tmp_path: Path):
    """``[client_defaults]`` says 4 rows (B·G = 8 there); a client whose own group_size makes
    B·G = 6 is refused, naming the field, where it came from and the client."""
    text = EXPERIMENT.replace("group_size = 4,", "group_size = 4, micro_batch_size = 4,", 1)
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    assert [c.grpo.micro_batch_size for c in load_experiment(path).clients] == [4, 4, 4]
    path.write_text(text.replace("grpo = { max_new_tokens = 8 }", "grpo = { group_size = 3 }"))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message
    assert "client_defaults.grpo.micro_batch_size (in clients[1])" in message, message
    assert "4 does not divide batch_size × group_size = 2 × 3 = 6" in message, message


@pytest.mark.parametrize("micro_batch_size", [0, 2, 4])
def test_prompt_once_gives_the_plain_step(micro_batch_size):
    """``grpo.prompt_once`` with the whole batch, half groups (2 of G = 4) and whole groups:
    the same loss, metrics and gradients as every row's own prompt, at every optimizer step."""
    settings = GRPOSettings(
        batch_size=2,
        group_size=4,
        max_new_tokens=8,
        lr=0.05,
        beta=0.04,
        num_iterations=2,
        micro_batch_size=micro_batch_size,
    )
    plain, plain_grads, _ = two_steps(dataclasses.replace(settings, prompt_once=False))
    once, once_grads, _ = two_steps(dataclasses.replace(settings, prompt_once=True))
    for a, b in zip(logged(plain), logged(once), strict=True):
        assert a["completions/mean_length"] == b["completions/mean_length"]
        assert b == pytest.approx(a, abs=1e-5)
    for step_plain, step_once in zip(plain_grads, once_grads, strict=True):
        scale = max(g.abs().max().item() for g in step_plain)
        for g_plain, g_once in zip(step_plain, step_once, strict=True):
            torch.testing.assert_close(g_once, g_plain, atol=1e-5 * scale, rtol=0)


def test_prompt_once_keeps_the_hypergradient_probe():
    """The shared prompt's gradient is already summed over its G rows, so the per-sample
    hooks cannot split it: the probe takes one backward per objective, to the same result."""
    plain, plain_probes, _ = hypergradient_run(0, per_sample=True)
    once, once_probes, weighting = hypergradient_run(0, per_sample=True, prompt_once=True)
    assert weighting.last_path == "per_objective"
    for a, b in zip(logged(plain), logged(once), strict=True):
        assert b == pytest.approx({**a, "hypergrad/per_sample": 0.0}, abs=1e-5)
    for a, b in zip(plain_probes, once_probes, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5 * a.abs().max().item(), rtol=0)
