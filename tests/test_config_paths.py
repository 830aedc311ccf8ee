"""Paths in a config file are relative to that file, never to the working directory.

Data files, reward files and ``output_dir`` of an experiment (its clients and
``[client_defaults]`` too), a train-local config and an eval config; and ``fedmoa run
some/dir/experiment.toml`` from another folder, end to end on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmoa.cli import app
from fedmoa.config import load_config
from fedmoa.eval.harness import load_eval_config
from fedmoa.federation.client import client_reward_funcs, load_client_data
from fedmoa.federation.config import load_experiment

REWARD = """
def says_answer(prompts, completions, answer, **kwargs):
    return [float(str(a) in c[0]["content"]) for c, a in zip(completions, answer)]
"""

EXPERIMENT = """
seed = 1
output_dir = "out/run"

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[server]
rounds = 1
validation_prompts = 1
test_prompts = 1

[client_defaults]
local_steps = 1
grpo = { batch_size = 2, group_size = 2, max_new_tokens = 3 }
data = { source = "jsonl", path = "data/rows.jsonl", size = 12 }
rewards = [{ name = "answer", function = "my_rewards.py:says_answer", role = "primary" }]

[[clients]]
id = "a"
task = "t"

[[clients]]
id = "b"
task = "t"
data = { source = "jsonl", path = "/ABSOLUTE/rows.jsonl" }
rewards = [
  { name = "answer", function = "sub/../my_rewards.py:says_answer", role = "primary" },
  { name = "brevity", function = "length", weight = 0.5, params = { target = 2 } },
  { name = "mod", function = "fedmoa.rewards.length:length_reward", weight = 0.5, params = { target = 2 } },
]
"""


def write_project(root: Path) -> Path:
    """An experiment folder: the TOML, its reward file and its data, named relatively."""
    folder = root / "some" / "dir"
    (folder / "data").mkdir(parents=True)
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(12)]
    (folder / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "my_rewards.py").write_text(REWARD)
    text = EXPERIMENT.replace("/ABSOLUTE/rows.jsonl", str(folder / "data" / "rows.jsonl"))
    (folder / "experiment.toml").write_text(text)
    return folder / "experiment.toml"


def test_experiment_paths_resolve_from_the_file(tmp_path: Path, monkeypatch) -> None:
    config = write_project(tmp_path)
    folder = config.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_experiment(Path("..") / "some" / "dir" / "experiment.toml")
    assert Path(cfg.output_dir) == folder / "out" / "run"
    a, b = cfg.clients
    assert Path(a.data.path) == folder / "data" / "rows.jsonl"  # from [client_defaults]
    assert a.rewards[0].function == f"{folder / 'my_rewards.py'}:says_answer"
    assert b.data.path == str(folder / "data" / "rows.jsonl")  # absolute: kept
    assert b.rewards[0].function == f"{folder / 'my_rewards.py'}:says_answer"  # normalised
    assert [r.function for r in b.rewards[1:]] == ["length", "fedmoa.rewards.length:length_reward"]
    # And they load from here: data rows and the user's reward function.
    assert len(load_client_data(a, "clients[0].data").train) > 0
    (_, says_answer), *_ = client_reward_funcs(a, 0)
    completions = [[{"role": "assistant", "content": "It is 3"}]]
    assert says_answer(prompts=[None], completions=completions, answer=[3]) == [1.0]


def test_train_local_and_eval_configs_resolve_from_the_file(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "local.toml").write_text(
        'output_dir = "runs/local"\n'
        'data = { source = "jsonl", path = "rows.jsonl" }\n'
        'rewards = [{ name = "a", function = "r.py:f", role = "primary" }]\n'
    )
    (folder / "eval.toml").write_text(
        'output_dir = "results"\nadapter = "../adapters/global"\n'
        'data = { source = "jsonl", path = "rows.jsonl" }\n'
    )
    monkeypatch.chdir(tmp_path)
    local = load_config("cfg/local.toml")
    assert Path(local.output_dir) == folder / "runs" / "local"
    assert Path(local.data.path) == folder / "rows.jsonl"
    assert local.rewards[0].function == f"{folder / 'r.py'}:f"
    evaluation = load_eval_config("cfg/eval.toml", {"limit": 2})
    assert Path(evaluation.adapter) == tmp_path / "adapters" / "global"
    assert Path(evaluation.output_dir) == folder / "results"
    # A command-line value is the user's own, relative to where they typed it.
    assert load_eval_config("cfg/eval.toml", {"output_dir": "mine"}).output_dir == "mine"


@pytest.mark.filterwarnings("ignore")
def test_fedmoa_run_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    """The issue's example: ``fedmoa run some/dir/experiment.toml`` from elsewhere."""
    config = write_project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(app, ["run", str(Path("..") / "some" / "dir" / "experiment.toml")])
    assert result.exit_code == 0, result.output
    run = config.parent / "out" / "run"
    assert (run / "summary.json").is_file()
    assert not (elsewhere / "out").exists()


def test_clients_may_live_in_their_own_files(tmp_path: Path, monkeypatch) -> None:
    """``clients = ["a.toml", ...]``: each data owner's table in its own file, paths relative to
    it; the result equals the one-file form."""
    one_file = load_experiment(write_project(tmp_path / "one"))
    root = tmp_path / "split"
    owner = root / "owners" / "a"
    (owner / "data").mkdir(parents=True)
    source = tmp_path / "one" / "some" / "dir"
    (owner / "data" / "rows.jsonl").write_text((source / "data" / "rows.jsonl").read_text())
    (owner / "my_rewards.py").write_text(REWARD)
    (owner / "client.toml").write_text(
        'id = "a"\ntask = "t"\n'
        'data = { source = "jsonl", path = "data/rows.jsonl", size = 12 }\n'
        'rewards = [{ name = "answer", function = "my_rewards.py:says_answer", role = "primary" }]\n'
    )
    header = 'clients = ["owners/a/client.toml"]\n' + EXPERIMENT.split("[[clients]]")[0]
    (root / "experiment.toml").write_text(header)
    monkeypatch.chdir(tmp_path)
    (client,) = load_experiment(root / "experiment.toml").clients
    assert client.data.path == str(owner / "data" / "rows.jsonl")
    assert client.rewards[0].function == f"{owner / 'my_rewards.py'}:says_answer"
    assert client.grpo == one_file.clients[0].grpo  # [client_defaults] still merged under it
    assert client.local_steps == one_file.clients[0].local_steps


def test_bad_client_files_name_the_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "experiment.toml").write_text('clients = ["missing.toml", "bad.toml"]\n')
    with pytest.raises(Exception, match=r"clients\[0\]: config file not found: .*missing.toml"):
        load_experiment(tmp_path / "experiment.toml")
    (tmp_path / "missing.toml").write_text(
        'id = "a"\ntask = "t"\nrewards = [{ name = "r", function = "length", role = "primary", params = { target = 2 } }]\n'
    )
    (tmp_path / "bad.toml").write_text(
        'id = "b"\ntask = "t"\nlocal_steps = 0\nrewards = [{ name = "r", function = "length", role = "primary" }]\n'
    )
    with pytest.raises(
        Exception, match=r"bad\.toml: local_steps \(clients\[1\]\): .*greater than 0"
    ):
        load_experiment(tmp_path / "experiment.toml")
