"""Evaluation-only checks (``[[clients]] checks``) and the report's check and recovery tables.

A check scores the same greedy test completions as the objectives and is never trained on, so a
verifier's accuracy can be read beside an independent check of the same answers (issue 26).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from fedmoa.errors import ConfigError
from fedmoa.federation.config import load_experiment
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.federation.evaluation import aggregate_evaluation
from fedmoa.report import load_run, write_report
from fedmoa.runs import RunDirectory
from test_embedded import run_embedded, write_experiment
from test_report import RUNS, section_table, table_rows

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CHECK = """
def said_seven(prompts, completions, **kwargs):
    return [float("7" in c[0]["content"]) for c in completions]
"""


def with_checks(tmp_path: Path, checks: str) -> Path:
    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    (tmp_path / "checks.py").write_text(CHECK)
    text = config.read_text().replace("[client_defaults]", f"[client_defaults]\n{checks}", 1)
    config.write_text(text)
    return config


def test_a_check_is_scored_at_evaluation_and_never_trained_on(tmp_path):
    config = with_checks(
        tmp_path, 'checks = [{ name = "seven", function = "checks.py:said_seven" }]'
    )
    federation, _ = run_embedded(config, tmp_path / "run")
    records = federation.run.read_metrics()
    for record in (r for r in records if r["type"] == "client"):
        assert not any("seven" in key for key in record), record  # no training signal
    final = [r for r in records if r["type"] == "eval"][-1]
    for cid in ("math-a", "math-b", "chain"):
        assert 0.0 <= final[f"global/{cid}/checks/seven"] <= 1.0
        assert f"global/{cid}/rewards/seven" not in final
        # The hypervolume is over the objectives only.
        means = [v for k, v in final.items() if k.startswith(f"personal/{cid}/rewards/")]
        assert final[f"personal/{cid}/hypervolume"] == pytest.approx(
            math.prod(max(v, 0.0) for v in means)
        )
    math_task = statistics.fmean(final[f"global/{c}/checks/seven"] for c in ("math-a", "math-b"))
    assert final["global/math/checks/seven"] == pytest.approx(math_task)
    assert final["global/checks/seven"] == pytest.approx(
        (math_task + final["global/chain/checks/seven"]) / 2
    )
    assert "personal/checks/seven" in final


def test_checks_combine_like_accuracy_over_the_clients_that_have_them():
    scores = {
        "a": {"test_size/a": 2.0, "global/a/accuracy": 0.5, "global/a/checks/x": 1.0},
        "b": {"test_size/b": 6.0, "global/b/accuracy": 0.0, "global/b/checks/x": 0.5},
        "c": {"test_size/c": 4.0, "global/c/accuracy": 1.0},
    }
    out = aggregate_evaluation(scores, {"a": "t", "b": "t", "c": "u"})
    assert out["global/t/checks/x"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    assert "global/u/checks/x" not in out
    assert out["global/checks/x"] == pytest.approx(out["global/t/checks/x"])  # the one task
    assert out["global/accuracy"] == pytest.approx(((2 * 0.5) / 8 + 1.0) / 2)


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ('checks = [{ name = "x", function = "checks.py:nope" }]', "checks[0].function"),
        (
            'checks = [{ name = "x", function = "length" }, { name = "x", function = "format" }]',
            "check names must be unique",
        ),
        ('checks = [{ name = "x", function = "length", weight = 1 }]', "weight"),
    ],
)
def test_a_bad_check_is_one_line_naming_it(tmp_path, checks, expected):
    with pytest.raises(ConfigError) as info:
        EmbeddedFederation(load_experiment(with_checks(tmp_path, checks)), RunDirectory(tmp_path))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_study_check_reads_the_last_number_exactly():
    sys.path.insert(0, str(BENCHMARKS))
    from study_rewards import exact_number

    completions = [
        [{"role": "assistant", "content": text}]
        for text in ("The answer is 6.", "The answer is -1 + 7", "2 - 9 = \u22127", "seven")
    ]
    assert exact_number([""] * 4, completions, ["6", "6", "-7", "7"]) == [1.0, 0.0, 1.0, 0.0]


def test_the_study_code_check_runs_the_asserts_in_human_evals_harness():
    sys.path.insert(0, str(BENCHMARKS))
    from study_rewards import passes_tests

    tests = ["assert f(1) == 8", "assert f(-3) == 4"]
    completions = [
        [{"role": "assistant", "content": text}]
        for text in (
            "```python\ndef f(x):\n    return x + 7\n```\nIt adds seven.",
            "```python\ndef f(x):\n    return x + 6\n```",
            "def f(x):\n    return 7 + x",
            "```python\ndef g(x):\n    return x + 7\n```",
            "```python\ndef f(x):\n    while True:\n        pass\n```",
        )
    ]
    assert passes_tests([""] * 5, completions, [tests] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_explaining_is_scored_on_prose_outside_code_only():
    sys.path.insert(0, str(BENCHMARKS))
    from study_rewards import explained

    completions = [
        [{"role": "assistant", "content": text}]
        for text in (
            "```python\ndef f(x):\n    return one two three four\n```",
            "Adds three to x, as asked:\n```python\ndef f(x):\n    return x + 3",
            " ".join(["word"] * 30),
        )
    ]
    assert explained([""] * 3, completions, words=12) == [0.0, 6 / 12, 1.0]


def fake_runs(tmp_path: Path) -> list[Path]:
    """The recorded fedmoa and fedavg runs (seeds 0, 1), a fedavg-primary copy of fedavg 0.1
    above it, and a check beside every global accuracy."""
    runs = []
    for name in ("fedmoa-s0", "fedmoa-s1", "fedavg-s0", "fedavg-s1"):
        runs.append(tmp_path / name)
        shutil.copytree(RUNS / name, runs[-1])
    for seed in (0, 1):
        reference = tmp_path / f"fedavg-primary-s{seed}"
        shutil.copytree(RUNS / f"fedavg-s{seed}", reference)
        summary = json.loads((reference / "summary.json").read_text())
        summary["method"] = "fedavg-primary"
        for name in ("config.toml", "resolved_config.json"):
            text = (reference / name).read_text()
            (reference / name).write_text(text.replace('"fedavg"', '"fedavg-primary"'))
        summary["final_eval"]["global/accuracy"] += 0.1
        (reference / "summary.json").write_text(json.dumps(summary))
        runs.append(reference)
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        final = summary["final_eval"]
        final["global/checks/exact"] = final["global/accuracy"] - 0.25
        (run / "summary.json").write_text(json.dumps(summary))
    return runs


def test_the_report_shows_checks_and_how_much_of_the_gap_a_method_recovers(tmp_path):
    runs = fake_runs(tmp_path)
    report = write_report(runs, tmp_path / "report")
    markdown = report.markdown.read_text()
    finals = {r.name: load_run(r).final_global_accuracy for r in runs}
    row = table_rows(markdown)["fedmoa"]
    expected = [finals["fedmoa-s0"] - 0.25, finals["fedmoa-s1"] - 0.25]
    assert row["final global acc (exact)"] == (
        f"{statistics.mean(expected):.3f} ± {statistics.stdev(expected):.3f}"
    )
    assert "never trained on" in markdown
    gained = [finals[f"fedmoa-s{s}"] - finals[f"fedavg-s{s}"] for s in (0, 1)]
    recovery = section_table(markdown, "## Comparison", index=2)["fedmoa"]
    assert recovery["fedavg-primary − fedavg [95% CI]"].startswith("+0.100")
    assert recovery["recovered"] == f"{statistics.mean(gained) / 0.1:.0%}"
    assert recovery["over half [95% CI]"].startswith(f"{statistics.mean(gained) - 0.05:+.3f}")
    paired = section_table(markdown, "## Comparison", index=1)["fedmoa"]
    assert paired["Δ global (exact) vs fedavg [95% CI]"].startswith(
        f"{statistics.mean(gained):+.3f}"
    )
