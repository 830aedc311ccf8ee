"""The primary's scale: accuracy-aware methods need a rate, and no scored row is no evidence.

``fedmoa`` and ``fedmoa-taa`` weigh clients by the primary's validation accuracy, which the
server only accepts in [0, 1]: a primary on another scale is stopped on the client at its first
score, with one line naming the reward and the value, instead of every update being dropped.
A validation pass where the primary scored no row reports ``V = 0``, which both accuracy rules
read as no evidence (docs/design.md, "Accuracy-aware weights under sampling noise").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedmoa.aggregation import (
    ClientUpdate,
    TaskAccuracySettings,
    accuracy_weights,
    fedavg_aggregate,
    sanitize,
    task_accuracy_aggregate,
)
from fedmoa.config import RewardConfig
from fedmoa.errors import RewardError
from fedmoa.federation.client import (
    ClientData,
    ClientRoundResult,
    PrimaryScaleCheck,
    adapter_state,
    run_client_round,
    with_scale_check,
)
from fedmoa.federation.config import ClientConfig, ExperimentConfig, ServerConfig
from fedmoa.federation.server import FederatedServer
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.models import LoraSettings, attach_lora, tiny_random_model
from fedmoa.rewards import completion_text
from fedmoa.weighting import WeightingConfig

PROMPT = [{"role": "user", "content": "Say a number."}]
CLIENT = ClientConfig(
    id="a",
    task="math",
    rewards=[
        RewardConfig(name="score", function="length", role="primary"),
        RewardConfig(name="brevity", function="length", weight=0.5),
    ],
    local_steps=1,
    grpo=GRPOSettings(batch_size=2, group_size=2, max_new_tokens=3),
)


def rows(*kinds: str) -> list[dict[str, Any]]:
    return [{"prompt": PROMPT, "kind": kind} for kind in kinds]


DATA = ClientData(
    train=rows("train", "train", "train", "train"), validation=rows("val", "val"), test=[]
)


def brevity(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [min(len(completion_text(c)), 10) / 10 for c in completions]


def scoring(train: float | None, val: float | None, calls: list[int]) -> Callable[..., Any]:
    """A primary scoring ``train`` on training rows and ``val`` on validation rows."""

    def primary(prompts: list[Any], completions: list[Any], kind: list[str], **_: Any) -> list:
        calls.append(len(completions))
        return [train if k == "train" else val for k in kind]

    return primary


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any, dict[str, torch.Tensor]]:
    model, tokenizer = tiny_random_model("qwen2", seed=0)
    peft = attach_lora(model, LoraSettings(r=4, alpha=8))
    return peft, tokenizer, adapter_state(peft)


def one_round(
    policy: tuple[Any, Any, dict[str, torch.Tensor]],
    method: str,
    primary: Callable[..., Any],
    data: ClientData = DATA,
    rule: str = "gain",
) -> ClientRoundResult:
    model, tokenizer, start = policy
    return run_client_round(
        model,
        tokenizer,
        CLIENT,
        data,
        [("score", primary), ("brevity", brevity)],
        start,
        None,
        method=method,
        server=ServerConfig(method=method, validation_prompts=2, accuracy_rule=rule),
        weighting_config=WeightingConfig(method="static"),
        seed=0,
        server_round=1,
    )


# --- the scale check ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedmoa", "fedmoa-taa"])
def test_an_off_scale_primary_stops_an_accuracy_aware_client_at_its_first_score(
    policy: Any, method: str
) -> None:
    calls: list[int] = []
    with pytest.raises(RewardError) as caught:
        one_round(policy, method, scoring(5.0, 5.0, calls))
    message = str(caught.value)
    assert "'score'" in message and "5.0" in message and "[0, 1]" in message
    assert method in message and "\n" not in message
    assert len(calls) == 1  # the first training batch


@pytest.mark.parametrize("rule", ["noise-aware", "gain"])
def test_the_check_falls_on_validation_when_training_never_scores(policy: Any, rule: str) -> None:
    """After the training steps; or, under the gain rule, at once: its first validation pass
    (the start adapter's) comes before training."""
    calls: list[int] = []
    with pytest.raises(RewardError, match=r"reward 'score' returned -2\.0 at sample 0"):
        one_round(policy, "fedmoa", scoring(None, -2.0, calls), rule=rule)
    assert len(calls) == (CLIENT.local_steps + 1 if rule == "noise-aware" else 1)


def test_an_off_scale_primary_trains_and_aggregates_under_fedavg(policy: Any) -> None:
    result = one_round(policy, "fedavg", scoring(5.0, 5.0, []))
    assert result.update.accuracy == 5.0 and result.update.validation_size == 2
    cfg = ExperimentConfig(clients=[CLIENT], server=ServerConfig(method="fedavg"))
    server = FederatedServer(cfg, policy[2])
    aggregated = server.aggregate_round(server.configure_round(1), [result.update])
    assert aggregated.rejected == [] and aggregated.client_weights == {"a": 1.0}
    # The pure aggregator agrees; a non-finite accuracy is still rejected.
    assert fedavg_aggregate(policy[2], [result.update]).rejected == []
    nan = ClientUpdate("b", "math", 2, result.update.delta, math.nan)
    assert "finite" in sanitize([nan], policy[2], rate_accuracy=False)[1][0].reason


def test_the_check_runs_once_and_only_under_accuracy_aware_methods() -> None:
    calls: list[int] = []
    funcs = [("score", scoring(5.0, 0.5, calls)), ("brevity", brevity)]
    assert with_scale_check(funcs, "score", "fedavg") is funcs
    checked = with_scale_check(funcs, "score", "fedmoa")
    assert isinstance(checked[0][1], PrimaryScaleCheck) and checked[1][1] is brevity
    check = checked[0][1]
    completions = [[{"role": "assistant", "content": "1"}]] * 2
    assert check(prompts=[PROMPT] * 2, completions=completions, kind=["x", "x"]) == [0.5, 0.5]
    # Armed by the first scored call: later calls pass straight through, unchecked.
    assert check(prompts=[PROMPT] * 2, completions=completions, kind=["train"] * 2) == [5.0, 5.0]


# --- no scored validation row -----------------------------------------------------------------


def peers(delta: dict[str, torch.Tensor]) -> list[ClientUpdate]:
    return [
        ClientUpdate("b", "math", 2, delta, 0.75, {}, 2),
        ClientUpdate("c", "math", 2, delta, 0.25, {}, 2),
    ]


@pytest.mark.parametrize("rule", ["noise-aware", "softmax"])
def test_a_validation_pass_without_scores_is_no_evidence(policy: Any, rule: str) -> None:
    result = one_round(policy, "fedmoa", scoring(0.5, None, []))
    update = result.update
    assert update.validation_size == 0 and update.accuracy == 0.0
    assert sanitize([update], policy[2])[1] == []  # a valid reply, not a bad accuracy

    # Next to peers at 0.75 and 0.25 (pooled 0.5), it sits halfway: neither reward nor penalty.
    updates = [update, *peers(update.delta)]
    aggregated = task_accuracy_aggregate(policy[2], updates, TaskAccuracySettings(rule=rule))
    assert aggregated.rejected == []
    w = aggregated.client_weights
    assert w["b"] > w["a"] > w["c"]
    assert math.log(w["b"] / w["a"]) == pytest.approx(math.log(w["a"] / w["c"]), rel=1e-9)


def test_only_scored_validation_rows_count(policy: Any) -> None:
    data = ClientData(train=DATA.train, validation=rows("val", "train"), test=[])
    update = one_round(policy, "fedmoa", scoring(0.5, None, []), data).update
    assert update.validation_size == 1 and update.accuracy == 0.5


def test_the_papers_rule_gives_a_client_without_evidence_the_pooled_rate() -> None:
    delta = {"w": torch.zeros(2)}
    blind = ClientUpdate("a", "math", 2, delta, 0.0, {}, 0)
    paper = accuracy_weights([blind, *peers(delta)], 0.1)
    pooled = [ClientUpdate("a", "math", 2, delta, 0.5, {}, 2), *peers(delta)]
    assert paper == pytest.approx(accuracy_weights(pooled, 0.1), rel=1e-12)
    # Callers that count no validation rows at all keep the paper's rule as it was.
    uncounted = [ClientUpdate(c, "math", 2, delta, a) for c, a in (("a", 0.9), ("b", 0.1))]
    expected = 1 / (1 + math.exp(-0.8 / 0.1))
    assert accuracy_weights(uncounted, 0.1) == pytest.approx([expected, 1 - expected])
