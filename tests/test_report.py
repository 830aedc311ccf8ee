"""``fedmoa report`` on recorded tiny runs: files, figures, the seed statistics, bad inputs.

The expected numbers are recomputed here from the fixture's ``summary.json`` files with
``statistics``, not with the report's own aggregation code.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.report import Stat, load_run, summarize, write_report
from fedmoa.report.aggregate import delta

RUNS = Path(__file__).resolve().parent / "data" / "report_runs"
RUN_DIRS = [RUNS / name for name in ("fedmoa-s0", "fedmoa-s1", "fedavg-s0", "fedavg-s1")]
FIGURES = [
    "accuracy.png",
    "accuracy-tasks.png",
    "weights-fedmoa.png",
    "weights-fedavg.png",
    "rewards-fedmoa.png",
    "rewards-fedavg.png",
    "shares-fedmoa.png",
    "shares-fedavg.png",
    "communication.png",
]


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def expected_by_method() -> dict[str, dict[str, list[float]]]:
    """Per method: final global/personalized accuracy and bytes per round, one value per seed."""
    out: dict[str, dict[str, list[float]]] = {}
    for run in RUN_DIRS:
        summary = json.loads((run / "summary.json").read_text())
        values = out.setdefault(
            summary["method"], {"global": [], "personal": [], "up": [], "hypervolume": []}
        )
        final = summary["final_eval"]
        values["global"].append(final["global/accuracy"])
        values["personal"].append(final["personal/accuracy"])
        values["hypervolume"].append(personal_hypervolume(final))
        values["up"].append(summary["bytes_up"] / summary["rounds"] / 1024)
    return out


def personal_hypervolume(final: dict[str, float]) -> float:
    """Mean over clients of prod(max(r, 0)) of the personalized reward means (the recorded runs
    predate the logged value, so the report computes it the same way)."""
    per_client: dict[str, list[float]] = {}
    for key, value in final.items():
        parts = key.split("/")
        if parts[0] == "personal" and len(parts) == 4 and parts[2] == "rewards":
            per_client.setdefault(parts[1], []).append(value)
    return statistics.mean(math.prod(max(v, 0.0) for v in vs) for vs in per_client.values())


def mean_std(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The comparison table (the Comparison section's first table), as method -> cells."""
    return section_table(markdown, "## Comparison")


def section_table(markdown: str, heading: str, index: int = 0) -> dict[str, dict[str, str]]:
    """The ``index``-th table under ``heading``, as first cell -> {header: cell}."""
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith("| "):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    lines = tables[index]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:  # after the header and the alignment rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    result = run_cli("report", *RUN_DIRS, "--output", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_report_writes_markdown_html_and_valid_pngs(rendered):
    out, stdout = rendered
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    for name in FIGURES:
        path = out / name
        assert path.is_file(), name
        assert path.stat().st_size > 5_000, name  # a blank canvas compresses to far less
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 200
            image.verify()
    markdown = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in markdown  # relative links next to report.md
    assert str(out / "report.md") in stdout and str(out / "report.html") in stdout


def test_html_is_standalone(rendered):
    out, _ = rendered
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert 'src="accuracy.png"' not in page


def test_table_has_mean_and_std_over_seeds(rendered):
    out, stdout = rendered
    rows = table_rows((out / "report.md").read_text())
    expected = expected_by_method()
    assert set(rows) == set(expected) == {"fedmoa", "fedavg"}
    for method, values in expected.items():
        row = rows[method]
        assert row["seeds"] == "2 (0, 1)"
        assert row["final global acc"] == mean_std(values["global"])
        assert row["final personalized acc"] == mean_std(values["personal"])
        assert row["KiB up/round"] == mean_std(values["up"], 1)
        assert row["final hypervolume"] == mean_std(values["hypervolume"])
        assert row["final local-model acc"] == "-"  # recorded before local models were scored
        assert method in stdout
    # Δ vs fedavg: difference of the seed means, ± the standard error of that difference.
    moa, avg = expected["fedmoa"]["global"], expected["fedavg"]["global"]
    diff = statistics.mean(moa) - statistics.mean(avg)
    se = math.sqrt(statistics.variance(moa) / 2 + statistics.variance(avg) / 2)
    assert rows["fedmoa"]["Δ global vs fedavg"].startswith(f"{diff:+.3f} ± {se:.3f}")
    assert rows["fedavg"]["Δ global vs fedavg"] == "reference"


