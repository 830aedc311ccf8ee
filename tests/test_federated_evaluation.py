"""Federated evaluation: what a client scores and how the server combines the scores."""

from __future__ import annotations

import math

import pytest

from fedmoa.federation.evaluation import aggregate_evaluation, weighted_mean


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
