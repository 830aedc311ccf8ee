"""``benchmarks/memory_vs_trl.py``, ``step_vs_trl.py`` and ``roofline.py`` keep running: ``--smoke --json``.

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

from conftest import needs_cxx

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(script: str, tmp_path: Path, options: list[str]) -> tuple[dict[str, Any], str]:
    """Run ``script`` with ``options`` and ``--json``; its figures and its printed report."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *options, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def run_smoke(script: str, tmp_path: Path, threads: bool = True) -> dict[str, Any]:
    return run_script(script, tmp_path, ["--smoke", *(["--threads", "1"] if threads else [])])[0]


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


def test_step_vs_trl_smoke_times_every_side_and_the_baseline_commit(tmp_path: Path) -> None:
    """Whole steps of ours, TRL and the commit before the speed work, each in its own process."""
    pytest.importorskip("trl")
    figures = run_smoke("step_vs_trl.py", tmp_path)
    sides = set(figures["sides"])
    assert {"ours", "trl", "ours-gc", "trl-gc"} <= sides
    if "baseline_skipped" not in figures:  # a clone without the baseline commit says why
        assert {"base", "base-gc"} <= sides
        assert figures["fedmoa_paths"]["base"] != figures["fedmoa_paths"]["ours"]
        assert figures["ours/base"]["throughput"] > 0
    samples = figures["samples_per_step"]
    for side, fig in figures["sides"].items():
        assert fig["steps"] == figures["args"]["steps"], side
        assert fig["samples_per_s"] == pytest.approx(samples / fig["step_s_median"])
        assert fig["cpu_s_per_sample"] > 0 and fig["peak_mb"] > 0
        # EOS masked while sampling: every side decodes max_new_tokens every step.
        assert fig["widths"] == [figures["args"]["max_new_tokens"]], side
    assert {"throughput", "cpu_per_sample", "peak_rss"} <= set(figures["ours/trl"])


@needs_cxx
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
    compiled = figures["compiled"]["rows"]
    assert [r["batch"] for r in compiled] == [1, 4]
    for row in compiled:
        assert row["cold_first_call_s"] > 0 and row["warm_first_call_s"] > 0
        assert row["eager_step_ms"] > 0 and row["compiled_step_ms"] > 0 and row["speedup"] > 0


BASE_EXPERIMENT = """
seed = 4
[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"
[server]
method = "local"
rounds = 1
validation_prompts = 2
test_prompts = 3
[client_defaults]
grpo = { batch_size = 2, group_size = 2, max_new_tokens = 5, lr = 0.05 }
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 20 }
rewards = [
  { name = "brevity", function = "length", role = "primary", params = { target = 3 } },
  { name = "boxed", function = "format", weight = 0.5 },
]
[[clients]]
id = "a"
task = "sums"
[[clients]]
id = "b"
task = "chains"
data = { name = "chain_sum", seed = 3 }
"""


def test_base_accuracy_matches_a_run_whose_global_adapter_never_moves(tmp_path: Path) -> None:
    """``local`` leaves the global adapter at its initial value (the base model), so the
    script's figures must equal that run's global evaluation, row for row."""
    from fedmoa.federation.config import load_experiment
    from fedmoa.federation.embedded import EmbeddedFederation
    from fedmoa.runs import RunDirectory

    experiment = tmp_path / "experiment.toml"
    experiment.write_text(BASE_EXPERIMENT)
    federation = EmbeddedFederation(load_experiment(experiment), RunDirectory(tmp_path / "run"))
    federation.run_rounds()
    record = next(r for r in federation.run.read_metrics() if r["type"] == "eval")
    out = tmp_path / "base.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "base_accuracy.py"), str(experiment), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = json.loads(out.read_text())
    global_keys = {k for k in record if k.startswith("global/")}
    assert {"global/a/rewards/brevity", "global/b/accuracy", "global/accuracy"} <= global_keys
    assert {k: base[k] for k in global_keys} == {k: record[k] for k in global_keys}
    assert base["global/accuracy"] > 0  # the brevity primary scores a random model's text


def test_weighting_behaviour_smoke_runs_every_method_and_scenario_and_resumes(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        str(BENCHMARKS / "weighting_behaviour.py"),
        "--smoke",
        "--threads",
        "1",
        "--out",
        str(runs),
        "--json",
        str(tmp_path / "figures.json"),
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    methods = ("static", "cosine", "persistent", "saw", "variance")
    scenarios = ("saturating", "noise", "conflict")
    assert set(figures["summary"]) == {f"{s}/{m}" for s in scenarios for m in methods}
    assert len(figures["runs"]) == 15 and (runs / "weights.png").stat().st_size > 0
    for run in figures["runs"]:
        assert len(run["steps"]) == figures["args"]["steps"]
        assert all(f"weights/{n}" in run["steps"][-1] for n in run["names"])
    static = figures["summary"]["noise/static"]["runs"][0]["final_weights"]
    assert static == {"accuracy": 0.5, "noise": 0.5}
    assert "target met" in first.stdout and "trajectories" in first.stdout
    # Finished runs are read back, not run again: the second call gives the same figures.
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "figures.json").read_text())
    assert again["summary"] == figures["summary"]


