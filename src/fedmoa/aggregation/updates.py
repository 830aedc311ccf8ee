"""Client updates as the server sees them, their sanitation, and adapter arithmetic.

Every aggregator in this package takes ``ClientUpdate`` objects, passes them
through :func:`sanitize` first and returns an :class:`AggregationResult`, so
that engines (Flower or embedded) can swap aggregators without changing code.

LoRA matrices are averaged entry by entry, ``A`` and ``B`` separately (the FedIT
convention that FlowerTune and OpenFedLLM use). That is inexact for the product
the model actually applies: ``avg(B)·avg(A) ≠ avg(B·A)``.

Arithmetic is done in float64 on the device of the current global adapter and
cast back to the adapter's dtype at the end, so bf16/fp16 adapters do not lose
the small per-client contributions during accumulation.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TypeGuard

import torch

from fedmoa.errors import ConfigError

logger = logging.getLogger(__name__)

Adapter = dict[str, torch.Tensor]
"""LoRA tensors by PEFT state-dict name."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply for one round (see "Reply to the server" in the algorithm doc)."""

    client_id: str
    task: str
    num_examples: int  # n_k
    delta: Adapter  # Δθ_k = θ_k - θ_t
    accuracy: float  # a_k: primary-objective validation accuracy of the updated adapter
    metrics: Mapping[str, float] = field(default_factory=dict)
    # V_k: validation rows behind ``accuracy`` (its evidence); 0 = none, the accuracy says nothing
    validation_size: int = 0
    # Under the "gain" accuracy rule: (validation row, primary score of the start adapter, of
    # the updated adapter) per prompt scored both times, the paired evidence of the update's gain
    validation_pairs: tuple[tuple[int, float, float], ...] = ()


@dataclass(frozen=True)
class Rejection:
    """Why an update was left out of aggregation; ``reason`` is one line."""

    client_id: str
    reason: str


@dataclass
class AggregationResult:
    """What one server round produces; the same type for every aggregator."""

    global_adapter: Adapter  # θ_{t+1}
    global_delta: Adapter  # the aggregated update before η_s (a server optimiser's input)
    task_adapters: dict[str, Adapter]  # θ^τ_{t+1}, for personalised evaluation
    client_weights: dict[str, float]  # effective weight of each accepted client in global_delta
    task_shares: dict[str, float]  # π_τ: each task's share of global_delta
    rejected: list[Rejection]
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. privacy: ε, noise stds


def check_positive(name: str, value: object, allow_inf: bool = False) -> None:
    """Raise a one-line ConfigError unless ``value`` is a positive (finite) real number."""
    if is_real(value) and value > 0 and (allow_inf or math.isfinite(value)):  # NaN fails > 0
        return
    kind = "positive number" if allow_inf else "positive finite number"
    raise ConfigError(f"{name} must be a {kind}, got {value!r}")


def sanitize(
    updates: Iterable[ClientUpdate],
    reference: Adapter,
    robust_norm: float | None = None,
    required_metrics: Collection[str] = (),
    rate_accuracy: bool = True,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split updates into usable ones and rejections, logging each rejection.

    One bad client (a diverged run, a stale adapter layout, a bug, or an
    attacker) must not poison the global adapter, so anything that cannot be
    averaged safely is dropped instead of raising. ``reference`` (the current
    global adapter) fixes the expected keys, shapes and dtypes: a tensor must have
    exactly its reference's dtype (the transport dtype; Flower carries bfloat16 as
    float32 and casts it back on arrival), so float64, integer or half-precision
    tensors sent for a float32 adapter are dropped, not silently cast. The accuracy must
    be a rate in [0, 1] where an aggregator weighs by it (``rate_accuracy``, the default);
    otherwise (FedAvg and the other methods that only report it) any finite number, so that
    a primary reward on another scale does not drop its client's updates. Metrics must
    include ``required_metrics`` and be real numbers, never ±inf; NaN is accepted
    only for reward means (``reward`` and ``reward/...``), where it means that no
    sample had an applicable reward. With
    ``robust_norm = c``, updates whose L2 norm exceeds ``c ×`` the median norm of
    the otherwise valid updates are dropped too; this needs at least 3 clients
    to ever trigger, since with 2 the median is their mean.

    Updates sharing a ``client_id`` are all dropped: keeping "the first" would
    make the result depend on arrival order.
    """
    if robust_norm is not None:
        check_positive("robust_norm", robust_norm)

    updates = list(updates)
    id_counts = Counter(u.client_id for u in updates)
    accepted: list[ClientUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        if id_counts[update.client_id] > 1:
            reason: str | None = f"{id_counts[update.client_id]} updates share this client_id"
        else:
            reason = _invalid_reason(update, reference, rate_accuracy) or _metrics_reason(
                update.metrics, required_metrics
            )
        if reason is None:
            accepted.append(update)
        else:
            rejected.append(Rejection(update.client_id, reason))

    if robust_norm is not None and accepted:
        norms = {u.client_id: adapter_norm(u.delta) for u in accepted}
        median = statistics.median(norms.values())
        kept = []
        for update in accepted:
            if norms[update.client_id] > robust_norm * median:
                reason = (
                    f"update norm {norms[update.client_id]:.4g} exceeds robust_norm "
                    f"{robust_norm:g} × median norm {median:.4g}"
                )
                rejected.append(Rejection(update.client_id, reason))
            else:
                kept.append(update)
        accepted = kept

    for rejection in rejected:
        logger.warning("dropping update from client %r: %s", rejection.client_id, rejection.reason)
    return accepted, rejected


def is_real(value: object) -> TypeGuard[Real]:
    """A real number that is not a bool (``True`` is an ``Integral``)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _invalid_reason(
    update: ClientUpdate, reference: Adapter, rate_accuracy: bool = True
) -> str | None:
    """The first thing wrong with an update, or None if it can be aggregated."""
    n = update.num_examples
    if n is None:
        return "num_examples is missing"
    if not isinstance(n, Integral) or isinstance(n, bool) or n <= 0:
        return f"num_examples must be a positive integer, got {n!r}"
    a = update.accuracy
    if a is None:
        return "accuracy is missing"
    if rate_accuracy and (not is_real(a) or not 0.0 <= a <= 1.0):  # NaN fails both
        return f"accuracy must be in [0, 1], got {a!r}"
    if not is_real(a) or not math.isfinite(a):
        return f"accuracy must be a finite number, got {a!r}"
    v = update.validation_size
    if not isinstance(v, Integral) or isinstance(v, bool) or v < 0:
        return f"validation_size must be a non-negative integer, got {v!r}"
    if (reason := _invalid_pairs(update.validation_pairs, rate_accuracy)) is not None:
        return reason
    if not isinstance(update.task, str) or not update.task:
        return f"task must be a non-empty string, got {update.task!r}"
    missing = sorted(reference.keys() - update.delta.keys())
    if missing:
        return f"missing {len(missing)} key(s): {_first_names(missing)}"
    extra = sorted(update.delta.keys() - reference.keys())
    if extra:
        return f"unexpected {len(extra)} key(s): {_first_names(extra)}"
    for name, ref in reference.items():
        tensor = update.delta[name]
        if not isinstance(tensor, torch.Tensor):
            return f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor"
        if tensor.shape != ref.shape:
            return f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"{name!r} has dtype {tensor.dtype}, expected {ref.dtype}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name!r} has non-finite values (NaN or inf)"
    return None


