"""Faults in a federation: crashed, hung and disconnected clients, bad updates, too few
clients, a server killed mid-round, atomic and truncated checkpoints.

Faults are injected through real configuration: user reward functions that crash,
hang or exit the process on their first call (a marker file remembers the call), a
learning rate that makes a client diverge. Only the NaN reply on Flower is a test
ClientApp that corrupts the real ClientApp's reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from fedmoa.aggregation import Adapter, ClientUpdate, sanitize
from fedmoa.config import RewardConfig
from fedmoa.errors import FedMOAError
from fedmoa.federation import checkpoint as checkpoint_module
from fedmoa.federation.checkpoint import latest_checkpoint, save_checkpoint
from fedmoa.federation.client import REQUIRED_METRICS, ClientTimeout, run_client_round
from fedmoa.federation.config import (
    ClientConfig,
    ExperimentConfig,
    ServerConfig,
    load_experiment,
)
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.federation.flower.records import METRICS, adapter_to_record, record_to_adapter
from fedmoa.federation.flower.server_app import serve
from fedmoa.federation.flower.settings import EXPERIMENT_KEY, RUN_DIR_KEY
from fedmoa.federation.server import FederatedServer
from fedmoa.runs import RunDirectory
from test_flower import LoopbackGrid, run_in_session

REWARDS = '''
import os
import time
from pathlib import Path


def digit_share(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def _first_call(marker):
    """True on the first call for ``marker`` only: each fault happens once."""
    path = Path(marker)
    if path.exists():
        return False
    path.touch()
    return True


def crash_once(prompts, completions, marker, **kwargs):
    if _first_call(marker):
        raise RuntimeError("simulated crash")
    return digit_share(prompts, completions)


def crash_while(prompts, completions, marker, **kwargs):
    if Path(marker).exists():
        raise RuntimeError("simulated crash")
    return digit_share(prompts, completions)


def hang_once(prompts, completions, marker, seconds, **kwargs):
    if _first_call(marker):
        time.sleep(seconds)
    return digit_share(prompts, completions)


def exit_once(prompts, completions, marker, **kwargs):
    if _first_call(marker):
        os._exit(1)  # the client's process dies mid-round: a disconnect
    return digit_share(prompts, completions)


def counted(prompts, completions, marker, **kwargs):
    with open(marker, "a") as fh:
        fh.write(".")
    return digit_share(prompts, completions)
'''

HEADER = """
seed = 3

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[server]
rounds = {rounds}
min_clients = {min_clients}
validation_prompts = 1
test_prompts = 1
eval_every = 0
eval_round0 = {round0}
{server}

