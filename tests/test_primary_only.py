"""``fedavg-primary``: FedAvg whose clients train on their primary reward alone.

It is the reference of what the primaries reach without the auxiliaries, so it must drop exactly
the auxiliaries (in training, on every engine, since ``run_client_round`` does it) and change
nothing else: the server still averages, and evaluation still scores every objective.
"""

from __future__ import annotations

import torch

from fedmoa.federation.client import training_objectives
from fedmoa.federation.config import load_experiment
from test_embedded import run_embedded, write_experiment


def test_only_the_primary_is_kept_with_weight_one(tmp_path):
    cfg = load_experiment(write_experiment(tmp_path, "fedavg-primary", rounds=1))
    client = next(c for c in cfg.clients if c.id == "math-b")
    funcs = [(r.name, lambda *a, **k: [0.0]) for r in client.rewards]
    kept, kept_funcs = training_objectives(client, funcs, "fedavg-primary")
    assert [(r.name, r.role, r.weight) for r in kept.rewards] == [("accuracy", "primary", 1.0)]
    assert [name for name, _ in kept_funcs] == ["accuracy"]
    assert kept_funcs[0][1] is funcs[0][1]
    assert kept.grpo == client.grpo and kept.data == client.data and kept.id == client.id
    for method in ("fedavg", "fedmoa", "fedprox", "local"):
        same, same_funcs = training_objectives(client, funcs, method)
        assert same is client and same_funcs == funcs


def test_a_fedavg_primary_round_trains_on_primaries_and_evaluates_everything(tmp_path):
    federation, _ = run_embedded(
        write_experiment(tmp_path, "fedavg-primary", rounds=1), tmp_path / "run"
    )
    records = federation.run.read_metrics()
    clients = {r["client"]: r for r in records if r["type"] == "client"}
    assert set(clients) == {"math-a", "math-b", "chain"}
    for record in clients.values():
        assert record["weight/primary"] == 1.0
        assert record["reward/aux_mean"] == 0.0  # no auxiliary was trained on
    assert "rewards/brevity/mean" not in clients["math-a"]
    assert not {"rewards/share/mean", "rewards/boxed/mean"} & set(clients["math-b"])
    assert clients["math-b"]["weights/accuracy"] == 1.0
    evaluation = next(r for r in records if r["type"] == "eval" and r["round"])
    # The auxiliaries are still scored on the test sets, for the hypervolume and the report.
    assert any("brevity" in key for key in evaluation)


def test_kept_optimizer_state_carries_adamw_moments_to_the_next_round(tmp_path):
    """``optimizer_state = "keep"``: round 2 starts from round 1's AdamW moments (its step
    count goes on), so the adapters differ from the reset run's; "reset" keeps none."""
    runs = {}
    for mode in ("reset", "keep"):
        folder = tmp_path / mode
        folder.mkdir()
        config = write_experiment(folder, "fedavg", rounds=2)
        config.write_text(
            config.read_text().replace(
                "local_steps = 2", f'local_steps = 2\noptimizer_state = "{mode}"'
            )
        )
        runs[mode], _ = run_embedded(config, folder / "run")
    kept = runs["keep"].client_states["math-a"]["optimizer"]
    steps = {float(s["step"]) for s in kept["state"].values()}
    assert steps == {4.0}  # 2 local steps in each of 2 rounds
    assert "optimizer" not in runs["reset"].client_states["math-a"]
    keep, reset = runs["keep"].server.state, runs["reset"].server.state
    assert any(not torch.equal(keep.global_adapter[k], v) for k, v in reset.global_adapter.items())
