"""TRL's rewards and data as a TRL user has them: reward factories (``factory = true``), functions
that cannot take TRL's call refused at load, conversational prompts used as written, and the
example in ``examples/trl_rewards``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedmoa.config import RewardConfig
from fedmoa.data import DEFAULT_SYSTEM_PROMPT, DataConfig, load_rows
from fedmoa.errors import ConfigError, RewardError
from fedmoa.rewards import compute_rewards, load_reward_function
from fedmoa.train_local import build_reward_funcs

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trl_rewards"
OVERLONG = "trl.rewards:get_soft_overlong_punishment"
OVERLONG_PARAMS = {"max_completion_len": 10, "soft_punish_cache": 4}

USER_FACTORIES = """
def not_a_reward(scale):
    return scale


def broken(scale):
    raise ValueError("scale must be positive")


def scaled(scale, **options):
    def reward(prompts, completions, **kwargs):
        return [scale * len(c[0]["content"]) for c in completions]

    return reward


def completions_only(completions, solution):
    return [1.0 for _ in completions]
"""


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def trl_call(func: Any, lengths: list[int]) -> list[float | None]:
    """``func`` called as TRL's GRPOTrainer (and fedmoa's trainer) call it."""
    n = len(lengths)
    columns = {"solution": ["4"] * n, "completion_ids": [[7] * k for k in lengths]}
    prompts = [[{"role": "user", "content": "2 + 2?"}]] * n
    completions = [chat("x" * k) for k in lengths]
    return compute_rewards([("r", func)], prompts, completions, columns)[:, 0].tolist()


def one_line_error(error: type[Exception], *args: Any, **kwargs: Any) -> str:
    with pytest.raises(error) as info:
        if error is ConfigError:
            build_reward_funcs(*args, **kwargs)
        else:
            load_reward_function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(USER_FACTORIES)
    return path


# ------------------------------------------------------------------------------ factories


def test_factory_params_make_trls_reward_function() -> None:
    from trl.rewards import get_soft_overlong_punishment

    func = load_reward_function(OVERLONG, OVERLONG_PARAMS, factory=True)
    direct = get_soft_overlong_punishment(**OVERLONG_PARAMS)
    assert type(func) is type(direct)
    lengths = [3, 6, 8, 10, 14]
    assert trl_call(func, lengths) == trl_call(direct, lengths) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert func([[1] * 8]) == direct([[1] * 8])


def test_factory_entry_of_a_config_is_built_by_every_engine() -> None:
    """``build_reward_funcs`` is where every engine turns ``RewardConfig``s into functions."""
    rewards = [
        RewardConfig(name="acc", function="trl.rewards:accuracy_reward", role="primary"),
        RewardConfig(
            name="overlong", function=OVERLONG, factory=True, params=OVERLONG_PARAMS, timeout=5
        ),
    ]
    _, (name, overlong) = build_reward_funcs(rewards)
    assert name == "overlong"
    assert trl_call(overlong, [2, 9]) == [0.0, -0.75]  # under its policy (timeout) too
    assert RewardConfig(name="x", function="format").factory is False


def test_user_factory_with_kwargs_takes_any_param(factories: Path) -> None:
    func = load_reward_function(f"{factories}:scaled", {"scale": 2, "unused": 1}, factory=True)
    assert trl_call(func, [1, 3]) == [2.0, 6.0]


def test_factory_that_returns_a_non_callable_is_refused(factories: Path) -> None:
    spec = f"{factories}:not_a_reward"
    message = one_line_error(RewardError, spec, {"scale": 3}, factory=True, name="bad")
    assert message.startswith(f"reward 'bad' ('{spec}'): factory = true, but it returned a int")
    reward = RewardConfig(name="bad", function=spec, factory=True, params={"scale": 3})
    message = one_line_error(ConfigError, [reward], field="clients[0].rewards")
    assert message.startswith("clients[0].rewards[0].function: reward 'bad'")
    assert "not a reward function" in message


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("broken", {"scale": 1}, "calling the factory raised ValueError: scale must be positive"),
        ("not_a_reward", {"scael": 1}, "factory does not take parameter(s) ['scael']"),
        ("not_a_reward", {}, "missing 1 required positional argument: 'scale'"),
    ],
)
def test_factory_failures_are_one_line(
    factories: Path, name: str, params: dict[str, Any], expected: str
) -> None:
    spec = f"{factories}:{name}"
    message = one_line_error(RewardError, spec, params, factory=True)
    assert spec in message and expected in message


# ------------------------------------------------------------- functions TRL cannot call


def test_factory_named_without_factory_true_is_refused_at_load() -> None:
    """The issue's case: the run used to start and stop at the first reward call."""
    reward = RewardConfig(name="overlong", function=OVERLONG, params=OVERLONG_PARAMS)
    primary = RewardConfig(name="acc", function="trl.rewards:accuracy_reward", role="primary")
    message = one_line_error(ConfigError, [primary, reward])
    assert message.startswith(f"rewards[1].function: reward 'overlong' ('{OVERLONG}') cannot take")
    assert "takes no keyword 'prompts' or 'completions' and no **kwargs" in message
    assert "(parameters: max_completion_len, soft_punish_cache)" in message
    assert "did you mean factory = true?" in message
    # without params too
    assert "did you mean factory = true?" in one_line_error(RewardError, OVERLONG)


