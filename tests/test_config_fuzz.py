"""Property tests: every bad config gives one line naming the field path (or file), exit status 2.

Each example mutates a valid experiment (``fedmoa run``) or train-local (``fedmoa train-local``)
config, writes it as TOML and runs the real CLI with ``catch_exceptions=False``, so a traceback
fails the test. Validation errors stop before any model loads, which keeps the examples fast.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.config import (
    LoraConfig,
    ModelConfig,
    RewardConfig,
    TrainLocalConfig,
    WeightingConfig,
    field_path,
    load_config,
)
from fedmoa.data import DataConfig
from fedmoa.federation.config import ClientConfig, ExperimentConfig, ServerConfig, load_experiment
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.rewards import BUILTIN_REWARDS

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

EXPERIMENT: dict[str, Any] = {
    "seed": 0,
    "model": {"name": "tiny-random-qwen2", "dtype": "fp32", "device": "cpu"},
    "lora": {"r": 4},
    "server": {
        "method": "fedmoa",
        "rounds": 1,
        "clients_per_round": 2,
        "validation_prompts": 2,
        "test_prompts": 2,
    },
    "hypergradient": {"eta": 0.5},
    "client_defaults": {
        "local_steps": 1,
        "grpo": {"batch_size": 2, "group_size": 2, "max_new_tokens": 4},
        "data": {"source": "reasoning_gym", "name": "basic_arithmetic", "size": 8},
    },
    "clients": [
        {
            "id": "alpha",
            "task": "math",
            "rewards": [{"name": "accuracy", "function": "math_accuracy", "role": "primary"}],
        },
        {
            "id": "beta",
            "task": "math",
            "local_steps": 2,
            "grpo": {"temperature": 0.9},
            "rewards": [
                {"name": "accuracy", "function": "math_accuracy", "role": "primary"},
                {"name": "brevity", "function": "length", "weight": 0.5, "params": {"target": 4}},
            ],
        },
    ],
}

LOCAL: dict[str, Any] = {
    "steps": 2,
    "seed": 1,
    "model": {"name": "tiny-random-qwen2", "dtype": "fp32", "device": "cpu"},
    "lora": {"r": 4},
    "data": {"source": "reasoning_gym", "name": "basic_arithmetic", "size": 8},
    "grpo": {"batch_size": 2, "group_size": 2, "max_new_tokens": 4},
    "weighting": {"method": "static"},
    "rewards": [
        {"name": "accuracy", "function": "math_accuracy", "role": "primary"},
        {"name": "brevity", "function": "length", "weight": 0.5, "params": {"target": 4}},
    ],
}

Path_ = tuple[str | int, ...]

# Scalar fields and their kind. "count" fields must be positive; "group" needs at least 2.
EXPERIMENT_FIELDS: dict[Path_, str] = {
    ("seed",): "int",
    ("output_dir",): "str",
    ("model", "name"): "str",
    ("model", "dtype"): "str",
    ("model", "attention"): "literal",
    ("lora", "r"): "count",
    ("lora", "dropout"): "float",
    ("server", "method"): "literal",
    ("server", "rounds"): "count",
    ("server", "clients_per_round"): "count",
    ("server", "validation_prompts"): "count",
    ("server", "test_prompts"): "count",
    ("server", "t_acc"): "float",
    ("server", "eval_every"): "int",
    ("hypergradient", "eta"): "float",
    ("hypergradient", "carry_across_rounds"): "bool",
    ("client_defaults", "local_steps"): "count",
    ("client_defaults", "grpo", "batch_size"): "count",
    ("client_defaults", "grpo", "group_size"): "group",
    ("client_defaults", "grpo", "max_new_tokens"): "count",
    ("client_defaults", "grpo", "mask_truncated"): "bool",
    ("client_defaults", "data", "size"): "count",
    ("clients", 0, "id"): "str",
    ("clients", 0, "task"): "str",
    ("clients", 1, "local_steps"): "count",
    ("clients", 1, "grpo", "temperature"): "float",
    ("clients", 1, "rewards", 1, "name"): "str",
    ("clients", 1, "rewards", 1, "role"): "literal",
    ("clients", 1, "rewards", 1, "weight"): "float",
    ("clients", 1, "rewards", 1, "on_error"): "literal",
    ("clients", 1, "rewards", 1, "timeout"): "float",
}
LOCAL_FIELDS: dict[Path_, str] = {
    ("steps",): "count",
    ("seed",): "int",
    ("model", "name"): "str",
    ("model", "device"): "str",
    ("lora", "r"): "count",
    ("data", "size"): "count",
    ("data", "name"): "str",
    ("grpo", "batch_size"): "count",
    ("grpo", "group_size"): "group",
    ("grpo", "max_new_tokens"): "count",
    ("grpo", "lr"): "float",
    ("grpo", "loss_type"): "literal",
    ("weighting", "method"): "literal",
    ("weighting", "carry_across_rounds"): "bool",
    ("rewards", 0, "role"): "literal",
    ("rewards", 1, "weight"): "float",
    ("rewards", 1, "function"): "str",
}
# Tables that reject unknown keys, with the schema listing their known ones.
EXPERIMENT_TABLES: dict[Path_, Any] = {
    (): ExperimentConfig,
    ("model",): ModelConfig,
    ("lora",): LoraConfig,
    ("server",): ServerConfig,
    ("hypergradient",): WeightingConfig,
    ("client_defaults",): ClientConfig,
    ("client_defaults", "grpo"): GRPOSettings,
    ("client_defaults", "data"): DataConfig,
    ("clients", 0): ClientConfig,
    ("clients", 1, "grpo"): GRPOSettings,
    ("clients", 1, "rewards", 1): RewardConfig,
}
LOCAL_TABLES: dict[Path_, Any] = {
    (): TrainLocalConfig,
    ("model",): ModelConfig,
    ("grpo",): GRPOSettings,
    ("data",): DataConfig,
    ("weighting",): WeightingConfig,
    ("rewards", 0): RewardConfig,
}
COMMANDS = {"run": (EXPERIMENT, EXPERIMENT_FIELDS), "train-local": (LOCAL, LOCAL_FIELDS)}

printable = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
tables = st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(), max_size=2)
non_numbers = st.one_of(
    printable, st.booleans(), st.lists(st.integers(), max_size=2), tables
)  # numeric strings too: TOML types are kept, "3" is not 3
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "int": st.one_of(non_numbers, st.floats(allow_nan=False, allow_subnormal=False)),
    "count": st.one_of(non_numbers, st.floats(allow_nan=False, allow_subnormal=False)),
    "group": st.one_of(non_numbers, st.floats(allow_nan=False, allow_subnormal=False)),
    "float": non_numbers,
    "str": st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_subnormal=False),
        st.booleans(),
        st.lists(printable),
        tables,
    ),
    "bool": st.one_of(
        st.integers(), st.floats(allow_nan=False, allow_subnormal=False), printable, tables
    ),
    "literal": st.one_of(printable.filter(lambda s: s not in LITERALS), st.integers()),
}
LITERALS = {
    "primary",
    "auxiliary",
    "fedmoa",
    "auto",
    "grpo",
    "static",
    "raise",
    "none",
    "sdpa",
    "eager",
    "flash_attention_2",
    "hypergradient",
    "persistent",
    "cosine",
    "saw",
    "variance",
}


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fedmoa-fuzz-") as tmp:
        yield Path(tmp)


def mutated(base: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``value`` at ``path`` (``DELETE`` removes the key)."""
    config = copy.deepcopy(base)
    *parents, last = path
    node: Any = config
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


