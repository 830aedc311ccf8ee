"""The benchmark script keeps running: ``benchmarks/local_step.py --smoke`` end to end.

Only that it exits cleanly and prints every figure; timings on a shared CPU are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "local_step.py"
LABELS = (
    "command:",
    "machine:",
    "1. rollout generation",
    "sampling processors:",
    "ours/TRL tok/s (forced):",
    "ours/TRL tok/s (natural):",
    "2. GRPO step time split",
    "timing/generate",
    "timing/reward",
    "timing/forward_backward",
    "timing/optimizer",
    "step_time",
    "3. peak RSS",
    "peak RSS GRPO step",
    "peak RSS LoRA training",
    "peak RSS ratio step/LoRA:",
)


def test_smoke_run_prints_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [label for label in LABELS if label not in proc.stdout]
    assert not missing, f"missing {missing} in:\n{proc.stdout}"
    figures = json.loads(out.read_text())
    assert set(figures) >= {"machine", "generation", "step", "memory"}
    assert figures["memory"]["ratio_peak"] > 0
