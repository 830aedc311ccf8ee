"""Round 0: every run scores the starting adapter before round 1, once, on the tiny model.

The Flower engine's record is checked in ``tests/test_flower.py`` (its ``metrics.jsonl`` equals
the embedded run's, round 0 included).
"""

from __future__ import annotations

from pathlib import Path

from fedmoa.federation.client import adapter_state
from fedmoa.federation.config import load_experiment
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.runs import RunDirectory
from test_faults import client, experiment


def evals(run: Path) -> list[dict]:
    return [r for r in RunDirectory(run).read_metrics() if r["type"] == "eval"]


def test_round0_scores_the_starting_adapter_once(tmp_path: Path) -> None:
    config = experiment(tmp_path, [client("a"), client("b")], rounds=1, round0=True)
    run = tmp_path / "run"
    federation = EmbeddedFederation(load_experiment(config), RunDirectory(run))
    initial = adapter_state(federation.policy)
    round0 = federation.evaluate()  # the starting adapter, before anything trains
    summary = federation.run_rounds()
    records = RunDirectory(run).read_metrics()
    assert records[0] == {"type": "eval", "round": 0, **round0}  # first, before any client
    assert [r["round"] for r in evals(run)] == [0, 1]
    trained = {k for k in evals(run)[1] if not k.startswith("local_model/")}  # none at round 0
    assert set(evals(run)[0]) == trained  # the same metrics as a trained round
    assert summary["final_eval"]["round"] == 1
    assert any(
        not bool((initial[k] == v).all()) for k, v in adapter_state(federation.policy).items()
    )


def test_round0_is_not_repeated_on_resume(tmp_path: Path) -> None:
    config = experiment(tmp_path, [client("a"), client("b")], rounds=2, round0=True)
    run = tmp_path / "run"
    first = EmbeddedFederation(load_experiment(config), RunDirectory(run))
    first.evaluate_round0()
    # Crashed during round 1 (no checkpoint), with a client record already logged.
    RunDirectory(run).log({"type": "client", "round": 1, "client": "a", "failed": "crash"})
    again = EmbeddedFederation(load_experiment(config), RunDirectory(run))
    assert again.resume() == 0
    assert [r["round"] for r in RunDirectory(run).read_metrics()] == [0]
    again.server.cfg.server.rounds = 1  # stop after round 1, as if interrupted
    again.run_rounds()
    third = EmbeddedFederation(load_experiment(config), RunDirectory(run))
    assert third.resume() == 1
    third.run_rounds()
    assert [r["round"] for r in evals(run)] == [0, 1, 2]


def test_eval_round0_false_turns_it_off(tmp_path: Path) -> None:
    config = experiment(tmp_path, [client("a")], rounds=1, round0=False)
    run = tmp_path / "run"
    EmbeddedFederation(load_experiment(config), RunDirectory(run)).run_rounds()
    assert [r["round"] for r in evals(run)] == [1]
