"""The Flower engine: same adapters as the embedded engine, failures, state records, deployment."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import needs_cxx
from fedmoa.cli import app
from fedmoa.federation.flower import client_app, records
from fedmoa.federation.flower.deployment import LocalDeployment, NodeSpec
from fedmoa.federation.flower.node import MODEL_BUILD_LOG
from fedmoa.federation.flower.records import (
    METRIC_KEYS,
    adapter_to_record,
    record_to_adapter,
)
from fedmoa.federation.flower.server_app import serve
from fedmoa.federation.flower.settings import EXPERIMENT_KEY, RUN_DIR_KEY
from fedmoa.grpo.decode import decode_mode
from fedmoa.runs import RunDirectory
from test_embedded import EXPERIMENT, USER_REWARD, run_embedded, write_experiment

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "examples" / "flower_app"
# Wall-clock fields, the only ones allowed to differ: these and every "timing/..." phase time.
TIMINGS = {"seconds", "step_time"}


def reap_session(process: subprocess.Popen, grace: float = 60) -> list[int]:
    """Wait for the processes of ``process``'s session (Ray's raylet and actors outlive the
    driver by a few seconds), kill what is left after ``grace`` and return their PIDs."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def session() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(proc.pid) == process.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    deadline = time.monotonic() + grace
    while (left := session()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [proc.pid for proc in left]


def run_in_session(command: list[str], timeout: float = 400) -> tuple[int, str, str, list[int]]:
    """Run ``command`` to its end in a session of its own, then reap what it left (Ray's
    processes); returns its exit status, output, errors and the PIDs that outlived it."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        leftovers = reap_session(process)
    return process.returncode, out, err, leftovers


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the embedded reference on as many threads as a Flower ClientApp gets (Ray sets
    ``OMP_NUM_THREADS`` to an actor's ``num_cpus``, 1 here; the deployment test sets 1): BLAS
    kernels may split a reduction differently by thread count on some CPUs, so the engines'
    bits are compared at equal counts (docs/design.md, "Determinism across engines")."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def adapters(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.name: load_file(p / "adapter_model.safetensors")
        for p in sorted((run / "adapters").iterdir())
    }


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in TIMINGS and not k.startswith("timing/")}
        for r in records
    ]


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


# -- the engines agree ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decode", "rule"),
    [
        ("eager", "noise-aware"),
        pytest.param("compiled", "noise-aware", marks=needs_cxx),
        ("eager", "gain"),
        ("eager", "softmax+privacy"),
    ],
)
def test_flower_simulation_matches_embedded_engine(tmp_path, decode, rule):
    """2 rounds, 3 clients with different objectives: bit-identical adapters and records,
    under either decode (``[model] decode``) and with the paired gain rule, whose
    validation pairs travel in a record of their own (that run also has checks), and with
    central DP, whose noise the server draws from its seeded generator.

    Both engines call ``run_client_round`` with the same seed, start adapter and
    client state, and the server sums the updates in client-id order, whatever
    order the Flower replies arrive in, so the results match bit for bit.
    """
    config = write_experiment(tmp_path, "fedmoa", rounds=2)
    rule, _, privacy = rule.partition("+")
    config.write_text(
        config.read_text()
        .replace('device = "cpu"', f'device = "cpu"\ndecode = "{decode}"', 1)
        .replace("[server]", f'[server]\naccuracy_rule = "{rule}"', 1)
    )
    if privacy:  # central DP: clipped on the nodes, noised from the server's seeded generator
        text = config.read_text().replace("[server]", "[server]\nmax_client_share = 0.5", 1)
        config.write_text(text + "\n[privacy]\nclip = 0.5\nnoise_multiplier = 0.8\n")
    if rule == "gain":  # and evaluation-only checks, scored where the data is
        config.write_text(
            config.read_text().replace(
                "[client_defaults]",
                '[client_defaults]\nchecks = [{ name = "short", function = "length", '
                "params = { target = 3 } }]",
                1,
            )
        )
    embedded_run = tmp_path / "embedded"
    with torch_threads(1):
        federation, initial = run_embedded(config, embedded_run)
    assert decode_mode(federation.policy) == decode  # no fallback

    flower_run = tmp_path / "flower"
    cli = [sys.executable, "-m", "fedmoa.cli", "run", str(config), "--engine", "flower"]
    returncode, _, stderr, leftovers = run_in_session([*cli, "--output", str(flower_run)])
    assert returncode == 0, stderr[-3000:]
    assert leftovers == [], "Ray's processes outlived the simulation by more than 60s"

    expected, got = adapters(embedded_run), adapters(flower_run)
    assert set(got) == set(expected) == {"global", "task-math", "task-chain"}
    for name, tensors in expected.items():
        assert tensors.keys() == got[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(got[name][key], tensor), f"{name}: {key} differs"
    moved = [k for k, v in initial.items() if not torch.equal(expected["global"][k], v)]
    assert any("lora_B" in k for k in moved), "training must move the global adapter"

    flower_records = RunDirectory(flower_run).read_metrics()
    assert without_timings(flower_records) == without_timings(federation.run.read_metrics())
    # Same layout; the embedded helper skips the config copy that the CLI (and ServerApp) write,
    # and the simulation's nodes keep their client state in the run directory.
    own = {"config.toml", "resolved_config.json", "run.json"}
    node_files = {f for f in files(flower_run) if f.startswith("client-state/")}
    assert files(flower_run) - node_files == files(embedded_run) | own
    assert len(node_files) == 6, node_files  # 3 clients × rounds 1 and 2 (nothing older)
    # The thread counts the bits depend on, recorded: the server's and each node's (Ray: 1).
    resolved = json.loads((flower_run / "resolved_config.json").read_text())
    assert resolved["node_torch_threads"] == {"math-a": 1, "math-b": 1, "chain": 1}
    assert resolved["torch_threads"] >= 1
    summary = json.loads((flower_run / "summary.json").read_text())
    assert summary["rounds"] == 2
    # Round 0 (on by default): the untrained adapter, scored once, first, on both engines.
    evals = [r for r in flower_records if r["type"] == "eval"]
    assert evals[0]["round"] == 0 and flower_records[0] == evals[0]
    assert summary["base_eval"] == evals[0] and evals[0]["global/accuracy"] is not None

    # Heterogeneous rewards in one simulation: each client logged its own objectives.
    clients = {(r["client"], r["round"]): r for r in flower_records if r["type"] == "client"}
    assert len(clients) == 6 and not any("failed" in r for r in clients.values())
    # The gain rule's pairs crossed the wire (the records above match the embedded ones),
    # and the checks were scored on every node.
    assert all(("validation_pairs" in r) == (rule == "gain") for r in clients.values())
    assert ("global/checks/short" in evals[-1]) == (rule == "gain")
    rounds = [r for r in flower_records if r["type"] == "round"]
    assert all(("privacy/epsilon" in r) == bool(privacy) for r in rounds)
    objectives = {
        cid: sorted(k.removeprefix("weights/") for k in r if k.startswith("weights/"))
        for (cid, _), r in clients.items()
    }
    assert objectives == {
        "math-a": ["brevity", "digits"],
        "math-b": ["accuracy", "boxed", "share"],
        "chain": ["digits"],
    }


# -- the ServerApp and ClientApp in one process: node mapping and failed replies -------------


class LoopbackGrid:
    """A Grid that hands each message to the ClientApp handlers in this process.

    Nodes are registered in an order unrelated to their partition ids, and
    ``failing`` nodes answer every train message with an error reply.
    """

    def __init__(
        self,
        partitions: dict[int, int | dict[str, Any]],
        run_config: dict[str, Any],
        failing: set[int],
    ):
        """``partitions``: node id -> its partition id, or its whole node config."""
        self.failing = failing
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=(
                    pid
                    if isinstance(pid, dict)
                    else {"partition-id": pid, "num-partitions": len(partitions)}
                ),
                state=RecordDict(),
                run_config=run_config,
            )
            for node, pid in partitions.items()
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if kind == "train" and node in self.failing:
                replies.append(Message(Error(code=0, reason="out of memory"), reply_to=message))
                continue
            handlers = {"train": client_app.train, "query": client_app.identify}
            handler = handlers.get(kind, client_app.evaluate)  # looked up late: tests spy on it
            replies.append(handler(message, self.contexts[node]))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity, as run_simulation sets it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_failed_reply_is_logged_and_skipped(tmp_path, task_identity, caplog):
    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    run = tmp_path / "run"
    run_config = {EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(run)}
    # node id -> partition id; client i of the experiment is partition i.
    grid = LoopbackGrid({30: 2, 10: 1, 20: 0}, run_config, failing={10})
    server_context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    summary = serve(grid, server_context)

    assert summary["rounds"] == 1
    records = RunDirectory(run).read_metrics()
    failed = [r for r in records if r["type"] == "client" and "failed" in r]
    assert failed == [
        {"type": "client", "round": 1, "client": "math-b", "failed": "error reply: out of memory"}
    ]
    assert "client 'math-b' failed" in caplog.text
    round_record = next(r for r in records if r["type"] == "round")
    assert round_record["replies"] == 2 and set(round_record["client_weights"]) == {
        "math-a",
        "chain",
    }
    assert (run / "adapters" / "global" / "adapter_model.safetensors").exists()
    # Each node keeps the state of the client of its partition id, and only that: the failed
    # one (math-b) has none.
    key = json.loads((run / "run.json").read_text())["run_key"]
    kept = run / "client-state" / key
    assert sorted(p.name for p in kept.iterdir()) == ["chain", "math-a"]
    state = torch.load(kept / "math-a" / "round-0001.pt", weights_only=True)
    assert set(state) == {"weighting", "sampler"}
    # The reply's metric keys are the uniform ones, whatever the client's objectives.
    ok = next(r for r in records if r["type"] == "client" and r["client"] == "chain")
    assert set(METRIC_KEYS) - {"num-examples"} <= set(ok)


def test_evaluation_runs_on_the_clients_and_matches_the_embedded_engine(
    tmp_path, task_identity, monkeypatch
):
    """Every client scores on its own node (evaluate messages, metrics-only replies) at round 0
    and after the last round; the eval records equal the embedded engine's, which calls the
    same ``evaluate_client`` for each client in turn; the ServerApp never loads a client's
    data or reward code."""
    config = write_experiment(tmp_path, "fedavg", rounds=1)
    with torch_threads(1):
        federation, _ = run_embedded(config, tmp_path / "embedded")
    expected = [r for r in federation.run.read_metrics() if r["type"] == "eval"]

    evaluated: list[tuple[int, str, list[str]]] = []
    replies: list[list[str]] = []
    original = client_app.evaluate

    def spy(message, context):
        rounds = int(message.content[records.ROUND_CONFIG]["server-round"])
        client = str(message.content[records.ROUND_CONFIG]["client-id"])
        evaluated.append((rounds, client, sorted(message.content.array_records)))
        reply = original(message, context)
        replies.append(sorted(reply.content.keys()))
        return reply

    monkeypatch.setattr(client_app, "evaluate", spy)

    def server_must_not(*args, **kwargs):
        raise AssertionError("the ServerApp opened a client's data or reward code")

    # The server half (EmbeddedFederation in the ServerApp) must not touch client data.
    monkeypatch.setattr("fedmoa.federation.embedded.load_client_data", server_must_not)
    monkeypatch.setattr("fedmoa.federation.embedded.client_reward_funcs", server_must_not)
    run = tmp_path / "flower"
    grid = LoopbackGrid(
        {30: 2, 10: 1, 20: 0}, {EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(run)}, set()
    )
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={EXPERIMENT_KEY: str(config), RUN_DIR_KEY: str(run)},
    )
    with torch_threads(1):
        serve(grid, context)
    clients = ["math-a", "math-b", "chain"]
    sent = [f"{records.ADAPTER}/{k}" for k in ("global", "local_model", "personal")]
    assert evaluated == [(0, c, sent[::2]) for c in clients] + [(1, c, sent) for c in clients]
    assert replies == [[records.METRICS]] * 6  # metrics only: no adapter, no rows
    got = [r for r in RunDirectory(run).read_metrics() if r["type"] == "eval"]
    assert got == expected


# -- records ---------------------------------------------------------------------------------


def test_adapter_record_keeps_bfloat16():
    adapter = {"a.lora_A.weight": torch.randn(4, 8).to(torch.bfloat16), "b": torch.randn(2)}
    back = record_to_adapter(adapter_to_record(adapter), like=adapter)
    for key, tensor in adapter.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)


# -- deployment: a real SuperLink and SuperNodes ---------------------------------------------


def test_deployment_superlink_supernodes_flwr_run(tmp_path):
    """``flower-superlink`` + 2 ``flower-supernode`` (a ``flwr-clientapp`` process per message,
    Flower's default) + ``flwr run``, the one-file form (``partition-id``): one FedMOA round."""
    text = write_experiment(tmp_path, "fedmoa", rounds=1).read_text()
    marker = '[[clients]]\nid = "chain"'
    assert marker in text
    config = tmp_path / "two_clients.toml"
    config.write_text(text[: text.index(marker)])
    run = tmp_path / "run"
    nodes = [NodeSpec(str(i), tmp_path, f"partition-id={i} num-partitions=2") for i in range(2)]
    with LocalDeployment(tmp_path, nodes, resident=False) as deployment:
        done = deployment.run(APP_DIR, {"experiment": str(config), "run-dir": str(run)}, tmp_path)
        log = done.stdout[-3000:] + done.stderr[-3000:]
        assert done.returncode == 0, log
        assert (run / "adapters" / "global" / "adapter_model.safetensors").exists(), log
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds"] == 1
        clients = [r for r in RunDirectory(run).read_metrics() if r["type"] == "client"]
        assert sorted(r["client"] for r in clients) == ["math-a", "math-b"]
        assert not any("failed" in r for r in clients)
    assert deployment.leftover == [], "every Flower process is gone"
    # Fresh flwr-clientapp processes per message, still the embedded engine's adapter.
    with torch_threads(1):
        run_embedded(config, tmp_path / "embedded")
    expected, got = adapters(tmp_path / "embedded")["global"], adapters(run)["global"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())


NODE_CLIENTS = {
    "math-a": """
id = "math-a"
task = "math"
local_steps = 2
grpo = { batch_size = 2, group_size = 4, max_new_tokens = 6, lr = 0.05 }
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 24, params = { min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 } }
rewards = [
  { name = "accuracy", function = "math_accuracy", role = "primary", params = { require_final_answer = false } },
  { name = "brevity", function = "length", weight = 0.5, params = { target = 3 } },
]
""",
    "math-b": """
id = "math-b"
task = "math"
local_steps = 2
grpo = { batch_size = 2, group_size = 4, max_new_tokens = 6, lr = 0.05 }
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 24, seed = 1, params = { min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 } }
rewards = [
  { name = "accuracy", function = "math_accuracy", role = "primary", params = { require_final_answer = false } },
  { name = "boxed", function = "format", weight = 0.1 },
]
""",
    "chain": """
id = "chain"
task = "chain"
local_steps = 2
grpo = { batch_size = 2, group_size = 4, max_new_tokens = 6, lr = 0.05 }
data = { source = "reasoning_gym", name = "chain_sum", size = 24, seed = 2 }
rewards = [{ name = "digits", function = "my_rewards.py:digit_share", role = "primary" }]
""",
}

# The settings of test_embedded's experiment, without its clients.
SERVER_SETTINGS = (
    EXPERIMENT[: EXPERIMENT.index("[client_defaults]")]
    .replace("METHOD", "fedmoa")
    .replace("ROUNDS", "2")
)


PRIVATE = "\n[privacy]\nclip = 0.5\nnoise_multiplier = 0.8\n"


def write_node_folders(root: Path, private: bool = False) -> tuple[Path, Path]:
    """One folder per data owner with its client file (chain's reward file beside it), the
    server's experiment without clients, and the one-file experiment naming the same files;
    ``private``: with central DP (the default gain rule, a share cap, a ``[privacy]`` table)."""
    settings = SERVER_SETTINGS
    if private:
        settings = settings.replace("[server]", "[server]\nmax_client_share = 0.5", 1) + PRIVATE
    for client_id, table in NODE_CLIENTS.items():
        folder = root / f"node-{client_id}"
        folder.mkdir()
        (folder / "client.toml").write_text(table)
    (root / "node-chain" / "my_rewards.py").write_text(USER_REWARD)
    server = root / "server"
    server.mkdir()
    (server / "experiment.toml").write_text(
        settings.replace("[server]", '[server]\nnum_clients = 3\ntasks = ["math", "chain"]', 1)
    )
    onefile = root / "onefile"
    onefile.mkdir()
    clients = ", ".join(f'"../node-{c}/client.toml"' for c in sorted(NODE_CLIENTS))
    (onefile / "experiment.toml").write_text(f"clients = [{clients}]\n{settings}")
    return server / "experiment.toml", onefile / "experiment.toml"


@pytest.mark.parametrize("private", [False, True], ids=["plain", "central-dp"])
def test_deployment_nodes_with_own_client_files_and_resident_models(tmp_path, private):
    """3 SuperNodes (``--isolation process``), each in its own folder with its own client file,
    each served by one long-lived ``fedmoa clientapp``; the server's experiment lists no
    clients. Same global adapter as the embedded run of the one-file experiment, one model
    build per node for the whole run; with central DP too (clipped on the nodes, noised on the
    server)."""
    server_experiment, onefile = write_node_folders(tmp_path, private)
    assert (
        "[[clients]]" not in server_experiment.read_text()
        and "toml" not in server_experiment.read_text()
    )
    run = tmp_path / "run"
    nodes = [
        NodeSpec(c, tmp_path / f"node-{c}", "client-config='client.toml'")  # relative to it
        for c in NODE_CLIENTS
    ]
    with LocalDeployment(tmp_path, nodes, resident=True) as deployment:
        run_config = {"experiment": str(server_experiment), "run-dir": str(run)}
        done = deployment.run(APP_DIR, run_config, cwd=tmp_path / "server")
        log = done.stdout[-3000:] + done.stderr[-3000:]
        assert done.returncode == 0, log
        records = RunDirectory(run).read_metrics()
        clients = [r for r in records if r["type"] == "client"]
        assert sorted({r["client"] for r in clients}) == ["chain", "math-a", "math-b"], log
        assert not any("failed" in r for r in clients)
        assert [r["round"] for r in records if r["type"] == "eval"] == [0, 1, 2]
    assert deployment.leftover == [], "every Flower process is gone"
    for client_id in NODE_CLIENTS:
        node_log = deployment.log(f"clientapp-{client_id}")
        assert node_log.count(MODEL_BUILD_LOG) == 1, node_log[-2000:]
    with torch_threads(1):
        run_embedded(onefile, tmp_path / "embedded")
    expected, got = adapters(tmp_path / "embedded")["global"], adapters(run)["global"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    embedded = RunDirectory(tmp_path / "embedded").read_metrics()
    assert without_timings(records) == without_timings(embedded)
    rounds = [r for r in records if r["type"] == "round"]
    assert all(("privacy/epsilon" in r) == private for r in rounds)


# -- the command line -------------------------------------------------------------------------


def test_cli_flower_engine_refuses_unknown_engines(tmp_path):
    config = write_experiment(tmp_path, "fedmoa", rounds=1)
    unknown = CliRunner().invoke(app, ["run", str(config), "--engine", "ray"])
    assert unknown.exit_code == 2 and "unknown --engine 'ray'" in unknown.output


def kill_at_checkpoint(process: subprocess.Popen, run: Path, kill: Callable[[], None]) -> None:
    """Wait for round 1's checkpoint, then ``kill`` the server: it dies during round 2."""
    deadline = time.monotonic() + 400
    while not (run / "checkpoints" / "round-0001.pt").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 400s"
        time.sleep(0.05)
    kill()
    assert not (run / "summary.json").exists(), "killed before the run finished"


def test_flower_simulation_killed_mid_run_resumes_to_an_uninterrupted_runs_adapters(tmp_path):
    """``fedmoa run --engine flower`` is killed (SIGKILL, Ray and all) after round 1 of 3;
    ``--resume RUN --engine flower`` continues from the server's checkpoint and the nodes'
    state files and ends with the embedded engine's adapters and records, bit for bit."""
    config = write_experiment(tmp_path, "fedmoa", rounds=3)
    with torch_threads(1):
        federation, _ = run_embedded(config, tmp_path / "embedded")
    crashed = tmp_path / "flower"
    cli = [sys.executable, "-m", "fedmoa.cli", "run", "--engine", "flower"]
    process = subprocess.Popen(
        [*cli, str(config), "--output", str(crashed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        kill_at_checkpoint(process, crashed, lambda: os.killpg(process.pid, signal.SIGKILL))
    finally:
        reap_session(process)
    rounds = [r["round"] for r in RunDirectory(crashed).read_metrics() if r["type"] == "round"]
    assert rounds and rounds[-1] < 3
    returncode, _, err, _ = run_in_session([*cli, "--resume", str(crashed)])
    assert returncode == 0, err[-3000:]
    expected, got = adapters(tmp_path / "embedded"), adapters(crashed)
    assert set(got) == set(expected)
    for name, tensors in expected.items():
        assert all(torch.equal(got[name][k], v) for k, v in tensors.items()), name
    records = RunDirectory(crashed).read_metrics()
    assert without_timings(records) == without_timings(federation.run.read_metrics())
    assert json.loads((crashed / "summary.json").read_text())["rounds"] == 3


def test_deployment_serverapp_killed_mid_run_resumes_from_the_nodes_state_files(tmp_path):
    """3 SuperNodes with their own client files; the ServerApp process is killed after round
    1 of 2 and ``flwr run`` again with ``resume=true`` finishes the run: the nodes kept their
    client state beside their client files, the server its checkpoint, and the adapters equal
    the embedded run's."""
    server_experiment, onefile = write_node_folders(tmp_path)
    run = tmp_path / "run"
    nodes = [
        NodeSpec(c, tmp_path / f"node-{c}", "client-config='client.toml'") for c in NODE_CLIENTS
    ]
    run_config = {"experiment": str(server_experiment), "run-dir": str(run)}
    # The nodes give up the dead run's last message after 15 s (fedmoa clientapp --object-wait).
    with LocalDeployment(tmp_path, nodes, resident=True, object_wait=15) as deployment:
        first = deployment.start_run(APP_DIR, run_config, cwd=tmp_path / "server")
        killed: list[int] = []
        kill_at_checkpoint(first, run, lambda: killed.append(deployment.kill_serverapps()))
        assert killed == [1], "one ServerApp process, killed"
        first.kill()
        first.wait()
        done = deployment.run(APP_DIR, {**run_config, "resume": True}, cwd=tmp_path / "server")
        log = done.stdout[-3000:] + done.stderr[-3000:]
        assert done.returncode == 0, log
        assert json.loads((run / "summary.json").read_text())["rounds"] == 2, log
        failed = [r for r in RunDirectory(run).read_metrics() if "failed" in r]
        node_logs = "".join(deployment.log(f"clientapp-{c}")[-1500:] for c in NODE_CLIENTS)
        assert failed == [], node_logs
    assert deployment.leftover == [], "every Flower process is gone"
    key = json.loads((run / "run.json").read_text())["run_key"]
    for client_id in NODE_CLIENTS:  # beside each client file, none on the server
        kept = tmp_path / f"node-{client_id}" / "client.toml.state" / key
        assert sorted(p.name for p in kept.iterdir()) == ["round-0001.pt", "round-0002.pt"]
    assert not (run / "client-state").exists()
    with torch_threads(1):
        run_embedded(onefile, tmp_path / "embedded")
    expected, got = adapters(tmp_path / "embedded")["global"], adapters(run)["global"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    embedded = RunDirectory(tmp_path / "embedded").read_metrics()
    assert without_timings(RunDirectory(run).read_metrics()) == without_timings(embedded)
