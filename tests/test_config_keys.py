"""Every accepted config key changes what runs, or is refused, or is warned about.

A key that contradicts the file (a persistent-rule key under ``rule = "cosine"``, a key the
chosen ``weighting.method`` does not read, ``sum_then_normalize`` with the hypergradient) is a
one-line ``ConfigError`` naming it; a key left over from another ``server.method`` is warned
about once, by name; ``server.server_lr`` scales the server optimisers' step like FedAvg's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedmoa.aggregation import (
    Adapter,
    ClientUpdate,
    fedavg_aggregate,
    make_server_optimizer,
    server_optimizer_aggregate,
)
from fedmoa.cli import app
from fedmoa.config import TrainLocalConfig, load_config, parse_config
from fedmoa.errors import ConfigError
from fedmoa.federation.client import REQUIRED_METRICS
from fedmoa.federation.config import (
    ExperimentConfig,
    check_client_fits,
    load_client_file,
    load_experiment,
)
from fedmoa.federation.server import FederatedServer

SHAPES = {"lora_A": (2, 3), "lora_B": (3, 2)}

EXPERIMENT = """
[server]
{server}

{weighting}

[client_defaults]
grpo = {{ batch_size = 2, group_size = 2, max_new_tokens = 4{grpo} }}
data = {{ source = "reasoning_gym", name = "basic_arithmetic", size = 8 }}

[[clients]]
id = "a"
task = "math"
rewards = [
  {{ name = "accuracy", function = "math_accuracy", role = "primary" }},
  {{ name = "brevity", function = "length", weight = 0.5 }},
]
"""

LOCAL = """
steps = 1

[grpo]
batch_size = 2
group_size = 2
{grpo}

[data]
source = "reasoning_gym"
name = "basic_arithmetic"
size = 8

[[rewards]]
name = "accuracy"
function = "math_accuracy"
role = "primary"

