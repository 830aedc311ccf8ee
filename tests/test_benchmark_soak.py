"""``benchmarks/soak.py --smoke`` keeps running and reports every verdict figure.

Only the report's shape is checked: how much RSS moves on a shared CPU is not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
VERDICT_KEYS = (
    "rss_slope_mb_per_round:",
    "fds_delta:",
    "tmp_entries_delta:",
    "children_delta:",
    "threads_delta:",
    "verdict:",
)


def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--smoke", "--max-new-tokens", "4", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in VERDICT_KEYS:
        assert key in proc.stdout, proc.stdout
    figures = json.loads(out.read_text())
    assert [s["round"] for s in figures["samples"]] == list(range(6))  # before round 1, then 1..5
    for sample in figures["samples"]:
        assert sample["rss_mb"] > 0 and sample["fds"] > 0
    verdict = figures["verdict"]
    assert verdict["rounds"] == 5 and verdict["fit_rounds"] == [2, 5]
    assert {"rss_slope_mb_per_round", "fds_delta", "tmp_entries_delta", "children_delta"} <= set(
        verdict
    )
