"""``--profile``: exclusive phase times, summed from the records a run writes."""

from __future__ import annotations

import time

import pytest
from tests.test_cli import TINY_CONFIG, write_config
from tests.test_embedded import write_experiment
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.grpo.trainer import STEP_PHASES, PhaseTimer
from fedmoa.profiling import phase_totals, profile_table


def test_nested_phases_count_once():
    timer = PhaseTimer()
    with timer.phase("outer"):
        time.sleep(0.02)
        with timer.phase("inner"):
            time.sleep(0.05)
        with timer.phase("outer"):  # re-entering a name adds to it, exclusively
            time.sleep(0.01)
    assert timer.seconds["inner"] == pytest.approx(0.05, abs=0.03)
    assert timer.seconds["outer"] == pytest.approx(0.03, abs=0.03)
    assert timer.seconds["outer"] < timer.seconds["inner"]


def test_phase_totals_sum_client_and_server_records():
    records = [
        {"type": "client", "round": 1, "timing/generate": 2.0, "timing/validation": 1.0},
        {"type": "client", "round": 1, "timing/generate": 3.0, "timing/weighting": 0.5},
        {"type": "round", "round": 1, "timing/aggregate": 0.25, "timing/generate": 99.0},
        {"type": "eval", "round": 1, "global/accuracy": 0.5},
        {"type": "timing", "round": 1, "timing/checkpoint": 0.75},
        {"step": 1, "timing/generate": 1.0},  # train-local records have no type
    ]
    totals = phase_totals(records)
    assert totals == {
        "generate": 6.0,
        "validation": 1.0,
        "weighting": 0.5,
        "aggregate": 0.25,
        "checkpoint": 0.75,
    }
    table = profile_table(totals, wall_seconds=10.0)
    phases = list(table.columns[0].cells)
    assert phases[:3] == ["generate", "weighting", "validation"]
    assert phases[-2:] == ["other", "total (wall)"]
    assert list(table.columns[1].cells)[phases.index("other")] == "1.50"


def test_train_local_profile_prints_every_step_phase(tmp_path):
    config = write_config(tmp_path, TINY_CONFIG)
    result = CliRunner().invoke(
        app, ["train-local", str(config), "--output", str(tmp_path / "run"), "--profile"]
    )
    assert result.exit_code == 0, result.output
    assert "time per phase" in result.output
    for phase in STEP_PHASES:
        assert phase in result.output


def test_run_profile_covers_client_and_server_phases(tmp_path):
    config = write_experiment(tmp_path, rounds=1)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(config), "--output", str(out), "--profile", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for phase in (*STEP_PHASES, "validation", "aggregate", "evaluate", "checkpoint", "other"):
        assert phase in result.output, phase
