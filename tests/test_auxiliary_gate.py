"""``grpo.auxiliary_gate = "primary_success"``: no auxiliary signal where the primary has none.

In a group where no completion earns the primary, an auxiliary's advantage only moves the policy
among wrong answers, and the hypergradient cannot judge it (the primary has no gradient there);
the gate withholds it exactly there (docs/design.md, "Auxiliaries gated by the primary").
"""

from __future__ import annotations

import math

import pytest
import torch

from fedmoa.grpo.advantages import combine_advantages
from fedmoa.grpo.trainer import GRPOSettings, gate_auxiliaries
from fedmoa.weighting import StaticWeighting
from test_fast_paths import seven_short_trainer
from test_trainer import tiny_policy


def test_only_the_groups_without_a_primary_success_lose_their_auxiliaries():
    nan = math.nan
    rewards = torch.tensor(
        [  # primary, aux ; two groups of 3
            [0.0, 1.0],
            [0.0, 0.0],
            [nan, 1.0],  # no success in group 0: the auxiliary is gated
            [1.0, 0.0],
            [0.0, 1.0],
            [0.0, 0.5],  # one success in group 1: kept
        ]
    )
    gated, fraction = gate_auxiliaries(rewards, 3, primary=0)
    assert fraction == 0.5
    assert torch.isnan(gated[:3, 1]).all() and torch.equal(gated[3:], rewards[3:])
    assert torch.equal(gated[:, 0].nan_to_num(-1), rewards[:, 0].nan_to_num(-1))
    # The gated group then carries no advantage at all; the other is as before.
    weights = torch.tensor([1.0, 1.0])
    before, _ = combine_advantages(rewards, weights, 3)
    after, _ = combine_advantages(gated, weights, 3)
    assert torch.equal(after[:3], torch.zeros(3)) and before[:3].abs().sum() > 0
    assert torch.allclose(after[3:], before[3:])


def test_a_primary_elsewhere_and_no_auxiliaries_are_handled():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [0.2, 0.0]])
    gated, fraction = gate_auxiliaries(rewards, 2, primary=1)  # the primary is column 1
    assert fraction == 1.0 and torch.isnan(gated[:, 0]).all()
    alone, fraction = gate_auxiliaries(rewards[:, :1], 2, primary=0)
    assert torch.equal(alone, rewards[:, :1]) and fraction == 0.0


@pytest.mark.parametrize("gate", ["none", "primary_success"])
def test_the_trainer_logs_the_gated_fraction_only_with_the_gate(gate):
    torch.manual_seed(0)
    policy, tokenizer = tiny_policy()
    settings = GRPOSettings(
        batch_size=2, group_size=4, max_new_tokens=4, lr=1e-3, auxiliary_gate=gate
    )
    weighting = StaticWeighting(["seven", "short"], "seven", [1.0, 0.5])
    history = seven_short_trainer(policy, tokenizer, weighting, settings).train(1)
    assert ("rewards/aux_gated_frac" in history[0]) == (gate == "primary_success")
    if gate == "primary_success":
        assert 0.0 <= history[0]["rewards/aux_gated_frac"] <= 1.0


def test_a_round_records_the_mean_gated_fraction():
    from fedmoa.federation.client import objective_metrics

    history = [
        {"rewards/aux_gated_frac": 1.0, "rewards/a/mean": 0.0},
        {"rewards/aux_gated_frac": 0.5, "rewards/a/mean": 0.5},
    ]
    assert objective_metrics(history, ["a"]) == {
        "rewards/a/mean": 0.5,
        "rewards/aux_gated_frac": 0.75,
    }
    assert objective_metrics([{"rewards/a/mean": 0.5}], ["a"]) == {"rewards/a/mean": 0.5}