{weighting}
"""


def experiment(
    tmp_path: Path, server: str = 'method = "fedmoa"', weighting: str = "", grpo: str = ""
) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(EXPERIMENT.format(server=server, weighting=weighting, grpo=grpo))
    return path


def local(tmp_path: Path, weighting: str = "", grpo: str = "") -> Path:
    path = tmp_path / "local.toml"
    path.write_text(LOCAL.format(weighting=weighting, grpo=grpo))
    return path


def refused(load, path: Path, key: str) -> str:
    """The one-line error of loading ``path``; it names the file and ``key``."""
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert key in message, message
    return message


def warnings_about(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if key in r.getMessage()]


# ---------------------------------------------------------------------------- server.server_lr


def adapter(seed: int, scale: float = 1.0) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def updates(round_: int) -> list[ClientUpdate]:
    metrics = dict.fromkeys(REQUIRED_METRICS, 0.5)
    return [
        ClientUpdate(cid, task, n, adapter(10 * round_ + i, 0.1), 0.5, metrics, 4)
        for i, (cid, task, n) in enumerate((("a", "math", 3), ("b", "math", 5), ("c", "code", 4)))
    ]


def minus(x: Adapter, y: Adapter) -> Adapter:
    return {k: x[k].double() - y[k].double() for k in x}


def assert_close(x: Adapter, y: Adapter) -> None:
    for k in x:
        torch.testing.assert_close(x[k].double(), y[k].double(), rtol=0, atol=1e-6)


# Each optimiser with the setting η_s is equivalent to scaling (Flower's name for its lr).
OPTIMIZERS = [
    ("fedadam", {"eta": 0.1}, "eta"),
    ("fedyogi", {"eta": 0.1, "beta_1": 0.5}, "eta"),
    ("fedavgm", {"server_momentum": 0.9}, "server_learning_rate"),
]


@pytest.mark.parametrize(("name", "params", "lr_key"), OPTIMIZERS)
def test_server_lr_scales_the_server_optimizers_step(
    name: str, params: dict[str, float], lr_key: str
) -> None:
    """η_s = 0.5 moves the global adapter as the optimiser with half its own lr would, over
    rounds (the moments see the same pseudo-gradients), and the task adapters by 0.5·Δ_τ."""
    scaled = make_server_optimizer(name, **params)  # type: ignore[arg-type]
    base_lr = params.get(lr_key, 1.0)
    halved = make_server_optimizer(name, **{**params, lr_key: 0.5 * base_lr})  # type: ignore[arg-type]
    plain = make_server_optimizer(name, **params)  # type: ignore[arg-type]
    theta = theta_half = theta_plain = adapter(0)
    for round_ in (1, 2, 3):
        result = server_optimizer_aggregate(theta, updates(round_), scaled, server_lr=0.5)
        reference = server_optimizer_aggregate(theta_half, updates(round_), halved)
        unscaled = server_optimizer_aggregate(theta_plain, updates(round_), plain)
        assert_close(result.global_adapter, reference.global_adapter)
        assert not torch.allclose(
            result.global_adapter["lora_A"], unscaled.global_adapter["lora_A"]
        )
        fedavg = fedavg_aggregate(theta, updates(round_), server_lr=0.5)
        assert result.task_adapters.keys() == {"math", "code"}
        for task, task_adapter in result.task_adapters.items():
            assert_close(task_adapter, fedavg.task_adapters[task])
        theta, theta_half = result.global_adapter, reference.global_adapter
        theta_plain = unscaled.global_adapter


def test_server_lr_one_keeps_the_optimizers_adapter_exactly() -> None:
    optimizer, twin = make_server_optimizer("fedadam"), make_server_optimizer("fedadam")
    theta = adapter(0)
    result = server_optimizer_aggregate(theta, updates(1), optimizer, server_lr=1.0)
    stepped = twin.step(theta, fedavg_aggregate(theta, updates(1)).global_delta)
    assert all(torch.equal(result.global_adapter[k], stepped[k]) for k in SHAPES)


@pytest.mark.parametrize("method", ["fedadam", "fedyogi", "fedavgm"])
def test_the_server_applies_server_lr_under_server_optimizer_methods(method: str) -> None:
    def round_delta(server_lr: float) -> Adapter:
        cfg = parse_config(
            {
                "server": {"method": method, "server_lr": server_lr, "num_clients": 3},
                "clients": [],
            },
            ExperimentConfig,
        )
        server = FederatedServer(
            cfg, adapter(0), client_tasks={"a": "math", "b": "math", "c": "code"}
        )
        result = server.aggregate_round(server.configure_round(1), updates(1))
        return minus(result.global_adapter, adapter(0))

    full, quarter = round_delta(1.0), round_delta(0.25)
    assert_close(quarter, {k: 0.25 * v for k, v in full.items()})
    assert float(full["lora_A"].abs().max()) > 1e-4


# ---------------------------------------------------------------------------- server keys


def test_server_optimizer_under_another_method_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = experiment(tmp_path, 'method = "fedavg"\nserver_optimizer = { eta = 0.1 }')
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        load_experiment(path)
        load_experiment(path)  # a second load (a node, a resume) says nothing new
    [message] = warnings_about(caplog, "server.server_optimizer")
    assert str(path) in message and "'fedavg'" in message and "fedadam" in message


@pytest.mark.parametrize(
    ("params", "expected"),
    [("{ lr = 0.1 }", "fedadam does not take lr"), ("{ beta_1 = 1.0 }", "beta_1")],
)
def test_bad_server_optimizer_settings_are_refused_by_the_config(
    tmp_path: Path, params: str, expected: str
) -> None:
    path = experiment(tmp_path, f'method = "fedadam"\nserver_optimizer = {params}')
    message = refused(load_experiment, path, "server.server_optimizer")
    assert expected in message


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ('method = "fedavg"\nt_acc = 0.2', "server.t_acc"),
        ('method = "fedmoa-hg"\naccuracy_rule = "softmax"', "server.accuracy_rule"),
        ('method = "fedprox"\ngamma = 1.0', "server.gamma"),
        ('method = "fedmoa"\nfedprox_mu = 0.1', "server.fedprox_mu"),
        ('method = "local"\nserver_lr = 0.5', "server.server_lr"),
        ('method = "local"\nclient_init = "task"', "server.client_init"),
    ],
)
def test_server_keys_of_another_method_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, server: str, key: str
) -> None:
    path = experiment(tmp_path, server)
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        load_experiment(path)
        load_experiment(path)
    assert len(warnings_about(caplog, key)) == 1, caplog.text


# ---------------------------------------------------------------------------- [weighting]


@pytest.mark.parametrize("key", ["ema", "momentum", "saturation_window", "saturation_decay"])
def test_a_persistent_rule_key_under_the_cosine_rule_is_refused(tmp_path: Path, key: str) -> None:
    value = 3 if key == "saturation_window" else 0.5
    table = f'[weighting]\nrule = "cosine"\n{key} = {value}'
    message = refused(load_experiment, experiment(tmp_path, weighting=table), f"weighting.{key}")
    assert "cosine" in message
    # The same in train-local, and in the older [hypergradient] table (named as written).
    local_table = f'[weighting]\nmethod = "hypergradient"\nrule = "cosine"\n{key} = {value}'
    refused(load_config, local(tmp_path, weighting=local_table), f"weighting.{key}")
    legacy = table.replace("[weighting]", "[hypergradient]")
    refused(load_experiment, experiment(tmp_path, weighting=legacy), f"hypergradient.{key}")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('method = "hypergradient"\nsmoothing = 0.5', "weighting.smoothing"),
        ('method = "saw"\neta = 0.5', "weighting.eta"),
        ('method = "variance"\nrule = "cosine"', "weighting.rule"),
        ('method = "saw"\nema = 0.5', "weighting.ema"),
        ('method = "static"\nw_min = 0.1', "weighting.w_min"),
        ('method = "static"\nanchor = 0.1', "weighting.anchor"),
    ],
)
def test_a_key_the_chosen_weighting_does_not_read_is_refused(
    tmp_path: Path, table: str, key: str
) -> None:
    server = 'method = "fedavg"'  # every weighting.method is allowed with FedAvg
    path = experiment(tmp_path, server, weighting=f"[weighting]\n{table}")
    refused(load_experiment, path, key)
    refused(load_config, local(tmp_path, weighting=f"[weighting]\n{table}"), key)


@pytest.mark.parametrize(
    ("server", "table", "key"),
    [
        # switched from fedmoa to a static method, hypergradient settings kept
        ('method = "fedavg"', "[weighting]\neta = 0.5", "weighting.eta"),
        ('method = "fedmoa-taa"', '[weighting]\nrule = "cosine"', "weighting.rule"),
        ('method = "local"', "[hypergradient]\nema = 0.5", "hypergradient.ema"),
        ('method = "centralized"', "[weighting]\nw_min = 0.1", "weighting.w_min"),
        # a saw/variance setting kept after going back to the method's own weighting
        ('method = "fedmoa"', "[weighting]\nsmoothing = 0.5", "weighting.smoothing"),
    ],
)
def test_weighting_keys_left_from_another_method_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, server: str, table: str, key: str
) -> None:
    path = experiment(tmp_path, server, weighting=table)
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        load_experiment(path)
        load_experiment(path)
    [message] = warnings_about(caplog, key)
    assert "ignored" in message and "'auto'" in message, message


def test_train_local_warns_about_hypergradient_keys_under_auto(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = local(tmp_path, weighting='[weighting]\nrule = "cosine"\neta = 2.0')
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        load_config(path, TrainLocalConfig)
        load_config(path, TrainLocalConfig)
    for key in ("weighting.rule", "weighting.eta"):
        [message] = warnings_about(caplog, key)
        assert "train-local" in message


def test_keys_the_run_reads_load_silently(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tables = [
        ('method = "fedmoa"\nt_acc = 0.2\ngamma = 1.0', '[weighting]\nrule = "cosine"\neta = 1.0'),
        ('method = "fedmoa-hg"', "[weighting]\nema = 0.5\nsaturation_window = 2\nanchor = 0.1"),
        ('method = "fedavg"\nserver_lr = 0.5', '[weighting]\nmethod = "saw"\nsmoothing = 0.5'),
        ('method = "fedadam"\nserver_optimizer = { eta = 0.1 }\nserver_lr = 0.5', ""),
        ('method = "fedprox"\nfedprox_mu = 0.1', '[weighting]\nmethod = "hypergradient"'),
    ]
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        for i, (server, weighting) in enumerate(tables):
            folder = tmp_path / str(i)
            folder.mkdir()
            load_experiment(experiment(folder, server, weighting))
    assert caplog.records == []


def test_settings_sent_to_nodes_are_not_refused(tmp_path: Path) -> None:
    """What a node validates again is ``dataclasses.asdict`` of the config, which has every key;
    only the keys a file sets count."""
    from fedmoa.federation.flower.node import settings_from_json, shared_settings

    path = experiment(tmp_path, weighting='[weighting]\nrule = "cosine"')
    cfg = load_experiment(path)
    again = settings_from_json(shared_settings(cfg))
    assert again.weighting == cfg.weighting
    assert parse_config(dataclasses.asdict(cfg), ExperimentConfig).weighting.rule == "cosine"


# ---------------------------------------------------------------------------- grpo.advantage


def test_sum_then_normalize_with_the_hypergradient_is_refused(tmp_path: Path) -> None:
    grpo = ', advantage = "sum_then_normalize"'
    message = refused(load_experiment, experiment(tmp_path, grpo=grpo), "clients[0].grpo.advantage")
    assert "hypergradient" in message
    explicit = '[weighting]\nmethod = "hypergradient"'
    path = experiment(tmp_path, 'method = "fedavg"', explicit, grpo)
    refused(load_experiment, path, "clients[0].grpo.advantage")
    local_path = local(tmp_path, '[weighting]\nmethod = "hypergradient"', grpo[2:])
    refused(load_config, local_path, "grpo.advantage")


def test_sum_then_normalize_with_other_weightings_loads(tmp_path: Path) -> None:
    grpo = ', advantage = "sum_then_normalize"'
    cfg = load_experiment(experiment(tmp_path, 'method = "fedavg"', grpo=grpo))
    assert cfg.clients[0].grpo.advantage == "sum_then_normalize"
    saw = '[weighting]\nmethod = "saw"'
    assert load_experiment(experiment(tmp_path, 'method = "fedmoa-taa"', saw, grpo)).clients
    assert load_config(local(tmp_path, grpo=grpo[2:])).grpo.advantage == "sum_then_normalize"


def test_a_client_file_with_sum_then_normalize_does_not_fit_a_hypergradient_federation(
    tmp_path: Path,
) -> None:
    client = tmp_path / "client.toml"
    client.write_text(
        'id = "x"\ntask = "math"\ngrpo = { advantage = "sum_then_normalize" }\n'
        'rewards = [{ name = "accuracy", function = "math_accuracy", role = "primary" }]\n'
    )
    server = 'method = "fedmoa"\nnum_clients = 1'
    path = tmp_path / "experiment.toml"
    path.write_text(f"[server]\n{server}\n")
    with pytest.raises(ConfigError, match=r"client\.toml: grpo\.advantage"):
        check_client_fits(load_experiment(path), load_client_file(client), str(client))


# ---------------------------------------------------------------------------- the CLI


def test_the_cli_refuses_with_one_line_and_status_2(tmp_path: Path) -> None:
    path = experiment(tmp_path, weighting='[weighting]\nrule = "cosine"\nmomentum = 0.5')
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "weighting.momentum" in lines[0], result.output
