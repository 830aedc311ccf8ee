"""The gain rule's harm test: an update whose paired gain is significantly below zero gets no weight.

``ĝ_k + z·sqrt(q_k/N_k) < 0`` on this round's pairs of the update, or on its client's record
(docs/design.md, "Excluding a harmful update" and "Which pairs the harm test reads"); the cases
are computed by hand from that formula.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from fedmoa.aggregation import (
    GainEvidence,
    TaskAccuracySettings,
    accumulate_gain_evidence,
    cap_shares,
    gain_weights,
    harmful,
    task_accuracy_aggregate,
    within_task_weights,
)
from fedmoa.errors import ConfigError
from fedmoa.federation.config import ServerConfig, load_experiment
from fedmoa.federation.server import task_accuracy_settings
from test_gain_rule import ADAPTER, pairs, update

HARM = TaskAccuracySettings(harm_z=2.33)


def record(before: list[float], after: list[float]) -> GainEvidence:
    return accumulate_gain_evidence({}, [update("c", pairs(before, after))], 0.0)["c"]


def test_the_study_collapse_is_harmful_and_a_small_sample_is_not():
    # sums-b at V = 32 (docs/results.md): 9 of 32 right before, none after. ĝ = -9/32,
    # q = (9 + ½)/(32 + 1), SE = sqrt(q/32) = 0.0949: ĝ/SE = -2.96.
    collapse = record([1.0] * 9 + [0.0] * 23, [0.0] * 32)
    se = math.sqrt((9.5 / 33) / 32)
    assert -9 / 32 / se == pytest.approx(-2.96, abs=0.01)
    assert harmful(collapse, 2.33)
    assert not harmful(collapse, 3.0)
    # The same rate on 8 prompts is not evidence: ĝ = -0.25, SE = sqrt((2.5/9)/8) = 0.186.
    assert not harmful(record([1.0] * 2 + [0.0] * 6, [0.0] * 8), 2.33)


def test_no_change_no_gain_and_no_pairs_are_never_harmful():
    assert not harmful(record([1.0] * 16, [1.0] * 16), 0.1)  # a saturated task
    assert not harmful(record([0.0] * 16, [1.0] * 16), 0.1)
    assert not harmful(GainEvidence(), 0.1)
    # Balanced changes: ĝ = 0, never below 0 by any number of standard errors.
    assert not harmful(record([1.0, 0.0] * 8, [0.0, 1.0] * 8), 0.01)


def test_a_harmful_update_gets_nothing_and_the_others_keep_their_ratios():
    updates = [
        update("bad", pairs([1.0] * 12 + [0.0] * 20, [0.0] * 32)),
        update("good", pairs([0.0] * 32, [1.0] * 8 + [0.0] * 24)),
        update("flat", pairs([0.0] * 32, [0.0] * 32)),
    ]
    plain = gain_weights(updates, 0.1, 5.0)
    assert plain[0] > 0.05  # the tempered weights alone leave it a real share
    shares = within_task_weights(updates, HARM)
    assert shares[0] == 0.0
    assert sum(shares) == pytest.approx(1.0)
    assert shares[1] / shares[2] == pytest.approx(plain[1] / plain[2], rel=1e-12)
    # Off by default: the same weights as the rule alone.
    assert within_task_weights(updates, TaskAccuracySettings()) == plain


RECORD = TaskAccuracySettings(harm_z=2.33, harm_evidence="record")
EITHER = TaskAccuracySettings(harm_z=2.33, harm_evidence="either")


def test_the_record_sums_evidence_across_rounds():
    """Two rounds of -3 of 8 (ρ = 0.5, fresh rows): alone neither is evidence, together they are."""
    first = update("bad", pairs([1.0] * 3 + [0.0] * 5, [0.0] * 8))
    second = update("bad", pairs([1.0] * 3 + [0.0] * 5, [0.0] * 8, first_row=8))
    one = accumulate_gain_evidence({}, [first], 0.5)
    two = accumulate_gain_evidence(one, [second], 0.5)
    assert not harmful(one["bad"], 1.8)
    assert harmful(two["bad"], 1.8)
    peer = update("peer", pairs([0.0] * 8, [0.0] * 8))
    record = replace(RECORD, harm_z=1.8)
    assert within_task_weights([second, peer], record, two)[0] == 0.0
    # the default reads this round's pairs only: -3 of 8 is not evidence on its own
    assert within_task_weights([second, peer], replace(record, harm_evidence="round"), two)[0] > 0


def two_rounds(first: list[tuple[float, float]], second: list[tuple[float, float]]):
    """Round 2's update of client "a" (32 rows, the same each round) and its record (ρ = ½)."""
    one = update("a", pairs(*map(list, zip(*first, strict=True))))
    two = update("a", pairs(*map(list, zip(*second, strict=True))))
    record = accumulate_gain_evidence(accumulate_gain_evidence({}, [one], 0.5), [two], 0.5)
    peer = update("peer", pairs([0.0] * 32, [0.0] * 32))
    return [two, peer], record


