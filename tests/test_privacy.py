"""Client-level DP: clipping, the Gaussian mechanism's calibration, opacus's accountant.

The sensitivities are computed by hand from docs/design.md, "Differential privacy"; the
accountant's ε is checked against opacus's own functions, called directly.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedmoa.aggregation import ClientUpdate, TaskAccuracySettings, task_accuracy_aggregate
from fedmoa.privacy import (
    PrivacyAccountant,
    add_gaussian_noise,
    clip_update,
    noise_for_target,
    sensitivity,
    update_norm,
)

SHAPES = {"a.lora_A": (4, 8), "a.lora_B": (8, 4)}


def random_update(scale: float, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_bounds_every_norm_and_keeps_small_updates_as_they_are(dtype):
    for seed in range(20):
        delta = random_update(10 ** random.Random(seed).uniform(-3, 2), seed, dtype)
        clipped, before = clip_update(delta, 1.0)
        assert update_norm(clipped) <= 1.0
        assert before == pytest.approx(update_norm(delta))
        if before <= 1.0:
            assert clipped is delta
        else:  # the direction is kept, up to the dtype's rounding (and its margin)
            rtol = 1e-5 if dtype == torch.float32 else 5 * torch.finfo(dtype).eps
            for k in delta:
                ratio = clipped[k].double() / delta[k].double()
                assert torch.allclose(ratio, torch.full_like(ratio, 1 / before), rtol=rtol)


def test_the_noise_std_is_the_multiplier_times_the_derived_sensitivity():
    assert sensitivity(0.25, 2.0) == 1.0  # 2 · w_max · C
    zero = {"w": torch.zeros(200_000)}
    noisy = add_gaussian_noise(zero, 0.3, torch.Generator().manual_seed(0))
    assert noisy["w"].std().item() == pytest.approx(0.3, rel=0.01)
    again = add_gaussian_noise(zero, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(noisy["w"], again["w"])  # a seeded server draws the same noise


@pytest.mark.parametrize(
    ("rule", "harm_z"), [("softmax", None), ("noise-aware", None), ("gain", None), ("gain", 0.5)]
)
def test_a_capped_accuracy_share_bounds_what_one_client_moves(rule, harm_z):
    """Replacing one client's update and report moves each task's aggregate by at most
    ``2·w_max·C`` with ``w_max = max(cap, 1/K)``, over random reports and updates, under every
    rule as the server runs it with DP (``worst_case_prompts``: the others only rescale in
    proportion), and with the harm test (an excluded client's weight goes to the others, never
    past the cap); the bound is reached within a factor 2."""
    clip, cap, k, v = 1.0, 0.4, 4, 8
    settings = TaskAccuracySettings(
        rule=rule, max_client_share=cap, worst_case_prompts=v, harm_z=harm_z
    )
    zero = {n: torch.zeros(s) for n, s in SHAPES.items()}
    rng = random.Random(0)

    def client(cid: str, seed: int) -> ClientUpdate:
        delta, _ = clip_update(random_update(3.0, seed), clip)
        pairs = tuple((i, float(rng.random() < 0.5), float(rng.random() < 0.5)) for i in range(v))
        accuracy = sum(a for *_, a in pairs) / v
        return ClientUpdate(cid, "t", 8, delta, accuracy, {}, v, pairs if rule == "gain" else ())

    worst, exclusions = 0.0, 0
    for trial in range(300):
        updates = [client(f"c{i}", trial * 10 + i) for i in range(k)]
        swapped = [client("c0", 10_000 + trial), *updates[1:]]
        result = task_accuracy_aggregate(zero, updates, settings)
        a = result.task_adapters["t"]
        b = task_accuracy_aggregate(zero, swapped, settings).task_adapters["t"]
        moved = update_norm({n: a[n] - b[n] for n in a})
        worst = max(worst, moved)
        exclusions += sum(w == 0.0 for w in result.client_weights.values())
        assert moved <= sensitivity(max(cap, 1 / k), clip) + 1e-6
    assert worst > sensitivity(max(cap, 1 / k), clip) / 2
    assert (exclusions > 100) == (harm_z is not None)  # the harm test did act


def test_epsilon_is_opacus_rdp_for_the_composed_releases():
    accountant = PrivacyAccountant("rdp", noise_multiplier=1.1, sample_rate=0.5, releases=2)
    for _ in range(3):
        accountant.step()
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = opacus_rdp.compute_rdp(q=0.5, noise_multiplier=1.1, steps=6, orders=orders)
    expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert accountant.epsilon(1e-5) == pytest.approx(expected)
    assert accountant.epsilon_after(1, 1e-5) > accountant.epsilon(1e-5)
    restored = PrivacyAccountant("rdp", 1.1, 0.5, 2)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    assert PrivacyAccountant("rdp", 1.1, 0.5, 2).epsilon(1e-5) == 0.0


def test_target_epsilon_finds_a_multiplier_that_spends_it():
    z = noise_for_target(8.0, 1e-5, sample_rate=1.0, rounds=5, releases=2, kind="rdp")
    accountant = PrivacyAccountant("rdp", z, 1.0, 2)
    for _ in range(5):
        accountant.step()
    assert accountant.epsilon(1e-5) <= 8.0
    assert accountant.epsilon(1e-5) == pytest.approx(8.0, rel=0.05)
    assert math.isfinite(z) and z > 0


PRIVACY = "\n[privacy]\nclip = 0.5\nnoise_multiplier = 0.8\ndelta = 1e-5\n"


def private_experiment(tmp_path, method: str = "fedavg", table: str = PRIVACY, rounds: int = 2):
    from test_embedded import write_experiment

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_experiment(tmp_path, method, rounds=rounds)
    config.write_text(config.read_text() + table)
    return config


def test_a_private_run_clips_noises_and_accounts_every_round(tmp_path):
    from test_embedded import run_embedded

    federation, _ = run_embedded(private_experiment(tmp_path), tmp_path / "run")
    records = federation.run.read_metrics()
    clients = [r for r in records if r["type"] == "client"]
    assert clients and all("privacy/update_norm" in r for r in clients)
    rounds = [r for r in records if r["type"] == "round"]
    epsilons = [r["privacy/epsilon"] for r in rounds]
    accountant = PrivacyAccountant("rdp", 0.8, 1.0, 2)
    expected = []
    for _ in rounds:
        accountant.step()
        expected.append(accountant.epsilon(1e-5))
    assert epsilons == pytest.approx(expected) and epsilons[0] < epsilons[1]
    # 3 clients of 2 steps × 2 rows each: FedAvg's largest weight is 1/3 globally, 1/2 in "math"
    assert rounds[0]["privacy/noise_std/global"] == pytest.approx(0.8 * 2 * 0.5 / 3)
    assert rounds[0]["privacy/noise_std/math"] == pytest.approx(0.8 * 2 * 0.5 / 2)
    assert rounds[0]["privacy/noise_std/chain"] == pytest.approx(0.8 * 2 * 0.5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == epsilons[-1]
    assert summary["privacy"]["delta"] == 1e-5
    config = tmp_path / "experiment.toml"
    assert_privacy_utility_reads_the_run(tmp_path / "run", config, rounds, clients)

    again, _ = run_embedded(private_experiment(tmp_path / "again"), tmp_path / "again-run")
    plain, _ = run_embedded(private_experiment(tmp_path / "plain", table=""), tmp_path / "p-run")
    for key, tensor in federation.server.state.global_adapter.items():
        assert torch.equal(again.server.state.global_adapter[key], tensor)  # seeded noise
    assert any(
        not torch.equal(plain.server.state.global_adapter[k], v)
        for k, v in federation.server.state.global_adapter.items()
    )


def assert_privacy_utility_reads_the_run(run, config, rounds, clients) -> None:
    """benchmarks/privacy_utility.py: the noise's norm against the updates', from the records."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy_utility.py"
    out = subprocess.run(
        [sys.executable, str(script), str(run), "--config", str(config), "--epsilons", "8"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    dim = clients[0]["bytes_up"] // 4
    assert f"z = 0.8, d = {dim:,} LoRA parameters" in out
    first = next(line.split() for line in out.splitlines() if line.startswith("    1 "))
    assert float(first[1]) == pytest.approx(rounds[0]["privacy/epsilon"], abs=1e-3)
    noise_norm = rounds[0]["privacy/noise_std/global"] * math.sqrt(dim)
    assert float(first[3]) == pytest.approx(noise_norm, rel=1e-3)
    norms = [c["privacy/update_norm"] for c in clients if c["round"] == 1]
    assert float(first[4].rstrip(",")) == pytest.approx(sum(norms) / len(norms), abs=1e-3)
    assert "epsilon 8: z = " in out


def test_local_privacy_noises_each_update_on_its_client(tmp_path):
    from test_embedded import run_embedded

    table = PRIVACY + 'where = "client"\n'
    federation, _ = run_embedded(
        private_experiment(tmp_path, table=table, rounds=1), tmp_path / "r"
    )
    rounds = [r for r in federation.run.read_metrics() if r["type"] == "round"]
    assert "privacy/epsilon" not in rounds[0]  # the server adds nothing and spends nothing
    assert federation.server.accountant is None


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("\n[privacy]\nclip = 0\nnoise_multiplier = 1.0\n", "privacy.clip"),
        ("\n[privacy]\nclip = 1\nnoise_multiplier = 1.0\ndelta = 1.5\n", "privacy.delta"),
        ("\n[privacy]\nclip = 1\n", "exactly one of noise_multiplier and target_epsilon"),
        (
            "\n[privacy]\nclip = 1\nnoise_multiplier = 1.0\ntarget_epsilon = 8\n",
            "exactly one of noise_multiplier and target_epsilon",
        ),
    ],
)
def test_bad_privacy_settings_are_one_line_naming_the_field(tmp_path, table, expected):
    from typer.testing import CliRunner

    from fedmoa.cli import app

    config = private_experiment(tmp_path, table=table)
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert expected in result.output


