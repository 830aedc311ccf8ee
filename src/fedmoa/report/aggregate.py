"""Seeds → mean ± std per method, and the honest difference to FedAvg.

The spread is the sample standard deviation over seeds (``ddof=1``): with one seed
there is none, and the report says so instead of printing ``± 0``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedmoa.report.load import RunRecord

BASELINE = "fedavg"


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


@dataclass
class MethodSummary:
    """One method's runs and the figures the comparison table shows."""

    method: str
    runs: list[RunRecord]
    final_global: Stat
    final_personal: Stat
    final_local_model: Stat
    final_hypervolume: Stat
    bytes_up_per_round: Stat
    bytes_down_per_round: Stat
    delta_global: Delta | None = None  # None: no fedavg among the runs, or this is fedavg
    delta_personal: Delta | None = None

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
    summaries = [
        MethodSummary(
            method=method,
            runs=group,
            final_global=Stat.of(r.final_global_accuracy for r in group),
            final_personal=Stat.of(r.final_personal_accuracy for r in group),
            final_local_model=Stat.of(r.final_local_model_accuracy for r in group),
            final_hypervolume=Stat.of(r.final_hypervolume for r in group),
            bytes_up_per_round=Stat.of(_per_round(r.bytes_up) for r in group),
            bytes_down_per_round=Stat.of(_per_round(r.bytes_down) for r in group),
        )
        for method, group in group_by_method(runs).items()
    ]
    base = next((s for s in summaries if s.method == BASELINE), None)
    for s in summaries:
        if base is not None and s is not base:
            s.delta_global = delta(s.final_global, base.final_global)
            s.delta_personal = delta(s.final_personal, base.final_personal)
    return summaries


def per_round(
    runs: list[RunRecord], series: Callable[[RunRecord], dict[int, float]]
) -> tuple[list[int], list[Stat]]:
    """Rounds (the union over seeds) and the Stat over the seeds that have each round."""
    rounds = sorted({k for r in runs for k in series(r)})
    return rounds, [Stat.of(series(r)[k] for r in runs if k in series(r)) for k in rounds]


def _per_round(per_round_bytes: dict[int, int]) -> float:
    return sum(per_round_bytes.values()) / len(per_round_bytes) if per_round_bytes else math.nan