def test_a_fresh_collapse_behind_a_good_round_is_excluded():
    """After the study's seed 1, round 2: a client that gained in round 1 turns 13 of 22 right
    answers wrong.

    This round: ĝ = -13/32, q = 13.5/33, z = -3.59. Its record (round 1's +8 at ρ = ½): Σd = -9
    over Σw = 48, Σ|d| = 17, N = 32: z = -0.1875/sqrt((17.5/49)/32) = -1.78, no evidence.
    """
    first = [(0.0, 1.0)] * 8 + [(1.0, 1.0)] * 16 + [(0.0, 0.0)] * 8
    second = [(1.0, 0.0)] * 13 + [(1.0, 1.0)] * 9 + [(0.0, 0.0)] * 10
    updates, record = two_rounds(first, second)
    assert -0.1875 / math.sqrt((17.5 / 49) / 32) == pytest.approx(-1.78, abs=0.01)
    assert within_task_weights(updates, HARM, record) == [0.0, 1.0]
    assert within_task_weights(updates, RECORD, record)[0] > 0.1
    assert within_task_weights(updates, EITHER, record) == [0.0, 1.0]


def test_a_mild_update_after_a_collapse_is_not_excluded():
    """After the study's seed 2, round 2: after round 1's collapse (20 right answers lost) the
    update loses 3 of 30. This round: z = -(3/32)/sqrt((3.5/33)/32) = -1.63. The record still
    carries round 1: Σd = -13, Σw = 48, Σ|d| = 13: z = -2.92, and excludes it."""
    first = [(1.0, 0.0)] * 20 + [(0.0, 0.0)] * 12
    second = [(1.0, 1.0)] * 27 + [(1.0, 0.0)] * 3 + [(0.0, 0.0)] * 2
    updates, record = two_rounds(first, second)
    assert -(3 / 32) / math.sqrt((3.5 / 33) / 32) == pytest.approx(-1.63, abs=0.01)
    assert (-13 / 48) / math.sqrt((13.5 / 49) / 32) == pytest.approx(-2.92, abs=0.01)
    assert within_task_weights(updates, HARM, record)[0] > 0.1
    assert within_task_weights(updates, RECORD, record)[0] == 0.0
    assert within_task_weights(updates, EITHER, record)[0] == 0.0


def test_a_task_whose_every_update_is_harmful_stays_put():
    current = {k: torch.ones_like(v) for k, v in ADAPTER.items()}
    collapse = pairs([1.0] * 12 + [0.0] * 20, [0.0] * 32)
    updates = [
        update("a", collapse, task="sums", delta=-1.0),
        update("b", collapse, task="sums", delta=-2.0),
        update("c", pairs([0.0] * 8, [1.0] * 8), task="code", delta=4.0),
    ]
    result = task_accuracy_aggregate(current, updates, HARM)
    assert result.client_weights == {"a": 0.0, "b": 0.0, "c": 0.5}
    for name, tensor in current.items():
        assert torch.equal(result.task_adapters["sums"][name], tensor)
        # the code task keeps its share π = ½; the sums task's part of the mix is zero
        assert torch.allclose(result.global_adapter[name], tensor + 0.5 * 4.0)


