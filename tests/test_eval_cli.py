"""``fedmoa eval`` end to end on the tiny random model: outputs agree with each other, a saved
adapter is really applied, user errors are one line with exit status 2, progress per batch."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.config import ModelConfig
from fedmoa.eval import greedy_completions, load_eval_config, load_policy, run_eval, select_rows
from fedmoa.federation.client import load_client_data
from fedmoa.federation.config import ClientConfig, SplitConfig
from fedmoa.models import LoraSettings, attach_lora, tiny_random_model

MAX_NEW = 6

TINY_EVAL = f"""
max_new_tokens = {MAX_NEW}
batch_size = 2

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[data]
source = "reasoning_gym"
name = "basic_arithmetic"
size = 16
params = {{ min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }}

[[rewards]]
name = "digits"
function = "REWARD_FILE:digit_share"
role = "primary"

[[rewards]]
name = "accuracy"
function = "math_accuracy"
params = {{ require_final_answer = false }}

[[rewards]]
name = "even_length"
function = "REWARD_FILE:length_if_even"
"""

# Dense user rewards, so that pass@1 is not trivially 0 on a random model; one returns None.
USER_REWARDS = """
def digit_share(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() or ch == " " for ch in t) / max(len(t), 1) for t in texts]

def length_if_even(prompts, completions, answer, **kwargs):
    return [
        float(len(c[0]["content"])) if int(a) % 2 == 0 else None
        for c, a in zip(completions, answer)
    ]