def test_function_without_prompts_or_kwargs_is_refused(factories: Path) -> None:
    message = one_line_error(RewardError, f"{factories}:completions_only")
    assert "takes no keyword 'prompts' and no **kwargs" in message
    assert "add **kwargs to its parameters" in message
    assert "factory" not in message.split("cannot take")[1]


def test_factory_whose_function_cannot_take_trls_call_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text("def make():\n    return lambda completion_ids: [0.0]\n")
    message = one_line_error(RewardError, f"{path}:make", factory=True)
    assert "the function its factory returned takes no keyword 'prompts' or 'completions'" in (
        message
    )
    assert "add **kwargs" in message


@pytest.mark.parametrize(
    "spec", ["trl.rewards:accuracy_reward", "trl.rewards:think_format_reward", "builtins:max"]
)
def test_trl_functions_and_unsignable_callables_load(spec: str) -> None:
    """TRL's plain functions take ``**kwargs``; a callable without a signature is not checked."""
    assert callable(load_reward_function(spec))


# ---------------------------------------------------------------------- system messages


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


USER = {"role": "user", "content": "What is 2 + 2?"}
OWN_SYSTEM = {"role": "system", "content": "Think first."}


@pytest.fixture
def conversational(tmp_path: Path) -> str:
    records = [
        {"prompt": [USER], "solution": "4"},
        {"prompt": [OWN_SYSTEM, USER], "solution": "4"},
    ]
    return str(write_jsonl(tmp_path / "trl.jsonl", records))


def test_conversational_prompts_get_no_system_message_by_default(conversational: str) -> None:
    rows = load_rows(DataConfig(source="jsonl", path=conversational))
    assert rows == [
        {"prompt": [USER], "solution": "4"},
        {"prompt": [OWN_SYSTEM, USER], "solution": "4"},
    ]
    empty = load_rows(DataConfig(source="jsonl", path=conversational, system_prompt=""))
    assert empty == rows


def test_conversational_prompts_get_a_configured_system_message(conversational: str) -> None:
    rows = load_rows(DataConfig(source="jsonl", path=conversational, system_prompt="Be brief."))
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, USER]
    assert rows[1]["prompt"] == [OWN_SYSTEM, USER]  # a prompt's own system message is kept


