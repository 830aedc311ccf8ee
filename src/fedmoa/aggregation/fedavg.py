"""FedAvg (McMahan et al. 2017): the baseline server, weighted by n_k over all clients.

LoRA ``A`` and ``B`` are averaged separately (FedIT convention), which is
inexact: ``avg(B)·avg(A) ≠ avg(B·A)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def fedavg(updates: Sequence[ClientUpdate]) -> Adapter:
    """Σ_k n_k Δ_k / Σ_k n_k, in the dtype and device of the first update's delta.

    No sanitation here: pass updates through ``sanitize`` first (the
    ``*_aggregate`` functions do).
    """
    if not updates:
        raise ValueError("fedavg needs at least one update")
    like = updates[0].delta
    return cast_like(_sample_weighted_mean(updates, like), like)


def _sample_weighted_mean(updates: Sequence[ClientUpdate], like: Adapter) -> Adapter:
    """FedAvg in float64 (not yet cast), clients in id order so arrival order does not matter."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    total = sum(u.num_examples for u in ordered)
    return weighted_sum([u.delta for u in ordered], [u.num_examples / total for u in ordered], like)


def fedavg_aggregate(
    current: Adapter,
    updates: Iterable[ClientUpdate],
    server_lr: float = 1.0,
    robust_norm: float | None = None,
) -> AggregationResult:
    """One FedAvg round: θ_{t+1} = θ_t + η_s · fedavg(updates).

    Task adapters are θ_t + η_s · fedavg(updates of that task), so that the
    FedAvg baseline gets the same personalised evaluation as FedMOA. Task shares
    are each task's fraction of the samples, which is what FedAvg implicitly
    gives it. The accuracies are not used, so any finite one is accepted.
    """
    check_positive("server_lr", server_lr)
    accepted, rejected = sanitize(updates, current, robust_norm, rate_accuracy=False)
    if not accepted:
        return unchanged_result(current, rejected)

    total = sum(u.num_examples for u in accepted)
    global_delta = _sample_weighted_mean(accepted, current)
    task_adapters: dict[str, Adapter] = {}
    task_shares: dict[str, float] = {}
    for task, members in group_by_task(accepted).items():
        task_adapters[task] = apply_delta(
            current, _sample_weighted_mean(members, current), server_lr
        )
        task_shares[task] = sum(u.num_examples for u in members) / total
    return AggregationResult(
        global_adapter=apply_delta(current, global_delta, server_lr),
        global_delta=cast_like(global_delta, current),
        task_adapters=task_adapters,
        client_weights={u.client_id: u.num_examples / total for u in accepted},
        task_shares=task_shares,
        rejected=rejected,
    )
