"""FedMOA server: task- and accuracy-aware aggregation (round t).

This is the server part of FedMOA (Wang et al., arXiv 2602.00453), as
specified in docs "Server: task- and accuracy-aware aggregation":

1. sanitise the updates (``sanitize``);
2. within each task τ with clients C_τ, weight by samples and accuracy:
   ``α_k = n_k·exp(a_k/T_acc) / Σ_{l∈C_τ} n_l·exp(a_l/T_acc)``,
   so a better adapter counts more and ``T_acc → ∞`` is FedAvg within the task;
3. task update ``Δ_τ = Σ_{k∈C_τ} α_k Δθ_k``;
4. task mix ``π_τ ∝ (Σ_{k∈C_τ} n_k)^γ``: γ = 0 gives every task the same share
   whatever its number of clients (tasks do not drown each other out),
   γ = 1 weights by samples;
5. global ``θ_{t+1} = θ_t + η_s·Σ_τ π_τ Δ_τ``;
6. task adapters ``θ^τ_{t+1} = θ_t + η_s·Δ_τ`` for personalisation.

The weights are normalised exponentials computed in log space (max-shifted),
so a tiny ``T_acc`` sends all weight to the most accurate client(s) instead of
overflowing, and ``T_acc = math.inf`` is exactly FedAvg within a task.
A task's accuracies only ever enter its own α's, never another task's weights.

LoRA ``A`` and ``B`` are averaged separately (FedIT convention), which is
inexact: ``avg(B)·avg(A) ≠ avg(B·A)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Real

from fedmoa.aggregation.updates import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    apply_delta,
    cast_like,
    check_positive,
    group_by_task,
    sanitize,
    unchanged_result,
    weighted_sum,
)
from fedmoa.errors import ConfigError


@dataclass(frozen=True)
class TaskAccuracySettings:
    """Knobs of the aggregation; defaults are the ones in the algorithm doc."""

    t_acc: float = 0.1  # accuracy temperature T_acc; math.inf = FedAvg within each task
    gamma: float = 0.0  # task-mix exponent γ; 0 = equal task shares, 1 = by samples
    server_lr: float = 1.0  # η_s

    def __post_init__(self) -> None:
        check_positive("t_acc", self.t_acc, allow_inf=True)  # math.inf = FedAvg within a task
        if not isinstance(self.gamma, Real) or not math.isfinite(self.gamma):
            raise ConfigError(f"gamma must be a finite number, got {self.gamma!r}")
        check_positive("server_lr", self.server_lr)


def accuracy_weights(updates: Sequence[ClientUpdate], t_acc: float) -> list[float]:
    """α_k ∝ n_k·exp(a_k/T_acc) over one task's clients, in the order given."""
    best = max(u.accuracy for u in updates)
    # (a_k - a_max)/T_acc ∈ [-inf, 0]: finite or -inf even where a_k/T_acc would overflow to
    # inf (subnormal T_acc), and exactly 0 for T_acc = inf.
    return _normalized_exp(
        [math.log(u.num_examples) + (u.accuracy - best) / t_acc for u in updates]
    )


def task_shares(samples_per_task: Sequence[int], gamma: float) -> list[float]:
    """π_τ ∝ (Σ_{k∈C_τ} n_k)^γ, in the order given."""
    return _normalized_exp([gamma * math.log(n) for n in samples_per_task])


def _normalized_exp(logits: Sequence[float]) -> list[float]:
    """softmax(logits), shifted by the max; -inf logits get weight 0."""
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def task_accuracy_aggregate(
    current: Adapter,
    updates: Iterable[ClientUpdate],
    settings: TaskAccuracySettings | None = None,
    robust_norm: float | None = None,
) -> AggregationResult:
    """One FedMOA server round (steps 1-6 of the module docstring).

    ``client_weights[k] = π_τ(k)·α_k`` is each client's effective weight in
    ``global_delta = Σ_τ π_τ Δ_τ``. Clients and tasks are processed in sorted
    order, so the result is bit-identical whatever order the replies came in.
    """
    settings = settings or TaskAccuracySettings()
    accepted, rejected = sanitize(updates, current, robust_norm)
    if not accepted:
        return unchanged_result(current, rejected)

    groups = group_by_task(accepted)
    shares = task_shares(
        [sum(u.num_examples for u in members) for members in groups.values()], settings.gamma
    )
    task_deltas: dict[str, Adapter] = {}
    client_weights: dict[str, float] = {}
    for (task, members), share in zip(groups.items(), shares, strict=True):
        alphas = accuracy_weights(members, settings.t_acc)
        task_deltas[task] = weighted_sum([u.delta for u in members], alphas, current)
        client_weights.update(
            {u.client_id: share * a for u, a in zip(members, alphas, strict=True)}
        )

    global_delta = weighted_sum(list(task_deltas.values()), shares, current)
    return AggregationResult(
        global_adapter=apply_delta(current, global_delta, settings.server_lr),
        global_delta=cast_like(global_delta, current),
        task_adapters={
            task: apply_delta(current, delta, settings.server_lr)
            for task, delta in task_deltas.items()
        },
        client_weights=client_weights,
        task_shares=dict(zip(groups, shares, strict=True)),
        rejected=rejected,
    )
