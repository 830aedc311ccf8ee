"""The experiment file: heterogeneous clients, defaults merging, and errors that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmoa.errors import ConfigError
from fedmoa.federation.config import load_experiment

EXPERIMENT = """
seed = 3

[model]
name = "tiny-random-qwen2"

[server]
method = "fedmoa"
rounds = 2
clients_per_round = 3
t_acc = 0.2

[hypergradient]
eta = 0.5

[client_defaults]
local_steps = 2
grpo = { batch_size = 2, group_size = 4, max_new_tokens = 16 }
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 32, params = { operators = ["+"] } }

[[clients]]
id = "math-format"
task = "math"
rewards = [
  { name = "accuracy", function = "math_accuracy", role = "primary" },
  { name = "format", function = "format", weight = 0.5, params = { style = "boxed" } },
]

[[clients]]
id = "math-brief"
task = "math"
grpo = { max_new_tokens = 8 }
rewards = [
  { name = "correct", function = "math_accuracy", role = "primary", params = { require_final_answer = false } },
  { name = "brevity", function = "length", weight = 2.0, params = { target = 8 } },
  { name = "boxed", function = "format", weight = 0.1 },
]

[[clients]]
id = "chain"
task = "chain"
data = { name = "chain_sum", seed = 1, params = { min_terms = 2 } }
rewards = [{ name = "acc", function = "math_accuracy", role = "primary" }]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_heterogeneous_clients_with_merged_defaults(tmp_path):
    cfg = load_experiment(write(tmp_path, EXPERIMENT))
    assert [c.id for c in cfg.clients] == ["math-format", "math-brief", "chain"]
    assert [len(c.rewards) for c in cfg.clients] == [2, 3, 1]
    assert [c.primary_reward for c in cfg.clients] == ["accuracy", "correct", "acc"]
    # Defaults apply where a client is silent; a client's own value wins key by key.
    assert cfg.clients[0].grpo.max_new_tokens == 16 and cfg.clients[1].grpo.max_new_tokens == 8
    assert cfg.clients[1].grpo.batch_size == 2 and cfg.clients[2].local_steps == 2
    assert cfg.clients[2].data.name == "chain_sum" and cfg.clients[2].data.size == 32
    # A dataset's own kwargs replace the default's instead of merging with them.
    assert cfg.clients[2].data.params == {"min_terms": 2}
    assert cfg.clients[0].data.params == {"operators": ["+"]}
    assert cfg.server.t_acc == 0.2 and cfg.weighting.eta == 0.5


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('id = "chain"', 'id = "math-brief"', "client ids must be unique, repeated: math-brief"),
        ("clients_per_round = 3", "clients_per_round = 4", "server.clients_per_round = 4 exceeds"),
        ("rounds = 2", "rounds = 0", "server.rounds: Input should be greater than 0"),
        ('method = "fedmoa"', 'method = "fedbest"', "server.method"),
        (
            "grpo = { max_new_tokens = 8 }",
            "grpo = { max_tokens = 8 }",
            "clients[1].grpo.max_tokens: unknown key",
        ),
        (
            '{ name = "boxed", function = "format", weight = 0.1 }',
            '{ name = "boxed", function = "format", weight = 0.1, role = "primary" }',
            "clients[1].rewards: exactly one reward must have role = 'primary' (found: correct, boxed)",
        ),
        ("weight = 2.0", 'weight = "heavy"', "clients[1].rewards[1].weight"),
        # A bad value from [client_defaults] is reported there, naming the first client it reached.
        ("local_steps = 2", "local_steps = -1", "client_defaults.local_steps (in clients[0])"),
    ],
)
def test_errors_name_the_field_path(tmp_path, old, new, expected):
    assert old in EXPERIMENT
    path = write(tmp_path, EXPERIMENT.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message, message


def test_no_clients(tmp_path):
    text = EXPERIMENT[: EXPERIMENT.index("[[clients]]")]
    with pytest.raises(ConfigError, match="clients"):
        load_experiment(write(tmp_path, text))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("eta = 0.5", "eta = -0.5", "hypergradient.eta: Input should be greater than 0"),
        ("eta = 0.5", "eta = 0.5\nstep = 1", "hypergradient.step: unknown key"),
        ("eta = 0.5", 'eta = 0.5\nmethod = "saw"', "hypergradient.method: unknown key"),
        ("[hypergradient]", '[weighting]\nmethod = "saw"\n[hypergradient]', "same table"),
        ("[hypergradient]", "[weighting]", None),  # the new name of the same table
        ("eta = 0.5", 'rule = "fast"', "hypergradient.rule"),
        ("eta = 0.5", "saturation_window = 0", "hypergradient.saturation_window"),
        ("eta = 0.5", "ema = 1.5", "hypergradient.ema"),
        (
            "eta = 0.5",
            "w_min = 0.4",
            "weighting.w_min = 0.4 is too large for the 3 objectives of clients[1]",
        ),
        (
            "[hypergradient]\neta = 0.5",
            '[weighting]\nmethod = "static"',
            "weighting.method = 'static' contradicts server.method = 'fedmoa'",
        ),
    ],
)
def test_weighting_table_errors_name_the_field(tmp_path, old, new, expected):
    assert old in EXPERIMENT
    path = write(tmp_path, EXPERIMENT.replace(old, new, 1))
    if expected is None:
        assert load_experiment(path).weighting.eta == 0.5
        return
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "\n" not in message and expected in message, message


def test_a_dynamic_baseline_with_fedavg_and_static_methods_ignore_the_floor(tmp_path):
    text = EXPERIMENT.replace('method = "fedmoa"', 'method = "fedavg"')
    saw = text.replace("[hypergradient]\neta = 0.5", '[weighting]\nmethod = "saw"\nsmoothing = 0.5')
    cfg = load_experiment(write(tmp_path, saw))
    assert cfg.weighting.method == "saw" and cfg.weighting.smoothing == 0.5
    # Static weights have no floor, so a w_min the clients could not hold is no error there.
    assert load_experiment(write(tmp_path, text.replace("eta = 0.5", "w_min = 0.4"))).weighting
