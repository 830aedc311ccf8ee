"""Seeds → mean ± std per method, and the honest difference to FedAvg.

The spread is the sample standard deviation over seeds (``ddof=1``): with one seed
there is none, and the report says so instead of printing ``± 0``. Runs of two methods
with the same seed share their data, splits and initial adapter, so their difference is
also taken seed by seed (:func:`paired_difference`), which removes the seed's own
luck from the comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from scipy import stats

from fedmoa.report.load import RunRecord

BASELINE = "fedavg"
# FedAvg on the primaries alone: what the heterogeneous auxiliaries cost FedAvg is measured
# against it, and how much of that cost a method recovers.
PRIMARY_REFERENCE = "fedavg-primary"


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of the finite values among a method's seeds."""

    mean: float
    std: float  # NaN when n < 2
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        kept = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not kept:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(kept) if len(kept) > 1 else math.nan
        return cls(statistics.fmean(kept), std, len(kept))

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        if self.n == 0:
            return "-"
        mean = f"{self.mean * scale:.{digits}f}"
        return mean if self.n < 2 else f"{mean} ± {self.std * scale:.{digits}f}"


@dataclass(frozen=True)
class Delta:
    """Difference of two methods' seed means; ``se`` is its standard error (NaN if either
    method has fewer than two seeds, since then there is no spread to compare against)."""

    diff: float
    se: float

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.diff):
            return "-"
        text = f"{self.diff:+.{digits}f}"
        if math.isnan(self.se):
            return f"{text} (no spread)"
        noise = " (within noise)" if abs(self.diff) < 2 * self.se else ""
        return f"{text} ± {self.se:.{digits}f}{noise}"


def delta(a: Stat, b: Stat) -> Delta:
    if a.n == 0 or b.n == 0:
        return Delta(math.nan, math.nan)
    se = math.sqrt(a.std**2 / a.n + b.std**2 / b.n) if a.n > 1 and b.n > 1 else math.nan
    return Delta(a.mean - b.mean, se)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of seed-by-seed differences and its two-sided t interval (NaN with < 2 pairs)."""

    mean: float
    low: float
    high: float
    n: int  # pairs: seeds both methods have a finite value for

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        text = f"{self.mean:+.{digits}f}"
        if self.n < 2:
            return f"{text} (one pair)"
        return f"{text} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference:
    """``a − b`` over the seeds both have: mean ± t_{(1+c)/2, n−1}·s/√n (paired t interval)."""
    seeds = sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, math.nan, math.nan, 1)
    half = stats.t.ppf((1 + confidence) / 2, len(diffs) - 1) * statistics.stdev(diffs)
    half /= math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))


PAIRED_METRICS: dict[str, Callable[[RunRecord], float]] = {
    "global": lambda r: r.final_global_accuracy,
    "personalized": lambda r: r.final_personal_accuracy,
    "hypervolume": lambda r: r.final_hypervolume,
}


def check_names(runs: Iterable[RunRecord]) -> list[str]:
    """The checks any run's final evaluation has a global figure for, sorted."""
    prefix = "global/checks/"
    return sorted({k[len(prefix) :] for r in runs for k in r.final_checks if k.startswith(prefix)})


def paired_metrics(runs: Iterable[RunRecord]) -> dict[str, Callable[[RunRecord], float]]:
    """:data:`PAIRED_METRICS` and the global figure of every check the runs have."""
    return {
        **PAIRED_METRICS,
        **{
            f"global ({name})": lambda r, key=f"global/checks/{name}": r.final_checks.get(
                key, math.nan
            )
            for name in check_names(runs)
        },
    }


def by_seed(runs: Iterable[RunRecord], metric: Callable[[RunRecord], float]) -> dict[int, float]:
    """A metric per seed; a repeated seed keeps its first run (the report warns about it)."""
    out: dict[int, float] = {}
    for run in runs:
        out.setdefault(run.seed, metric(run))
    return out


