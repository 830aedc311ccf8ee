"""``benchmarks/hypergradient_overhead.py --smoke`` runs end to end and reports every figure.

Only that it exits cleanly and writes every variant and ratio; timings on a shared CPU are not
asserted (docs/performance.md has the measured figures).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hypergradient_overhead.py"
VARIANTS = {
    f"{m}obj/{kind}"
    for m in (2, 4)
    for kind in ("static", "cosine-last2", "persistent-last2", "persistent-all")
}
FIGURES = {"step_s", "step_cpu_s", "train_s", "train_cpu_s", "weighting_s", "weighting_cpu_s"}
RATIOS = {"step_wall", "step_cpu", "train_wall", "train_cpu", "overhead_wall", "overhead_cpu"}
LABELS = ("command:", "machine:", "machine load", "per variant", "vs static", "target")


def test_smoke_run_reports_every_variant_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [label for label in LABELS if label not in proc.stdout]
    assert not missing, f"missing {missing} in:\n{proc.stdout}"
    figures = json.loads(out.read_text())
    assert {"machine", "machine_load", "same_completions", "variants", "steps"} <= figures.keys()
    assert figures["variants"].keys() == VARIANTS
    for name, variant in figures["variants"].items():
        assert variant.keys() >= FIGURES, name
        assert variant["ratio"].keys() == RATIOS, name
        assert all(math.isfinite(v) and v >= 0 for v in variant["ratio"].values()), name
        assert name in proc.stdout
    # Every variant sampled the same completions, so the ratios compare like with like.
    assert figures["same_completions"] is True
