"""Where a run's time went: the per-phase split that ``--profile`` prints.

Why from records: every step and round already logs its exclusive phase times (``timing/*``,
see ``fedmoa.grpo.trainer.PhaseTimer``) to ``metrics.jsonl``, so a profile is a sum over the
run's records. It then covers resumed runs and both engines alike, and costs nothing when off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table

from fedmoa.grpo.trainer import STEP_PHASES

# Client side (per local step, summed over steps and clients), then server side (per round).
CLIENT_PHASES = (*STEP_PHASES, "validation")
SERVER_PHASES = ("aggregate", "evaluate", "checkpoint")
_CLIENT_RECORDS = ("client", "step")


def phase_totals(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds per phase summed over ``records`` (train-local steps or a run's metrics.jsonl).

    ``step`` and ``client`` records carry the step phases; ``round`` and ``timing`` records the
    server's. Phases nobody logged are left out.
    """
    totals: dict[str, float] = {}
    for record in records:
        kind = record.get("type", "step")
        phases = CLIENT_PHASES if kind in _CLIENT_RECORDS else SERVER_PHASES
        for phase in phases:
            value = record.get(f"timing/{phase}")
            if isinstance(value, int | float):
                totals[phase] = totals.get(phase, 0.0) + float(value)
    return totals


def profile_table(totals: Mapping[str, float], wall_seconds: float) -> Table:
    """Phases in pipeline order with their share of the wall time; the rest is ``other``
    (model and data loading, saving adapters, Python between phases)."""
    table = Table(title="time per phase", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    order = [p for p in (*CLIENT_PHASES, *SERVER_PHASES) if p in totals]
    other = max(0.0, wall_seconds - sum(totals[p] for p in order))
    for phase, seconds in [*((p, totals[p]) for p in order), ("other", other)]:
        share = seconds / wall_seconds if wall_seconds > 0 else 0.0
        table.add_row(phase, f"{seconds:.2f}", f"{100 * share:.1f}%")
    table.add_row("total (wall)", f"{wall_seconds:.2f}", "100.0%", style="bold")
    return table