def test_the_cap_gives_an_excluded_client_none_of_the_excess():
    # c0 excluded; c1 would own the rest, the cap (½ of four) holds it, and c2, c3 take the excess.
    assert cap_shares([0.0, 0.9, 0.05, 0.05], 0.5, [True, False, False, False]) == pytest.approx(
        [0.0, 0.5, 0.25, 0.25]
    )
    # Only one left: it keeps the cap and the rest of the task's update is left out.
    capped = cap_shares([0.0, 1.0, 0.0, 0.0], 0.5, [True, False, True, True])
    assert capped == pytest.approx([0.0, 0.5, 0.0, 0.0])
    updates = [
        update("bad", pairs([1.0] * 12 + [0.0] * 20, [0.0] * 32)),
        update("good", pairs([0.0] * 32, [1.0] * 8 + [0.0] * 24)),
    ]
    capped_settings = TaskAccuracySettings(harm_z=2.33, max_client_share=0.6)
    assert within_task_weights(updates, capped_settings) == pytest.approx([0.0, 0.6])


def test_the_server_key_reaches_the_rule_and_bad_values_are_refused():
    assert task_accuracy_settings(ServerConfig(accuracy_harm_z=2.33)).harm_z == 2.33
    assert task_accuracy_settings(ServerConfig()).harm_z is None
    with pytest.raises(ValidationError, match="accuracy_harm_z tests the paired gain"):
        ServerConfig(accuracy_harm_z=2.0, accuracy_rule="noise-aware")
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValidationError, match="accuracy_harm_z"):
            ServerConfig(accuracy_harm_z=bad)
    with pytest.raises(ConfigError, match="harm_z tests the paired gain"):
        TaskAccuracySettings(rule="softmax", harm_z=2.0)
    with pytest.raises(ConfigError, match="harm_z must be a finite number > 0"):
        TaskAccuracySettings(harm_z=math.nan)


def test_the_evidence_key_reaches_the_rule_and_is_refused_without_the_test(tmp_path):
    settings = task_accuracy_settings(
        ServerConfig(accuracy_harm_z=2.33, accuracy_harm_evidence="record")
    )
    assert settings.harm_evidence == "record"
    assert task_accuracy_settings(ServerConfig()).harm_evidence == "round"
    with pytest.raises(ValidationError, match="accuracy_harm_evidence"):
        ServerConfig(accuracy_harm_evidence="record")
    with pytest.raises(ValidationError, match="accuracy_harm_evidence"):
        ServerConfig(accuracy_harm_z=2.33, accuracy_harm_evidence="both")
    with pytest.raises(ConfigError, match="harm_evidence must be one of round, record, either"):
        TaskAccuracySettings(harm_z=2.33, harm_evidence="pooled")
    # set in a file without the test it would do nothing: one line naming the key
    config = tmp_path / "run.toml"
    config.write_text(
        '[server]\nmethod = "fedmoa"\nnum_clients = 2\naccuracy_harm_evidence = "round"\n'
    )
    with pytest.raises(ConfigError, match=r"run\.toml: server\.accuracy_harm_evidence .* set "
                       r"server\.accuracy_harm_z"):  # fmt: skip
        load_experiment(config)
    config.write_text(
        '[server]\nmethod = "fedmoa"\nnum_clients = 2\naccuracy_harm_z = 2.33\n'
        'accuracy_harm_evidence = "record"\n'
    )
    assert task_accuracy_settings(load_experiment(config).server).harm_evidence == "record"
