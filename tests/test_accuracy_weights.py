"""Accuracy-aware weights under validation noise: the noise-aware rule, its memory and the cap.

Hand-computed cases (docs/design.md, "Accuracy-aware weights under sampling noise"), the limits
that recover the paper's rule, the ``[server]`` keys that select them, and the record a server
keeps between rounds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmoa.aggregation import (
    AccuracyEvidence,
    ClientUpdate,
    TaskAccuracySettings,
    accumulate_evidence,
    accuracy_weights,
    cap_shares,
    noise_aware_weights,
    sanitize,
    task_accuracy_aggregate,
    within_task_weights,
)
from fedmoa.errors import ConfigError
from fedmoa.federation.config import ServerConfig
from fedmoa.federation.server import task_accuracy_settings

KEY = "lora_A.weight"
CURRENT = {KEY: torch.zeros(2, 2)}


def client(cid: str, accuracy: float, v: int = 16, n: int = 8, task: str = "math") -> ClientUpdate:
    delta = {KEY: torch.full((2, 2), float(len(cid)))}
    return ClientUpdate(cid, task, n, delta, accuracy, {}, v)


def test_equal_accuracies_give_equal_shares() -> None:
    for v in (1, 4, 16, 10**6):
        updates = [client(c, 0.5, v) for c in "abcd"]
        assert noise_aware_weights(updates, 0.1, 4.0) == pytest.approx([0.25] * 4)


def test_hand_computed_two_clients() -> None:
    # 3 of 4 against 1 of 4: pooled (4 + 0.5)/(8 + 1) = 0.5, SE = sqrt(0.25/4) = 0.25,
    # T = 0.1 + 4·0.25 = 1.1, α_a = sigmoid(0.5/1.1).
    weights = noise_aware_weights([client("a", 0.75, 4), client("b", 0.25, 4)], 0.1, 4.0)
    expected = 1 / (1 + math.exp(-0.5 / 1.1))
    assert weights == pytest.approx([expected, 1 - expected], rel=1e-12)
    assert expected == pytest.approx(0.6117, abs=1e-4)
    # The paper's rule on the same reports: sigmoid(0.5/0.1).
    assert accuracy_weights([client("a", 0.75, 4), client("b", 0.25, 4)], 0.1)[0] == (
        pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-12)
    )


@pytest.mark.parametrize("accuracies", [(0.9, 0.2, 0.5), (0.25, 0.75, 0.5, 0.0), (1.0, 0.0)])
def test_infinite_validation_recovers_the_paper_rule(accuracies: tuple[float, ...]) -> None:
    def gap(v: int) -> float:
        updates = [client(f"c{i}", a, v=v, n=i + 1) for i, a in enumerate(accuracies)]
        paper = accuracy_weights(updates, 0.1)
        aware = noise_aware_weights(updates, 0.1, 4.0)
        return max(abs(x - y) for x, y in zip(aware, paper, strict=True))

    gaps = [gap(10**k) for k in (2, 6, 10, 16)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.01  # shrinks as V grows
    assert gaps[-1] < 1e-6


def test_zero_noise_scale_is_the_paper_rule_on_the_record() -> None:
    updates = [client("a", 0.75, 4), client("b", 0.25, 4)]
    assert noise_aware_weights(updates, 0.1, 0.0) == pytest.approx(accuracy_weights(updates, 0.1))


def test_a_client_without_validation_rows_is_neutral() -> None:
    # pooled over a and b only: (12 + 4 + 0.5)/(32 + 1) = 0.5; c's V = 0 puts it at 0.5 too.
    updates = [client("a", 0.75), client("b", 0.25), client("c", 0.0, v=0)]
    a, b, c = noise_aware_weights(updates, 0.1, 4.0)
    assert a > c > b
    assert math.log(a / c) == pytest.approx(math.log(c / b), rel=1e-9)  # c sits halfway
    # Nobody has evidence: by samples alone.
    none = [client("a", 1.0, v=0, n=1), client("b", 0.0, v=0, n=3)]
    assert noise_aware_weights(none, 0.1, 4.0) == pytest.approx([0.25, 0.75])


def test_memory_pools_a_clients_rounds() -> None:
    first = accumulate_evidence({}, [client("a", 0.5, 16), client("b", 1.0, 4)], 0.5)
    assert first == {"a": AccuracyEvidence(8.0, 16.0), "b": AccuracyEvidence(4.0, 4.0)}
    second = accumulate_evidence(first, [client("a", 0.25, 16)], 0.5)
    assert second["a"] == AccuracyEvidence(4.0 + 4.0, 16.0 + 8.0)
    assert second["b"] == first["b"]  # did not report: kept as it was
    assert accumulate_evidence(first, [client("a", 0.25, 16)], 0.0)["a"] == AccuracyEvidence(4, 16)
    # The rates the rule then uses are the records' (8/24 for a), not this round's 0.25.
    updates = [client("a", 0.25, 16), client("b", 1.0, 4)]
    with_record = noise_aware_weights(updates, 0.1, 0.0, second)
    assert with_record == pytest.approx(
        accuracy_weights([client("a", 8 / 24), client("b", 1.0)], 0.1), rel=1e-12
    )


@pytest.mark.parametrize("cap", [0.3, 0.5, 0.6, 0.9])
def test_cap_holds_and_keeps_the_others_ratios(cap: float) -> None:
    weights = [0.7, 0.2, 0.06, 0.04]
    capped = cap_shares(weights, cap)
    assert sum(capped) == pytest.approx(1.0, abs=1e-12)
    assert max(capped) <= cap + 1e-12
    free = [i for i, w in enumerate(capped) if w < cap - 1e-12]
    for i in free:
        for j in free:
            assert capped[i] / capped[j] == pytest.approx(weights[i] / weights[j], rel=1e-12)
    assert cap_shares(weights, 1.0) == weights


def test_cap_below_one_over_k_is_equal_shares() -> None:
    assert cap_shares([0.9, 0.05, 0.05], 0.1) == pytest.approx([1 / 3] * 3)
    assert cap_shares([1.0, 0.0], 0.5) == pytest.approx([0.5, 0.5])


def test_cap_applies_within_each_task_under_either_rule() -> None:
    updates = [client("a", 1.0), client("b", 0.0), client("c", 0.5, task="code")]
    for rule in ("softmax", "noise-aware"):
        settings = TaskAccuracySettings(rule=rule, max_client_share=0.6)
        result = task_accuracy_aggregate(CURRENT, updates, settings)
        assert result.client_weights["a"] == pytest.approx(0.5 * 0.6)
        assert result.client_weights["b"] == pytest.approx(0.5 * 0.4)
        assert result.client_weights["c"] == pytest.approx(0.5)


def test_noise_aware_shares_move_less_than_the_papers_on_a_small_validation_set() -> None:
    updates = [client("a", 0.75, 8), client("b", 0.5, 8)]
    paper = within_task_weights(updates, TaskAccuracySettings(rule="softmax"))
    aware = within_task_weights(updates, TaskAccuracySettings(rule="noise-aware"))
    assert paper[0] > 0.9  # 2 of 8 prompts hand a 0.92 share
    assert 0.5 < aware[0] < 0.65


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rule", "bayes", "rule must be one of noise-aware, softmax"),
        ("noise_scale", -1.0, "noise_scale must be a finite number"),
        ("noise_scale", math.inf, "noise_scale must be a finite number"),
        ("memory", 1.0, r"memory must be in \[0, 1\)"),
        ("max_client_share", 0.0, r"max_client_share must be in \(0, 1\]"),
        ("max_client_share", 1.5, r"max_client_share must be in \(0, 1\]"),
    ],
)
def test_bad_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TaskAccuracySettings(**{field: value})


@pytest.mark.parametrize("v", [-1, 2.5, None, True])
def test_sanitize_rejects_a_bad_validation_size(v: object) -> None:
    bad = dataclasses.replace(client("a", 0.5), validation_size=v)
    accepted, rejected = sanitize([bad, client("b", 0.5)], CURRENT)
    assert [u.client_id for u in accepted] == ["b"]
    assert "validation_size must be a non-negative integer" in rejected[0].reason


def test_every_server_key_reaches_the_rule() -> None:
    """Each ``[server]`` key changes the within-task weights it is meant to change."""
    updates = [client("a", 0.75, 8), client("b", 0.5, 8), client("c", 0.25, 8)]
    evidence = accumulate_evidence(
        {"a": AccuracyEvidence(0.0, 8.0), "b": AccuracyEvidence(4.0, 8.0)}, updates, 0.5
    )

    def shares(**keys: object) -> list[float]:  # these updates carry accuracies, not pairs
        settings = task_accuracy_settings(ServerConfig(**{"accuracy_rule": "noise-aware", **keys}))
        return within_task_weights(updates, settings, evidence)

    default = shares()
    assert task_accuracy_settings(ServerConfig()) == TaskAccuracySettings()
    for keys in (
        {"accuracy_rule": "softmax"},
        {"accuracy_noise_scale": 1.0},
        {"max_client_share": 0.34},
        {"t_acc": 1.0},
    ):
        assert shares(**keys) != pytest.approx(default), keys
    # accuracy_memory acts through the record the server accumulates.
    for memory in (0.0, 0.9):
        settings = task_accuracy_settings(ServerConfig(accuracy_memory=memory))
        assert settings.memory == memory
    previous = {"a": AccuracyEvidence(0.0, 8.0)}
    assert accumulate_evidence(previous, updates, 0.0) != accumulate_evidence(
        previous, updates, 0.9
    )


def test_server_keeps_the_record_across_rounds_and_checkpoints() -> None:
    from fedmoa.config import RewardConfig
    from fedmoa.federation.config import ClientConfig, ExperimentConfig
    from fedmoa.federation.server import FederatedServer

    reward = RewardConfig(name="r", function="length", role="primary")

    def server(memory: float) -> FederatedServer:
        cfg = ExperimentConfig(
            clients=[ClientConfig(id=c, task="math", rewards=[reward]) for c in "ab"],
            server=ServerConfig(
                method="fedmoa", accuracy_rule="noise-aware", accuracy_memory=memory
            ),
        )
        return FederatedServer(cfg, CURRENT)

    metrics = {"reward": 0.5, "reward/primary": 0.5, "reward/aux_mean": 0.5}
    metrics |= {"weight/primary": 0.5, "loss": 0.1}

    def round_of(s: FederatedServer, t: int, acc_a: float, acc_b: float) -> dict[str, float]:
        updates = [
            dataclasses.replace(client("a", acc_a, 8), metrics=metrics),
            dataclasses.replace(client("b", acc_b, 8), metrics=metrics),
        ]
        return s.aggregate_round(s.configure_round(t), updates).client_weights

    forgetful, remembering = server(0.0), server(0.5)
    for s in (forgetful, remembering):
        round_of(s, 1, 1.0, 0.0)
    assert remembering.state.accuracy_evidence == {
        "a": AccuracyEvidence(8.0, 8.0),
        "b": AccuracyEvidence(0.0, 8.0),
    }
    # Round 2 reports are equal: only the record of round 1 can tell the clients apart.
    assert round_of(forgetful, 2, 0.5, 0.5)["a"] == pytest.approx(0.5)
    assert round_of(remembering, 2, 0.5, 0.5)["a"] > 0.55
    restored = server(0.5)
    restored.load_state_dict(remembering.state_dict())
    assert restored.state.accuracy_evidence == remembering.state.accuracy_evidence
    old = remembering.state_dict()
    del old["accuracy_evidence"]  # a checkpoint from before the record
    restored.load_state_dict(old)
    assert restored.state.accuracy_evidence == {}
