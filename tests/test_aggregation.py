"""Server aggregation: FedMOA's task- and accuracy-aware rule, FedAvg, sanitation, server optimisers.

The server optimisers drive Flower's Message-API strategies; they are checked
against Flower's *legacy* strategies (``flwr.server.strategy``), a separate
implementation, executed here on the same client updates.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import math
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoa.aggregation import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    FlowerServerOptimizer,
    Rejection,
    TaskAccuracySettings,
    fedavg,
    fedavg_aggregate,
    make_server_optimizer,
    sanitize,
    task_accuracy_aggregate,
)
from fedmoa.errors import ConfigError

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {A: (2, 5), B: (5, 2)}
TASKS = ("math", "code", "chat")
FAST = settings(max_examples=100, deadline=None)


def make_adapter(seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
        for k, s in SHAPES.items()
    }


CURRENT = make_adapter(-1)


def update(
    cid: str,
    task: str = "math",
    n: int = 10,
    acc: float = 0.5,
    seed: int | None = None,
    delta: Adapter | None = None,
) -> ClientUpdate:
    """A client update; its delta is derived from the client id unless given."""
    if delta is None:
        delta = make_adapter(zlib.crc32(cid.encode()) if seed is None else seed, scale=0.1)
    return ClientUpdate(cid, task, n, delta, acc)


def in_dtype(adapter: Adapter, dtype: torch.dtype) -> Adapter:
    return {k: v.to(dtype) for k, v in adapter.items()}


def with_dtype(updates: list[ClientUpdate], dtype: torch.dtype) -> list[ClientUpdate]:
    return [dataclasses.replace(u, delta=in_dtype(u.delta, dtype)) for u in updates]


@st.composite
def client_updates(draw: st.DrawFn, min_size: int = 1, max_size: int = 7) -> list[ClientUpdate]:
    count = draw(st.integers(min_size, max_size))
    return [
        update(
            f"client-{i}",
            task=draw(st.sampled_from(TASKS)),
            n=draw(st.integers(1, 1000)),
            acc=draw(st.floats(0.0, 1.0, allow_subnormal=False)),
            seed=draw(st.integers(0, 2**31 - 1)),
        )
        for i in range(count)
    ]


def shifted(current: Adapter, delta: Adapter, scale: float = 1.0) -> Adapter:
    """Oracle for θ + scale·Δ, in float64."""
    return {k: current[k].double() + scale * delta[k].double() for k in current}


def assert_adapters_close(
    actual: Adapter, expected: Adapter, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    assert actual.keys() == expected.keys()
    for k in actual:
        torch.testing.assert_close(actual[k].double(), expected[k].double(), rtol=rtol, atol=atol)


def assert_results_identical(
    r1: AggregationResult, r2: AggregationResult, check_rejected: bool = True
) -> None:
    for name in ("global_adapter", "global_delta"):
        a1, a2 = getattr(r1, name), getattr(r2, name)
        assert all(torch.equal(a1[k], a2[k]) for k in a1), name
    assert r1.task_adapters.keys() == r2.task_adapters.keys()
    for task in r1.task_adapters:
        assert all(
            torch.equal(r1.task_adapters[task][k], r2.task_adapters[task][k]) for k in SHAPES
        )
    assert r1.client_weights == r2.client_weights
    assert r1.task_shares == r2.task_shares
    if check_rejected:
        assert sorted(r1.rejected, key=str) == sorted(r2.rejected, key=str)


def oracle_task_delta(members: list[ClientUpdate], t_acc: float) -> Adapter:
    """Δ_τ straight from the formula α_k = n_k exp(a_k/T) / Σ n_l exp(a_l/T) (no log-space)."""
    raw = np.array([u.num_examples * math.exp(u.accuracy / t_acc) for u in members])
    alphas = raw / raw.sum()
    return {
        k: sum(float(a) * u.delta[k].double() for a, u in zip(alphas, members, strict=True))
        for k in SHAPES
    }


# --- reductions to FedAvg -------------------------------------------------------------------


@FAST
@given(updates=client_updates(), t_acc=st.sampled_from([math.inf, 1e12]))
def test_infinite_temperature_and_gamma_one_is_fedavg(
    updates: list[ClientUpdate], t_acc: float
) -> None:
    result = task_accuracy_aggregate(CURRENT, updates, TaskAccuracySettings(t_acc=t_acc, gamma=1.0))
    baseline = fedavg_aggregate(CURRENT, updates)
    assert_adapters_close(result.global_adapter, shifted(CURRENT, fedavg(updates)))
    assert_adapters_close(result.global_adapter, baseline.global_adapter)
    total = sum(u.num_examples for u in updates)
    for u in updates:
        assert result.client_weights[u.client_id] == pytest.approx(u.num_examples / total, rel=1e-9)
    # T_acc → ∞ is FedAvg within each task whatever γ is: the task adapters agree too.
    assert result.task_adapters.keys() == baseline.task_adapters.keys()
    for task, adapter in result.task_adapters.items():
        assert_adapters_close(adapter, baseline.task_adapters[task])
    assert result.task_shares == pytest.approx(baseline.task_shares, rel=1e-12)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    updates = [update("a", n=1), update("b", n=3)]
    expected = {
        k: (updates[0].delta[k].double() + 3 * updates[1].delta[k].double()) / 4 for k in SHAPES
    }
    assert_adapters_close(fedavg(updates), expected)
    assert fedavg(updates)[A].dtype == torch.float32
    with pytest.raises(ValueError, match="at least one"):
        fedavg([])


# --- order invariance -----------------------------------------------------------------------


@FAST
@given(
    data=st.data(),
    updates=client_updates(),
    t_acc=st.sampled_from([0.01, 0.1, 1.0, math.inf]),
    gamma=st.floats(-2.0, 2.0, allow_subnormal=False),
)
def test_result_does_not_depend_on_client_order(
    data: st.DataObject, updates: list[ClientUpdate], t_acc: float, gamma: float
) -> None:
    # float64 adapters, so that a different summation order would show in the last bits.
    current, updates = in_dtype(CURRENT, torch.float64), with_dtype(updates, torch.float64)
    permuted = data.draw(st.permutations(updates))
    cfg = TaskAccuracySettings(t_acc=t_acc, gamma=gamma)
    assert_results_identical(
        task_accuracy_aggregate(current, updates, cfg),
        task_accuracy_aggregate(current, permuted, cfg),
    )
    assert_results_identical(
        fedavg_aggregate(current, updates), fedavg_aggregate(current, permuted)
    )


# --- sanitation -----------------------------------------------------------------------------


def _with_value(value: float) -> Adapter:
    delta = make_adapter(7, scale=0.1)
    delta[B] = delta[B].clone()
    delta[B][1, 0] = value
    return delta


CORRUPTIONS: dict[str, tuple[Callable[[], ClientUpdate], str]] = {
    "nan": (lambda: update("mallory", delta=_with_value(math.nan)), "non-finite"),
    "inf": (lambda: update("mallory", delta=_with_value(-math.inf)), "non-finite"),
    "shape": (
        lambda: update("mallory", delta={A: torch.zeros(2, 5), B: torch.zeros(2, 5)}),
        "shape",
    ),
    "missing key": (lambda: update("mallory", delta={A: torch.zeros(2, 5)}), "missing 1 key"),
    "extra key": (
        lambda: update(
            "mallory", delta={**make_adapter(3, 0.1), "x.lora_A.weight": torch.zeros(1)}
        ),
        "unexpected 1 key",
    ),
    "dtype": (lambda: update("mallory", delta=make_adapter(3, 0.1, dtype=torch.float64)), "dtype"),
    "not a tensor": (
        lambda: update("mallory", delta={A: np.zeros((2, 5)), B: torch.zeros(5, 2)}),
        "not a torch",
    ),
    "accuracy 1.5": (lambda: update("mallory", acc=1.5), "accuracy"),
    "accuracy nan": (lambda: update("mallory", acc=math.nan), "accuracy"),
    "accuracy -0.1": (lambda: update("mallory", acc=-0.1), "accuracy"),
    "num_examples 0": (lambda: update("mallory", n=0), "num_examples"),
    "num_examples -3": (lambda: update("mallory", n=-3), "num_examples"),
    "num_examples 2.5": (lambda: update("mallory", n=2.5), "num_examples"),  # type: ignore[arg-type]
    "empty task": (lambda: update("mallory", task=""), "task"),
    # No silent casts: only the reference dtype (the transport dtype) is accepted.
    "dtype float16": (
        lambda: update("mallory", delta=make_adapter(3, 0.1, dtype=torch.float16)),
        "dtype",
    ),
    "dtype int32": (
        lambda: update("mallory", delta={A: torch.zeros(2, 5, dtype=torch.int32), B: CURRENT[B]}),
        "dtype",
    ),
    "accuracy missing": (lambda: update("mallory", acc=None), "accuracy is missing"),  # type: ignore[arg-type]
    "metric inf": (
        lambda: dataclasses.replace(update("mallory"), metrics={"loss": math.inf}),
        "not finite",
    ),
    "metric nan": (
        lambda: dataclasses.replace(update("mallory"), metrics={"loss": math.nan}),
        "not finite",
    ),
    "metric not a number": (
        lambda: dataclasses.replace(update("mallory"), metrics={"loss": "low"}),
        "not a number",
    ),
}
GOOD = [
    update("alice", "math", 10, 0.9),
    update("bob", "math", 30, 0.4),
    update("carol", "code", 20, 0.7),
]


@pytest.mark.parametrize("aggregate", [task_accuracy_aggregate, fedavg_aggregate])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_update_is_dropped_with_a_logged_reason(
    kind: str, aggregate: Callable[..., AggregationResult], caplog: pytest.LogCaptureFixture
) -> None:
    make_bad, reason_part = CORRUPTIONS[kind]
    if aggregate is fedavg_aggregate and kind in ("accuracy 1.5", "accuracy -0.1"):
        # FedAvg does not weigh by accuracy: any finite one is only reported.
        assert aggregate(CURRENT, [GOOD[0], make_bad(), *GOOD[1:]]).rejected == []
        return
    with caplog.at_level(logging.WARNING, logger="fedmoa.aggregation"):
        result = aggregate(CURRENT, [GOOD[0], make_bad(), *GOOD[1:]])
    assert [r.client_id for r in result.rejected] == ["mallory"]
    reason = result.rejected[0].reason
    assert reason_part in reason and "\n" not in reason
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mallory" in m and reason in m for m in logged), logged
    assert "mallory" not in result.client_weights
    assert_results_identical(result, aggregate(CURRENT, GOOD), check_rejected=False)


def test_sanitize_keeps_valid_updates_in_input_order() -> None:
    accepted, rejected = sanitize(GOOD, CURRENT)
    assert accepted == GOOD and rejected == []


def test_duplicate_client_ids_are_all_dropped(caplog: pytest.LogCaptureFixture) -> None:
    twins = [update("eve", n=5), update("eve", n=50, seed=3)]
    with caplog.at_level(logging.WARNING, logger="fedmoa.aggregation"):
        accepted, rejected = sanitize([*GOOD, *twins], CURRENT)
    assert accepted == GOOD
    assert [r.client_id for r in rejected] == ["eve", "eve"]
    assert "eve" in caplog.text and "share this client_id" in caplog.text


def test_robust_norm_drops_an_absurd_update(caplog: pytest.LogCaptureFixture) -> None:
    huge = ClientUpdate("mallory", "math", 10, make_adapter(5, scale=1e4), 1.0)
    # Without robust_norm the update is finite and well-formed, so it is accepted ...
    assert sanitize([*GOOD, huge], CURRENT)[1] == []
    # ... and with it, its norm (~1e5 × the others) gets it dropped and logged.
    with caplog.at_level(logging.WARNING, logger="fedmoa.aggregation"):
        result = task_accuracy_aggregate(CURRENT, [*GOOD, huge], robust_norm=5.0)
    assert [r.client_id for r in result.rejected] == ["mallory"]
    assert "median norm" in result.rejected[0].reason and "mallory" in caplog.text
    assert_results_identical(result, task_accuracy_aggregate(CURRENT, GOOD), check_rejected=False)
    # A generous threshold keeps it.
    assert sanitize([*GOOD, huge], CURRENT, robust_norm=1e9)[1] == []


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_invalid_robust_norm_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="robust_norm"):
        sanitize(GOOD, CURRENT, robust_norm=bad)


def test_round_without_usable_updates_leaves_the_adapter_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedmoa.aggregation"):
        result = task_accuracy_aggregate(CURRENT, [update("mallory", acc=2.0)])
    assert all(torch.equal(result.global_adapter[k], CURRENT[k]) for k in SHAPES)
    assert all(not result.global_delta[k].any() for k in SHAPES)
    assert result.task_adapters == {} and result.client_weights == {}
    assert result.rejected == [Rejection("mallory", result.rejected[0].reason)]
    assert "unchanged" in caplog.text


# --- task shares (γ) ------------------------------------------------------------------------

UNEVEN = [
    update("m1", "math", 100, 0.5),
    update("m2", "math", 200, 0.5),
    update("m3", "math", 300, 0.5),
    update("c1", "code", 50, 0.5),
]


def test_gamma_zero_gives_tasks_equal_shares_whatever_their_size() -> None:
    result = task_accuracy_aggregate(CURRENT, UNEVEN, TaskAccuracySettings(gamma=0.0))
    assert result.task_shares == pytest.approx({"math": 0.5, "code": 0.5})
    assert result.client_weights["c1"] == pytest.approx(0.5)
    assert sum(result.client_weights.values()) == pytest.approx(1.0)


def test_gamma_one_weights_tasks_by_samples() -> None:
    result = task_accuracy_aggregate(CURRENT, UNEVEN, TaskAccuracySettings(gamma=1.0))
    assert result.task_shares == pytest.approx({"math": 600 / 650, "code": 50 / 650})


@FAST
@given(
    updates=client_updates(),
    gamma=st.floats(-3.0, 3.0, allow_subnormal=False),
    t_acc=st.sampled_from([0.1, 1.0]),
)
def test_task_shares_follow_samples_to_the_power_gamma(
    updates: list[ClientUpdate], gamma: float, t_acc: float
) -> None:
    result = task_accuracy_aggregate(
        CURRENT, updates, TaskAccuracySettings(t_acc=t_acc, gamma=gamma)
    )
    samples = {
        t: sum(u.num_examples for u in updates if u.task == t) for t in {u.task for u in updates}
    }
    norm = sum(n**gamma for n in samples.values())
    assert result.task_shares == pytest.approx(
        {t: n**gamma / norm for t, n in samples.items()}, rel=1e-9
    )
    # The global delta is the π-weighted mix of the task deltas, and weights add up to 1.
    mix = {
        k: sum(
            result.task_shares[t] * (result.task_adapters[t][k].double() - CURRENT[k].double())
            for t in samples
        )
        for k in SHAPES
    }
    assert_adapters_close(result.global_delta, mix, atol=1e-6)
    assert sum(result.client_weights.values()) == pytest.approx(1.0)


# --- accuracy-aware weights within a task ---------------------------------------------------


@FAST
@given(
    n=st.integers(1, 1000),
    percents=st.lists(st.integers(0, 100), min_size=2, max_size=5, unique=True),
    t_acc=st.sampled_from([0.01, 0.1, 1.0, 10.0]),
)
def test_higher_accuracy_gets_more_weight_within_a_task(
    n: int, percents: list[int], t_acc: float
) -> None:
    accs = [p / 100 for p in percents]
    updates = [update(f"c{i}", "math", n, a) for i, a in enumerate(accs)]
    weights = task_accuracy_aggregate(
        CURRENT, updates, TaskAccuracySettings(t_acc=t_acc, rule="softmax")
    ).client_weights
    by_acc = [weights[f"c{i}"] for i in np.argsort(accs)]
    assert all(lo < hi for lo, hi in itertools.pairwise(by_acc)), by_acc


@FAST
@given(
    updates=client_updates(),
    t_acc=st.sampled_from([0.05, 0.1, 0.5, 2.0]),
    lr=st.floats(0.01, 10.0, allow_subnormal=False),
)
def test_task_adapters_match_the_formula_and_server_lr_scales_the_step(
    updates: list[ClientUpdate], t_acc: float, lr: float
) -> None:
    result = task_accuracy_aggregate(
        CURRENT, updates, TaskAccuracySettings(t_acc=t_acc, server_lr=lr, rule="softmax")
    )
    unit = task_accuracy_aggregate(
        CURRENT, updates, TaskAccuracySettings(t_acc=t_acc, server_lr=1.0, rule="softmax")
    )
    for task, adapter in result.task_adapters.items():
        members = [u for u in updates if u.task == task]
        assert_adapters_close(adapter, shifted(CURRENT, oracle_task_delta(members, t_acc), lr))
    assert_adapters_close(result.global_adapter, shifted(CURRENT, unit.global_delta, lr))
    assert_adapters_close(result.global_delta, unit.global_delta, atol=0, rtol=0)
    fed = fedavg_aggregate(CURRENT, updates, server_lr=lr)
    assert_adapters_close(fed.global_adapter, shifted(CURRENT, fedavg(updates), lr))


def test_tiny_temperature_sends_all_weight_to_the_best_client() -> None:
    updates = [
        update("a", n=1000, acc=0.50),
        update("b", n=1, acc=0.51),
        update("c", n=10, acc=0.2),
    ]
    result = task_accuracy_aggregate(
        CURRENT, updates, TaskAccuracySettings(t_acc=1e-300, rule="softmax")
    )
    assert result.client_weights == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert_adapters_close(result.global_adapter, shifted(CURRENT, updates[1].delta))


@FAST
@given(
    updates=client_updates(min_size=2),
    new_accs=st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=7, max_size=7),
)
def test_a_task_accuracy_does_not_leak_into_another_task(
    updates: list[ClientUpdate], new_accs: list[float]
) -> None:
    """Changing the code clients' accuracies leaves every non-code weight and adapter bit-identical."""
    changed = [
        dataclasses.replace(u, accuracy=new_accs[i]) if u.task == "code" else u
        for i, u in enumerate(updates)
    ]
    before, after = (
        task_accuracy_aggregate(CURRENT, updates),
        task_accuracy_aggregate(CURRENT, changed),
    )
    assert before.task_shares == after.task_shares
    for u in updates:
        if u.task != "code":
            assert before.client_weights[u.client_id] == after.client_weights[u.client_id]
    for task in before.task_adapters.keys() - {"code"}:
        assert all(
            torch.equal(before.task_adapters[task][k], after.task_adapters[task][k]) for k in SHAPES
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("t_acc", 0.0),
        ("t_acc", -1.0),
        ("t_acc", math.nan),
        ("gamma", math.nan),
        ("gamma", math.inf),
        ("server_lr", 0.0),
        ("server_lr", math.inf),
    ],
)
def test_invalid_settings_are_config_errors(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        TaskAccuracySettings(**{field: value})
    if field == "server_lr":
        with pytest.raises(ConfigError, match=field):
            fedavg_aggregate(CURRENT, GOOD, server_lr=value)


def test_low_precision_adapters_keep_their_dtype() -> None:
    current = in_dtype(CURRENT, torch.bfloat16)
    result = task_accuracy_aggregate(current, with_dtype(GOOD, torch.bfloat16))
    assert result.rejected == []
    assert {t.dtype for t in result.global_adapter.values()} == {torch.bfloat16}
    assert {t.dtype for a in result.task_adapters.values() for t in a.values()} == {torch.bfloat16}


# --- server optimisers vs Flower's legacy strategies ----------------------------------------

OPTIMIZER_CASES = [
    ("fedadam", {}),
    ("fedadam", {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
    ("fedyogi", {}),
    ("fedyogi", {"eta": 0.1, "tau": 1e-4}),
    ("fedavgm", {"server_momentum": 0.9}),
    ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.5}),
    ("fedavgm", {}),
]


def _legacy_flower(name: str, params: dict[str, float], initial: Adapter) -> object:
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvgM, FedYogi

    cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedavgm": FedAvgM}[name]
    arrays = [initial[k].double().numpy() for k in sorted(initial)]
    return cls(initial_parameters=ndarrays_to_parameters(arrays), **params)


def _legacy_round(
    strategy: object, server_round: int, current: Adapter, updates: list[ClientUpdate]
) -> Adapter:
    """One round of a legacy Flower strategy: clients send θ_t + Δ_k, Flower does the rest."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    keys = sorted(current)
    results = [
        (
            None,
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(
                    [(current[k].double() + u.delta[k].double()).numpy() for k in keys]
                ),
                u.num_examples,
                {},
            ),
        )
        for u in updates
    ]
    parameters, _ = strategy.aggregate_fit(server_round, results, [])  # type: ignore[attr-defined]
    return {
        k: torch.from_numpy(a)
        for k, a in zip(keys, parameters_to_ndarrays(parameters), strict=True)
    }


@pytest.mark.parametrize(("name", "params"), OPTIMIZER_CASES)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_server_optimizer_matches_flower_over_three_rounds(
    name: str, params: dict[str, float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    current = make_adapter(seed, dtype=torch.float64)
    ours = FlowerServerOptimizer(name, **params)  # type: ignore[arg-type]
    # Full hyperparameters: legacy FedAdam's default tau (1e-9) differs from the new one (1e-3).
    legacy = _legacy_flower(name, ours.hyperparameters, current)
    for server_round in (1, 2, 3):
        updates = [
            ClientUpdate(
                f"c{i}",
                "math",
                int(rng.integers(1, 100)),
                make_adapter(int(rng.integers(2**31)), 0.1, dtype=torch.float64),
                0.5,
            )
            for i in range(3)
        ]
        expected = _legacy_round(legacy, server_round, current, updates)
        current = ours.step(current, fedavg(updates))
        assert_adapters_close(current, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "params"), OPTIMIZER_CASES)
def test_server_optimizer_resumes_from_its_state_dict(name: str, params: dict[str, float]) -> None:
    deltas = [make_adapter(s, 0.1) for s in (1, 2, 3)]
    straight = make_server_optimizer(name, **params)  # type: ignore[arg-type]
    theta = CURRENT
    for delta in deltas[:2]:
        theta = straight.step(theta, delta)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_server_optimizer(name, **params)  # type: ignore[arg-type]
    resumed.load_state_dict(torch.load(buffer))
    expected, actual = straight.step(theta, deltas[2]), resumed.step(theta, deltas[2])
    assert all(torch.equal(expected[k], actual[k]) for k in SHAPES)
    assert actual[A].dtype == torch.float32
    # A fresh optimiser (round 1, empty moments) would take a different step.
    fresh = make_server_optimizer(name, **params).step(theta, deltas[2])  # type: ignore[arg-type]
    if name != "fedavgm" or params.get("server_momentum"):
        assert not torch.equal(fresh[A], actual[A])


def test_fedavgm_with_flower_defaults_is_plain_fedavg() -> None:
    delta = make_adapter(4, 0.1)
    stepped = make_server_optimizer("fedavgm").step(CURRENT, delta)
    assert_adapters_close(stepped, shifted(CURRENT, delta))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedsgd", {}, "must be one of"),
        ("fedadam", {"server_momentum": 0.9}, "does not take"),
        ("fedavgm", {"eta": 0.1}, "does not take"),
        ("fedadam", {"beta_1": 1.0}, "beta_1"),
        ("fedyogi", {"tau": 0.0}, "tau"),
        ("fedavgm", {"server_learning_rate": -1.0}, "server_learning_rate"),
    ],
)
def test_bad_server_optimizer_config_is_a_config_error(
    name: str, params: dict[str, float], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_server_optimizer(name, **params)  # type: ignore[arg-type]


def test_loading_another_optimizers_state_fails() -> None:
    with pytest.raises(ValueError, match="fedadam"):
        make_server_optimizer("fedyogi").load_state_dict(
            make_server_optimizer("fedadam").state_dict()
        )


def test_server_optimizer_rejects_a_mismatched_delta() -> None:
    optimizer = make_server_optimizer("fedavgm", server_momentum=0.9)
    with pytest.raises(ValueError, match="shapes"):
        optimizer.step(CURRENT, {A: torch.zeros(1, 5), B: torch.zeros(5, 2)})
    with pytest.raises(ValueError, match="keys"):
        optimizer.step(CURRENT, {A: torch.zeros(2, 5)})