[client_defaults]
local_steps = 1
grpo = {{ batch_size = 2, group_size = 2, max_new_tokens = 4, lr = 0.05 }}
data = {{ source = "reasoning_gym", name = "basic_arithmetic", size = 12, params = {{ min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }} }}
"""


def client(cid: str, function: str = "digit_share", extra: str = "", **params: Any) -> str:
    """One ``[[clients]]`` entry whose primary reward is ``function`` of the test module."""
    bound = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    params_toml = f", params = {{ {bound} }}" if params else ""
    return (
        f'\n[[clients]]\nid = "{cid}"\ntask = "math"\n{extra}\n'
        f'rewards = [{{ name = "digits", function = "REWARDS:{function}", role = "primary"'
        f"{params_toml} }}]\n"
    )


def experiment(
    tmp_path: Path,
    clients: list[str],
    *,
    rounds: int = 1,
    min_clients: int = 1,
    server: str = "",
    round0: bool = False,
) -> Path:
    """An experiment file; round 0 off by default, so each fault hits the round it is for."""
    rewards = tmp_path / "faulty_rewards.py"
    rewards.write_text(REWARDS)
    text = HEADER.format(
        rounds=rounds, min_clients=min_clients, server=server, round0=str(round0).lower()
    )
    text += "".join(clients).replace("REWARDS", str(rewards))
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def embedded(config: Path, run: Path) -> EmbeddedFederation:
    return EmbeddedFederation(load_experiment(config), RunDirectory(run))


def by_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == kind]


def finite(adapter: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in adapter.values())


# -- the server's validation: every kind of bad update -----------------------------------------

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {A: (2, 5), B: (5, 2)}
GOOD_METRICS = {name: 0.5 for name in REQUIRED_METRICS} | {"step_time": 1.0}


def server_config(
    n: int, min_clients: int = 1, robust_norm: float | None = None
) -> ExperimentConfig:
    reward = RewardConfig(name="digits", function="length", role="primary")
    return ExperimentConfig(
        clients=[ClientConfig(id=f"c{i}", task="math", rewards=[reward]) for i in range(n)],
        server=ServerConfig(method="fedmoa", min_clients=min_clients, robust_norm=robust_norm),
    )


def random_adapter(seed: int, scale: float = 0.1) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def good_update(cid: str, seed: int) -> ClientUpdate:
    return ClientUpdate(cid, "math", 4, random_adapter(seed), 0.5, dict(GOOD_METRICS))


def _poison(delta: Adapter, value: float, position: int) -> Adapter:
    bad = {k: v.clone() for k, v in delta.items()}
    bad[B].view(-1)[position % bad[B].numel()] = value
    return bad


def _without(update: ClientUpdate, field: str, key: str) -> ClientUpdate:
    kept = {k: v for k, v in getattr(update, field).items() if k != key}
    return dataclasses.replace(update, **{field: kept})


# kind -> (how to break a good update given a drawn value, a part of the logged reason)
BREAKS = {
    "non-finite value": (
        lambda u, d: dataclasses.replace(
            u,
            delta=_poison(
                u.delta,
                d.draw(st.sampled_from([math.nan, math.inf, -math.inf])),
                d.draw(st.integers(0, 9)),
            ),
        ),
        "non-finite",
    ),
    "missing key": (
        lambda u, d: _without(u, "delta", d.draw(st.sampled_from([A, B]))),
        "missing 1 key",
    ),
    "unexpected key": (
        lambda u, d: dataclasses.replace(u, delta={**u.delta, "x.lora_A.weight": torch.zeros(2)}),
        "unexpected 1 key",
    ),
    "wrong shape": (
        lambda u, d: dataclasses.replace(u, delta={**u.delta, B: u.delta[B].T.contiguous()}),
        "shape",
    ),
    "wrong dtype": (
        lambda u, d: dataclasses.replace(
            u,
            delta={
                **u.delta,
                A: u.delta[A].to(
                    d.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16]))
                ),
            },
        ),
        "dtype",
    ),
    "integer tensor": (
        lambda u, d: dataclasses.replace(
            u, delta={**u.delta, B: torch.zeros(SHAPES[B], dtype=torch.int32)}
        ),
        "dtype",
    ),
    "accuracy out of range": (
        lambda u, d: dataclasses.replace(
            u,
            accuracy=d.draw(
                st.one_of(
                    st.floats(max_value=-1e-9),
                    st.floats(min_value=1.0 + 1e-9),
                    st.just(math.nan),
                )
            ),
        ),
        "accuracy must be in [0, 1]",
    ),
    "accuracy missing": (lambda u, d: dataclasses.replace(u, accuracy=None), "accuracy is missing"),
    "metric missing": (
        lambda u, d: _without(u, "metrics", d.draw(st.sampled_from(REQUIRED_METRICS))),
        "missing 1 metric",
    ),
    "metric not finite": (
        lambda u, d: dataclasses.replace(
            u,
            metrics={
                **u.metrics,
                d.draw(st.sampled_from(["loss", "weight/primary", "reward", "step_time"])): (
                    d.draw(st.sampled_from([math.inf, -math.inf]))
                ),
            },
        ),
        "not finite",
    ),
    "metric NaN": (
        lambda u, d: dataclasses.replace(
            u, metrics={**u.metrics, d.draw(st.sampled_from(["loss", "weight/primary"])): math.nan}
        ),
        "not finite",
    ),
    "metric not a number": (
        lambda u, d: dataclasses.replace(u, metrics={**u.metrics, "loss": "low"}),
        "not a number",
    ),
}


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    good=st.integers(1, 4),
    kinds=st.lists(st.sampled_from(sorted(BREAKS)), min_size=1, max_size=4),
)
def test_bad_updates_are_rejected_with_a_logged_reason_and_the_round_goes_on(
    data: st.DataObject, good: int, kinds: list[str]
) -> None:
    """Every kind of bad update is dropped with its reason (logged with the client id and
    in ``result.rejected``), and the round aggregates exactly the good ones."""
    n = good + len(kinds)
    initial = random_adapter(-1, scale=1.0)
    goods = [good_update(f"c{i}", seed=i) for i in range(good)]
    bads = [
        BREAKS[kind][0](good_update(f"c{good + j}", seed=100 + j), data)
        for j, kind in enumerate(kinds)
    ]
    updates = data.draw(st.permutations(goods + bads))
    server = FederatedServer(server_config(n), initial)
    plan = server.configure_round(1)
    handler = Captured()
    logging.getLogger("fedmoa").addHandler(handler)
    try:
        result = server.aggregate_round(plan, updates)
    finally:
        logging.getLogger("fedmoa").removeHandler(handler)

    reasons = {r.client_id: r.reason for r in result.rejected}
    assert set(reasons) == {u.client_id for u in bads}
    for update, kind in zip(bads, kinds, strict=True):
        reason = reasons[update.client_id]
        assert BREAKS[kind][1] in reason and "\n" not in reason, (kind, reason)
        assert any(update.client_id in m and reason in m for m in handler.messages)
    assert set(result.client_weights) == {u.client_id for u in goods}
    assert server.state.completed_rounds == 1
    # The same as a round with only the good updates.
    clean = FederatedServer(server_config(n), initial)
    expected = clean.aggregate_round(clean.configure_round(1), goods)
    for key, tensor in expected.global_adapter.items():
        assert torch.equal(result.global_adapter[key], tensor)


def test_a_nan_reward_mean_is_not_applicable_not_bad() -> None:
    """NaN in a reward mean means no sample had an applicable reward (e.g. the centralized
    learner's primary on another client's rows): the update is kept."""
    initial = random_adapter(-1, scale=1.0)
    update = good_update("c0", 0)
    update = dataclasses.replace(update, metrics={**update.metrics, "reward/primary": math.nan})
    server = FederatedServer(server_config(1), initial)
    result = server.aggregate_round(server.configure_round(1), [update])
    assert result.rejected == [] and set(result.client_weights) == {"c0"}


def test_absurd_norm_is_rejected_only_with_robust_norm() -> None:
    initial = random_adapter(-1, scale=1.0)
    updates = [good_update(f"c{i}", i) for i in range(3)]
    huge = dataclasses.replace(updates[2], delta=random_adapter(2, scale=1e6))
    kept = FederatedServer(server_config(3), initial)
    assert kept.aggregate_round(kept.configure_round(1), [*updates[:2], huge]).rejected == []
    robust = FederatedServer(server_config(3, robust_norm=10.0), initial)
    result = robust.aggregate_round(robust.configure_round(1), [*updates[:2], huge])
    assert [r.client_id for r in result.rejected] == ["c2"]
    assert "robust_norm" in result.rejected[0].reason
    assert set(result.client_weights) == {"c0", "c1"}


def test_too_few_usable_updates_fail_the_round_and_change_nothing() -> None:
    initial = random_adapter(-1, scale=1.0)
    server = FederatedServer(server_config(3, min_clients=2), initial)
    ok = good_update("c0", 0)
    bad = dataclasses.replace(good_update("c1", 1), accuracy=1.5)
    # c2 failed (no update at all), c1 is rejected: 1 usable < min_clients = 2.
    with pytest.raises(FedMOAError, match=r"1 usable client update\(s\) of 3 sampled") as err:
        server.aggregate_round(server.configure_round(1), [ok, bad])
    message = str(err.value)
    assert "min_clients = 2" in message and "'c1': accuracy must be in [0, 1]" in message
    assert "1 failed, 1 rejected" in message and "\n" not in message
    assert server.state.completed_rounds == 0
    assert all(torch.equal(server.state.global_adapter[k], v) for k, v in initial.items())
    assert server.state.task_adapters == {}
    # With enough usable updates the same server goes on.
    result = server.aggregate_round(server.configure_round(1), [ok, good_update("c2", 2)])
    assert set(result.client_weights) == {"c0", "c2"} and server.state.completed_rounds == 1


# -- checkpoints: atomic writes, truncated files -------------------------------------------


def test_checkpoint_write_is_temp_file_fsync_rename(tmp_path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(self: Path, target: Path) -> Path:
        events.append(("rename", f"{self.name} -> {Path(target).name}"))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    target = save_checkpoint(tmp_path, 1, {"server": {"x": torch.ones(2)}})
    assert events == [
        ("fsync", str(tmp_path / ".round-0001.pt.tmp")),
        ("rename", ".round-0001.pt.tmp -> round-0001.pt"),
        ("fsync", str(tmp_path)),  # the directory entry too
    ]
    assert target.name == "round-0001.pt" and sorted(p.name for p in tmp_path.iterdir()) == [
        "round-0001.pt"
    ]


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, 1, {"server": {"x": torch.ones(2)}})
    real_save = torch.save

    def dies_halfway(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"server": {"x": torch.zeros(2)}})
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert not (tmp_path / "round-0002.pt").exists()  # only the hidden temp file
    state = latest_checkpoint(tmp_path)
    assert state is not None and state["completed_round"] == 1 and state["skipped"] == []


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(tmp_path) -> None:
    for done in (1, 2, 3):
        save_checkpoint(tmp_path, done, {"server": {"x": torch.full((64,), float(done))}})
    third = tmp_path / "round-0003.pt"
    third.write_bytes(third.read_bytes()[: third.stat().st_size // 2])  # truncated
    torch.save(["not", "a", "checkpoint"], tmp_path / "round-0002.pt")  # wrong content
    state = latest_checkpoint(tmp_path)
    assert state is not None and state["completed_round"] == 1
    assert torch.equal(state["server"]["x"], torch.full((64,), 1.0))
    skipped = state["skipped"]
    assert [s.split(" ")[0] for s in skipped] == ["round-0003.pt", "round-0002.pt"]
    assert "not a fedmoa checkpoint" in skipped[1] and all("\n" not in s for s in skipped)
    (tmp_path / "round-0001.pt").write_bytes(b"")
    with pytest.raises(FedMOAError, match=r"no readable checkpoint in .*round-0003\.pt"):
        latest_checkpoint(tmp_path)


# -- the embedded engine -----------------------------------------------------------------------


def test_embedded_crashed_and_timed_out_clients_are_left_out_of_their_round(tmp_path, caplog):
    """Round 1: one client crashes (its reward function raises), one hangs past
    ``round_timeout``; the round completes with the third. Round 2: all three are back."""
    timeout = 15.0
    config = experiment(
        tmp_path,
        [
            client("steady"),
            client("crashy", "crash_once", marker=str(tmp_path / "crashed")),
            client("slow", "hang_once", marker=str(tmp_path / "hung"), seconds=timeout + 1),
        ],
        rounds=2,
        server=f"round_timeout = {timeout}",
    )
    federation = embedded(config, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        summary = federation.run_rounds()

    assert summary["rounds"] == 2
    records = federation.run.read_metrics()
    first = {r["client"]: r for r in by_kind(records, "client") if r["round"] == 1}
    assert "failed" not in first["steady"]
    assert "simulated crash" in first["crashy"]["failed"]
    assert first["slow"]["failed"].startswith("ClientTimeout: client 'slow' still running")
    assert f"server.round_timeout = {timeout:g}s" in first["slow"]["failed"]
    assert "client 'crashy' failed" in caplog.text and "client 'slow' failed" in caplog.text
    rounds = by_kind(records, "round")
    assert rounds[0]["replies"] == 1 and set(rounds[0]["client_weights"]) == {"steady"}
    assert rounds[1]["replies"] == 3 and set(rounds[1]["client_weights"]) == {
        "steady",
        "crashy",
        "slow",
    }
    assert not any("failed" in r for r in by_kind(records, "client") if r["round"] == 2)

    # The deadline is checked at every forward: a reward function that hangs past it makes
    # the round raise at the next forward after it returns, on a round of its own too.
    slow = federation.clients["slow"]
    short = dataclasses.replace(federation.cfg.server, round_timeout=0.5)

    def hangs(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        time.sleep(0.6)
        return [0.0] * len(completions)

    began = time.monotonic()
    with pytest.raises(ClientTimeout, match=r"past server\.round_timeout = 0\.5s"):
        run_client_round(
            federation.policy,
            federation.tokenizer,
            slow,
            federation.data["slow"],
            [("digits", hangs)],
            federation.server.state.global_adapter,
            None,
            method="fedmoa",
            server=short,
            weighting_config=federation.cfg.weighting,
            seed=0,
            server_round=3,
        )
    assert time.monotonic() - began < 10
    # The timed-out round left no hook behind: the model runs without a deadline again.
    federation.evaluate()


def test_embedded_too_few_clients_stop_the_run_and_resume_goes_on(tmp_path):
    """min_clients = 2 of 2: a crash in round 2 stops the run with a FedMOAError before
    anything is aggregated; round 1's checkpoint stays the state, and the run goes on."""
    marker = tmp_path / "broken"
    config = experiment(
        tmp_path,
        [client("a"), client("b", "crash_while", marker=str(marker))],
        rounds=2,
        min_clients=2,
    )
    federation = embedded(config, tmp_path / "run")
    federation.run_round(1)
    after_one = {k: v.clone() for k, v in federation.server.state.global_adapter.items()}
    marker.touch()
    with pytest.raises(FedMOAError, match=r"round 2: 1 usable client update\(s\) of 2 sampled"):
        federation.run_rounds()
    checkpoints = sorted(p.name for p in federation.checkpoint_dir.iterdir())
    assert checkpoints == ["round-0001.pt"]
    assert federation.server.state.completed_rounds == 1
    assert all(
        torch.equal(federation.server.state.global_adapter[k], v) for k, v in after_one.items()
    )
    records = federation.run.read_metrics()
    assert [r["round"] for r in by_kind(records, "round")] == [1]
    failed = [r for r in by_kind(records, "client") if "failed" in r]
    assert [(r["round"], r["client"]) for r in failed] == [(2, "b")]

    marker.unlink()
    resumed = embedded(config, tmp_path / "run")
    assert resumed.resume() == 1
    assert resumed.run_rounds()["rounds"] == 2
    assert [r["round"] for r in by_kind(resumed.run.read_metrics(), "round")] == [1, 2]