def _invalid_pairs(pairs: object, rate_accuracy: bool) -> str | None:
    """What is wrong with ``validation_pairs``: rows must be distinct indices, scores rates."""
    if not isinstance(pairs, tuple | list):
        return f"validation_pairs must be a sequence of (row, before, after), got {pairs!r}"
    rows = set()
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 3:
            return f"validation_pairs entries must be (row, before, after), got {pair!r}"
        row, *scores = pair
        if not isinstance(row, Integral) or isinstance(row, bool) or row < 0 or row in rows:
            return f"validation_pairs rows must be distinct non-negative integers, got {row!r}"
        rows.add(row)
        for score in scores:
            if not is_real(score) or not math.isfinite(score):
                return f"validation_pairs scores must be finite numbers, got {score!r}"
            if rate_accuracy and not 0.0 <= score <= 1.0:
                return f"validation_pairs scores must be in [0, 1], got {score!r}"
    return None


def _metrics_reason(metrics: object, required: Collection[str]) -> str | None:
    """What is wrong with an update's metrics (see :func:`sanitize`), or None."""
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping, got {type(metrics).__name__}"
    missing = sorted(set(required) - set(metrics))
    if missing:
        return f"missing {len(missing)} metric(s): {_first_names(missing)}"
    for name, value in metrics.items():
        if not is_real(value):
            return f"metric {name!r} is {value!r}, not a number"
        if math.isnan(value) and (name == "reward" or str(name).startswith("reward/")):
            continue  # a reward mean over no applicable sample
        if not math.isfinite(value):
            return f"metric {name!r} is {value!r}, not finite"
    return None


def _first_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def adapter_norm(adapter: Adapter) -> float:
    """Global L2 norm over all tensors of an adapter."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in adapter.values()))


def weighted_sum(adapters: Sequence[Adapter], weights: Sequence[float], like: Adapter) -> Adapter:
    """Σ_i w_i · adapter_i in float64, on the devices of ``like`` (cast with :func:`cast_like`).

    Callers fix the order of ``adapters`` (e.g. sorted by client id) so that
    results are bit-identical whatever order the clients replied in.
    """
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("weighted_sum needs as many weights as adapters, and at least one")
    out: Adapter = {}
    for name, ref in like.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for adapter, w in zip(adapters, weights, strict=True):
            acc.add_(adapter[name].to(device=ref.device, dtype=torch.float64), alpha=float(w))
        out[name] = acc
    return out


def apply_delta(current: Adapter, delta: Adapter, scale: float) -> Adapter:
    """θ + scale·Δ, computed in float64 and returned in θ's dtype and device."""
    return {
        name: (ref.to(torch.float64) + scale * delta[name].to(ref.device, torch.float64)).to(
            ref.dtype
        )
        for name, ref in current.items()
    }


def cast_like(adapter: Adapter, like: Adapter) -> Adapter:
    """``adapter`` in the dtypes and devices of ``like``."""
    return {
        name: adapter[name].to(device=ref.device, dtype=ref.dtype) for name, ref in like.items()
    }


def group_by_task(updates: Iterable[ClientUpdate]) -> dict[str, list[ClientUpdate]]:
    """Updates by task, tasks and clients sorted by name so results do not depend on order."""
    groups: dict[str, list[ClientUpdate]] = {}
    for update in sorted(updates, key=lambda u: u.client_id):
        groups.setdefault(update.task, []).append(update)
    return dict(sorted(groups.items()))


def unchanged_result(current: Adapter, rejected: list[Rejection]) -> AggregationResult:
    """The result of a round in which no update survived sanitation: θ stays where it is."""
    logger.warning("no usable client update this round; the global adapter is unchanged")
    return AggregationResult(
        global_adapter={k: v.clone() for k, v in current.items()},
        global_delta={k: torch.zeros_like(v) for k, v in current.items()},
        task_adapters={},
        client_weights={},
        task_shares={},
        rejected=rejected,
    )