@dataclass
class MethodSummary:
    """One method's runs and the figures the comparison table shows."""

    method: str
    runs: list[RunRecord]
    final_global: Stat
    final_personal: Stat
    final_local_model: Stat
    final_hypervolume: Stat
    base_global: Stat  # round 0: the starting adapter
    gain_global: Stat  # final − base, run by run
    bytes_up_per_round: Stat
    bytes_down_per_round: Stat
    # check name -> (base, final) of its global figure
    global_checks: dict[str, tuple[Stat, Stat]] = field(default_factory=dict)
    epsilon: Stat = field(default_factory=lambda: Stat.of([]))  # central DP's final ε
    delta_global: Delta | None = None  # None: no fedavg among the runs, or this is fedavg
    delta_personal: Delta | None = None
    # vs fedavg, seed by seed: PAIRED_METRICS name -> difference (empty without fedavg)
    paired: dict[str, PairedDifference] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def group_by_method(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Methods in the order they first appear on the command line."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return groups


def summarize(runs: list[RunRecord]) -> list[MethodSummary]:
    checks = check_names(runs)
    summaries = [
        MethodSummary(
            method=method,
            runs=group,
            final_global=Stat.of(r.final_global_accuracy for r in group),
            final_personal=Stat.of(r.final_personal_accuracy for r in group),
            final_local_model=Stat.of(r.final_local_model_accuracy for r in group),
            final_hypervolume=Stat.of(r.final_hypervolume for r in group),
            base_global=Stat.of(r.base_global_accuracy for r in group),
            gain_global=Stat.of(r.final_global_accuracy - r.base_global_accuracy for r in group),
            bytes_up_per_round=Stat.of(_per_round(r.bytes_up) for r in group),
            bytes_down_per_round=Stat.of(_per_round(r.bytes_down) for r in group),
            epsilon=Stat.of(r.epsilon for r in group),
            global_checks={
                name: (
                    Stat.of(r.base_checks.get(f"global/checks/{name}", math.nan) for r in group),
                    Stat.of(r.final_checks.get(f"global/checks/{name}", math.nan) for r in group),
                )
                for name in checks
            },
        )
        for method, group in group_by_method(runs).items()
    ]
    metrics = paired_metrics(runs)
    base = next((s for s in summaries if s.method == BASELINE), None)
    for s in summaries:
        if base is not None and s is not base:
            s.delta_global = delta(s.final_global, base.final_global)
            s.delta_personal = delta(s.final_personal, base.final_personal)
            s.paired = {
                name: paired_difference(by_seed(s.runs, metric), by_seed(base.runs, metric))
                for name, metric in metrics.items()
            }
    return summaries


@dataclass(frozen=True)
class Recovery:
    """How much of FedAvg's loss to the primaries-only reference a method wins back (global
    accuracy, seed by seed)."""

    method: str
    gained: PairedDifference  # method − fedavg
    gap: PairedDifference  # fedavg-primary − fedavg, over the same seeds
    # (method − fedavg) − ½·(fedavg-primary − fedavg): above 0 = more than half recovered
    over_half: PairedDifference

    @property
    def fraction(self) -> float:
        """Share of the gap recovered, from the means (NaN without a gap)."""
        if self.gap.n == 0 or self.gap.mean == 0:
            return math.nan
        return self.gained.mean / self.gap.mean


def recoveries(summaries: list[MethodSummary]) -> list[Recovery]:
    """One :class:`Recovery` per method other than fedavg and the reference, when both ran."""
    by_method = {s.method: s for s in summaries}
    if BASELINE not in by_method or PRIMARY_REFERENCE not in by_method:
        return []
    accuracy = PAIRED_METRICS["global"]
    fedavg = by_seed(by_method[BASELINE].runs, accuracy)
    reference = by_seed(by_method[PRIMARY_REFERENCE].runs, accuracy)
    out = []
    for s in summaries:
        if s.method in (BASELINE, PRIMARY_REFERENCE):
            continue
        mine = by_seed(s.runs, accuracy)
        seeds = mine.keys() & fedavg.keys() & reference.keys()
        margin = {
            seed: (mine[seed] - fedavg[seed]) - 0.5 * (reference[seed] - fedavg[seed])
            for seed in seeds
        }
        out.append(
            Recovery(
                s.method,
                paired_difference({k: mine[k] for k in seeds}, fedavg),
                paired_difference({k: reference[k] for k in seeds}, fedavg),
                paired_difference(margin, dict.fromkeys(seeds, 0.0)),
            )
        )
    return out


def per_round(
    runs: list[RunRecord], series: Callable[[RunRecord], dict[int, float]]
) -> tuple[list[int], list[Stat]]:
    """Rounds (the union over seeds) and the Stat over the seeds that have each round."""
    rounds = sorted({k for r in runs for k in series(r)})
    return rounds, [Stat.of(series(r)[k] for r in runs if k in series(r)) for k in rounds]


def _per_round(per_round_bytes: dict[int, int]) -> float:
    return sum(per_round_bytes.values()) / len(per_round_bytes) if per_round_bytes else math.nan


def first_value(series: Mapping[int, float]) -> float:
    """The value at the first round a series has; NaN when it has none."""
    return series[min(series)] if series else math.nan


def last_value(series: Mapping[int, float]) -> float:
    """The value at the last round a series has; NaN when it has none."""
    return series[max(series)] if series else math.nan


@dataclass(frozen=True)
class TaskBreakdown:
    """One method's global accuracy on one task: where the mean hides a task that lost."""

    method: str
    task: str
    base: Stat  # round 0
    final: Stat
    paired: PairedDifference | None  # vs fedavg; None for fedavg itself or without it


@dataclass(frozen=True)
class ClientBreakdown:
    """What each half of FedMOA did to one client: its primary weight and its server share."""

    method: str
    client: str
    task: str
    primary_weight_first: Stat  # after round 1's local steps
    primary_weight_last: Stat
    share: Stat  # its weight in the global update, mean over rounds
    base: Stat  # personalized accuracy, round 0
    final: Stat  # personalized accuracy, last evaluated round


def task_breakdown(summaries: list[MethodSummary]) -> list[TaskBreakdown]:
    """Per method and task: base and final global accuracy, and the paired Δ vs fedavg."""
    base = next((s for s in summaries if s.method == BASELINE), None)
    rows = []
    for s in summaries:
        for task in dict.fromkeys(t for r in s.runs for t in r.tasks):

            def final(r: RunRecord, task: str = task) -> float:
                return last_value(r.task_accuracy.get(task, {}))

            paired = None
            if base is not None and s is not base:
                paired = paired_difference(by_seed(s.runs, final), by_seed(base.runs, final))
            start = Stat.of(r.task_accuracy.get(task, {}).get(0, math.nan) for r in s.runs)
            rows.append(TaskBreakdown(s.method, task, start, Stat.of(map(final, s.runs)), paired))
    return rows


def client_breakdown(summaries: list[MethodSummary]) -> list[ClientBreakdown]:
    """Per method and client, mean over seeds: primary weight, server share, accuracy."""
    rows = []
    for s in summaries:
        clients = {c: t for r in s.runs for c, t in r.clients.items()}
        for client, task in clients.items():

            def primary(r: RunRecord, client: str = client) -> dict[int, float]:
                return r.weights.get(client, {}).get(r.primary.get(client, ""), {})

            # "local" averages nothing; its older records carry a discarded aggregate's weights.
            shares = [r.shares.get(client, {}) for r in s.runs if s.method != "local"]
            accuracy = [r.client_accuracy.get(client, {}) for r in s.runs]
            rows.append(
                ClientBreakdown(
                    method=s.method,
                    client=client,
                    task=task,
                    primary_weight_first=Stat.of(first_value(primary(r)) for r in s.runs),
                    primary_weight_last=Stat.of(last_value(primary(r)) for r in s.runs),
                    share=Stat.of(statistics.fmean(v.values()) for v in shares if v),
                    base=Stat.of(a.get(0, math.nan) for a in accuracy),
                    final=Stat.of(last_value(a) for a in accuracy),
                )
            )
    return rows