def test_load_run_reads_trajectories_from_metrics():
    run = load_run(RUNS / "fedmoa-s1")
    records = [json.loads(line) for line in (RUNS / "fedmoa-s1" / "metrics.jsonl").open()]
    first = next(r for r in records if r["type"] == "client" and r["client"] == "arith-boxed")
    assert (run.method, run.seed, run.rounds) == ("fedmoa", 1, 3)
    assert run.clients == {
        "arith-boxed": "arithmetic",
        "arith-strict": "arithmetic",
        "chain": "chain",
    }
    assert run.primary["arith-strict"] == "digits"
    assert set(run.weights["arith-boxed"]) == {"letters", "accuracy", "digits"}
    assert run.weights["arith-boxed"]["letters"][1] == first["weights/letters"]
    assert run.rewards["arith-boxed"]["digits"][1] == first["rewards/digits/mean"]
    assert sorted(run.global_accuracy) == [1, 2, 3]
    assert set(run.client_accuracy) == set(run.clients)
    assert set(run.task_accuracy) == {"arithmetic", "chain"}
    rounds = [r for r in records if r["type"] == "round"]
    assert run.bytes_up == {r["round"]: r["bytes_up"] for r in rounds}


def test_stat_and_delta():
    assert Stat.of([]).fmt() == "-"
    one = Stat.of([0.5, math.nan])
    assert (one.n, one.fmt()) == (1, "0.500")
    two = Stat.of([0.25, 0.75])
    assert two.fmt() == f"0.500 ± {statistics.stdev([0.25, 0.75]):.3f}"
    assert delta(two, one).fmt() == "+0.000 (no spread)"
    assert "within noise" in delta(two, Stat.of([0.5, 0.6])).fmt()


