"""A deployment's clients come from the nodes: admission, refusals, and the run going on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedmoa.errors import ConfigError, FedMOAError
from fedmoa.federation.config import load_client_file, load_experiment
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.federation.flower.node import shared_settings
from fedmoa.federation.flower.roster import RosterEntry, admit, in_order
from fedmoa.federation.flower.server_app import serve
from fedmoa.federation.flower.settings import (
    CLIENT_CONFIG_KEY,
    EXPERIMENT_KEY,
    NODE_TIMEOUT_KEY,
    RUN_DIR_KEY,
)
from fedmoa.federation.flower.simulation import run_simulation
from fedmoa.runs import RunDirectory
from test_flower import LoopbackGrid, task_identity, torch_threads, write_node_folders

__all__ = ["task_identity"]  # a fixture, used by name


def experiment(tmp_path: Path, extra: str = "") -> Path:
    server_experiment, _ = write_node_folders(tmp_path)
    if extra:
        server_experiment.write_text(server_experiment.read_text().replace("[server]", extra))
    return server_experiment


def identity_of(cfg, client_id: str = "math-a", task: str = "math", **changes) -> dict:
    shared = json.loads(shared_settings(cfg))
    for key, value in changes.items():
        table, field = key.split("__")
        shared[table][field] = value
    return {
        "client-id": client_id,
        "task": task,
        "num-train": 19,
        "num-test": 2,
        "model": json.dumps(shared["model"]),
        "lora": json.dumps(shared["lora"]),
    }


def test_admit_takes_a_matching_node(tmp_path):
    cfg = load_experiment(experiment(tmp_path))
    entry = admit(7, identity_of(cfg), cfg, {})
    assert entry == RosterEntry(7, "math-a", "math", 19, 2)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("error", "node 7: config file not found: /x/client.toml"),
        ("duplicate", "node 7 (client 'math-a'): client id 'math-a' is already node 3's"),
        ("task", "node 7 (client 'math-a'): task = 'code' is not in server.tasks (math, chain)"),
        ("lora", "node 7 (client 'math-a'): lora.r = 4, the server's is 8"),
        ("model", "node 7 (client 'math-a'): model.name = 'other', the server's is"),
        ("malformed", "node 7: its identity reply is malformed"),
        ("full", "node 7 (client 'd'): the federation is full (server.num_clients = 3)"),
    ],
)
def test_admit_refuses_with_one_line_naming_node_and_field(tmp_path, case, message):
    cfg = load_experiment(experiment(tmp_path))
    roster: dict[str, RosterEntry] = {}
    identity = identity_of(cfg)
    if case == "error":
        identity = {"error": "config file not found: /x/client.toml"}
    elif case == "duplicate":
        roster = {"math-a": RosterEntry(3, "math-a", "math", 19, 2)}
    elif case == "task":
        identity = identity_of(cfg, task="code")
    elif case == "lora":
        identity = identity_of(cfg, lora__r=4)
    elif case == "model":
        identity = identity_of(cfg, model__name="other")
    elif case == "malformed":
        del identity["num-train"]
    elif case == "full":
        roster = {c: RosterEntry(i, c, "math", 1, 1) for i, c in enumerate("abc")}
        identity = identity_of(cfg, client_id="d")
    with pytest.raises(FedMOAError) as err:
        admit(7, identity, cfg, roster)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_listed_experiment_admits_only_its_clients_with_their_tasks(tmp_path):
    _, onefile = write_node_folders(tmp_path)
    cfg = load_experiment(onefile)
    with pytest.raises(FedMOAError, match="id: the experiment lists no such client"):
        admit(1, identity_of(cfg, client_id="stranger"), cfg, {})
    with pytest.raises(FedMOAError, match="task = 'chain', the experiment says 'math'"):
        admit(1, identity_of(cfg, task="chain"), cfg, {})
    roster = {c: RosterEntry(i, c, "t", 1, 1) for i, c in enumerate(["math-b", "chain", "math-a"])}
    assert list(in_order(roster, cfg)) == ["chain", "math-a", "math-b"]  # the file's order


def node_configs(root: Path) -> dict[int, dict]:
    """Three good nodes (client files in their own folders) and three bad ones, node ids
    unrelated to the client order."""
    good = {
        30: {CLIENT_CONFIG_KEY: str(root / "node-math-a" / "client.toml")},
        10: {CLIENT_CONFIG_KEY: str(root / "node-math-b" / "client.toml")},
    }
    bad = {
        40: {},  # no client file
        50: {CLIENT_CONFIG_KEY: str(root / "nowhere" / "client.toml")},  # missing
        60: {CLIENT_CONFIG_KEY: str(root / "node-math-a" / "client.toml")},  # a second math-a
    }
    return {**good, **bad}


def test_deployment_goes_on_without_refused_nodes(tmp_path, task_identity, caplog):
    """Nodes without a client file, with a missing one, or claiming a taken id are refused with
    one line each; with server.min_clients = 2 of 3 present, the run goes on without them, and
    the server experiment names no client file."""
    server_experiment = experiment(tmp_path, "[server]\nmin_clients = 2")
    run = tmp_path / "run"
    run_config = {
        EXPERIMENT_KEY: str(server_experiment),
        RUN_DIR_KEY: str(run),
        NODE_TIMEOUT_KEY: 1.0,
    }
    grid = LoopbackGrid(node_configs(tmp_path), run_config, failing=set())
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with caplog.at_level(logging.WARNING), torch_threads(1):
        summary = serve(grid, context)
    assert summary["rounds"] == 2
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert any(m.startswith("refused node 40: this node has no client") for m in refused), refused
    assert any(
        m.startswith("refused node 50: config file not found:") and "nowhere" in m for m in refused
    ), refused
    assert "refused node 60 (client 'math-a'): client id 'math-a' is already node 30's" in refused
    assert "2 of 3 clients joined" in caplog.text
    clients = {r["client"] for r in RunDirectory(run).read_metrics() if r["type"] == "client"}
    assert clients == {"math-a", "math-b"}


def test_deployment_stops_when_too_few_nodes_join(tmp_path, task_identity):
    server_experiment = experiment(tmp_path, "[server]\nmin_clients = 3")
    run_config = {
        EXPERIMENT_KEY: str(server_experiment),
        RUN_DIR_KEY: str(tmp_path / "run"),
        NODE_TIMEOUT_KEY: 1.0,
    }
    grid = LoopbackGrid(node_configs(tmp_path), run_config, failing=set())
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(FedMOAError, match=r"2 of 3 clients joined within 1s, fewer than server"):
        serve(grid, context)


def test_an_experiment_without_clients_is_for_deployments_only(tmp_path):
    server_experiment = experiment(tmp_path)
    cfg = load_experiment(server_experiment)
    assert cfg.clients == [] and cfg.server.num_clients == 3
    with pytest.raises(ConfigError, match="clients: the embedded engine runs the clients"):
        EmbeddedFederation(cfg, RunDirectory(tmp_path / "run"))
    with pytest.raises(ConfigError, match="clients: the simulation runs the clients"):
        run_simulation(server_experiment, tmp_path / "sim")


@pytest.mark.parametrize(
    ("server_table", "message"),
    [
        (
            "[server]\n",
            "clients: at least one [[clients]] entry is required, or server.num_clients",
        ),
        ("[server]\nnum_clients = 2\n", "server.num_clients = 2 but the experiment lists 3"),
        ('[server]\ntasks = ["math"]\n', "clients[0].task = 'chain' is not in server.tasks"),
    ],
)
def test_client_count_and_tasks_are_checked(tmp_path, server_table, message):
    _, onefile = write_node_folders(tmp_path)
    text = onefile.read_text()
    if server_table == "[server]\n":  # no clients at all
        text = text[text.index("\n") + 1 :]
    onefile.write_text(text.replace("[server]\n", server_table))
    with pytest.raises(ConfigError) as err:
        load_experiment(onefile)
    assert message in str(err.value)


def test_deployment_example_server_and_one_file_forms_agree():
    """examples/deployment: the server's experiment (no clients) and the one-file experiment
    share every setting, and each node's client file loads on its own."""
    root = Path(__file__).resolve().parents[1] / "examples" / "deployment"
    server, onefile = (
        load_experiment(root / "server" / "experiment.toml"),
        load_experiment(root / "experiment.toml"),
    )
    text = (root / "server" / "experiment.toml").read_text()
    assert server.clients == [] and "[[clients]]" not in text and ".toml" not in text
    shared = {k: v for k, v in json.loads(shared_settings(server)).items() if k != "output_dir"}
    ours = {k: v for k, v in json.loads(shared_settings(onefile)).items() if k != "output_dir"}
    ours["server"]["tasks"] = shared["server"]["tasks"]  # only the server's form restricts
    assert shared == ours
    files = sorted(root.glob("node-*/client.toml"))
    assert [load_client_file(f).id for f in files] == [c.id for c in onefile.clients]
    assert all(c.task in server.server.tasks for c in onefile.clients)


