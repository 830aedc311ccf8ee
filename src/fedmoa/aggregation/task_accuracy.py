"""FedMOA server: task- and accuracy-aware aggregation (round t).

This is the server part of FedMOA (Wang et al., arXiv 2602.00453), as
specified in docs "Server: task- and accuracy-aware aggregation":

1. sanitise the updates (``sanitize``);
2. within each task τ with clients C_τ, weight by samples and accuracy:
   ``α_k = n_k·exp(a_k/T_acc) / Σ_{l∈C_τ} n_l·exp(a_l/T_acc)`` (``rule = "softmax"``,
   the paper's rule), so a better adapter counts more and ``T_acc → ∞`` is FedAvg
   within the task. ``a_k`` is measured on only ``V_k`` validation prompts, so with
   ``rule = "noise-aware"`` ``a_k`` is replaced by the client's pooled
   validation record ``â_k`` (this round's ``V_k`` outcomes plus ``ρ`` times its
   earlier ones) and the temperature grows with the standard error of that record:
   ``T_τ = T_acc + κ·sqrt(p̄_τ(1−p̄_τ)/N̄_τ)``, so a difference the size of sampling
   noise moves shares little and ``V → ∞`` (with ``ρ = 0``) is the paper's rule.
   With ``rule = "gain"`` (the default) the signal is the update's paired gain instead: each client
   scores the same freshly drawn validation prompts with its start adapter and with its
   trained one, ``ĝ_k`` is the mean of ``after − before`` over its record (repeated
   prompts merged, so they are not counted as new evidence), and
   ``T_τ = T_acc + κ·sqrt(q̄_τ/N̄_τ)`` with ``q̄_τ`` the pooled rate of prompts whose
   score changed and ``N̄_τ`` the mean number of distinct prompts: a hard validation
   set no longer passes for a bad update.
   With ``harm_z = z`` (gain rule only) an update whose gain is significantly below
   zero, ``ĝ_k + z·sqrt(q_k/N_k) < 0`` on this round's pairs (``harm_evidence = "round"``),
   on its client's record (``"record"``) or on either (``"either"``), gets ``α_k = 0`` and
   the others share its weight: the tempered weights cannot act on an update that clearly hurts.
   An optional cap bounds any one client's ``α_k`` (docs/design.md, "Accuracy-aware
   weights under sampling noise", "The gain of an update" and "Excluding a harmful update");
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Literal

from fedmoa.aggregation.updates import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    apply_delta,
    cast_like,
    check_positive,
    group_by_task,
    is_real,
    sanitize,
    unchanged_result,
    weighted_sum,
)
from fedmoa.errors import ConfigError

AccuracyRule = Literal["noise-aware", "softmax", "gain"]
ACCURACY_RULES: tuple[AccuracyRule, ...] = ("noise-aware", "softmax", "gain")
# What the harm test reads: this round's pairs (the update it judges), the client's record,
# or both (excluded when either test fails)
HarmEvidence = Literal["round", "record", "either"]
HARM_EVIDENCE: tuple[HarmEvidence, ...] = ("round", "record", "either")


@dataclass(frozen=True)
class TaskAccuracySettings:
    """Knobs of the aggregation; ``rule = "softmax"`` with the defaults is the algorithm doc."""

    t_acc: float = 0.1  # accuracy temperature T_acc; math.inf = FedAvg within each task
    gamma: float = 0.0  # task-mix exponent γ; 0 = equal task shares, 1 = by samples
    server_lr: float = 1.0  # η_s
    rule: AccuracyRule = "gain"
    noise_scale: float = 5.0  # κ: the temperature's growth per unit of standard error
    memory: float = 0.5  # ρ: weight of a client's earlier validation outcomes, per round
    max_client_share: float = 1.0  # cap on one client's α_k within its task; 1 = none
    # > 0 (client-level DP): the temperature's noise term is its worst case at this many
    # prompts, and a client without evidence gets a neutral value, so that no client's report
    # moves another's weight ratios (docs/design.md, "Differential privacy")
    worst_case_prompts: int = 0
    # z of the one-sided harm test (rule "gain"): an update whose record's gain is below 0 by
    # more than z standard errors gets no weight; None: off
    harm_z: float | None = None
    # "round": the test reads this round's pairs, the update it judges; "record": the
    # client's discounted record, earlier updates included; "either": both tests, excluded
    # when either fails (docs/design.md, "Which pairs the harm test reads")
    harm_evidence: HarmEvidence = "round"

    def __post_init__(self) -> None:
        check_positive("t_acc", self.t_acc, allow_inf=True)  # math.inf = FedAvg within a task
        if not isinstance(self.gamma, Real) or not math.isfinite(self.gamma):
            raise ConfigError(f"gamma must be a finite number, got {self.gamma!r}")
        check_positive("server_lr", self.server_lr)
        if self.rule not in ACCURACY_RULES:
            raise ConfigError(f"rule must be one of {', '.join(ACCURACY_RULES)}, got {self.rule!r}")
        if not is_real(self.noise_scale) or not 0 <= self.noise_scale < math.inf:
            raise ConfigError(f"noise_scale must be a finite number ≥ 0, got {self.noise_scale!r}")
        if not is_real(self.memory) or not 0 <= self.memory < 1:
            raise ConfigError(f"memory must be in [0, 1), got {self.memory!r}")
        if not is_real(self.max_client_share) or not 0 < self.max_client_share <= 1:
            raise ConfigError(f"max_client_share must be in (0, 1], got {self.max_client_share!r}")
        if not isinstance(self.worst_case_prompts, int) or self.worst_case_prompts < 0:
            raise ConfigError(
                f"worst_case_prompts must be an integer ≥ 0, got {self.worst_case_prompts!r}"
            )
        if self.harm_z is not None:
            if not is_real(self.harm_z) or not 0 < self.harm_z < math.inf:
                raise ConfigError(f"harm_z must be a finite number > 0, got {self.harm_z!r}")
            if self.rule != "gain":
                raise ConfigError(
                    f"harm_z tests the paired gain: it needs rule 'gain', not {self.rule!r}"
                )
        if self.harm_evidence not in HARM_EVIDENCE:
            raise ConfigError(
                f"harm_evidence must be one of {', '.join(HARM_EVIDENCE)}, "
                f"got {self.harm_evidence!r}"
            )


@dataclass(frozen=True)
class AccuracyEvidence:
    """A client's validation record: ``successes`` out of ``trials`` (discounted by ρ)."""

    successes: float
    trials: float