def test_aggregation_noise_smoke_prints_every_rule_and_the_bound(tmp_path: Path) -> None:
    figures = run_smoke("aggregation_noise.py", tmp_path, threads=False)  # no torch compute
    cells = figures["cells"]
    rules = {c["rule"] for c in cells}
    assert rules == {
        "softmax",
        "noise-aware ρ=0",
        "noise-aware ρ=0.5",
        "gain ρ=0",
        "gain ρ=0.5",
        "gain ρ=0.5 z=2.33",
        "gain ρ=0.5 z=2.33 record",
        "gain ρ=0.5 z=2.33 either",
    }
    assert {c["V"] for c in cells} == {4, 8, 16} and {c["rounds"] for c in cells} == {1, 6}
    for c in cells:
        for key in ("equal_in_band", "worse_below_peers", "easier_below_peers"):
            assert 0 <= c[key] <= 1
    # What the rules are for (200 draws: each gap is many standard errors wide): equal clients
    # stay near an equal split far more often than under the paper's rule, at every V; and a
    # useless update validated on an easier set is ranked below its peers only by the gain.
    for v in (4, 8, 16):
        at = {c["rule"]: c for c in cells if c["V"] == v and c["rounds"] == 6}
        assert at["noise-aware ρ=0.5"]["equal_in_band"] > at["softmax"]["equal_in_band"] + 0.4
        assert at["gain ρ=0.5"]["equal_in_band"] > at["softmax"]["equal_in_band"] + 0.4
    at16 = {c["rule"]: c for c in cells if c["V"] == 16 and c["rounds"] == 6}
    assert (
        at16["gain ρ=0.5"]["easier_below_peers"]
        > 0.8
        > 0.5
        > at16["noise-aware ρ=0.5"]["easier_below_peers"]
    )
    # The harm test: a collapsed update (every right answer turned wrong) keeps about a third of
    # its task under the tempered weights alone. At V = 16 one round's pairs catch it in about
    # a third of draws; the record, pooling six rounds of collapses, in most, but never one that
    # follows good rounds (late); either test catches both. Equal clients are never excluded,
    # nor a recovered client's good update.
    plain, now, record, either = (
        at16[f"gain ρ=0.5{read}"] for read in ("", " z=2.33", " z=2.33 record", " z=2.33 either")
    )
    assert plain["collapsed_mean_share"] > 0.2 and plain["collapsed_excluded"] == 0
    assert record["collapsed_excluded"] > 0.7 and either["collapsed_excluded"] > 0.7
    assert record["collapsed_mean_share"] < 0.1
    assert record["late_excluded"] < 0.05 < 0.15 < now["late_excluded"]
    assert either["late_excluded"] > 0.15
    assert all(c["equal_excluded"] == 0 and c["recovered_excluded"] < 0.05 for c in cells)


def test_reward_hacking_smoke_scores_every_case_and_task_twice(tmp_path: Path) -> None:
    figures = run_smoke("reward_hacking.py", tmp_path)
    runs = figures["runs"]
    assert {(r["case"], r["task"]) for r in runs} == {
        (case, task)
        for case in ("math-strict", "math-lenient", "format-boxed", "format-marker", "length")
        for task in ("sums", "chains")
    }
    for run in runs:
        for phase in ("before", "after"):
            scores = run[phase]
            assert len(scores["rows"]) == figures["args"]["test_prompts"]
            gap = 100 * (scores["verifier"] - scores["reference"])
            assert scores["gap_points"] == pytest.approx(gap)


def test_reward_hacking_references_check_what_the_verifiers_promise() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import reward_hacking as rh

    assert rh.exact_final_number("The answer is 6.", "6") == 1.0
    assert rh.exact_final_number("The answer is -1 + 7", "6") == 0.0
    assert rh.exact_final_number("2 - 9 = \u22127", "-7") == 1.0
    assert rh.exact_final_number("The answer is 1,000", "1000") == 1.0
    assert rh.has_closed_boxed(r"so \boxed{7}") == 1.0
    assert rh.has_closed_boxed(r"\boxed{ } and \boxed{7") == 0.0
    assert rh.has_closed_boxed(r"\boxed{\frac{1}{2}} then \boxed{") == 1.0
    assert rh.has_marker_line("The answer is 7") == 1.0
    assert rh.has_marker_line("The answer is\n7") == 0.0
    assert [rh.linear_length(n) for n in (8, 12, 16, 30)] == [1.0, 0.5, 0.0, 0.0]


