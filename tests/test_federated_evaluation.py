"""Federated evaluation: what a client scores and how the server combines the scores."""

from __future__ import annotations

import math

import pytest
from flwr.app import Context, RecordDict

from fedmoa.errors import ConfigError
from fedmoa.federation.config import load_experiment
from fedmoa.federation.evaluation import aggregate_evaluation, weighted_mean
from fedmoa.federation.flower.server_app import serve
from fedmoa.federation.flower.settings import EXPERIMENT_KEY, RUN_DIR_KEY
from fedmoa.runs import RunDirectory
from test_embedded import run_embedded, write_experiment
from test_flower import LoopbackGrid, task_identity, torch_threads

__all__ = ["task_identity"]  # a fixture, used by name


def scores(cid: str, size: int, glob: float, personal: float, hv: float = 0.5) -> dict:
    return {
        f"test_size/{cid}": float(size),
        f"global/{cid}/accuracy": glob,
        f"global/{cid}/hypervolume": hv,
        f"personal/{cid}/accuracy": personal,
        f"personal/{cid}/hypervolume": hv,
    }


def test_tasks_weighted_by_test_size_and_tasks_count_alike() -> None:
    tasks = {"a": "math", "b": "math", "c": "code"}
    record = aggregate_evaluation(
        {
            "a": scores("a", 30, 0.5, 0.6),
            "b": scores("b", 10, 0.9, 1.0),
            "c": scores("c", 8, 0.25, 0.5),
        },
        tasks,
    )
    assert record["global/math/accuracy"] == pytest.approx((30 * 0.5 + 10 * 0.9) / 40)  # 0.6
    assert record["global/code/accuracy"] == 0.25
    assert record["global/accuracy"] == pytest.approx((0.6 + 0.25) / 2)  # not by clients
    assert record["personal/accuracy"] == pytest.approx((30 * 0.6 + 10 * 1.0 + 8 * 0.5) / 48)
    assert record["personal/hypervolume"] == pytest.approx(0.5)
    assert record["global/b/accuracy"] == 0.9  # per-client keys as sent
    assert "local_model/accuracy" not in record  # nobody scored a local model


def test_a_client_that_sent_nothing_is_left_out_and_nan_is_skipped() -> None:
    tasks = {"a": "math", "b": "math", "c": "code"}
    record = aggregate_evaluation({"a": scores("a", 4, 0.5, math.nan)}, tasks)
    assert record["global/math/accuracy"] == 0.5
    assert "global/code/accuracy" not in record and record["global/accuracy"] == 0.5
    assert math.isnan(record["personal/accuracy"])
    assert math.isnan(weighted_mean([])) and weighted_mean([(1.0, 0.0), (0.5, 2.0)]) == 0.5


def test_equal_test_sizes_give_the_plain_means() -> None:
    tasks = {"a": "t", "b": "t"}
    record = aggregate_evaluation(
        {"a": scores("a", 5, 0.2, 0.4), "b": scores("b", 5, 0.6, 0.8)}, tasks
    )
    assert record["global/accuracy"] == pytest.approx(0.4)
    assert record["personal/accuracy"] == pytest.approx(0.6)


SERVER_SET = """
[server.eval_data]
task = "math"
prompts = 3
max_new_tokens = 4
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 8, seed = 9 }
rewards = [{ name = "correct", function = "math_accuracy", role = "primary", params = { require_final_answer = false } }]
"""


def test_server_held_set_is_scored_on_the_server_on_both_engines(tmp_path, task_identity):
    """``[server.eval_data]``: round 0 and every evaluation round also score the global and
    the task adapter on the server's own rows; the Flower ServerApp computes the same record
    as the embedded engine. Without the table no ``server_eval`` key appears."""

    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    plain = [r for r in run_embedded(config, tmp_path / "plain")[0].run.read_metrics()]
    assert not any(k.startswith("server_eval") for r in plain for k in r)
    config.write_text(
        config.read_text().replace("[client_defaults]", SERVER_SET + "\n[client_defaults]")
    )
    with torch_threads(1):
        federation, _ = run_embedded(config, tmp_path / "embedded")
    evals = [r for r in federation.run.read_metrics() if r["type"] == "eval"]
    assert [r["round"] for r in evals] == [0, 1]
    for record in evals:
        assert record["server_eval/test_size"] == 3.0
        assert 0.0 <= record["server_eval/global/accuracy"] <= 1.0
        assert "server_eval/task/rewards/correct" in record
    # the federated figures are the clients' own, unchanged by the server's set
    assert {k: v for k, v in evals[0].items() if not k.startswith("server_eval")} == next(
        r for r in plain if r["type"] == "eval" and r["round"] == 0
    )
    run = tmp_path / "flower"
    run_config = {EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(run)}
    grid = LoopbackGrid({30: 2, 10: 1, 20: 0}, run_config, set())
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with torch_threads(1):
        serve(grid, context)
    assert [r for r in RunDirectory(run).read_metrics() if r["type"] == "eval"] == evals


def test_server_set_task_must_be_a_clients_task(tmp_path):
    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    config.write_text(
        config.read_text().replace(
            "[client_defaults]", SERVER_SET.replace('"math"', '"code"') + "\n[client_defaults]"
        )
    )
    with pytest.raises(
        ConfigError, match=r"server\.eval_data\.task = 'code' is no task of the clients"
    ):
        load_experiment(config)
