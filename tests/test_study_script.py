"""``benchmarks/study.py`` survives being stopped: finished runs are skipped, an interrupted one
resumes from its last checkpoint, and the report covers every finished run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

STUDY = """
seed = 0
output_dir = "ignored"

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[server]
method = "fedmoa"
rounds = 2
validation_prompts = 2
test_prompts = 2

[client_defaults]
grpo = { batch_size = 2, group_size = 2, max_new_tokens = 4 }
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 16 }
rewards = [{ name = "accuracy", function = "math_accuracy", role = "primary" }]

[[clients]]
id = "a"
task = "sums"

[[clients]]
id = "b"
task = "sums"
data = { seed = 1 }
rewards = [
  { name = "accuracy", function = "math_accuracy", role = "primary" },
  { name = "brevity", function = "length", weight = 0.5, params = { target = 2 } },
]
"""


def run_study(config: Path, out: Path) -> list[str]:
    options = ["--config", str(config), "--out", str(out), "--methods", "fedavg", "local"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "study.py"), *options, "--seeds", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("[")]


def test_study_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path: Path) -> None:
    config = tmp_path / "study.toml"
    config.write_text(STUDY)
    out = tmp_path / "study"
    assert [line.split(":")[1].split("(")[0].strip() for line in run_study(config, out)] == [
        "ran",
        "ran",
    ]
    fedavg = out / "fedavg-seed3"
    written = json.loads((fedavg / "resolved_config.json").read_text())
    assert written["seed"] == 3 and written["server"]["method"] == "fedavg"
    assert (out / "report" / "report.md").is_file()
    assert "fedavg" in (out / "report" / "report.md").read_text()

    # Stopped during round 2: no summary, only the round-1 checkpoint.
    (fedavg / "summary.json").unlink()
    (fedavg / "checkpoints" / "round-0002.pt").unlink()
    lines = run_study(config, out)
    assert "fedavg seed 3: resumed" in lines[0] and "local seed 3: done before" in lines[1]
    rounds = [
        json.loads(line)["round"]
        for line in (fedavg / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "round"
    ]
    assert rounds == [1, 2]
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert [t["action"] for t in timings] == ["ran", "ran", "resumed", "done before"]


def test_report_covers_finished_runs_of_every_method_and_seed_not_only_this_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = load_study()
    for name, done in [
        ("fedmoa-seed10", True),
        ("fedmoa-seed2", True),
        ("fedavg-seed1", True),
        ("fedavg-seed0", False),  # interrupted: no summary
        ("local-seed0", True),  # a method not asked for: from another call
        ("fedmoa-hg-seed0", True),  # shares the "fedmoa-" prefix
        ("fedavg+saw-seed0", True),
    ]:
        (tmp_path / name).mkdir()
        if done:
            (tmp_path / name / "summary.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert study.finished_runs(Path("."), ["fedavg", "fedmoa"]) == [
        "fedavg-seed1",
        "fedmoa-seed2",
        "fedmoa-seed10",
        "fedmoa-hg-seed0",
        "local-seed0",
        "fedavg+saw-seed0",
    ]


def load_study():
    spec = importlib.util.spec_from_file_location("study", BENCHMARKS / "study.py")
    assert spec is not None and spec.loader is not None
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_run_config_splits_method_and_weighting_and_anchors_reward_files(tmp_path: Path) -> None:
    study = load_study()
    base = {
        "server": {"method": "fedmoa"},
        "clients": [
            {"rewards": [{"function": "math_accuracy"}, {"function": "mine.py:no_digits"}]}
        ],
    }
    args = study.parse_args(["--config", str(tmp_path / "cfg" / "study.toml"), "--out", "o"])
    cfg = study.run_config(base, args, "fedavg+saw", 4)
    assert cfg["server"]["method"] == "fedavg" and cfg["weighting"]["method"] == "saw"
    # absolute, so the run's copy of the config means the same wherever it lies
    assert cfg["output_dir"] == str((Path("o") / "fedavg+saw-seed4").resolve())
    functions = [r["function"] for r in cfg["clients"][0]["rewards"]]
    assert functions == ["math_accuracy", f"{(tmp_path / 'cfg' / 'mine.py').resolve()}:no_digits"]
    plain = study.run_config(base, args, "fedmoa", 0)
    assert "weighting" not in plain and base["clients"][0]["rewards"][1]["function"] == (
        "mine.py:no_digits"  # the study file's own data is left as it was
    )


def test_set_overrides_win_and_land_in_the_runs_config(tmp_path: Path) -> None:
    study = load_study()
    base = {"server": {"method": "fedmoa", "validation_prompts": 8}}
    args = study.parse_args(
        ["--config", str(tmp_path / "study.toml"), "--set", "server.validation_prompts=32",
         "--set", "privacy.target_epsilon=8.0", "--set", "server.method=fedprox",
         "--set", 'client_defaults.grpo.auxiliary_gate="primary_success"',
         "--set", "model.name=smollm2-135m"]
    )  # fmt: skip
    cfg = study.run_config(base, args, "fedavg", 1)
    assert cfg["server"] == {"method": "fedprox", "validation_prompts": 32}
    assert cfg["privacy"] == {"target_epsilon": 8.0}
    assert cfg["client_defaults"]["grpo"]["auxiliary_gate"] == "primary_success"
    assert cfg["model"]["name"] == "smollm2-135m"  # a bare word is a string
    assert base["server"]["validation_prompts"] == 8
    # a path given with --set is relative to the study file, as the file's own paths are
    args = study.parse_args(
        ["--config", str(tmp_path / "cfg" / "study.toml"),
         "--set", "client_defaults.data.path=tasks.jsonl"]
    )  # fmt: skip
    cfg = study.run_config({"client_defaults": {"data": {"source": "jsonl"}}}, args, "fedavg", 1)
    assert cfg["client_defaults"]["data"]["path"] == str(
        (tmp_path / "cfg" / "tasks.jsonl").resolve()
    )


def test_a_malformed_set_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    study = load_study()
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--set", "server.rounds"])
    assert exit_info.value.code == 2
    assert "--set 'server.rounds': expected KEY=VALUE" in capsys.readouterr().err


def test_machine_time_counts_every_start_and_resume_not_skips(tmp_path: Path) -> None:
    study = load_study()
    assert study.machine_time(tmp_path) == (0, 0.0)
    lines = [
        {"method": "fedavg", "seed": 0, "action": "ran", "seconds": 100.0},
        {"method": "fedmoa", "seed": 0, "action": "ran", "seconds": 50.5},
        {"method": "fedmoa", "seed": 0, "action": "resumed", "seconds": 20.0},
        {"method": "fedavg", "seed": 0, "action": "done before", "seconds": 0.0},
    ]
    (tmp_path / "timings.jsonl").write_text("".join(json.dumps(t) + "\n" for t in lines))
    assert study.machine_time(tmp_path) == (2, 170.5)
