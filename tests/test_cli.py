"""``fedmoa train-local`` end to end: run directory, PEFT adapter, and one-line config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.models import tiny_random_model

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = """
steps = 2
seed = 1

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[data]
source = "reasoning_gym"
name = "basic_arithmetic"
size = 16
params = { min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }

[grpo]
batch_size = 2
group_size = 2
max_new_tokens = 8
lr = 0.05

[[rewards]]
name = "accuracy"
function = "math_accuracy"
role = "primary"

[[rewards]]
name = "brevity"
function = "length"
weight = 0.5
params = { target = 4 }

[[rewards]]
name = "digits"
function = "REWARD_FILE:digit_share"
weight = 0.5
"""

# A user reward loaded from a file: dense enough that a random model gets signal.
USER_REWARD = """
def digit_share(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() or ch == " " for ch in t) / max(len(t), 1) for t in texts]
"""


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def write_config(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(USER_REWARD)
    path = tmp_path / name
    path.write_text(text.replace("REWARD_FILE", str(reward_file)))
    return path


def test_train_local_writes_config_metrics_and_a_loadable_adapter(tmp_path):
    config = write_config(tmp_path, TINY_CONFIG)
    out = tmp_path / "run"
    result = run_cli("train-local", str(config), "--output", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "config.toml").read_text() == config.read_text()
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["grpo"]["group_size"] == 2 and resolved["grpo"]["loss_type"] == "grpo"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in (
        "reward",
        "rewards/accuracy/mean",
        "rewards/brevity/mean",
        "weights/accuracy",
        "step_time",
    ):
        assert key in records[-1]
    assert records[-1]["weights/accuracy"] == pytest.approx(1 / 2)
    assert "rewards/digits/mean" in records[-1]

    base, tokenizer = tiny_random_model("qwen2", seed=0)
    reference, _ = tiny_random_model("qwen2", seed=0)
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    ids = tokenizer("Calculate 2 + 3.", return_tensors="pt").input_ids
    with torch.no_grad():
        trained_logits = adapted(ids).logits
        base_logits = reference(ids).logits
    assert not torch.allclose(trained_logits, base_logits), "the saved adapter carries the training"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("batch_size = 2", "batch_size = 0"), "grpo.batch_size: Input should be greater than 0"),
        (("batch_size = 2", "batch_size = 'two'"), "grpo.batch_size"),
        (("lr = 0.05", "lr = 0.05\nlearning_rate = 1"), "grpo.learning_rate: unknown key"),
        (('role = "primary"', 'role = "main"'), "rewards[0].role"),
        (("weight = 0.5", 'weight = 0.5\nrole = "primary"'), "exactly one reward must have role"),
        (
            ('function = "length"', 'function = "no_such_reward"'),
            "rewards[1].function: unknown reward",
        ),
        (('name = "tiny-random-qwen2"', 'name = "/no/such/model"'), "/no/such/model"),
        (
            ('name = "tiny-random-qwen2"', 'name = "tiny-random-qwen2"\ndecode = "fast"'),
            "model.decode: Input should be 'auto', 'compiled' or 'eager'",
        ),
        (('source = "reasoning_gym"', 'source = "nowhere"'), "data.source"),
        (("steps = 2", "steps = [2"), "invalid TOML"),
    ],
)
def test_bad_config_gives_one_line_naming_the_field(tmp_path, edit, expected):
    old, new = edit
    assert old in TINY_CONFIG
    config = write_config(tmp_path, TINY_CONFIG.replace(old, new, 1))
    result = run_cli("train-local", str(config), "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    assert expected in message, message


def test_missing_config_file(tmp_path):
    result = run_cli("train-local", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2
    assert "config file not found" in result.output and "absent.toml" in result.output


@pytest.mark.slow
def test_train_local_with_the_default_model(tmp_path):
    """The real embedded default (SmolLM2-135M), 2 steps on a tiny batch."""
    text = (ROOT / "examples" / "local.toml").read_text()
    config = write_config(tmp_path, text, "local.toml")
    out = tmp_path / "run"
    result = run_cli(
        "train-local",
        str(config),
        "--output",
        str(out),
        "--steps",
        "2",
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(0.0 <= r["rewards/accuracy/mean"] <= 1.0 for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8


# The user's dense reward as the primary, so the tiny random model's groups have spread.
WEIGHTED_CONFIG = (
    TINY_CONFIG.replace("steps = 2", "steps = 3")
    .replace("group_size = 2", "group_size = 4")
    .replace("lr = 0.05", "lr = 0.001")
    .replace('role = "primary"\n', "")
    .replace(
        'function = "REWARD_FILE:digit_share"\n',
        'function = "REWARD_FILE:digit_share"\nrole = "primary"\n',
    )
)


@pytest.mark.parametrize(
    ("table", "moves"),
    [
        ("", False),  # method "auto": static in train-local
        ('[weighting]\nmethod = "static"\n', False),
        ('[weighting]\nmethod = "hypergradient"\neta = 1.0\n', True),
        ('[weighting]\nmethod = "hypergradient"\nrule = "cosine"\neta = 50.0\n', True),
        ('[weighting]\nmethod = "saw"\n', True),
        ('[weighting]\nmethod = "variance"\n', True),
    ],
)
def test_train_local_honours_the_weighting_table(tmp_path, table, moves):
    """The bug this guards: train-local accepted method = "hypergradient" and trained static."""
    config = write_config(tmp_path, WEIGHTED_CONFIG + "\n" + table)
    out = tmp_path / "run"
    result = run_cli("train-local", str(config), "--output", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = ("accuracy", "brevity", "digits")
    weights = [[r[f"weights/{n}"] for n in names] for r in records]
    initial = [0.5, 0.25, 0.25]
    if moves:
        assert any(w != pytest.approx(initial, abs=1e-6) for w in weights), weights
        assert any(r.get("timing/weighting", 0.0) > 0 for r in records)
    else:
        assert all(w == pytest.approx(initial, abs=1e-7) for w in weights), weights
    assert all(f"frac_reward_zero_std/{n}" in records[-1] for n in names)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('method = "magic"', "weighting.method"),
        ('rule = "magic"', "weighting.rule"),
        ("eta = 0.0", "weighting.eta: Input should be greater than 0"),
        ("eta = -1.0", "weighting.eta"),
        ("ema = 1.0", "weighting.ema: Input should be less than 1"),
        ("momentum = 1.5", "weighting.momentum"),
        ("saturation_window = 0", "weighting.saturation_window: Input should be greater than"),
        ("saturation_decay = 0.0", "weighting.saturation_decay"),
        ("smoothing = 1.0", "weighting.smoothing"),
        ("w_min = 0.4", "w_min"),
    ],
)
def test_bad_weighting_values_give_one_line_naming_the_field(tmp_path, table, expected):
    config = write_config(
        tmp_path,
        WEIGHTED_CONFIG
        + f'\n[weighting]\nmethod = "hypergradient"\n{table}\n'.replace(
            'method = "hypergradient"\nmethod', "method"
        ),
    )
    result = run_cli("train-local", str(config), "--output", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert expected in message, message
