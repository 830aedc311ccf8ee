"""The ``gain`` accuracy rule: a client's share follows the paired gain of its update.

Each client scores freshly drawn validation prompts with its start adapter and its trained one;
the server weighs ``exp(ĝ_k/T_τ)`` with ``ĝ_k`` the mean of ``after − before`` and
``T_τ = T_acc + κ·sqrt(q̄/N̄)`` (docs/design.md, "The gain of an update"). The cases are computed
by hand from those formulas.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedmoa.aggregation import (
    ClientUpdate,
    GainEvidence,
    TaskAccuracySettings,
    accumulate_gain_evidence,
    gain_weights,
    noise_aware_weights,
    sanitize,
    task_accuracy_aggregate,
)
from fedmoa.errors import FedMOAError
from fedmoa.federation.client import validation_indices
from fedmoa.federation.config import load_experiment
from fedmoa.federation.flower.records import pairs_to_record, record_to_pairs
from fedmoa.federation.server import FederatedServer
from test_embedded import run_embedded, write_experiment

ADAPTER = {"lora_A": torch.zeros(2, 2), "lora_B": torch.zeros(2, 2)}


def update(cid: str, pairs, task: str = "t", n: int = 8, delta: float = 0.0) -> ClientUpdate:
    after = [a for _, _, a in pairs]
    return ClientUpdate(
        client_id=cid,
        task=task,
        num_examples=n,
        delta={k: torch.full_like(v, delta) for k, v in ADAPTER.items()},
        accuracy=sum(after) / len(after) if after else 0.0,
        validation_size=len(pairs),
        validation_pairs=tuple(pairs),
    )


def pairs(before: list[float], after: list[float], first_row: int = 0):
    return [(first_row + i, b, a) for i, (b, a) in enumerate(zip(before, after, strict=True))]


def expected_two_client_share(gain_a: float, gain_b: float, changed: float, prompts: float,
                              t_acc: float = 0.1, kappa: float = 5.0) -> float:  # fmt: skip
    """α_a of two clients with equal n under the gain rule, from the docs' formula."""
    temperature = t_acc + kappa * math.sqrt(changed / prompts)
    return 1.0 / (1.0 + math.exp((gain_b - gain_a) / temperature))


def test_equal_gains_get_equal_shares_whatever_the_prompts_difficulty():
    easy = update("easy", pairs([1, 1, 1, 0], [1, 1, 1, 1]))  # 0.75 -> 1.00
    hard = update("hard", pairs([0, 0, 0, 0], [1, 0, 0, 0]))  # 0.00 -> 0.25
    assert gain_weights([easy, hard], 0.1, 5.0) == pytest.approx([0.5, 0.5])
    # The after-accuracy alone (the noise-aware rule) credits the easy set instead.
    favoured, other = noise_aware_weights([easy, hard], 0.1, 5.0)
    assert favoured > 0.6 > other


def test_a_client_whose_update_hurts_gets_less_by_the_formula():
    good = update("good", pairs([0, 0, 1, 0], [1, 1, 1, 0]))  # +2 of 4
    bad = update("bad", pairs([1, 1, 0, 0], [0, 1, 0, 0]))  # -1 of 4
    alphas = gain_weights([good, bad], 0.1, 5.0)
    # q̄ = (3 changed + 0.5) / (8 pairs + 1); N̄ = 4 distinct prompts each
    share = expected_two_client_share(0.5, -0.25, 3.5 / 9, 4.0)
    assert alphas == pytest.approx([share, 1.0 - share])
    assert alphas[0] > alphas[1]


def test_a_client_without_pairs_gets_the_pooled_gain():
    good = update("good", pairs([0, 0], [1, 1]))
    bad = update("bad", pairs([1, 1], [0, 0]))
    silent = update("silent", [])
    weights = gain_weights([good, bad, silent], 0.1, 5.0)
    # pooled gain 0: between the two, and with two hand-computed logits around it
    assert weights[0] > weights[2] > weights[1]
    assert gain_weights([silent, update("quiet", [])], 0.1, 5.0) == pytest.approx([0.5, 0.5])


def test_repeated_prompts_do_not_shrink_the_standard_error():
    same = accumulate_gain_evidence({}, [update("a", pairs([0, 0], [1, 0]))], 0.5)
    same = accumulate_gain_evidence(same, [update("a", pairs([0, 0], [1, 0]))], 0.5)
    fresh = accumulate_gain_evidence({}, [update("a", pairs([0, 0], [1, 0]))], 0.5)
    fresh = accumulate_gain_evidence(fresh, [update("a", pairs([0, 0], [1, 0], 10))], 0.5)
    assert same["a"].distinct == pytest.approx(2.0)  # rows 0 and 1, twice each
    assert fresh["a"].distinct == pytest.approx((2 * 0.5 + 2) ** 2 / (2 * 0.25 + 2))  # 3.6
    # Both records have the same mean gain; only the fresh one is more evidence.
    for record in (same["a"], fresh["a"]):
        assert record.gain_sum / record.weight == pytest.approx(0.5)
    # So against the same peer, the repeated record's difference moves the shares less.
    peer = {"b": GainEvidence({20: (0.0, 0.0, 1.0), 21: (0.0, 0.0, 1.0)})}
    updates = [update("a", []), update("b", [])]
    repeated = gain_weights(updates, 0.1, 5.0, {**peer, "a": same["a"]})
    distinct = gain_weights(updates, 0.1, 5.0, {**peer, "a": fresh["a"]})
    assert 0.5 < repeated[0] < distinct[0]