DELETE = object()


def run_cli(command: str, config: Path, workdir: Path) -> str:
    """Runs ``fedmoa COMMAND CONFIG`` and returns its single error line (asserting the contract)."""
    result = CliRunner().invoke(
        app, [command, str(config), "--output", str(workdir / "run")], catch_exceptions=False
    )
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    return lines[0]


def check(command: str, config: dict[str, Any], workdir: Path, *expected: str) -> str:
    """Writes ``config``, runs the command and asserts the line names one of ``expected``."""
    path = workdir / "config.toml"
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    line = run_cli(command, path, workdir)
    assert any(e in line for e in expected), f"{line!r} names none of {expected}"
    return line


def node(config: dict[str, Any], path: Path_) -> Any:
    for part in path:
        config = config[part]
    return config


def known_keys(schema: Any) -> set[str]:
    names = {f.name for f in dataclasses.fields(schema)}
    return names | {"client_defaults"} if schema is ExperimentConfig else names


def rewards_of(command: str, index: int) -> Path_:
    return ("clients", index, "rewards") if command == "run" else ("rewards",)


# ---------------------------------------------------------------------------- the base configs


def test_base_configs_are_valid(workdir: Path) -> None:
    path = workdir / "base.toml"
    path.write_text(tomli_w.dumps(EXPERIMENT))
    cfg = load_experiment(path)
    assert [c.id for c in cfg.clients] == ["alpha", "beta"]
    assert cfg.clients[0].grpo.batch_size == 2 and cfg.clients[1].local_steps == 2
    path.write_text(tomli_w.dumps(LOCAL))
    assert load_config(path, TrainLocalConfig).steps == 2