def test_logprob_memory_runs_both_settings_and_they_agree(tmp_path: Path) -> None:
    figures, stdout = run_script(
        "logprob_memory.py",
        tmp_path,
        [
            *("--model", "tiny-random-qwen2", "--dtype", "fp32", "--sequences", "2"),
            *("--completion-tokens", "6", "--chunk", "4", "--micro", "1", "--threads", "1"),
        ],
    )
    assert figures["whole"]["chunk"] == 0 and figures["chunked"]["chunk"] == 4
    assert figures["micro"]["micro_batch_size"] == 1 and figures["micro_chunked"]["chunk"] == 4
    assert figures["max_logp_difference"] <= 1e-5
    assert figures["grad_norm_relative_difference"] <= 1e-5
    assert "peak ratio whole/chunked" in stdout


@needs_cxx
def test_prompt_once_times_both_sides_and_they_agree(tmp_path: Path) -> None:
    figures, stdout = run_script(
        "prompt_once.py",
        tmp_path,
        ["--smoke", "--compiled", "--dtype", "fp32", "--threads", "1"],
    )
    for side in ("whole", "prompt_once"):
        assert len(figures[side]["wall_s"]) == figures["args"]["repeats"]
        assert figures[side]["median_wall_s"] > 0
    assert figures["ratio_wall_whole_over_prompt_once"] > 0
    assert figures["max_logp_difference"] <= 1e-5
    assert figures["grad_relative_difference"] <= 1e-5
    assert "ratio whole/prompt_once" in stdout
    assert figures["compiled"]["first_call_s"] > 0 and figures["ratio_wall_whole_over_compiled"] > 0
    assert figures["compiled_max_logp_difference"] <= 1e-4


@needs_cxx
def test_learning_speed_smoke(tmp_path: Path) -> None:
    figures = run_smoke("learning_speed.py", tmp_path)
    runs = {run["variant"]: run for run in figures["runs"]}
    assert set(runs) == {"plain", "prompt-once", "compiled"}
    assert runs["compiled"]["decode_used"] == "compiled"
    for run in runs.values():
        assert run["train_seconds"] > 0 and len(run["train_reward"]) == figures["args"]["steps"]
        assert set(run["median_split_s"]) == {"generate", "forward_backward", "rest"}
        assert 0 <= run["test_verifier"] <= 1


def test_privacy_cost_smoke_times_every_part_against_the_aggregation(tmp_path: Path) -> None:
    figures = run_smoke("privacy_cost.py", tmp_path)
    assert set(figures["timings"]) == {
        "aggregate (FedAvg, reference)",
        "clip one update",
        "noise one aggregate",
        "accountant step + ε",
    }
    assert all(t > 0 for t in figures["timings"].values())
    assert figures["ratio"] == pytest.approx(
        figures["server_added"] / figures["timings"]["aggregate (FedAvg, reference)"]
    )
    assert figures["bytes_per_update"] == 4 * figures["parameters"]  # float32 on the wire


def test_harm_replay_reads_each_rounds_own_pairs_back_from_the_records(tmp_path: Path) -> None:
    """The fresh collapse of tests/test_harm_test.py as a finished run: round 1 gains 8 of 32,
    round 2 turns 13 of 22 right answers wrong. Its own pairs: z = -3.59; the record: -1.78."""
    import torch

    from fedmoa.aggregation import ClientUpdate, accumulate_gain_evidence

    run = tmp_path / "runs" / "fedmoa-seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "resolved_config.json").write_text(json.dumps({"server": {"accuracy_memory": 0.5}}))
    rounds = [
        [(0.0, 1.0)] * 8 + [(1.0, 1.0)] * 16 + [(0.0, 0.0)] * 8,
        [(1.0, 0.0)] * 13 + [(1.0, 1.0)] * 9 + [(0.0, 0.0)] * 10,
    ]
    records: dict[str, Any] = {}
    metrics = []
    for number, outcomes in enumerate(rounds, start=1):
        pairs = tuple((row, b, a) for row, (b, a) in enumerate(outcomes))
        update = ClientUpdate("a", "t", 8, {}, 0.0, {}, 32, pairs)
        records = accumulate_gain_evidence(records, [update], 0.5)
        before, after = (sum(o[i] for o in outcomes) / 32 for i in (0, 1))
        metrics.append(
            {"round": number, "client": "a", "accuracy_before": before, "accuracy": after,
             "validation_pairs": 32}
        )  # fmt: skip
        state = {"gain_evidence": {"a": [[r, *v] for r, v in records["a"].rows.items()]}}
        torch.save({"completed_round": number, "server": state},
                   run / "checkpoints" / f"round-{number:04d}.pt")  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    figures, report = run_script("harm_replay.py", tmp_path, [str(run)])
    first, second = figures["updates"]
    assert first["z_round"] == pytest.approx(first["z_record"])  # round 1: the record is its pairs
    assert not first["excluded_either"]
    assert second["pairs"] == pytest.approx(32)
    assert second["z_round"] == pytest.approx(-3.59, abs=0.01)
    assert second["z_record"] == pytest.approx(-1.78, abs=0.01)
    assert (second["excluded_round"], second["excluded_record"], second["excluded_either"]) == (
        True, False, True,
    )  # fmt: skip
    assert figures["excluded"] == {"round": 1, "record": 0, "either": 1}
    assert "runs/fedmoa-seed0" in report