def test_memory_discounts_earlier_rounds_and_merges_a_row_seen_again():
    first = accumulate_gain_evidence({}, [update("a", [(3, 0.0, 1.0)])], 0.5)
    second = accumulate_gain_evidence(first, [update("a", [(3, 1.0, 0.0), (4, 0.0, 0.0)])], 0.5)
    assert second["a"].rows == {3: (0.5 - 1.0, 0.5 + 1.0, 1.5), 4: (0.0, 0.0, 1.0)}
    quiet = accumulate_gain_evidence(second, [update("b", [(0, 0.0, 1.0)])], 0.5)
    assert quiet["a"] is second["a"]  # a client that did not report keeps its record


def test_the_server_rule_weighs_by_gain_and_checkpoints_its_record(tmp_path):
    settings = TaskAccuracySettings(rule="gain")
    good = update("good", pairs([0, 0, 0, 0], [1, 1, 1, 0]), delta=1.0)
    bad = update("bad", pairs([1, 1, 1, 1], [1, 1, 0, 0]), delta=-1.0)
    result = task_accuracy_aggregate(ADAPTER, [good, bad], settings)
    share = result.client_weights["good"]
    assert share == pytest.approx(expected_two_client_share(0.75, -0.5, 5.5 / 9, 4.0))
    assert result.global_adapter["lora_A"][0, 0].item() == pytest.approx(2 * share - 1)

    cfg = load_experiment(write_experiment(tmp_path, "fedmoa", rounds=1))
    server = FederatedServer(cfg, ADAPTER)
    server.state.gain_evidence = accumulate_gain_evidence({}, [good, bad], 0.5)
    restored = FederatedServer(cfg, ADAPTER)
    restored.load_state_dict(server.state_dict())
    assert restored.state.gain_evidence == server.state.gain_evidence


@pytest.mark.parametrize(
    ("bad_pairs", "reason"),
    [
        ([(0, 0.0, 1.0), (0, 1.0, 1.0)], "rows must be distinct"),
        ([(-1, 0.0, 1.0)], "rows must be distinct non-negative"),
        ([(0, 0.0, 1.5)], "scores must be in [0, 1]"),
        ([(0, 0.0, float("nan"))], "scores must be finite"),
        ([(0, 0.0)], "entries must be (row, before, after)"),
    ],
)
def test_malformed_pairs_drop_the_update_with_one_line(bad_pairs, reason):
    malformed = dataclasses.replace(update("x", []), validation_pairs=tuple(bad_pairs))
    accepted, rejected = sanitize([malformed], ADAPTER)
    assert accepted == [] and reason in rejected[0].reason and "\n" not in rejected[0].reason


def test_pairs_travel_through_a_flower_record_unchanged():
    sent = ((3, 0.0, 1.0), (7, 1.0, 0.5))
    assert record_to_pairs(pairs_to_record(sent)) == sent
    broken = pairs_to_record(sent)
    broken["after"] = [1.0]
    with pytest.raises(FedMOAError, match="validation pairs"):
        record_to_pairs(broken)


def test_fresh_validation_draws_are_distinct_seeded_and_change_by_round():
    draws = [validation_indices(40, 8, True, 0, "c", r) for r in (1, 2, 3)]
    assert all(len(set(d)) == 8 and all(0 <= i < 40 for i in d) for d in draws)
    assert draws[0] != draws[1] != draws[2]
    assert draws[0] == validation_indices(40, 8, True, 0, "c", 1)
    assert validation_indices(40, 8, False, 0, "c", 2) == list(range(8))
    assert validation_indices(5, 8, True, 0, "c", 1) == list(range(5))


def test_a_gain_round_reports_paired_scores_of_start_and_trained_adapters(tmp_path):
    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    config.write_text(config.read_text().replace("[server]", '[server]\naccuracy_rule = "gain"'))
    federation, _ = run_embedded(config, tmp_path / "run")
    records = [r for r in federation.run.read_metrics() if r["type"] == "client"]
    assert {r["client"] for r in records} == {"math-a", "math-b", "chain"}
    for record in records:
        assert record["validation_pairs"] == record["validation_size"] > 0
        assert record["accuracy_gain"] == pytest.approx(
            record["accuracy"] - record["accuracy_before"]
        )
    assert set(federation.server.state.gain_evidence) == {"math-a", "math-b", "chain"}
    assert federation.server.state.accuracy_evidence == {}