@pytest.mark.parametrize(
    ("method", "rule", "expected"),
    [
        ("fedadam", "softmax", "server.method = 'fedadam' is not supported"),
        ("local", "softmax", "server.method = 'local' is not supported"),
    ],
)
def test_methods_without_the_derived_sensitivity_are_refused(tmp_path, method, rule, expected):
    from fedmoa.errors import ConfigError
    from fedmoa.federation.config import load_experiment

    config = private_experiment(tmp_path, method)
    config.write_text(config.read_text().replace("[server]", f'[server]\naccuracy_rule = "{rule}"'))
    with pytest.raises(ConfigError, match="privacy") as info:
        load_experiment(config)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_run_at_max_epsilon_stops_with_its_adapters_and_resumes_to_the_same_state(tmp_path):
    from fedmoa.federation.config import load_experiment
    from fedmoa.federation.embedded import EmbeddedFederation
    from fedmoa.runs import RunDirectory
    from test_embedded import run_embedded

    accountant = PrivacyAccountant("rdp", 0.8, 1.0, 2)
    accountant.step()
    one = accountant.epsilon(1e-5)
    accountant.step()
    budget = (one + accountant.epsilon(1e-5)) / 2  # room for one round of three
    config = private_experiment(tmp_path, rounds=3, table=PRIVACY + f"max_epsilon = {budget}\n")
    federation, _ = run_embedded(config, tmp_path / "run")
    assert federation.server.state.completed_rounds == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["privacy"]["epsilon"] <= budget
    assert (tmp_path / "run" / "adapters" / "global" / "adapter_model.safetensors").is_file()
    records = federation.run.read_metrics()
    assert [r["round"] for r in records if r["type"] == "eval"][-1] == 1  # the last is scored

    resumed = EmbeddedFederation(load_experiment(config), RunDirectory(tmp_path / "run"))
    assert resumed.resume() == 1
    resumed.run_rounds()
    assert resumed.server.state.completed_rounds == 1
    for key, tensor in federation.server.state.global_adapter.items():
        assert torch.equal(resumed.server.state.global_adapter[key], tensor)
    assert resumed.server.accountant.epsilon(1e-5) == pytest.approx(one)