# ---------------------------------------------------------------------------- mutations


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_wrong_types(workdir: Path, command: str, data: st.DataObject) -> None:
    base, fields = COMMANDS[command]
    path = data.draw(st.sampled_from(sorted(fields, key=str)), label="path")
    value = data.draw(WRONG[fields[path]], label="value")
    check(command, mutated(base, path, value), workdir, field_path(path))


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_unknown_keys(workdir: Path, command: str, data: st.DataObject) -> None:
    tables = EXPERIMENT_TABLES if command == "run" else LOCAL_TABLES
    base = COMMANDS[command][0]
    table = data.draw(st.sampled_from(sorted(tables, key=str)), label="table")
    key = data.draw(
        st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(
            lambda k: k not in known_keys(tables[table])
        ),
        label="key",
    )
    value = data.draw(st.one_of(st.integers(), printable, st.booleans()), label="value")
    line = check(command, mutated(base, (*table, key), value), workdir, field_path((*table, key)))
    assert "unknown key" in line


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_zero_or_negative_counts(workdir: Path, command: str, data: st.DataObject) -> None:
    base, fields = COMMANDS[command]
    counts = [p for p, kind in fields.items() if kind in ("count", "group")]
    path = data.draw(st.sampled_from(sorted(counts, key=str)), label="path")
    top = 1 if fields[path] == "group" else 0
    value = data.draw(st.integers(max_value=top), label="value")
    line = check(command, mutated(base, path, value), workdir, field_path(path))
    assert "greater than" in line


@FUZZ
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    weight=st.one_of(
        printable,
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(max_value=-1e-9, allow_nan=False, allow_subnormal=False),
        st.booleans(),
        st.lists(st.floats(allow_nan=False, allow_subnormal=False), max_size=2),
    ),
)
def test_weights_that_do_not_parse(workdir: Path, command: str, weight: Any) -> None:
    path = (*rewards_of(command, 1), 1, "weight")
    check(command, mutated(COMMANDS[command][0], path, weight), workdir, field_path(path))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_all_weights_zero(workdir: Path, command: str) -> None:
    config = copy.deepcopy(COMMANDS[command][0])
    rewards = rewards_of(command, 1)
    for reward in node(config, rewards):
        reward["weight"] = 0.0
    line = check(command, config, workdir, field_path(rewards))
    assert "must not all be zero" in line


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), primaries=st.sampled_from([0, 2]))
def test_two_primaries_or_none(workdir: Path, command: str, primaries: int) -> None:
    config = copy.deepcopy(COMMANDS[command][0])
    rewards = rewards_of(command, 1)
    for i, reward in enumerate(node(config, rewards)):
        reward["role"] = "primary" if i < primaries else "auxiliary"
    line = check(command, config, workdir, field_path(rewards))
    assert "exactly one reward must have role = 'primary'" in line
    assert ("found: none" in line) == (primaries == 0)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("clients", [DELETE, [], 3, "alpha", {"id": "alpha"}, [[1]], ["alpha"]])
def test_missing_or_empty_clients_and_rewards(workdir: Path, command: str, clients: Any) -> None:
    if command == "run":
        path: Path_ = ("clients",)
    else:  # train-local's list of tables is its rewards
        path = ("rewards",)
    line = check(command, mutated(COMMANDS[command][0], path, clients), workdir, path[0])
    if clients == []:
        assert "at least one" in line


@FUZZ
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    function=st.one_of(
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True).map(lambda s: f"no_such_{s}"),
        st.sampled_from(
            [
                "no_such_module_xyz:reward",
                "os:no_such_attribute",
                "math:pi",
                "/nonexistent/rewards.py:f",
                "rewards.py:",
                "",
            ]
        ),
    ),
)
def test_unknown_reward_function(workdir: Path, command: str, function: str) -> None:
    assert function not in BUILTIN_REWARDS
    path = (*rewards_of(command, 1), 1, "function")
    line = check(command, mutated(COMMANDS[command][0], path, function), workdir, field_path(path))
    assert "reward" in line


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), source=printable)
def test_unknown_dataset_source(workdir: Path, command: str, source: str) -> None:
    from fedmoa.data import SOURCES

    if source in SOURCES:
        return
    base_path: Path_ = ("client_defaults", "data") if command == "run" else ("data",)
    path = (*base_path, "source")
    line = check(command, mutated(COMMANDS[command][0], path, source), workdir, field_path(path))
    assert "unknown data source" in line


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(sorted(COMMANDS)),
    name=st.from_regex(r"[a-z_]{1,10}", fullmatch=True).map(lambda s: f"no_such_{s}"),
    where=st.sampled_from(["defaults", "client"]),
)
def test_unknown_reasoning_gym_dataset(workdir: Path, command: str, name: str, where: str) -> None:
    """Dataset names are checked when the rows load (before the model): the line names the client
    and its data section."""
    if command == "train-local":
        config, expected = mutated(LOCAL, ("data", "name"), name), "data: "
    elif where == "defaults":  # reaches client 0 first
        config = mutated(EXPERIMENT, ("client_defaults", "data", "name"), name)
        expected = "client 'alpha' (clients[0].data)"
    else:
        config = mutated(EXPERIMENT, ("clients", 1, "data"), {"name": name})
        expected = "client 'beta' (clients[1].data)"
    line = check(command, config, workdir, expected)
    assert f"unknown reasoning-gym dataset '{name}'" in line


