"""Reward failure policy: ``on_error = "raise" | "none"`` and ``timeout``, for every way a call fails."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any

import pytest
import torch

from fedmoa.config import RewardConfig, TrainLocalConfig, parse_config
from fedmoa.errors import ConfigError, RewardError
from fedmoa.federation.centralized import SOURCE_COLUMN, only_for
from fedmoa.models import LoraSettings, attach_lora
from fedmoa.rewards import compute_rewards, math_accuracy
from fedmoa.rewards.base import PolicyReward, with_policy
from fedmoa.train_local import build_reward_funcs

PROMPTS = ["p"] * 4
COMPLETIONS = ["a", "b", "bad", "c"]


def ok(completions: list[str], **kwargs: Any) -> list[float]:
    return [0.5] * len(completions)


def raises_on_bad(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0 / (c != "bad") for c in completions]


def hangs(completions: list[str], **kwargs: Any) -> list[float]:
    time.sleep(30)
    return [1.0] * len(completions)


# A function per failure, and what "raise" says about it.
FAILURES = {
    "raises": (raises_on_bad, r"reward 'f' raised ZeroDivisionError at sample 2: "),
    "nan": (lambda completions, **kw: [1.0, 1.0, math.nan, 1.0], r"returned nan .* at sample 2"),
    "inf": (lambda completions, **kw: [-math.inf, 1.0, 1.0, 1.0], r"returned -inf .* at sample 0"),
    "wrong_length": (lambda completions, **kw: [1.0], r"returned 1 values, expected 4"),
    "wrong_type": (lambda completions, **kw: {"a": 1.0}, r"returned dict, expected a list of 4"),
    "string": (lambda completions, **kw: "1111", r"returned str, expected a list of 4"),
    "bad_value": (
        lambda completions, **kw: [1.0, "1", 1.0, 1.0],
        r"returned '1' \(str\) at sample 1; expected a finite float",
    ),
    "hangs": (hangs, r"reward 'f' timed out after 0.3s"),
}
# Under "none": which samples keep their value (the others become None / NaN).
KEPT_UNDER_NONE = {
    "raises": [],
    "nan": [0, 1, 3],
    "inf": [1, 2, 3],
    "wrong_length": [],
    "wrong_type": [],
    "string": [],
    "bad_value": [0, 2, 3],
    "hangs": [],
}


def matrix(func: Any, on_error: str, timeout: float | None = 0.3) -> torch.Tensor:
    guarded = with_policy("f", func, on_error, timeout)  # type: ignore[arg-type]
    return compute_rewards([("ok", ok), ("f", guarded)], PROMPTS, COMPLETIONS, {})


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_raise_policy_names_the_function_and_sample(failure: str) -> None:
    func, pattern = FAILURES[failure]
    began = time.perf_counter()
    with pytest.raises(RewardError, match=pattern) as info:
        matrix(func, "raise")
    assert "\n" not in str(info.value)
    assert time.perf_counter() - began < 10  # a hang stops waiting at the timeout


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_none_policy_scores_none_and_warns(failure: str, caplog: pytest.LogCaptureFixture) -> None:
    func, _ = FAILURES[failure]
    with caplog.at_level(logging.WARNING, logger="fedmoa.rewards.base"):
        result = matrix(func, "none")
    assert result[:, 0].tolist() == [0.5] * 4  # the other objective is untouched
    kept = KEPT_UNDER_NONE[failure]
    for row in range(4):
        value = result[row, 1].item()
        assert (not math.isnan(value)) == (row in kept), (row, value)
    (record,) = [r for r in caplog.records if "reward 'f'" in r.getMessage()]
    assert "on_error = 'none'" in record.getMessage()


def test_raise_without_a_policy_is_unchanged() -> None:
    assert with_policy("f", ok) is ok
    assert isinstance(with_policy("f", ok, timeout=1.0), PolicyReward)
    with pytest.raises(RewardError, match=r"reward 'plain' raised ZeroDivisionError at sample 2"):
        compute_rewards([("plain", raises_on_bad)], PROMPTS, COMPLETIONS, {})


def test_timeout_leaves_a_daemon_thread_and_a_fast_call_passes() -> None:
    """A hung function cannot be killed: its daemon thread is abandoned (documented)."""
    release = threading.Event()

    def stuck(completions: list[str], **kwargs: Any) -> list[float]:
        release.wait(30)
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"timed out after 0\.2s"):
        compute_rewards([("s", with_policy("s", stuck, timeout=0.2))], PROMPTS, COMPLETIONS, {})
    abandoned = [t for t in threading.enumerate() if t.name == "fedmoa-reward-s"]
    assert abandoned and all(t.daemon for t in abandoned)
    release.set()
    fast = compute_rewards([("f", with_policy("f", ok, timeout=5.0))], PROMPTS, COMPLETIONS, {})
    assert fast.tolist() == [[0.5]] * 4


def test_exceptions_from_a_timed_call_are_reported_like_direct_ones() -> None:
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError at sample 2"):
        matrix(raises_on_bad, "raise", timeout=5.0)


def test_policy_survives_the_centralized_wrapper(caplog: pytest.LogCaptureFixture) -> None:
    """The pooled learner wraps each client's reward; the policy applies to that client's rows."""
    pooled = only_for("a", with_policy("f", raises_on_bad, "none"))
    columns = {SOURCE_COLUMN: ["a", "a", "a", "b"]}
    with caplog.at_level(logging.WARNING):
        result = compute_rewards([("a/f", pooled)], PROMPTS, COMPLETIONS, columns)
    assert all(math.isnan(v) for v in result[:, 0].tolist())
    with pytest.raises(RewardError, match=r"reward 'f' raised ZeroDivisionError at sample 2"):
        strict = only_for("a", with_policy("f", raises_on_bad, "raise", timeout=5.0))
        compute_rewards([("a/f", strict)], PROMPTS, COMPLETIONS, columns)


def test_config_fields_and_their_validation() -> None:
    cfg = RewardConfig(name="x", function="format", on_error="none", timeout=2.5)
    assert (cfg.on_error, cfg.timeout) == ("none", 2.5)
    assert RewardConfig(name="x", function="format").on_error == "raise"
    base = {"rewards": [{"name": "x", "function": "format", "role": "primary"}]}
    for bad, field in [
        ({"on_error": "skip"}, "rewards[0].on_error"),
        ({"timeout": 0}, "rewards[0].timeout"),
        ({"timeout": -1.0}, "rewards[0].timeout"),
        ({"timeout": math.inf}, "rewards[0].timeout"),
    ]:
        data = {"rewards": [{**base["rewards"][0], **bad}]}
        with pytest.raises(ConfigError, match=rf"^test: {re.escape(field)}: "):
            parse_config(data, TrainLocalConfig, "test")


def test_build_reward_funcs_wires_the_policy() -> None:
    rewards = [
        RewardConfig(name="acc", function="math_accuracy", role="primary"),
        RewardConfig(name="fmt", function="format", on_error="none", timeout=3.0),
    ]
    (acc_name, acc), (fmt_name, fmt) = build_reward_funcs(rewards)
    assert (acc_name, fmt_name) == ("acc", "fmt")
    assert acc is math_accuracy  # the default policy adds no wrapper
    assert isinstance(fmt, PolicyReward)
    assert (fmt.name, fmt.on_error, fmt.timeout) == ("fmt", "none", 3.0)
    assert fmt.__name__ == "format_reward"
    assert fmt(None, [r"\boxed{1}", "no"]) == [1.0, 0.0]


def test_math_accuracy_under_a_timeout_policy() -> None:
    """With a timeout the call runs in a worker thread, where math-verify uses its child process."""
    guarded = with_policy("acc", math_accuracy, timeout=60.0)
    result = compute_rewards(
        [("acc", guarded)], ["p", "p"], [r"\boxed{2}", r"\boxed{3}"], {"answer": ["2", "2"]}
    )
    assert result[:, 0].tolist() == [1.0, 0.0]


def test_a_training_step_goes_on_when_an_objective_fails(
    tiny_model_and_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer
    from fedmoa.weighting import StaticWeighting

    model, tokenizer = tiny_model_and_tokenizer
    policy = attach_lora(model, LoraSettings(r=4))
    rows = [
        {"prompt": [{"role": "user", "content": f"{i} + 1 = ?"}], "answer": str(i + 1)}
        for i in range(4)
    ]

    def broken(completions: list[Any], **kwargs: Any) -> list[float]:
        raise RuntimeError("service down")

    funcs = [
        ("length", lambda completions, **kw: [float(len(c[0]["content"])) for c in completions]),
        ("broken", with_policy("broken", broken, "none")),
    ]
    settings = GRPOSettings(batch_size=2, group_size=2, max_new_tokens=4, lr=0.01)
    weighting = StaticWeighting(["length", "broken"], "length", [1.0, 1.0])
    trainer = LocalTrainer(policy, tokenizer, rows, funcs, weighting, settings, seed=0)
    with caplog.at_level(logging.WARNING, logger="fedmoa.rewards.base"):
        (metrics,) = trainer.train(1)
    assert math.isfinite(metrics["loss"])
    assert math.isnan(metrics["rewards/broken/mean"])
    assert any("service down" in r.getMessage() for r in caplog.records)