"""


def run_cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args], catch_exceptions=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    rewards = tmp_path / "user_rewards.py"
    rewards.write_text(USER_REWARDS)
    path = tmp_path / "eval.toml"
    path.write_text(TINY_EVAL.replace("REWARD_FILE", str(rewards)))
    return path


def read_samples(out: Path) -> list[dict[str, str]]:
    with (out / "samples.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def column_mean(samples: list[dict[str, str]], column: str) -> float:
    values = [float(s[column]) for s in samples if s[column] != ""]
    return sum(values) / len(values)


def save_adapter(path: Path, b_std: float) -> torch.nn.Module:
    """A LoRA adapter on the model ``tiny-random-qwen2`` loads; B is zero unless ``b_std``."""
    model, _ = tiny_random_model("qwen2", seed=0, dtype=torch.float32)
    policy = attach_lora(model, LoraSettings())
    if b_std:
        generator = torch.Generator().manual_seed(0)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * b_std
    policy.save_pretrained(path)
    return policy.eval()


def test_eval_writes_results_and_samples_that_agree(config, tmp_path):
    out = tmp_path / "out"
    result = run_cli(str(config), "--limit", "5", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "pass@1 (digits)" in result.output
    assert str(out / "results.json") in result.output

    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    samples = read_samples(out)
    assert len(samples) == summary["num_rows"] == 5
    assert [s["index"] for s in samples] == ["0", "1", "2", "3", "4"]
    assert math.isclose(column_mean(samples, "reward/digits"), summary["pass_at_1"], rel_tol=1e-6)
    for name, mean in summary["reward_means"].items():
        assert math.isclose(column_mean(samples, f"reward/{name}"), mean, rel_tol=1e-6)
    # None (odd answers) stays empty, not 0.
    blanks = [s["reward/even_length"] == "" for s in samples]
    assert blanks == [int(s["answer"]) % 2 == 1 for s in samples]

    tokens = [int(s["tokens"]) for s in samples]
    truncated = [s["truncated"] == "True" for s in samples]
    assert summary["completion_tokens"] == sum(tokens)
    assert summary["truncated"] == sum(truncated)
    assert all(0 < t <= MAX_NEW for t in tokens)
    assert all(t == MAX_NEW for t, cut in zip(tokens, truncated, strict=True) if cut)
    assert summary["tokens_per_s"] > 0 and summary["wall_s"] >= summary["generation_s"] > 0
    assert summary["dtype"] == "float32" and summary["device"] == "cpu"
    assert results["config"]["limit"] == 5 and results["config"]["output_dir"] == str(out)
    assert results["versions"]["torch"] and results["versions"]["fedmoa"]
    rows = select_rows(load_eval_config(config, {"limit": 5}))
    assert [s["prompt"] for s in samples] == [r["question"] for r in rows]
    assert [s["answer"] for s in samples] == [r["answer"] for r in rows]


def test_eval_without_config_uses_math_accuracy_on_arithmetic(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "--model", "tiny-random-qwen2", "--limit", "2", "--max-new-tokens", "3",
        "--device", "cpu", "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["data"]["source"] == "reasoning_gym"
    assert config["data"]["name"] == "basic_arithmetic"
    assert [(r["function"], r["role"]) for r in config["rewards"]] == [("math_accuracy", "primary")]
    assert len(read_samples(out)) == 2


def test_zero_adapter_matches_base_and_a_perturbed_one_is_applied(config, tmp_path):
    zero = save_adapter(tmp_path / "zero", b_std=0.0)
    perturbed = save_adapter(tmp_path / "perturbed", b_std=0.5)
    completions = {}
    for name, extra in [
        ("base", []),
        ("zero", ["--adapter", str(tmp_path / "zero")]),
        ("perturbed", ["--adapter", str(tmp_path / "perturbed")]),
    ]:
        out = tmp_path / f"out-{name}"
        result = run_cli(str(config), "--limit", "4", "--output", str(out), *extra)
        assert result.exit_code == 0, result.output
        completions[name] = [s["completion"] for s in read_samples(out)]
    assert completions["zero"] == completions["base"]
    assert completions["perturbed"] != completions["base"]

    # The loaded policy computes exactly what the in-memory adapter did.
    model_cfg = ModelConfig(name="tiny-random-qwen2", dtype="fp32", device="cpu")
    base, tokenizer = load_policy(model_cfg)
    ids = tokenizer("12 + 7 =", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**ids).logits
        for saved, reference in [("zero", zero), ("perturbed", perturbed)]:
            loaded, _ = load_policy(model_cfg, tmp_path / saved)
            logits = loaded(**ids).logits
            torch.testing.assert_close(logits, reference(**ids).logits)
            assert torch.equal(logits, base_logits) == (saved == "zero")


def save_other_adapter(path: Path, **changes: int) -> None:
    """An adapter saved from a variant of the tiny model (another depth or width)."""
    from transformers import AutoModelForCausalLM

    small, _ = tiny_random_model("qwen2")
    other = type(small.config)(**{**small.config.to_dict(), **changes, "layer_types": None})
    attach_lora(AutoModelForCausalLM.from_config(other), LoraSettings()).save_pretrained(path)


@pytest.mark.parametrize("where", ["missing", "run_dir", "deeper_model", "wider_model"])
def test_a_bad_adapter_is_one_line_naming_the_path(config, tmp_path, where):
    adapter = tmp_path / where
    if where == "missing":
        expected = "adapter directory not found"
    elif where == "run_dir":
        save_adapter(adapter / "adapter", b_std=0.0)
        expected = f"did you mean {adapter / 'adapter'}?"
    elif where == "deeper_model":  # PEFT alone would drop layer 2's tensors silently
        save_other_adapter(adapter, num_hidden_layers=3)
        expected = "does not fit tiny-random-qwen2: 8 saved tensors have no place"
    else:
        save_other_adapter(adapter, hidden_size=128)
        expected = "RuntimeError: size mismatch for"
    result = run_cli(str(config), "--adapter", str(adapter), "--output", str(tmp_path / "o"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and str(adapter) in lines[0]
    assert expected in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize(
    ("edit", "args", "expected"),
    [
        (("[data]", "[data]\nsauce = 1"), [], "eval.toml: data.sauce: unknown key"),
        (('role = "primary"', 'role = "auxiliary"'), [], "eval.toml: rewards: exactly one"),
        (("batch_size = 2", "batch_size = 0"), [], "eval.toml: batch_size: Input should be"),
        (None, ["--limit", "0"], "command line: limit: Input should be greater than 0"),
        (None, ["--use", "dev"], "command line: split.use: Input should be"),
    ],
)
def test_a_bad_config_field_is_one_line_naming_the_field(config, edit, args, expected):
    if edit is not None:
        config.write_text(config.read_text().replace(*edit, 1))
    result = run_cli(str(config), *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output


def test_progress_is_reported_once_per_batch(config, tmp_path):
    model, tokenizer = tiny_random_model("qwen2")
    prompts = [[{"role": "user", "content": f"{i} + 1 ="}] for i in range(5)]
    batches: list[int] = []
    greedy_completions(model, tokenizer, prompts, 2, batch_size=2, on_batch=batches.append)
    assert batches == [2, 2, 1]

    cfg = load_eval_config(config, {"limit": 5, "output_dir": str(tmp_path / "out")})
    calls: list[tuple[int, int]] = []
    report = run_eval(cfg, lambda done, total: calls.append((done, total)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]  # the start, then one call per batch
    assert report.num_rows == 5 and report.samples_path == tmp_path / "out" / "samples.csv"


def test_split_use_scores_a_runs_partition(config):
    cfg = load_eval_config(config, {"split": {"use": "test"}, "data": {"size": 40}, "limit": 3})
    rows = select_rows(cfg)
    client = ClientConfig(
        id="any", task="any", rewards=list(cfg.rewards), data=cfg.data, split=SplitConfig()
    )
    assert rows == load_client_data(client).test[:3]
    cfg = load_eval_config(config, {"split": {"use": "validation"}, "data": {"size": 40}})
    validation = select_rows(cfg)
    assert len(validation) == 4
    assert not {r["question"] for r in validation} & {r["question"] for r in rows}


def test_code_rewards_run_through_code_execution(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    rows = [
        {"id": "t/1", "question": "Write add(a, b).", "test_list": ["assert add(1, 2) == 3"]},
        {"id": "t/2", "question": "Write neg(x).", "test_list": ["assert neg(1) == -1"]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_eval_config(
        None,
        {
            "model": {"name": "tiny-random-qwen2", "dtype": "fp32", "device": "cpu"},
            "data": {"source": "jsonl", "path": str(data)},
            "rewards": [{"name": "tests", "function": "code_execution", "role": "primary"}],
            "max_new_tokens": 4,
            "output_dir": str(tmp_path / "out"),
        },
    )
    report = run_eval(cfg)
    assert report.pass_at_1 == 0.0  # scored (a random model writes no passing code), not None
    assert [r.rewards["tests"] for r in report.records] == [0.0, 0.0]
    assert [s["id"] for s in read_samples(tmp_path / "out")] == ["t/1", "t/2"]
