"""One client's local GRPO loop: generate → score → advantages → loss → AdamW step.

``grpo_step`` reads top to bottom like the algorithm; ``LocalTrainer`` only adds
the state that outlives a step (optimizer, prompt sampler, weighting) and logging.
The federated engines call the same ``LocalTrainer`` for every client.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as config_dataclass

from fedmoa.grpo.advantages import (
    AdvantageMode,
    ScaleRewards,
    combine_advantages,
    objective_advantages,
    objective_zero_std,
)
from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.loss import BatchTotals, LossSettings, LossType, policy_loss
from fedmoa.grpo.rollout import Rollout, SamplingSettings, generate_rollouts
from fedmoa.rewards import RewardFunc, compute_rewards
from fedmoa.weighting import RewardBatch, RewardWeighting, StepSignals

Row = dict[str, Any]


@config_dataclass(config=ConfigDict(extra="forbid"))
class GRPOSettings:
    """The ``[grpo]`` section of a config: everything one local step needs."""

    batch_size: int = Field(4, gt=0)  # B prompts per step
    group_size: int = Field(4, gt=1)  # G completions per prompt
    max_new_tokens: int = Field(128, gt=0)  # most tokens sampled per completion
    temperature: float = Field(1.0, gt=0)  # sampling temperature (log-probs are taken at it too)
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling mass; 1: off
    top_k: int = Field(0, ge=0)  # top-k sampling; 0: off
    mask_truncated: bool = False  # leave completions that hit max_new_tokens out of the loss
    lr: float = Field(1e-5, gt=0)  # AdamW learning rate of the LoRA parameters
    weight_decay: float = Field(0.0, ge=0)  # AdamW weight decay
    max_grad_norm: float = Field(1.0, gt=0)  # gradient clipping norm
    beta: float = Field(0.0, ge=0)  # KL coefficient against the base model (0: no reference pass)
    kl_bias_correction: bool = True  # importance-correct the k3 KL estimate when num_iterations > 1
    # lower clip of the probability ratio (1 - epsilon_low)
    epsilon_low: float = Field(0.2, ge=0, lt=1)
    epsilon_high: float = Field(0.2, ge=0)  # upper clip of the probability ratio (1 + epsilon_high)
    loss_type: LossType = "grpo"  # loss normalisation, as TRL's loss_type
    num_iterations: int = Field(1, ge=1)  # optimisation passes over each generation batch
    # per-objective advantages then the weighted sum, or the weighted reward normalised
    advantage: AdvantageMode = "normalize_then_sum"
    # advantage scaling by the group's std, the batch's, or none
    scale_rewards: ScaleRewards = "group"
    # Recompute layer activations in backward instead of keeping them: less peak memory
    # (what TRL does by default) for one extra forward per step.
    gradient_checkpointing: bool = False
    # Completion positions per chunk of the LM head and log-softmax in the loss's forward,
    # recomputed in the backward; 0: all at once. Bounds the log-probs' memory (docs/performance.md).
    logprob_chunk: int = Field(0, ge=0)
    # Run each prompt once, its KV cache shared by its G completions, instead of G times: in
    # sampling's prefill (eager decode) and in the log-prob forwards. Same values and gradients,
    # fewer FLOPs (docs/performance.md). Under gradient checkpointing the training forward takes
    # whole sequences; the hypergradient probe takes one backward per objective.
    prompt_once: bool = True
    # Rows of the B·G batch per forward and backward, gradients accumulated; 0: the whole batch
    # at once. Same loss and gradients, less activation memory; must divide B·G.
    micro_batch_size: int = Field(0, ge=0)
    # "primary_success": the auxiliaries give no signal in a group where no completion earns
    # the primary (> 0), so they cannot pull a policy that fails the primary away from it
    # (docs/design.md, "Auxiliaries gated by the primary"); "none": always
    auxiliary_gate: Literal["none", "primary_success"] = "none"

    @field_validator("micro_batch_size")
    @classmethod
    def _divides_the_batch(cls, value: int, info: ValidationInfo) -> int:
        batch, group = info.data.get("batch_size"), info.data.get("group_size")
        if value and batch is not None and group is not None and (batch * group) % value:
            raise ValueError(
                f"{value} does not divide batch_size × group_size = {batch} × {group} = "
                f"{batch * group}"
            )
        return value

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            group_size=self.group_size,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            mask_truncated=self.mask_truncated,
            prompt_once=self.prompt_once,
        )

    def loss(self) -> LossSettings:
        return LossSettings(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            kl_bias_correction=self.kl_bias_correction,
            max_completion_length=self.max_new_tokens,
        )


# The phases of one step, in order; every step reports all of them (0.0 when skipped), so metric
# keys are the same on every client and every step.
STEP_PHASES = ("generate", "reward", "forward_backward", "weighting", "optimizer")


@dataclass
class PhaseTimer:
    """Exclusive wall time per phase, for ``step_time``, ``timing/*`` and ``--profile``.

    Phases may nest; a nested phase's time counts for it alone, not for its parent, so the
    phases of a step add up to the step's time and a profile never counts a second twice.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    _nested: list[float] = field(default_factory=list, repr=False)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed


def repeat_columns(rows: Sequence[Row], group_size: int) -> dict[str, list[Any]]:
    """Dataset columns (all but ``prompt``) repeated once per completion, as TRL passes them."""
    keys = dict.fromkeys(k for row in rows for k in row if k != "prompt")  # rows may differ
    return {k: [row.get(k) for row in rows for _ in range(group_size)] for k in keys}


def reward_metrics(
    names: Sequence[str], rewards: torch.Tensor, weights: torch.Tensor
) -> dict[str, float]:
    """TRL's reward metrics: ``reward``, ``reward_std`` and ``rewards/<name>/mean|std``."""
    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        column = rewards[:, i]
        metrics[f"rewards/{name}/mean"] = torch.nanmean(column).item()
        metrics[f"rewards/{name}/std"] = _nan_std(column)
    total = (
        (rewards * weights).nansum(dim=1).masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))
    )
    metrics["reward"] = torch.nanmean(total).item()
    metrics["reward_std"] = _nan_std(total)
    return metrics


def _nan_std(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.std().item() if x.numel() > 1 else 0.0


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    lengths = rollout.completion_lengths.float()
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
    }


def micro_batches(rows: int, size: int) -> list[slice]:
    """Consecutive row ranges of ``size`` rows (``0``: one range, the whole batch)."""
    if size <= 0 or size >= rows:
        return [slice(0, rows)]
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def gate_auxiliaries(
    rewards: torch.Tensor, group_size: int, primary: int
) -> tuple[torch.Tensor, float]:
    """Rewards [N, m] with every auxiliary set to NaN (not applicable) in the groups where no
    completion earns the primary (> 0), and the fraction of groups gated.

    A NaN reward has advantage 0 and stays out of its group's statistics, so a gated group
    trains on nothing, exactly as a group whose every objective had zero spread.
    """
    grouped = rewards.view(-1, group_size, rewards.shape[1]).clone()
    primary_rewards = grouped[:, :, primary].nan_to_num(0.0)
    failed = ~(primary_rewards > 0).any(dim=1)  # [groups]
    auxiliaries = [i for i in range(rewards.shape[1]) if i != primary]
    if auxiliaries:
        mask = failed[:, None, None].expand(-1, group_size, len(auxiliaries))
        grouped[:, :, auxiliaries] = grouped[:, :, auxiliaries].masked_fill(mask, float("nan"))
    return grouped.view_as(rewards), failed.float().mean().item()


def grpo_step(
    policy: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    rows: Sequence[Row],
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    weighting: RewardWeighting,
    settings: GRPOSettings,
    timer: PhaseTimer | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One GRPO update of ``policy`` (a PEFT model) on the prompts in ``rows``.

    ``regularizer`` adds a term to the loss (FedProx's proximal term), once per optimizer
    step. ``scaler``: fp16 gradient scaling (``LocalTrainer`` passes one for a float16
    model); a step whose scaled gradients overflowed is skipped.

    With ``settings.micro_batch_size`` the reference, old-policy and loss passes run over
    consecutive rows a micro-batch at a time, gradients accumulated; each micro-batch's loss
    is its share of the whole batch's (``BatchTotals``), so loss, metrics and gradients are
    those of the whole batch.
    """
    timer = timer or PhaseTimer()
    group = settings.group_size
    names = [name for name, _ in reward_funcs]

    # 1. Generate G completions per prompt with the current policy.
    with timer.phase("generate"):
        rollout = generate_rollouts(
            policy, tokenizer, [r["prompt"] for r in rows], settings.sampling()
        )
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    completions = [[{"role": "assistant", "content": text}] for text in rollout.completions]

    # 2. Score every completion with every objective: R [N, m], NaN = not applicable.
    with timer.phase("reward"):
        columns = repeat_columns(rows, group)
        columns["completion_ids"] = [
            ids[:n].tolist()
            for ids, n in zip(rollout.completion_ids, rollout.completion_lengths, strict=True)
        ]
        rewards = compute_rewards(reward_funcs, prompts, completions, columns)
    metrics: dict[str, float] = {}
    if settings.auxiliary_gate == "primary_success":
        rewards, gated = gate_auxiliaries(rewards, group, weighting.primary_index)
        metrics["rewards/aux_gated_frac"] = gated

    # 3. Group-relative advantages per objective, mixed with the current weights (which may
    #    first look at this batch: saturation, or the spread that SAW/variance weight by).
    zero_std = objective_zero_std(rewards, group)
    with timer.phase("weighting"):
        metrics.update(weighting.observe_batch(RewardBatch(rewards, group, zero_std)))
    weights = weighting.weights()
    per_objective = objective_advantages(rewards, group, settings.scale_rewards)
    advantages, adv_stats = combine_advantages(
        rewards, weights, group, settings.advantage, settings.scale_rewards
    )

    # 4. Reference log-probs: the same model with the adapter switched off (no second copy).
    loss_settings = settings.loss()
    inputs = (
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
    )
    # Micro-batches of consecutive rows (prompt-major groups; one may end inside a group, the
    # advantages being the whole batch's). One micro-batch is the whole batch, on the plain path.
    spans = micro_batches(rollout.completion_ids.shape[0], settings.micro_batch_size)
    totals = BatchTotals.of(rollout.completion_mask) if len(spans) > 1 else None

    def logps_of(span: slice) -> torch.Tensor:
        part = (t[span] for t in inputs)
        # A span starts on a multiple of its length, so runs of gcd(length, G) rows share a
        # prompt even where a micro-batch ends inside a group.
        shared = math.gcd(span.stop - span.start, group) if settings.prompt_once else 1
        return completion_logps(
            policy, *part, settings.temperature, settings.logprob_chunk, group_size=shared
        )

    def logps_without_grad() -> torch.Tensor:
        with torch.no_grad():
            parts = [logps_of(span) for span in spans]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    with timer.phase("forward_backward"):
        ref_logps = old_logps = None
        if settings.beta != 0.0:
            with policy.disable_adapter():
                ref_logps = logps_without_grad()
        if settings.num_iterations > 1:
            # The sampler's own log-probs would do, but a forward in train numerics keeps
            # the first ratio at exactly 1 (as TRL does outside vLLM).
            old_logps = logps_without_grad()

    # 5. The clipped surrogate, num_iterations times over the same batch.
    params = [p for p in policy.parameters() if p.requires_grad]
    reward_means = torch.nanmean(rewards, dim=0)
    scale, skipped = 1.0, 0
    for iteration in range(settings.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        scale = scaler.get_scale() if scaler is not None else 1.0
        loss_value, loss_stats = 0.0, dict[str, float]()
        for index, span in enumerate(spans):
            with timer.phase("forward_backward"):
                logps = logps_of(span)
                old = logps.detach() if old_logps is None else old_logps[span]
                ref = None if ref_logps is None else ref_logps[span]
                mask = rollout.completion_mask[span]
                loss, stats = policy_loss(
                    logps, old, advantages[span], mask, loss_settings, ref, totals
                )
                if iteration == 0:
                    # 6. Let the weighting look at this step's graph (the hypergradient needs
                    #    it): the whole batch's, or each micro-batch's part of it.
                    signals = StepSignals(
                        objective_advantages=per_objective[span],
                        objective_loss=lambda adv, lp=logps, old=old, mask=mask, ref=ref: (
                            policy_loss(lp, old, adv, mask, loss_settings, ref, totals)[0]
                        ),
                        reward_means=reward_means,
                        loss_scale=scale,
                    )
                    with timer.phase("weighting"):
                        if totals is None:
                            metrics.update(weighting.observe(signals))
                        else:
                            weighting.observe_part(signals)
                if regularizer is not None and index == len(spans) - 1:
                    penalty = regularizer()
                    metrics["proximal_term"] = penalty.item()
                    loss = loss + penalty
                loss_value += loss.item()
                for key, value in stats.items():
                    loss_stats[key] = loss_stats.get(key, 0.0) + value
                (loss if scaler is None else scaler.scale(loss)).backward()
        if iteration == 0 and totals is not None:
            with timer.phase("weighting"):
                metrics.update(
                    weighting.observe(StepSignals(per_objective, None, reward_means, scale))
                )
        # 7. AdamW step on the LoRA parameters with the combined gradient.
        with timer.phase("optimizer"):
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skipped when a gradient is inf or NaN
                scaler.update()  # which then lowers the scale
                skipped += scaler.get_scale() < scale
    if scaler is not None:
        # Only with fp16 scaling, which a run's model decides for all its clients and steps,
        # so the metric keys stay the same within a run (bf16/fp32 runs log as before).
        metrics["grad_scale"] = scale  # the scale of the last backward
        metrics["skipped_step"] = skipped / settings.num_iterations
    metrics.update(loss_stats)
    metrics.update(adv_stats)
    metrics.update(reward_metrics(names, rewards, weights))
    metrics.update(
        {f"frac_reward_zero_std/{n}": float(z) for n, z in zip(names, zero_std, strict=True)}
    )
    metrics.update(completion_metrics(rollout))
    metrics["loss"] = loss_value
    metrics["grad_norm"] = grad_norm.item()
    return metrics


def set_gradient_checkpointing(policy: Any, enabled: bool) -> None:
    """Turn activation checkpointing on or off; both ways, because engines share one model
    between clients whose settings differ. Non-reentrant, so no input needs grad for PEFT."""
    if enabled == bool(getattr(policy, "is_gradient_checkpointing", False)):
        return
    if enabled:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_disable()


class PromptSampler:
    """Draws ``B`` prompts per step without replacement within an epoch, reproducibly."""

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows <= 0:
            raise ValueError("no training rows")
        self.num_rows = num_rows
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self, batch_size: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < batch_size:
            if not self.order:
                self.order = list(range(self.num_rows))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order = list(state["order"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def computes_in_float16(policy: Any) -> bool:
    """Whether the frozen base model is float16 (PEFT keeps LoRA weights float32), so that
    gradients through its activations need loss scaling to not underflow."""
    frozen = (p for p in policy.parameters() if not p.requires_grad and p.is_floating_point())
    return next(frozen, torch.empty(0)).dtype == torch.float16


class LocalTrainer:
    """A client's training state: policy, optimizer, prompt sampler and weighting, and for a
    float16 model the gradient scaler (its state travels with the client's between rounds)."""

    def __init__(
        self,
        policy: Any,
        tokenizer: Any,
        rows: Sequence[Row],
        reward_funcs: Sequence[tuple[str, RewardFunc]],
        weighting: RewardWeighting,
        settings: GRPOSettings,
        seed: int = 0,
        regularizer: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.policy = policy
        self.regularizer = regularizer
        self.tokenizer = tokenizer
        self.rows = list(rows)
        self.reward_funcs = list(reward_funcs)
        self.weighting = weighting
        self.settings = settings
        self.sampler = PromptSampler(len(self.rows), seed)
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=settings.lr,
            weight_decay=settings.weight_decay,
        )
        device = next(policy.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device, enabled=computes_in_float16(policy))
        self.global_step = 0
        set_gradient_checkpointing(policy, settings.gradient_checkpointing)

    def step(self) -> dict[str, float]:
        timer = PhaseTimer()
        start = time.perf_counter()
        batch = [self.rows[i] for i in self.sampler.next(self.settings.batch_size)]
        metrics = grpo_step(
            self.policy,
            self.tokenizer,
            self.optimizer,
            batch,
            self.reward_funcs,
            self.weighting,
            self.settings,
            timer,
            self.regularizer,
            self.scaler if self.scaler.is_enabled() else None,
        )
        self.global_step += 1
        metrics.update(self.weighting.weight_metrics())
        metrics.update({f"timing/{k}": timer.seconds.get(k, 0.0) for k in STEP_PHASES})
        metrics["step_time"] = time.perf_counter() - start
        metrics["step"] = float(self.global_step)
        return metrics

    def train(
        self, steps: int, on_step: Callable[[dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        history = []
        for _ in range(steps):
            metrics = self.step()
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
        return history
