"""``benchmarks/scale.py`` and ``benchmarks/communication.py`` keep running: ``--smoke --json``.

Only that each exits cleanly and writes every figure; timings and memory on a shared CPU are not
asserted. The byte counts are exact, so those are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CONFIG_KEYS = {
    "name",
    "engine",
    "configured",
    "per_round",
    "rounds",
    "peak_mb",
    "rss_ratio",
    "session_peak_mb",
    "round_s",
    "round_cpu_s",
    "client_round_s",
    "round_s_per_sampled",
    "first_round_s",
    "eval_s",
    "checkpoint_mb",
    "failed_clients",
    "round_details",
    "machine_load",
}


def run_smoke(script: str, tmp_path: Path, timeout: float) -> tuple[dict[str, Any], str]:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_scale_smoke(tmp_path: Path) -> None:
    figures, stdout = run_smoke("scale.py", tmp_path, timeout=600)
    assert set(figures) >= {"args", "machine", "configs", "fits", "checks"}
    names = [c["name"] for c in figures["configs"]]
    assert names == ["emb-3", "emb-12x3", "emb-12x6", "flower-4x2"]
    for config in figures["configs"]:
        assert set(config) >= CONFIG_KEYS, config["name"]
        assert config["failed_clients"] == 0
        assert len(config["round_details"]) == config["rounds"]
        assert all(r["clients"] == config["per_round"] for r in config["round_details"])
    assert set(figures["fits"]) == {
        f"round_{kind}_vs_{x}" for kind in ("s", "cpu_s") for x in ("sampled", "configured")
    }
    assert set(figures["fits"]["round_s_vs_sampled"]) == {"slope", "intercept", "r2", "n"}
    assert set(figures["checks"]) >= {"rss_ratio_max", "rss_ok", "flower_completed"}
    assert figures["checks"]["flower_completed"]
    for label in ("peak MB", "s/round", "s/client", "fit s/round vs clients sampled", "Flower 4"):
        assert label in stdout


def test_communication_smoke(tmp_path: Path) -> None:
    figures, stdout = run_smoke("communication.py", tmp_path, timeout=300)
    assert set(figures) >= {"args", "machine", "sizes", "runs", "effect", "machine_load"}
    (tiny,) = figures["sizes"]
    assert tiny["model"] == "tiny-random-qwen2"
    adapter = tiny["adapter_bytes"]
    assert adapter["float32"] == 4 * tiny["lora_params"]
    assert adapter["float16"] == adapter["bfloat16"] == adapter["float32"] // 2
    assert tiny["full_bytes"]["float32"] == 4 * tiny["params"]
    runs = figures["runs"]
    assert set(runs) == {"float32", "float16", "bfloat16", "float32-seed1"}
    for label, run in runs.items():
        expected = adapter[run["transport"]]
        assert run["bytes_down_per_client_round"] == [expected], label
        assert run["bytes_up_per_client_round"] == [expected], label
    assert figures["effect"]["float32"]["diff_norm"] == 0.0
    assert "1. per client per round" in stdout and "3. accuracy effect" in stdout