def test_single_run(tmp_path):
    result = run_cli("report", RUNS / "fedmoa-s0", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report.md").read_text()
    row = table_rows(markdown)["fedmoa"]
    summary = json.loads((RUNS / "fedmoa-s0" / "summary.json").read_text())
    assert row["seeds"] == "1 (0)"
    assert row["final global acc"] == f"{summary['final_eval']['global/accuracy']:.3f}"
    assert "Δ global vs fedavg" not in row and "No fedavg run" in markdown
    assert (tmp_path / "weights-fedmoa.png").is_file()


def test_logged_local_model_accuracy_and_hypervolume_are_used(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "fedmoa-s0", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["final_eval"].update({"local_model/accuracy": 0.625, "personal/hypervolume": 0.125})
    (run / "summary.json").write_text(json.dumps(summary))
    record = load_run(run)
    assert (record.final_local_model_accuracy, record.final_hypervolume) == (0.625, 0.125)
    row = table_rows(write_report([run], tmp_path / "out").markdown.read_text())["fedmoa"]
    assert (row["final local-model acc"], row["final hypervolume"]) == ("0.625", "0.125")


def test_default_output_and_config_fallbacks(tmp_path):
    """report/ lands next to the runs; without resolved_config.json the TOML (or, without
    any config, summary.json) names the method."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    shutil.copytree(RUNS / "fedavg-s1", a)
    shutil.copytree(RUNS / "fedmoa-s1", b)
    (a / "resolved_config.json").unlink()
    (b / "resolved_config.json").unlink()
    (b / "config.toml").unlink()
    assert (load_run(a).method, load_run(a).seed) == ("fedavg", 1)
    assert load_run(b).method == "fedmoa"
    report = write_report([a, b])
    assert report.output == tmp_path / "runs" / "report"
    assert report.markdown.is_file()
    assert [s.method for s in summarize(report.runs)] == ["fedavg", "fedmoa"]


def test_text_is_escaped_in_html(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "fedmoa-s0", run)
    config = json.loads((run / "resolved_config.json").read_text())
    config["server"]["method"] = "<b>x&y</b>"
    (run / "resolved_config.json").write_text(json.dumps(config))
    report = write_report([run], tmp_path / "out")
    page = report.html.read_text()
    assert "&lt;b&gt;x&amp;y&lt;/b&gt;" in page and "<b>x&y</b>" not in page


def assert_one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    for text in expected:
        assert text in message, message


def test_missing_run_directory(tmp_path):
    missing = tmp_path / "absent"
    assert_one_line_error(run_cli("report", missing), "not found", str(missing))


def test_directory_without_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        run_cli("report", RUNS / "fedmoa-s0", tmp_path / "empty", "-o", tmp_path / "out"),
        str(tmp_path / "empty" / "metrics.jsonl"),
    )
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize(
    "bad_line", ['{"type": "client", "round": 2, "client"', "[1, 2]", '{"type": "eval"}']
)
def test_malformed_metrics_line(tmp_path, bad_line):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "fedavg-s0", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = bad_line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert_one_line_error(
        run_cli("report", run, "-o", tmp_path / "out"), f"{run / 'metrics.jsonl'} line 3"
    )


def test_malformed_summary(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUNS / "fedavg-s0", run)
    (run / "summary.json").write_text("{")
    assert_one_line_error(run_cli("report", run), str(run / "summary.json"))


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    from scipy import stats

    from fedmoa.report.aggregate import paired_difference

    a = {0: 0.50, 1: 0.62, 2: 0.55, 3: 0.71, 4: 0.48}
    b = {0: 0.47, 1: 0.55, 2: 0.56, 3: 0.63, 4: 0.41, 9: 0.9}  # seed 9 has no pair
    result = paired_difference(a, b)
    seeds = sorted(a)
    reference = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    interval = reference.confidence_interval(0.95)
    assert result.n == 5
    assert result.mean == pytest.approx(statistics.mean(a[s] - b[s] for s in seeds), rel=1e-12)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert result.fmt() == f"{result.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
    assert paired_difference({0: 0.5}, {0: 0.25}).fmt() == "+0.250 (one pair)"
    assert paired_difference({0: 0.5}, {1: 0.25}).fmt() == "-"


def test_paired_table_differences_seed_by_seed(rendered):
    from scipy import stats

    out, _ = rendered
    rows = section_table((out / "report.md").read_text(), "## Comparison", index=1)
    assert set(rows) == {"fedmoa"}  # fedavg is the reference, not a row
    expected = expected_by_method()
    for name, key in (("global", "global"), ("personalized", "personal")):
        moa, avg = expected["fedmoa"][key], expected["fedavg"][key]  # seeds 0, 1 in order
        interval = stats.ttest_rel(moa, avg).confidence_interval(0.95)
        diff = statistics.mean(m - a for m, a in zip(moa, avg, strict=True))
        cell = rows["fedmoa"][f"Δ {name} vs fedavg [95% CI]"]
        assert cell == f"{diff:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
    assert rows["fedmoa"]["pairs"] == "2"


def test_base_and_gain_come_from_round_zero(tmp_path):
    runs = []
    for name in ("fedmoa-s0", "fedmoa-s1"):
        shutil.copytree(RUNS / name, tmp_path / name)
        metrics = tmp_path / name / "metrics.jsonl"
        base = {"type": "eval", "round": 0, "global/accuracy": 0.125, "personal/accuracy": 0.125}
        metrics.write_text(json.dumps(base) + "\n" + metrics.read_text())
        runs.append(tmp_path / name)
    report = write_report(runs, tmp_path / "report")
    row = table_rows(report.markdown.read_text())["fedmoa"]
    finals = [load_run(r).final_global_accuracy for r in runs]
    assert row["base global acc"] == "0.125 ± 0.000"
    assert row["gain global"] == mean_std([f - 0.125 for f in finals])
    assert load_run(runs[0]).global_accuracy[0] == 0.125  # round 0 is on the curves too
    # Without a round-0 record there is no base and no gain.
    plain = table_rows(write_report([RUNS / "fedmoa-s0"], tmp_path / "plain").markdown.read_text())
    assert plain["fedmoa"]["base global acc"] == "-" and plain["fedmoa"]["gain global"] == "-"


def test_shares_come_from_the_round_records():
    run = load_run(RUNS / "fedmoa-s1")
    records = [json.loads(line) for line in (RUNS / "fedmoa-s1" / "metrics.jsonl").open()]
    rounds = [r for r in records if r["type"] == "round"]
    assert rounds and run.shares
    for record in rounds:
        for client, weight in record["client_weights"].items():
            assert run.shares[client][record["round"]] == weight


def raw_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").open() if line.strip()]


def test_per_task_table_pairs_each_task_seed_by_seed(rendered):
    from scipy import stats

    out, _ = rendered
    rows = section_table((out / "report.md").read_text(), "## Per task and per client")
    finals: dict[tuple[str, str], list[float]] = {}  # (method, task) -> per seed 0, 1
    for run in RUN_DIRS:
        method = json.loads((run / "summary.json").read_text())["method"]
        last = [r for r in raw_records(run) if r["type"] == "eval"][-1]
        for task in ("arithmetic", "chain"):
            finals.setdefault((method, task), []).append(last[f"global/{task}/accuracy"])
    for task in ("arithmetic", "chain"):
        avg, moa = finals["fedavg", task], finals["fedmoa", task]
        assert rows[f"fedavg / {task}"]["final global acc"] == mean_std(avg)
        assert rows[f"fedavg / {task}"]["Δ vs fedavg [95% CI]"] == "reference"
        assert rows[f"fedmoa / {task}"]["base global acc"] == "-"  # no round-0 record
        diffs = [m - a for m, a in zip(moa, avg, strict=True)]
        cell = rows[f"fedmoa / {task}"]["Δ vs fedavg [95% CI]"]
        if statistics.stdev(diffs) == 0:
            assert cell.startswith(f"{statistics.mean(diffs):+.3f} [")
        else:
            interval = stats.ttest_rel(moa, avg).confidence_interval(0.95)
            expected = f"{statistics.mean(diffs):+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"
            assert cell == expected


def test_per_client_table_shows_weights_and_shares(rendered):
    out, _ = rendered
    rows = section_table((out / "report.md").read_text(), "## Per task and per client", index=1)
    primary = {"arith-boxed": "letters", "arith-strict": "digits", "chain": "letters"}
    runs = [RUNS / "fedmoa-s0", RUNS / "fedmoa-s1"]
    for client, objective in primary.items():
        first, last, shares = [], [], []
        for run in runs:
            records = raw_records(run)
            weights = [
                r[f"weights/{objective}"]
                for r in records
                if r["type"] == "client" and r["client"] == client
            ]
            first.append(weights[0])
            last.append(weights[-1])
            per_round = [r["client_weights"][client] for r in records if r["type"] == "round"]
            shares.append(statistics.fmean(per_round))
        row = rows[f"fedmoa / {client}"]
        assert row["primary weight, round 1"] == mean_std(first)
        assert row["primary weight, last"] == mean_std(last)
        assert row["share of global update"] == mean_std(shares)
    assert set(rows) == {f"{m} / {c}" for m in ("fedmoa", "fedavg") for c in primary}


def test_breakdown_base_comes_from_round_zero(tmp_path):
    from fedmoa.report.aggregate import client_breakdown, task_breakdown

    shutil.copytree(RUNS / "fedmoa-s0", tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    base = {
        "type": "eval",
        "round": 0,
        "global/accuracy": 0.25,
        "personal/accuracy": 0.25,
        "global/chain/accuracy": 0.375,
        "personal/chain/accuracy": 0.125,
    }
    metrics.write_text(json.dumps(base) + "\n" + metrics.read_text())
    summaries = summarize([load_run(tmp_path / "run")])
    chain = next(row for row in task_breakdown(summaries) if row.task == "chain")
    assert chain.base.mean == 0.375 and chain.paired is None  # no fedavg to pair with
    client = next(row for row in client_breakdown(summaries) if row.client == "chain")
    assert client.base.mean == 0.125
    assert client.final.mean == load_run(RUNS / "fedmoa-s0").client_accuracy["chain"][3]


def test_local_runs_have_no_share_of_a_global_update(tmp_path):
    from fedmoa.report.aggregate import client_breakdown

    shutil.copytree(RUNS / "fedmoa-s0", tmp_path / "run")
    resolved = tmp_path / "run" / "resolved_config.json"
    config = json.loads(resolved.read_text())
    config["server"]["method"] = "local"
    resolved.write_text(json.dumps(config))
    run = load_run(tmp_path / "run")
    assert run.method == "local" and run.shares  # as older local records do
    rows = client_breakdown(summarize([run]))
    assert rows and all(row.share.n == 0 and row.share.fmt() == "-" for row in rows)


@pytest.mark.parametrize(
    ("grpo", "privacy", "label"),
    [
        ({}, None, "fedmoa"),
        ({"auxiliary_gate": "none"}, None, "fedmoa"),
        ({"auxiliary_gate": "primary_success"}, None, "fedmoa+gate"),
        ({}, {"clip": 3.0, "target_epsilon": 8.0}, "fedmoa+dp(ε=8)"),
        ({"auxiliary_gate": "primary_success"}, {"clip": 1.0, "noise_multiplier": 0.5,
         "where": "client"}, "fedmoa+gate+dp(z=0.5, local)"),
    ],
)  # fmt: skip
def test_gate_and_privacy_runs_get_rows_of_their_own(tmp_path, grpo, privacy, label):
    """Runs with and without them share one report, paired seed by seed, without merging."""
    shutil.copytree(RUNS / "fedmoa-s0", tmp_path / "run")
    resolved = tmp_path / "run" / "resolved_config.json"
    config = json.loads(resolved.read_text())
    config["clients"][-1].setdefault("grpo", {}).update(grpo)  # one client is enough
    config["privacy"] = privacy
    resolved.write_text(json.dumps(config))
    assert load_run(tmp_path / "run").method == label


@pytest.mark.parametrize(
    ("server", "label"),
    [
        ({}, "fedmoa"),
        ({"accuracy_harm_z": 2.33, "accuracy_harm_evidence": "round"}, "fedmoa+harm(z=2.33)"),
        ({"accuracy_harm_z": 2.33, "accuracy_harm_evidence": "record"},
         "fedmoa+harm(z=2.33, record)"),
        ({"accuracy_harm_z": 2.33, "accuracy_harm_evidence": "either"},
         "fedmoa+harm(z=2.33, either)"),
        # a resolved config from before the key existed: the test read the record then
        ({"accuracy_harm_z": 2.33}, "fedmoa+harm(z=2.33, record)"),
    ],
)  # fmt: skip
def test_harm_test_runs_get_rows_of_their_own(tmp_path, server, label):
    shutil.copytree(RUNS / "fedmoa-s0", tmp_path / "run")
    resolved = tmp_path / "run" / "resolved_config.json"
    config = json.loads(resolved.read_text())
    config["server"].pop("accuracy_harm_evidence", None)
    config["server"].update(server)
    resolved.write_text(json.dumps(config))
    assert load_run(tmp_path / "run").method == label


def test_a_users_toml_without_the_evidence_key_has_the_default(tmp_path):
    shutil.copytree(RUNS / "fedmoa-s0", tmp_path / "run")
    (tmp_path / "run" / "resolved_config.json").unlink()
    (tmp_path / "run" / "config.toml").write_text(
        'seed = 0\n[server]\nmethod = "fedmoa"\naccuracy_harm_z = 2.33\n'
    )
    assert load_run(tmp_path / "run").method == "fedmoa+harm(z=2.33)"