def test_importing_fedmoa_leaves_the_root_logger_alone():
    """opacus adds a root handler when imported, after which an application's
    ``logging.basicConfig`` does nothing (the nodes' INFO lines vanished): it is imported only
    when an accountant is made."""
    import subprocess
    import sys

    code = (
        "import logging, fedmoa.federation.server, fedmoa.federation.flower.client_app\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_report_shows_each_methods_final_epsilon(tmp_path):
    import shutil

    from fedmoa.report import write_report
    from test_report import RUNS, table_rows

    runs = []
    for name, epsilon in (("fedmoa-s0", 2.0), ("fedmoa-s1", 3.0), ("fedavg-s0", None)):
        shutil.copytree(RUNS / name, tmp_path / name)
        runs.append(tmp_path / name)
        metrics = tmp_path / name / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        for record in lines:
            if record.get("type") == "round" and epsilon is not None:
                record["privacy/epsilon"] = epsilon * record["round"] / 2
        metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = table_rows(write_report(runs, tmp_path / "report").markdown.read_text())
    last = max(r["round"] for r in lines if r.get("type") == "round")
    assert rows["fedmoa"]["ε (DP)"] == f"{(2.0 + 3.0) / 2 * last / 2:.2f} ± " + (
        f"{math.sqrt(((2.0 - 3.0) * last / 2) ** 2 / 2):.2f}"
    )
    assert rows["fedavg"]["ε (DP)"] == "∞ (not private)"