def test_embedded_diverged_client_is_rejected_by_robust_norm(tmp_path, caplog):
    """A learning rate of 3e37 makes one client's update absurdly large but finite."""
    config = experiment(
        tmp_path,
        [
            client("a"),
            client("b"),
            client(
                "wild",
                extra="grpo = { batch_size = 2, group_size = 4, max_new_tokens = 4, lr = 3e37 }",
            ),
        ],
        server="robust_norm = 10.0",
    )
    federation = embedded(config, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="fedmoa"):
        federation.run_rounds()
    round_record = by_kind(federation.run.read_metrics(), "round")[0]
    assert [r["client_id"] for r in round_record["rejected"]] == ["wild"]
    assert "exceeds robust_norm 10" in round_record["rejected"][0]["reason"]
    assert "dropping update from client 'wild'" in caplog.text
    assert set(round_record["client_weights"]) == {"a", "b"}
    assert finite(federation.server.state.global_adapter)


def test_sigkill_during_round_two_and_a_truncated_checkpoint_resume_bit_identically(tmp_path):
    """The server is killed while round 2 trains; the newest checkpoint is also truncated.
    ``--resume`` reports it, restarts from round 1's checkpoint and ends with the adapters
    of an uninterrupted run."""
    calls = tmp_path / "reward-calls"
    config = experiment(
        tmp_path,
        [client("a", "counted", marker=str(calls)), client("b", "counted", marker=str(calls))],
        rounds=2,
    )
    reference = tmp_path / "reference"
    embedded(config, reference).run_rounds()

    crashed = tmp_path / "crashed"
    cli = [sys.executable, "-m", "fedmoa.cli", "run", str(config), "--output", str(crashed)]
    process = subprocess.Popen(
        cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = crashed / "checkpoints" / "round-0001.pt"
    deadline = time.monotonic() + 300
    try:
        while not first.exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seen = calls.stat().st_size
        while calls.stat().st_size == seen:  # a reward call after checkpoint 1: round 2 trains
            assert process.poll() is None, "the run ended before round 2 trained"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (crashed / "checkpoints" / "round-0002.pt").exists(), "killed during round 2"
    assert not (crashed / "summary.json").exists()
    # A truncated newer checkpoint (a partial copy, a failing disk) must not be trusted.
    second = crashed / "checkpoints" / "round-0002.pt"
    second.write_bytes(first.read_bytes()[: first.stat().st_size // 2])

    resumed = subprocess.run(
        [sys.executable, "-m", "fedmoa.cli", "run", "--resume", str(crashed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint round-0002.pt (" in resumed.stderr
    assert "is unreadable (truncated or corrupt); resuming from round 1" in resumed.stderr
    assert "resuming after round 1 of 2" in resumed.stdout + resumed.stderr
    for name in ("global", "task-math"):
        expected = load_file(reference / "adapters" / name / "adapter_model.safetensors")
        got = load_file(crashed / "adapters" / name / "adapter_model.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    records = RunDirectory(crashed).read_metrics()
    assert [r["round"] for r in by_kind(records, "round")] == [1, 2]
    assert sorted((r["round"], r["client"]) for r in by_kind(records, "client")) == [
        (1, "a"),
        (1, "b"),
        (2, "a"),
        (2, "b"),
    ]


# -- the Flower engine ---------------------------------------------------------------------------

SIMULATION = """
import json
import sys
from pathlib import Path

import torch
from flwr.app import Array
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedmoa.federation.flower import client_app as apps, records, settings
from fedmoa.federation.flower.server_app import build_server_app

experiment, run_dir, home = (Path(a) for a in sys.argv[1:4])
run_config = {settings.EXPERIMENT_KEY: str(experiment), settings.RUN_DIR_KEY: str(run_dir)}


def train(message, context):
    # The real ClientApp; the reply of client "nan" then gets a NaN in one tensor.
    reply = apps.train(message, context)
    if message.content[records.ROUND_CONFIG]["client-id"] == "nan":
        adapter = reply.content[records.ADAPTER]
        name = records.PACKED + "float32"  # every LoRA tensor, flattened
        tensor = torch.from_numpy(adapter[name].numpy()).clone()
        tensor.view(-1)[0] = float("nan")
        adapter[name] = Array(tensor)
    return reply


client_app = ClientApp()
client_app.train()(settings.with_run_config(train, run_config))
client_app.query()(settings.with_run_config(apps.identify, run_config))
summaries = []
with settings.flower_environment(home):
    run_simulation(
        server_app=build_server_app(run_config, on_finish=summaries.append),
        client_app=client_app,
        num_supernodes=int(sys.argv[4]),
        # One Ray actor per client, so that the clients run side by side (this machine may
        # have fewer cores): the dead actor of "gone" is never handed another message.
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": int(sys.argv[4])},
        },
    )
print("SUMMARY " + json.dumps(summaries))
"""


def test_flower_simulation_survives_hung_disconnected_and_bad_clients(tmp_path):
    """One Ray simulation, one round, four SuperNodes: "slow" hangs past the round timeout
    (the ServerApp stops waiting for it), "gone" exits its process mid-round (a disconnect:
    Flower answers with an error reply), "nan" replies with a NaN tensor (rejected); the
    round completes with "steady"."""
    timeout = 30.0
    config = experiment(
        tmp_path,
        [
            client("steady"),
            client("slow", "hang_once", marker=str(tmp_path / "hung"), seconds=timeout + 1),
            client("gone", "exit_once", marker=str(tmp_path / "exited")),
            client("nan"),
        ],
        server=f"round_timeout = {timeout}",
    )
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATION)
    run = tmp_path / "run"
    returncode, stdout, stderr, _ = run_in_session(
        [sys.executable, str(script), str(config), str(run), str(tmp_path / "flwr-home"), "4"]
    )
    assert returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.split("SUMMARY ", 1)[1])
    assert summary[0]["rounds"] == 1

    records = RunDirectory(run).read_metrics()
    clients = {r["client"]: r for r in by_kind(records, "client")}
    assert "failed" not in clients["steady"] and "failed" not in clients["nan"]
    assert clients["slow"]["failed"] == f"no reply within the round timeout ({timeout:g}s)"
    assert (
        clients["gone"]["failed"].startswith("error reply: ")
        and "died" in clients["gone"]["failed"]
    )
    assert "\n" not in clients["gone"]["failed"]
    round_record = by_kind(records, "round")[0]
    assert round_record["replies"] == 2
    assert [r["client_id"] for r in round_record["rejected"]] == ["nan"]
    assert "non-finite" in round_record["rejected"][0]["reason"]
    assert set(round_record["client_weights"]) == {"steady"}
    for line in (
        "client 'slow' failed",
        "client 'gone' failed",
        "dropping update from client 'nan'",
    ):
        assert line in stderr
    assert finite(load_file(run / "adapters" / "global" / "adapter_model.safetensors"))


def test_flower_decoding_leaves_a_wrong_dtype_for_sanitize() -> None:
    """bfloat16 travels as float32 and is cast back; any other dtype arrives as sent, so the
    server rejects it instead of silently casting it."""
    like = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(3)}
    assert record_to_adapter(adapter_to_record(like), like=like)["a"].dtype == torch.bfloat16
    sent = {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3, dtype=torch.int32)}
    back = record_to_adapter(ArrayRecord({k: Array(v) for k, v in sent.items()}), like=like)
    assert {k: v.dtype for k, v in back.items()} == {"a": torch.float64, "b": torch.int32}
    update = ClientUpdate("x", "math", 1, back, 0.5, dict(GOOD_METRICS))
    _, rejected = sanitize([update], like, required_metrics=REQUIRED_METRICS)
    assert "has dtype torch.float64, expected torch.bfloat16" in rejected[0].reason


class FaultyGrid(LoopbackGrid):
    """The loopback grid, where ``silent`` nodes never reply (hung or disconnected) and
    ``metrics_dropped`` nodes reply without some metrics."""

    def __init__(self, *args: Any, silent: set[int], metrics_dropped: dict[int, list[str]]):
        super().__init__(*args, failing=set())
        self.silent, self.metrics_dropped = silent, metrics_dropped

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if kind == "train" and node in self.silent:
                continue
            for reply in super().send_and_receive([message], timeout=timeout):
                if kind == "train" and reply.has_content():
                    for name in self.metrics_dropped.get(node, []):
                        del reply.content[METRICS][name]
                replies.append(reply)
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity, as run_simulation sets it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_flower_missing_reply_and_missing_metrics_then_too_few_clients(
    tmp_path, task_identity, caplog
):
    """On the ServerApp: a node that never replies is a failed client, a reply without
    its ``loss`` metric is rejected, and with 1 usable update < min_clients = 2 the round
    fails before anything is aggregated or checkpointed."""
    config = experiment(tmp_path, [client("a"), client("b"), client("c")], min_clients=2)
    run = tmp_path / "run"
    run_config = {EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(run)}
    grid = FaultyGrid(
        {10: 0, 20: 1, 30: 2}, run_config, silent={20}, metrics_dropped={30: ["loss"]}
    )
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with caplog.at_level(logging.WARNING, logger="fedmoa"), pytest.raises(FedMOAError) as err:
        serve(grid, context)
    message = str(err.value)
    assert "round 1: 1 usable client update(s) of 3 sampled" in message
    assert "min_clients = 2" in message and "'c': missing 1 metric(s): loss" in message
    assert "client 'b' failed: no reply within the round timeout (3600s)" in caplog.text
    assert "dropping update from client 'c': missing 1 metric(s): loss" in caplog.text
    records = RunDirectory(run).read_metrics()
    assert by_kind(records, "round") == []
    assert [r["client"] for r in by_kind(records, "client") if "failed" in r] == ["b"]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "summary.json").exists()