def _model_paths(workdir: Path) -> dict[str, Path]:
    """Model specs that cannot load, created once: missing, junk GGUF, folders without/bad config."""
    junk_gguf = workdir / "junk.gguf"
    junk_gguf.write_bytes(b"not a gguf file at all")
    no_config = workdir / "empty-model"
    no_config.mkdir(exist_ok=True)
    bad_config = workdir / "bad-model"
    bad_config.mkdir(exist_ok=True)
    (bad_config / "config.json").write_text("{not json")
    return {
        "missing": workdir / "no" / "such" / "model",
        "missing_gguf": workdir / "missing.gguf",
        "junk_gguf": junk_gguf,
        "no_config": no_config,
        "bad_config": bad_config,
        "not_gguf": workdir / "config.toml",
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "kind", ["missing", "missing_gguf", "junk_gguf", "no_config", "bad_config", "not_gguf"]
)
def test_bad_model_path(workdir: Path, command: str, kind: str) -> None:
    """The model loads after validation and data; its errors are one line naming the path."""
    model = str(_model_paths(workdir)[kind])
    check(command, mutated(COMMANDS[command][0], ("model", "name"), model), workdir, model)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("dtype", "fp8", "model.dtype: unknown dtype 'fp8'"),
        ("device", "gpu:x", "model.device: invalid device 'gpu:x'"),
        ("name", "no-such-model", "unknown model 'no-such-model'"),
    ],
)
def test_bad_model_settings(
    workdir: Path, command: str, field: str, value: str, expected: str
) -> None:
    check(command, mutated(COMMANDS[command][0], ("model", field), value), workdir, expected)


def test_bad_device_override(workdir: Path) -> None:
    path = workdir / "config.toml"
    path.write_text(tomli_w.dumps(EXPERIMENT))
    result = CliRunner().invoke(
        app, ["run", str(path), "--device", "gpu:x", "-o", str(workdir / "run")]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: command line: --device: invalid device 'gpu:x': expected 'auto', 'cpu', 'cuda' or "
        "'cuda:N'"
    )


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), raw=st.binary(max_size=40))
def test_unreadable_or_odd_files(workdir: Path, command: str, raw: bytes) -> None:
    """Any bytes at all: invalid TOML, non-UTF-8, or TOML that is not our config."""
    path = workdir / "raw.toml"
    path.write_bytes(raw)
    line = run_cli(command, path, workdir)
    assert str(path) in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("make", ["missing", "directory", "latin1"])
def test_config_file_problems(workdir: Path, command: str, make: str) -> None:
    path = workdir / f"{make}.toml"
    if make == "directory":
        path.mkdir(exist_ok=True)
    elif make == "latin1":
        path.write_bytes('steps = 2\nname = "caf\xe9"\n'.encode("latin-1"))
    line = run_cli(command, path, workdir)
    assert str(path) in line


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(clients=[c["clients"][0], dict(c["clients"][0])]), "unique"),
        (lambda c: c["server"].update(clients_per_round=3), "server.clients_per_round = 3"),
        (lambda c: c["server"].update(min_clients=3), "server.min_clients"),
        (  # client 0 takes its rewards from the defaults
            lambda c: (c["clients"][0].pop("rewards"), c["client_defaults"].update(rewards="x")),
            "client_defaults.rewards (in clients[0]): Input should be a valid array",
        ),
        (lambda c: c.update(client_defaults=[1]), "client_defaults: must be a table"),
        (lambda c: c["clients"].append(3), "clients[2]: Input should be a table"),
        (
            lambda c: c["clients"][1].update(split={"train": 0.5, "validation": 0.1, "test": 0.1}),
            "clients[1].split",
        ),
        (lambda c: c["clients"][0].update(id=""), "clients[0].id"),
        (
            lambda c: c["clients"][0].update(
                split={"train": 0.01, "validation": 0.49, "test": 0.5}
            ),
            "client 'alpha' (clients[0].data): empty train split",
        ),
        (
            lambda c: c["client_defaults"]["data"].update(
                partition={"scheme": "iid", "num_partitions": 20}
            ),
            "client 'alpha' (clients[0].data): data source 'reasoning_gym'",
        ),
    ],
)
def test_experiment_cross_field_errors(
    workdir: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    config = copy.deepcopy(EXPERIMENT)
    edit(config)
    check("run", config, workdir, expected)
