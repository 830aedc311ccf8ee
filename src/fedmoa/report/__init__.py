"""``fedmoa report``: compare runs (methods × seeds) in Markdown, HTML and PNGs.

``load_run`` reads one run directory, ``summarize`` aggregates over seeds per method,
``write_report`` does both and renders; see ``build.py`` for what goes in the report.
"""

from __future__ import annotations

from fedmoa.report.aggregate import Delta, MethodSummary, Stat, summarize
from fedmoa.report.build import Report, comparison_table, default_output, write_report
from fedmoa.report.load import RunRecord, load_run, load_runs

__all__ = [
    "Delta",
    "MethodSummary",
    "Report",
    "RunRecord",
    "Stat",
    "comparison_table",
    "default_output",
    "load_run",
    "load_runs",
    "summarize",
    "write_report",
]
