"""``benchmarks/memory_vs_trl.py`` and ``benchmarks/roofline.py`` keep running: ``--smoke --json``.

Only that each exits cleanly and writes every figure; timings and memory on a shared CPU are not
asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(script: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_memory_vs_trl_smoke(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    figures = run_smoke("memory_vs_trl.py", tmp_path)
    assert set(figures) >= {
        "args",
        "machine",
        "machine_load",
        "ours",
        "trl",
        "trl-gc",
        "ratio_step_peak_vs_trl",
        "ratio_step_peak_vs_trl-gc",
        "ratio_process_peak_vs_trl",
        "no_reference_copy",
    }
    for side in ("ours", "trl", "trl-gc"):
        fig = figures[side]
        assert set(fig) >= {"setup", "end", "step_peak_mb", "weight_mb", "census_at_reference"}
        assert fig["setup"]["rss_mb"] > 0
        assert len(fig["census_at_reference"]) == figures["args"]["steps"]  # β > 0: one per step
    assert figures["no_reference_copy"] is True
    assert figures["ratio_process_peak_vs_trl"] > 0


def test_roofline_smoke(tmp_path: Path) -> None:
    figures = run_smoke("roofline.py", tmp_path)
    assert set(figures) >= {"args", "machine", "bandwidth", "decode", "bound_bandwidth"}
    assert {run["threads"] for run in figures["bandwidth"]["runs"]} >= {1}
    assert all(run["best_gb_s"] > 0 for run in figures["bandwidth"]["runs"])
    rows = figures["decode"]["rows"]
    assert {(r["variant"], r["batch"]) for r in rows} == {
        ("lora", 1),
        ("base", 1),
        ("lora", 4),
        ("base", 4),
    }
    for row in rows:
        assert set(row) >= {
            "decode_step_ms",
            "weight_mb",
            "kv_mb",
            "achieved_tok_s",
            "bound_tok_s",
            "fraction_of_bound",
        }
        assert row["bound_tok_s"] > 0