CLIENT_FILE = """
id = "owner"
task = "math"
local_steps = 5
data = { source = "reasoning_gym", name = "basic_arithmetic", size = 12 }
rewards = [{ name = "accuracy", function = "math_accuracy", role = "primary" }]
"""

DEFAULTS = """
[model]
name = "tiny-random-qwen2"

[client_defaults]
grpo = { batch_size = 2, max_new_tokens = 24 }
local_steps = 3
"""


def test_a_node_merges_the_servers_client_defaults_as_the_one_file_form_does(tmp_path):
    """The same client file, listed by a one-file experiment or run by a node of a deployment
    whose experiment has the same ``[client_defaults]``, trains with the same settings: the
    server sends its defaults with the shared settings and the node merges them under its
    own file (its own values win)."""
    from fedmoa.federation.flower.node import client_from_file, settings_from_json

    (tmp_path / "owner").mkdir()
    client_file = tmp_path / "owner" / "client.toml"
    client_file.write_text(CLIENT_FILE)
    onefile = tmp_path / "experiment.toml"
    onefile.write_text('clients = ["owner/client.toml"]\n' + DEFAULTS)
    server = tmp_path / "server.toml"
    server.write_text(DEFAULTS.replace("[model]", "[server]\nnum_clients = 1\n\n[model]"))

    listed = load_experiment(onefile).clients[0]
    node = client_from_file(
        client_file, settings_from_json(shared_settings(load_experiment(server)))
    )
    assert node.client == listed
    assert (listed.local_steps, listed.grpo.batch_size, listed.grpo.max_new_tokens) == (5, 2, 24)

    server.write_text(server.read_text().replace("max_new_tokens = 24", "max_new_tokens = -1"))
    with pytest.raises(
        ConfigError, match=r"grpo\.max_new_tokens.*from the server's \[client_defaults\]"
    ):
        client_from_file(client_file, settings_from_json(shared_settings(load_experiment(server))))
