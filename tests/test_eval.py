"""Greedy evaluation: deterministic, independent of the batch size, accuracy = primary reward mean."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmoa.eval import evaluate_rows, greedy_completions, hypervolume
from fedmoa.models import tiny_random_model

ROWS = [
    {"prompt": [{"role": "user", "content": q}], "answer": a}
    for q, a in [("1+1?", "2"), ("What is three plus four?", "7"), ("9-3", "6"), ("Say 5.", "5")]
]


def first_char_is_digit(prompts, completions, **kwargs):
    return [float(c[0]["content"][:1].isdigit()) for c in completions]


def length_or_none(prompts, completions, answer, **kwargs):
    return [
        None if a == "7" else float(len(c[0]["content"]))
        for c, a in zip(completions, answer, strict=True)
    ]


def test_greedy_is_deterministic_and_batch_size_invariant():
    model, tokenizer = tiny_random_model("qwen2", seed=2)
    prompts = [row["prompt"] for row in ROWS]
    one_by_one = greedy_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert one_by_one == batched
    assert greedy_completions(model, tokenizer, prompts, max_new_tokens=6) == batched


def test_accuracy_is_the_primary_mean_and_none_is_left_out():
    model, tokenizer = tiny_random_model("qwen2", seed=2)
    funcs = [("digit", first_char_is_digit), ("length", length_or_none)]
    result = evaluate_rows(model, tokenizer, ROWS, funcs, primary="digit", max_new_tokens=6)
    digits = first_char_is_digit(None, [[{"content": t}] for t in result.completions])
    assert result.num_rows == 4
    assert math.isclose(result.accuracy, sum(digits) / 4)
    lengths = [
        len(t) for t, row in zip(result.completions, ROWS, strict=True) if row["answer"] != "7"
    ]
    assert math.isclose(result.reward_means["length"], sum(lengths) / 3, rel_tol=1e-6)
    metrics = result.metrics("val")
    assert set(metrics) == {
        "val/accuracy",
        "val/hypervolume",
        "val/rewards/digit",
        "val/rewards/length",
    }
    assert math.isclose(metrics["val/hypervolume"], result.accuracy * sum(lengths) / 3)


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ([0.5, 0.4], 0.2),
        ([1.0, 0.0, 0.9], 0.0),  # one objective at zero dominates nothing
        ([0.5, -2.0], 0.0),  # below the origin counts as zero, not as a sign flip
        ([0.5, math.nan, 0.8], 0.4),  # an objective that applied to no row is left out
        ([0.7], 0.7),
    ],
)
def test_hypervolume_of_one_point_against_the_origin(means: list[float], expected: float) -> None:
    assert math.isclose(hypervolume(means), expected)


@given(st.lists(st.floats(-1.0, 2.0, allow_subnormal=False), min_size=1, max_size=5))
def test_hypervolume_matches_moocore(means: list[float]) -> None:
    """The reference: moocore's hypervolume of the same point, maximised, origin as reference."""
    moocore = pytest.importorskip("moocore")
    clipped = [max(v, 0.0) for v in means]  # moocore counts only points that dominate the ref
    reference = moocore.hypervolume([clipped], ref=[0.0] * len(means), maximise=True)
    assert math.isclose(hypervolume(means), reference, rel_tol=1e-9, abs_tol=1e-12)


def test_hypervolume_of_nothing_is_nan() -> None:
    assert math.isnan(hypervolume([])) and math.isnan(hypervolume([math.nan]))