def test_plain_text_questions_still_get_the_default(tmp_path: Path) -> None:
    path = str(
        write_jsonl(
            tmp_path / "q.jsonl",
            [{"question": "What is 2 + 2?", "answer": 4}, {"prompt": "What is 2 + 2?"}],
        )
    )
    default = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    rows = load_rows(DataConfig(source="jsonl", path=path))
    assert [r["prompt"] for r in rows] == [[default, USER], [default, USER]]
    generated = load_rows(DataConfig(size=1))[0]["prompt"]
    assert generated[0] == default
    bare = load_rows(DataConfig(source="jsonl", path=path, system_prompt=""))
    assert [r["prompt"] for r in bare] == [[USER], [USER]]
    assert load_rows(DataConfig(size=1, system_prompt=""))[0]["prompt"][0]["role"] == "user"


# ---------------------------------------------------------------------------- the example


def test_example_config_builds_trl_rewards_and_data() -> None:
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment

    from fedmoa.federation.client import client_reward_funcs, load_client_data
    from fedmoa.federation.config import load_experiment

    cfg = load_experiment(EXAMPLE / "experiment.toml")
    assert [c.id for c in cfg.clients] == ["trl-a", "trl-b"]
    built = {c.id: dict(client_reward_funcs(c, i)) for i, c in enumerate(cfg.clients)}
    assert list(built["trl-a"]) == ["accuracy", "overlong"]
    assert list(built["trl-b"]) == ["accuracy", "think"]
    overlong = next(r for r in cfg.clients[0].rewards if r.name == "overlong")
    direct = get_soft_overlong_punishment(**overlong.params)
    lengths = [10, 40, 60]
    assert trl_call(built["trl-a"]["overlong"], lengths) == trl_call(direct, lengths)
    train = load_client_data(cfg.clients[0], "clients[0].data").train
    assert train and all(row["prompt"][0]["role"] == "user" for row in train)  # used as written
    rows = train[:2]
    completions = [chat(f"The answer is \\boxed{{{row['solution']}}}.") for row in rows]
    columns = {"solution": [row["solution"] for row in rows]}
    matrix = compute_rewards(
        [("accuracy", built["trl-a"]["accuracy"])],
        [row["prompt"] for row in rows],
        completions,
        columns,
    )
    assert matrix[:, 0].tolist() == accuracy_reward(completions, **columns) == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore")
def test_example_runs_one_round_on_the_tiny_model(tmp_path: Path) -> None:
    """The example as written, but on the tiny random model, for one short round."""
    from typer.testing import CliRunner

    from fedmoa.cli import app

    folder = tmp_path / "trl_rewards"
    shutil.copytree(EXAMPLE, folder)
    text = (folder / "experiment.toml").read_text()
    for old, new in [
        ('name = "smollm2-135m"', 'name = "tiny-random-qwen2"\ndevice = "cpu"'),
        ("rounds = 2", "rounds = 1"),
        ("local_steps = 2", "local_steps = 1"),
        ("max_new_tokens = 48", "max_new_tokens = 4"),
        ('output_dir = "../../runs/trl-rewards"', 'output_dir = "out"'),
    ]:
        assert old in text
        text = text.replace(old, new)
    (folder / "experiment.toml").write_text(text)
    result = CliRunner().invoke(app, ["run", str(folder / "experiment.toml")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").open()]
    clients = {r["client"]: r for r in records if r.get("type") == "client"}
    assert clients["trl-a"]["rewards/overlong/mean"] == 0.0  # 4 tokens: far below 48 - 16
    assert "rewards/think/mean" in clients["trl-b"]
    assert "rewards/accuracy/mean" in clients["trl-a"]


def test_readme_block_is_the_examples() -> None:
    """The README's TOML block says what the tested example does."""
    import re
    import tomllib

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "factory" in b)
    shown = tomllib.loads(block)
    example = tomllib.loads((EXAMPLE / "experiment.toml").read_text(encoding="utf-8"))
    assert shown["data"] == example["client_defaults"]["data"]
    assert shown["rewards"] == example["clients"][0]["rewards"]
