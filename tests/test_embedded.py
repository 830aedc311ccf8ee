"""The embedded engine: heterogeneous clients, every method, checkpoints and resume after a kill."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmoa.errors import ConfigError
from fedmoa.federation import evaluation
from fedmoa.federation.config import load_experiment
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.runs import RunDirectory

USER_REWARD = """
def digit_share(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
"""

EXPERIMENT = """
seed = 5

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[server]
method = "METHOD"
rounds = ROUNDS
validation_prompts = 2
test_prompts = 2

[client_defaults]
local_steps = 2
grpo = {{ batch_size = 2, group_size = 4, max_new_tokens = 6, lr = 0.05 }}
data = {{ source = "reasoning_gym", name = "basic_arithmetic", size = 24, params = {{ min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }} }}

[[clients]]
id = "math-a"
task = "math"
rewards = [
  {{ name = "digits", function = "{reward}:digit_share", role = "primary" }},
  {{ name = "brevity", function = "length", weight = 0.5, params = {{ target = 3 }} }},
]

[[clients]]
id = "math-b"
task = "math"
rewards = [
  {{ name = "accuracy", function = "math_accuracy", role = "primary", params = {{ require_final_answer = false }} }},
  {{ name = "share", function = "{reward}:digit_share", weight = 2.0 }},
  {{ name = "boxed", function = "format", weight = 0.1 }},
]

[[clients]]
id = "chain"
task = "chain"
data = {{ name = "chain_sum", seed = 2 }}
rewards = [{{ name = "digits", function = "{reward}:digit_share", role = "primary" }}]
"""


def write_experiment(tmp_path: Path, method: str = "fedmoa", rounds: int = 2) -> Path:
    reward = tmp_path / "user_rewards.py"
    reward.write_text(USER_REWARD)
    text = EXPERIMENT.format(reward=reward).replace("METHOD", method).replace("ROUNDS", str(rounds))
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def run_embedded(config: Path, out: Path) -> tuple[EmbeddedFederation, dict[str, torch.Tensor]]:
    cfg = load_experiment(config)
    federation = EmbeddedFederation(cfg, RunDirectory(out))
    initial = dict(federation.server.state.global_adapter)
    federation.run_rounds()
    return federation, initial


def test_heterogeneous_rewards_in_one_federation(tmp_path):
    federation, _ = run_embedded(write_experiment(tmp_path, "fedmoa", rounds=1), tmp_path / "run")
    records = federation.run.read_metrics()
    clients = {r["client"]: r for r in records if r["type"] == "client"}
    assert set(clients) == {"math-a", "math-b", "chain"}
    assert {"weights/brevity", "alignment/brevity"} <= set(clients["math-a"])
    assert {"weights/accuracy", "weights/share", "weights/boxed"} <= set(clients["math-b"])
    # The keys every client reports to the server are the same whatever its objectives.
    uniform = {"reward", "reward/primary", "reward/aux_mean", "weight/primary", "loss", "step_time"}
    assert all(uniform <= set(r) for r in clients.values())
    round_record = next(r for r in records if r["type"] == "round")
    assert round_record["task_shares"] == pytest.approx({"math": 0.5, "chain": 0.5})
    assert round_record["bytes_up"] > 0
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"method": "fedmoa"' in summary
    assert (tmp_path / "run" / "adapters" / "global" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "method", ["fedavg", "fedprox", "fedadam", "fedmoa-hg", "fedmoa-taa", "local", "centralized"]
)
def test_every_method_runs_a_round(tmp_path, method):
    federation, initial = run_embedded(
        write_experiment(tmp_path, method, rounds=1), tmp_path / "run"
    )
    state = federation.server.state
    changed = any(not torch.equal(state.global_adapter[k], v) for k, v in initial.items())
    assert state.completed_rounds == 1
    if method == "local":
        assert not changed, "local training never touches the global adapter"
        assert set(state.client_adapters) == {"math-a", "math-b", "chain"}
        # Nothing is averaged, so there is no task adapter and no share to log; each
        # client's own adapter is what the run saves.
        assert state.task_adapters == {}
        round_record = next(r for r in federation.run.read_metrics() if r["type"] == "round")
        assert round_record["client_weights"] == {} and round_record["task_shares"] == {}
        saved = sorted(p.name for p in (tmp_path / "run" / "adapters").iterdir())
        assert saved == ["client-chain", "client-math-a", "client-math-b", "global"]
    elif method == "centralized":
        assert changed
        clients = [r for r in federation.run.read_metrics() if r["type"] == "client"]
        assert [r["client"] for r in clients] == ["centralized"]
        assert {"weights/math-a/brevity", "weights/chain/digits"} <= set(clients[0])
    else:
        assert changed
        assert set(state.task_adapters) == {"math", "chain"}


@pytest.mark.parametrize(
    ("method", "eval_local_models"), [("fedavg", True), ("local", True), ("fedavg", False)]
)
def test_evaluation_scores_global_personalized_and_local_models(
    tmp_path, monkeypatch, method, eval_local_models
):
    """Per client: the global adapter, its personalized adapter and, unless switched off, the
    adapter it trained this round (start + its own delta), each with a hypervolume."""
    scored: list[tuple[str, dict[str, torch.Tensor]]] = []
    original = evaluation.score_adapter

    def spy(policy, tokenizer, client, adapter, *args):
        scored.append((client.id, {k: v.clone() for k, v in adapter.items()}))
        return original(policy, tokenizer, client, adapter, *args)

    monkeypatch.setattr(evaluation, "score_adapter", spy)
    config = write_experiment(tmp_path, method, rounds=1)
    if not eval_local_models:
        config.write_text(
            config.read_text().replace(
                "test_prompts = 2", "test_prompts = 2\neval_local_models = false"
            )
        )
    federation, initial = run_embedded(config, tmp_path / "run")
    record = next(r for r in federation.run.read_metrics() if r["type"] == "eval" and r["round"])
    clients = ["math-a", "math-b", "chain"]
    # Round 0 came first: the starting adapter once per client (it is also the personalized one).
    assert [c for c, _ in scored[: len(clients)]] == clients
    for _, adapter in scored[: len(clients)]:
        assert all(torch.equal(adapter[k], initial[k]) for k in initial)
    del scored[: len(clients)]
    assert {"global/accuracy", "personal/accuracy", "personal/hypervolume"} <= set(record)
    for cid in clients:
        assert 0.0 <= record[f"personal/{cid}/hypervolume"] <= 1.0 or math.isnan(
            record[f"personal/{cid}/hypervolume"]
        )
    has_local = {f"local_model/{cid}/accuracy" for cid in clients} <= set(record)
    assert has_local == eval_local_models
    assert ("local_model/accuracy" in record) == eval_local_models
    by_client: dict[str, list[dict[str, torch.Tensor]]] = {}
    for cid, adapter in scored:
        by_client.setdefault(cid, []).append(adapter)
    assert list(by_client) == clients  # one client after the other
    if method == "local" and eval_local_models:
        for cid in clients:  # the personalized adapter is the local model: scored once
            assert len(by_client[cid]) == 2
            assert record[f"local_model/{cid}/accuracy"] == record[f"personal/{cid}/accuracy"]
    if method == "fedavg" and not eval_local_models:
        assert all(len(by_client[cid]) == 2 for cid in clients)  # global, task adapter
    if method == "fedavg" and eval_local_models:
        state = federation.server.state
        for cid in clients:
            task = "chain" if cid == "chain" else "math"
            global_, personal, *local = by_client[cid]
            assert all(torch.equal(global_[k], state.global_adapter[k]) for k in global_)
            assert all(torch.equal(personal[k], state.task_adapters[task][k]) for k in personal)
            if cid == "chain":  # alone in its task: its task adapter is its local model
                assert local == []
                assert record["local_model/chain/accuracy"] == record["personal/chain/accuracy"]
                continue
            (local,) = local
            # Started from the initial global adapter and moved away from it on its own.
            assert any(not torch.equal(local[k], initial[k]) for k in local)
            assert any(not torch.equal(local[k], global_[k]) for k in local)


def adapter_file(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapters" / "global" / "adapter_model.safetensors")


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    config = write_experiment(tmp_path, "fedmoa", rounds=2)
    reference = tmp_path / "reference"
    run_embedded(config, reference)

    crashed = tmp_path / "crashed"
    cli = [sys.executable, "-m", "fedmoa.cli", "run", str(config), "--output", str(crashed)]
    process = subprocess.Popen(
        cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (crashed / "checkpoints" / "round-0001.pt").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (crashed / "summary.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "fedmoa.cli", "run", "--resume", str(crashed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = adapter_file(reference), adapter_file(crashed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    trained = load_file(reference / "adapters" / "task-math" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k), (
        "training moved lora_B"
    )
    rounds = [r["round"] for r in RunDirectory(crashed).read_metrics() if r["type"] == "round"]
    assert rounds == [1, 2]


@pytest.mark.parametrize(("weighting", "moves"), [("static", False), ("saw", True)])
def test_fedavg_with_a_dynamic_weighting_baseline(tmp_path, weighting, moves):
    """server.method = "fedavg" + [weighting] method = "saw": FedAvg + SAW, end to end."""
    config = write_experiment(tmp_path, "fedavg", rounds=1)
    config.write_text(config.read_text() + f'\n[weighting]\nmethod = "{weighting}"\n')
    federation, _ = run_embedded(config, tmp_path / "run")
    clients = {r["client"]: r for r in federation.run.read_metrics() if r["type"] == "client"}
    # The configured weights, normalised; SAW moves a client's weights only where its
    # objectives' rewards had spread, so any multi-objective client counts.
    static = {
        "math-a": {"digits": 1 / 1.5, "brevity": 0.5 / 1.5},
        "math-b": {"accuracy": 1 / 3.1, "share": 2 / 3.1, "boxed": 0.1 / 3.1},
    }
    moved = {
        cid: [clients[cid][f"weights/{n}"] for n in w] != pytest.approx(list(w.values()), abs=1e-6)
        for cid, w in static.items()
    }
    assert any(moved.values()) is moves, moved


def test_resume_reads_the_runs_config_with_paths_relative_to_where_it_came_from(tmp_path):
    """A run directory keeps a copy of the experiment; its relative paths (client files, reward
    files) still start from the experiment's own folder, wherever the run directory is."""
    owner = tmp_path / "experiment" / "node-a"
    owner.mkdir(parents=True)
    (owner / "rewards.py").write_text(USER_REWARD)
    text = write_experiment(tmp_path, "fedmoa", rounds=1).read_text()
    head = text[: text.index("[[clients]]")]
    client = text[text.index("[[clients]]") :].split("[[clients]]")[1]
    (owner / "client.toml").write_text(
        client.replace(str(tmp_path / "user_rewards.py"), "rewards.py")
    )
    experiment = tmp_path / "experiment" / "experiment.toml"
    experiment.write_text('clients = ["node-a/client.toml"]\n' + head)
    run = RunDirectory(tmp_path / "elsewhere" / "run")
    run.save_config(experiment, {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(run.config_path)  # read where it lies, the path points nowhere
    cfg = load_experiment(run.config_path, run.config_origin)
    assert [c.id for c in cfg.clients] == [load_experiment(experiment).clients[0].id]