@dataclass(frozen=True)
class GainEvidence:
    """A client's paired validation record under the ``gain`` rule.

    Per validation row (its index in the client's validation split): the discounted sums
    ``(Σ w·d, Σ w·|d|, Σ w)`` of its gains ``d = after − before``. A row drawn again merges
    into its entry, so the effective number of prompts (Kish's ``(Σw)²/Σw²``) counts it once.
    """

    rows: Mapping[int, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        return sum(w for *_, w in self.rows.values())

    @property
    def gain_sum(self) -> float:
        return sum(d for d, _, _ in self.rows.values())

    @property
    def changed_sum(self) -> float:
        return sum(c for _, c, _ in self.rows.values())

    @property
    def distinct(self) -> float:
        """Effective number of distinct prompts behind the record."""
        squares = sum(w * w for *_, w in self.rows.values())
        return self.weight**2 / squares if squares > 0 else 0.0


def accumulate_gain_evidence(
    previous: Mapping[str, GainEvidence], updates: Iterable[ClientUpdate], memory: float
) -> dict[str, GainEvidence]:
    """Each reporting client's gain record: this round's pairs plus ρ × its earlier ones.

    Each round's pairs measure another update of the same client, so older ones count for
    less, as in :func:`accumulate_evidence`; a row seen before adds to its own entry.
    """
    out = dict(previous)
    for u in updates:
        rows = {
            row: (memory * d, memory * c, memory * w)
            for row, (d, c, w) in previous.get(u.client_id, GainEvidence()).rows.items()
        }
        for row, before, after in u.validation_pairs:
            d, c, w = rows.get(row, (0.0, 0.0, 0.0))
            rows[row] = (d + after - before, c + abs(after - before), w + 1.0)
        out[u.client_id] = GainEvidence(rows)
    return out


def gain_weights(
    updates: Sequence[ClientUpdate],
    t_acc: float,
    noise_scale: float,
    evidence: Mapping[str, GainEvidence] | None = None,
    worst_case_prompts: int = 0,
) -> list[float]:
    """α_k ∝ n_k·exp(ĝ_k/T_τ), ``T_τ = T_acc + κ·sqrt(q̄_τ/N̄_τ)``, over one task's clients.

    ``ĝ_k``: the mean paired gain of the client's record (``evidence``; this round's pairs
    when absent). A client without pairs gets the task's pooled gain, no reward and no
    penalty. ``q̄_τ`` (Jeffreys-smoothed) is the pooled rate of changed scores: for
    ``|d| ≤ 1``, ``Var d ≤ E|d|``, so ``sqrt(q̄/N)`` bounds the standard error of a mean gain
    over N distinct prompts whatever the set's difficulty, which cancels in ``d``.
    ``worst_case_prompts = V > 0``: ``T = T_acc + κ·sqrt(1/V)`` and a client without pairs
    gets gain 0, whatever the others report.
    """
    records = gain_records(updates, evidence or {})
    if worst_case_prompts > 0:
        gains = [r.gain_sum / r.weight if r.weight > 0 else 0.0 for r in records]
        temperature = t_acc + noise_scale * math.sqrt(1.0 / worst_case_prompts)
        return _tempered_weights(updates, gains, temperature)
    weights = [r.weight for r in records]
    if not any(w > 0 for w in weights):  # nobody has evidence: by samples alone
        return _tempered_weights(updates, [0.0] * len(updates), math.inf)
    pooled_gain = sum(r.gain_sum for r in records) / sum(weights)
    gains = [r.gain_sum / r.weight if r.weight > 0 else pooled_gain for r in records]
    changed = (sum(r.changed_sum for r in records) + 0.5) / (sum(weights) + 1.0)
    sizes = [r.distinct for r in records if r.weight > 0]
    standard_error = math.sqrt(changed / (sum(sizes) / len(sizes)))
    return _tempered_weights(updates, gains, t_acc + noise_scale * standard_error)


def gain_records(
    updates: Sequence[ClientUpdate], evidence: Mapping[str, GainEvidence]
) -> list[GainEvidence]:
    """Each update's gain record: its client's in ``evidence``, else this round's pairs."""
    return [
        evidence.get(u.client_id) or accumulate_gain_evidence({}, [u], 0.0)[u.client_id]
        for u in updates
    ]


def harmful(record: GainEvidence, z: float) -> bool:
    """One-sided test of "this update does not lower the primary": ``ĝ + z·sqrt(q/N) < 0``.

    ``record``: this round's pairs of the update (:func:`gain_records` with no evidence), or
    its client's discounted record; docs/design.md, "Which pairs the harm test reads".

    Under ``g = 0``, ``Var d = E d² = E|d| = q`` for 0/1 scores (and ≤ q for rates), so
    ``sqrt(q/N)`` is the standard error of the mean gain over ``N`` distinct prompts. ``q`` is
    the client's own (Jeffreys-smoothed) rate of changed scores, not the task's: an update that
    turns right answers wrong changes many, and the test must not borrow its peers' calm. Only
    the client's own report enters, so one client cannot get another excluded (and the DP
    bound holds). No pairs: no evidence, never harmful.
    """
    return record.weight > 0 and gain_z(record) < -z


def gain_z(record: GainEvidence) -> float:
    """``ĝ/sqrt(q/N)``: the record's mean gain in its own standard errors (:func:`harmful`);
    NaN without pairs."""
    if record.weight <= 0:
        return math.nan
    changed = (record.changed_sum + 0.5) / (record.weight + 1.0)
    return record.gain_sum / record.weight / math.sqrt(changed / record.distinct)


def harm_exclusions(
    members: Sequence[ClientUpdate],
    evidence: Mapping[str, GainEvidence],
    z: float,
    read: HarmEvidence,
) -> list[bool]:
    """Which updates the harm test excludes, reading this round's pairs, the record or both."""
    sources = {"round": [{}], "record": [evidence], "either": [{}, evidence]}[read]
    verdicts = [[harmful(r, z) for r in gain_records(members, e)] for e in sources]
    return [any(flags) for flags in zip(*verdicts, strict=True)]


def accumulate_evidence(
    previous: Mapping[str, AccuracyEvidence], updates: Iterable[ClientUpdate], memory: float
) -> dict[str, AccuracyEvidence]:
    """Each reporting client's record: this round's ``a_k·V_k`` of ``V_k`` plus ρ × its last.

    The adapter a client validates changes every round, so older outcomes count for less
    (their weight halves each round at ρ = 0.5); clients that did not report keep theirs.
    """
    out = dict(previous)
    for u in updates:
        old = previous.get(u.client_id, AccuracyEvidence(0.0, 0.0))
        out[u.client_id] = AccuracyEvidence(
            u.accuracy * u.validation_size + memory * old.successes,
            u.validation_size + memory * old.trials,
        )
    return out


def accuracy_weights(
    updates: Sequence[ClientUpdate], t_acc: float, neutral: float | None = None
) -> list[float]:
    """α_k ∝ n_k·exp(a_k/T_acc) over one task's clients, in the order given (the paper's rule).

    A client that reports ``V_k = 0`` (no scored validation row) has no evidence: next to
    peers that report outcomes it gets their pooled rate ``Σ a_l·V_l / Σ V_l``, no reward and
    no penalty, as under the noise-aware rule. Where no client of the task reports ``V``
    (callers that do not count), the accuracies are taken as given.
    """
    if neutral is not None:  # client-level DP: nothing pooled from the other clients
        rates = [u.accuracy if u.validation_size > 0 else neutral for u in updates]
        return _tempered_weights(updates, rates, t_acc)
    trials = sum(u.validation_size for u in updates)
    if trials == 0:
        return _tempered_weights(updates, [u.accuracy for u in updates], t_acc)
    pooled = sum(u.accuracy * u.validation_size for u in updates) / trials
    rates = [u.accuracy if u.validation_size > 0 else pooled for u in updates]
    return _tempered_weights(updates, rates, t_acc)


def noise_aware_weights(
    updates: Sequence[ClientUpdate],
    t_acc: float,
    noise_scale: float,
    evidence: Mapping[str, AccuracyEvidence] | None = None,
    worst_case_prompts: int = 0,
) -> list[float]:
    """α_k ∝ n_k·exp(â_k/T_τ), ``T_τ = T_acc + κ·SE_τ``, over one task's clients.

    ``â_k`` is the client's success rate over its record (``evidence``; this round's
    ``a_k·V_k`` of ``V_k`` when absent). A client without validation outcomes gets the
    task's pooled rate ``p̄_τ``: no evidence, no reward and no penalty. ``SE_τ`` is the
    standard error of one client's rate at the task's pooled rate and mean record size;
    ``p̄_τ`` is Jeffreys-smoothed, so a task where every answer was right (or wrong) still
    has a noise scale. ``worst_case_prompts = V > 0``: ``T = T_acc + κ·sqrt(¼/V)`` and a
    client without outcomes gets ½, whatever the others report.
    """
    evidence = evidence or {}
    records = [
        evidence.get(u.client_id)
        or AccuracyEvidence(u.accuracy * u.validation_size, float(u.validation_size))
        for u in updates
    ]
    if worst_case_prompts > 0:
        rates = [r.successes / r.trials if r.trials > 0 else 0.5 for r in records]
        temperature = t_acc + noise_scale * math.sqrt(0.25 / worst_case_prompts)
        return _tempered_weights(updates, rates, temperature)
    sizes = [r.trials for r in records if r.trials > 0]
    pooled = (sum(r.successes for r in records) + 0.5) / (sum(sizes) + 1.0)
    rates = [r.successes / r.trials if r.trials > 0 else pooled for r in records]
    if not sizes:  # nobody has evidence: by samples alone
        return _tempered_weights(updates, rates, math.inf)
    standard_error = math.sqrt(pooled * (1.0 - pooled) / (sum(sizes) / len(sizes)))
    return _tempered_weights(updates, rates, t_acc + noise_scale * standard_error)


def cap_shares(
    weights: Sequence[float], cap: float, excluded: Sequence[bool] | None = None
) -> list[float]:
    """Clip each weight at ``max(cap, 1/K)`` and hand the excess to the others pro rata.

    Water-filling: a weight pushed over the cap by the redistribution is clipped in turn,
    so the result sums to 1 with every weight ≤ the cap and keeps the uncapped ones'
    ratios. ``excluded`` clients (weight 0) take none of the excess, and ``K`` still counts
    them, so what the rest cannot take under the cap is left out (the weights then sum to
    less than 1): the bound ``max(cap, 1/K)`` holds whoever is excluded.
    """
    cap = max(cap, 1.0 / len(weights))
    out = list(weights)
    capped: set[int] = {i for i, e in enumerate(excluded or ()) if e}
    while over := [i for i, w in enumerate(out) if i not in capped and w > cap]:
        capped.update(over)
        for i in over:
            out[i] = cap
        free = [i for i in range(len(out)) if i not in capped]
        left = 1.0 - sum(out[i] for i in capped)
        total = sum(weights[i] for i in free)
        for i in free:
            out[i] = left * weights[i] / total if total > 0 else left / len(free)
    return out


def within_task_weights(
    members: Sequence[ClientUpdate],
    settings: TaskAccuracySettings,
    evidence: Mapping[str, AccuracyEvidence | GainEvidence] | None = None,
) -> list[float]:
    """The α_k of one task's clients under ``settings`` (rule, harm test, then the cap)."""
    worst_case = settings.worst_case_prompts
    excluded: list[bool] | None = None
    if settings.rule == "softmax":
        alphas = accuracy_weights(members, settings.t_acc, 0.5 if worst_case else None)
    elif settings.rule == "gain":
        gains = {k: e for k, e in (evidence or {}).items() if isinstance(e, GainEvidence)}
        alphas = gain_weights(members, settings.t_acc, settings.noise_scale, gains, worst_case)
        if settings.harm_z is not None:
            excluded = harm_exclusions(members, gains, settings.harm_z, settings.harm_evidence)
            alphas = _without(alphas, excluded)
    else:
        records = {k: e for k, e in (evidence or {}).items() if isinstance(e, AccuracyEvidence)}
        alphas = noise_aware_weights(
            members, settings.t_acc, settings.noise_scale, records, worst_case
        )
    if settings.max_client_share < 1:
        return cap_shares(alphas, settings.max_client_share, excluded)
    return alphas


def _without(alphas: Sequence[float], excluded: Sequence[bool]) -> list[float]:
    """The weights with the excluded set to 0 and the rest rescaled in proportion to sum to 1;
    all 0 when every client is excluded (the task's update is then zero: it stays put)."""
    kept = [0.0 if e else a for a, e in zip(alphas, excluded, strict=True)]
    total = sum(kept)
    return [a / total for a in kept] if total > 0 else kept


def _tempered_weights(
    updates: Sequence[ClientUpdate], rates: Sequence[float], temperature: float
) -> list[float]:
    best = max(rates)
    # (a_k - a_max)/T ∈ [-inf, 0]: finite or -inf even where a_k/T would overflow to
    # inf (subnormal T), and exactly 0 for T = inf.
    return _normalized_exp(
        [
            math.log(u.num_examples) + (r - best) / temperature
            for u, r in zip(updates, rates, strict=True)
        ]
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
    evidence: Mapping[str, AccuracyEvidence | GainEvidence] | None = None,
) -> AggregationResult:
    """One FedMOA server round (steps 1-6 of the module docstring).

    ``evidence``: each client's validation record for the noise-aware rule
    (:func:`accumulate_evidence`) or the gain rule (:func:`accumulate_gain_evidence`);
    without it, this round's outcomes alone.
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
        alphas = within_task_weights(members, settings, evidence)
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
