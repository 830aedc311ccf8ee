"""The ClientApp: a node's ``query``, ``train`` and ``evaluate`` handlers.

Each calls what the embedded engine calls for the same client (``run_client_round``,
``evaluate_client``) on the node's own data, model and rewards (:mod:`.node`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp

from fedmoa.errors import FedMOAError, one_line
from fedmoa.federation.client import objective_metrics, run_client_round
from fedmoa.federation.evaluation import EVAL_KINDS, evaluate_client
from fedmoa.federation.flower.client_state import load_state, save_state, state_folder
from fedmoa.federation.flower.node import (
    NodeClient,
    client_checks,
    client_from_experiment,
    client_from_file,
    client_inputs,
    identity,
    node_policy,
    settings_from_json,
)
from fedmoa.federation.flower.records import (
    ADAPTER,
    DETAILS,
    IDENTITY,
    METRICS,
    PAIRS,
    ROUND_CONFIG,
    SETTINGS,
    adapter_to_record,
    pairs_to_record,
    record_to_adapter,
)
from fedmoa.federation.flower.settings import (
    CLIENT_CONFIG_KEY,
    PARTITION_ID,
    RunSettings,
    with_run_config,
)


def node_client(message: Message, context: Context) -> NodeClient:
    """This node's client: from its own client file (``client-config`` in its node config,
    under the settings the server sent), else client ``partition-id`` of the experiment file."""
    client_file = str(context.node_config.get(CLIENT_CONFIG_KEY) or "")
    if client_file:
        if SETTINGS not in message.content:
            raise FedMOAError("the message carries no settings: is the ServerApp fedmoa's?")
        cfg = settings_from_json(str(message.content[SETTINGS]["experiment"]))
        return client_from_file(client_file, cfg)
    if PARTITION_ID not in context.node_config:
        raise FedMOAError(
            "this node has no client: start its SuperNode with --node-config "
            f"\"{CLIENT_CONFIG_KEY}='/path/client.toml'\" (or {PARTITION_ID}=I, client I of "
            "the experiment file)"
        )
    settings = RunSettings.from_run_config(context.run_config)
    return client_from_experiment(settings.experiment, context.node_config[PARTITION_ID])


def _named_client(message: Message, context: Context) -> NodeClient:
    """:func:`node_client`, which must be the client the server addressed."""
    node = node_client(message, context)
    asked = str(message.content[ROUND_CONFIG]["client-id"])
    if node.client.id != asked:
        raise FedMOAError(
            f"node {context.node_id} runs client {node.client.id!r} ({node.where}), the server "
            f"asked for {asked!r}"
        )
    return node


def identify(message: Message, context: Context) -> Message:
    """Reply to the server's query with this node's client (``roster.admit`` checks it); a node
    that cannot load its client says why, in one line."""
    try:
        record = identity(node_client(message, context))
    except FedMOAError as err:
        record = {"error": one_line(err)}
    return Message(RecordDict({IDENTITY: ConfigRecord(record)}), reply_to=message)


def node_state_folder(node: NodeClient, run_key: str, context: Context) -> Path:
    """Where this node keeps its client's state: beside its own client file, or in the run
    directory (the one-file form, whose run config names it)."""
    if node.in_experiment:
        run_dir = RunSettings.from_run_config(context.run_config).run_dir
        return state_folder(node.client.id, run_key, None, run_dir)
    return state_folder(node.client.id, run_key, str(node.source), None)


def train(message: Message, context: Context) -> Message:
    """One client round: the same ``run_client_round`` call as the embedded engine makes.

    ``server.round_timeout`` counts from here on the client (the ServerApp counts from
    sending): past it the round raises ``ClientTimeout``, so a slow node stops working
    on a reply the server has dropped and becomes free for the next message.
    """
    began = time.perf_counter()
    started = time.monotonic()
    node = _named_client(message, context)
    cfg, client = node.cfg, node.client
    model = node_policy(cfg)
    data, reward_funcs = client_inputs(node)
    round_config = message.content[ROUND_CONFIG]
    server_round = int(round_config["server-round"])
    folder = node_state_folder(node, str(round_config["run-key"]), context)
    started_from, state = load_state(folder, server_round)
    result = run_client_round(
        model.policy,
        model.tokenizer,
        client,
        data,
        reward_funcs,
        record_to_adapter(
            message.content[ADAPTER],
            like=model.initial,
            transport_dtype=cfg.server.transport_dtype,
        ),
        state,
        method=cfg.server.method,
        server=cfg.server,
        weighting_config=cfg.weighting,
        privacy=cfg.privacy,
        seed=cfg.seed,
        server_round=server_round,
        started=started,
    )
    save_state(folder, server_round, result.state, started_from)
    update = result.update
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "accuracy": update.accuracy,
            "validation_size": update.validation_size,
            **update.metrics,
            "bytes_down": result.bytes_down,
            "bytes_up": result.bytes_up,
        }
    )
    details = ConfigRecord(
        {
            "client-id": client.id,
            "task": client.task,
            "seconds": time.perf_counter() - began,
            **objective_metrics(result.history, [r.name for r in client.rewards]),
        }
    )
    content = RecordDict(
        {
            ADAPTER: adapter_to_record(update.delta, cfg.server.transport_dtype),
            METRICS: metrics,
            DETAILS: details,
        }
    )
    if update.validation_pairs:
        content[PAIRS] = pairs_to_record(update.validation_pairs)
    return Message(content, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Score the adapters the server sent on this client's own test rows; reply metrics only.

    The same ``evaluate_client`` call the embedded engine makes for each client.
    """
    node = _named_client(message, context)
    model = node_policy(node.cfg)
    data, reward_funcs = client_inputs(node)
    adapters = {
        kind: record_to_adapter(message.content[f"{ADAPTER}/{kind}"], like=model.initial)
        for kind in EVAL_KINDS
        if f"{ADAPTER}/{kind}" in message.content
    }
    metrics = evaluate_client(
        model.policy,
        model.tokenizer,
        node.client,
        data,
        reward_funcs,
        adapters,
        node.cfg.server,
        client_checks(node),
    )
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


def build_client_app(run_config: Mapping[str, UserConfigValue] | None = None) -> ClientApp:
    """A ClientApp answering ``train`` (:func:`train`), ``evaluate`` (:func:`evaluate`) and
    ``query`` (:func:`identify`)."""
    app = ClientApp()
    app.train()(with_run_config(train, run_config))
    app.evaluate()(with_run_config(evaluate, run_config))
    app.query()(with_run_config(identify, run_config))
    return app


app = build_client_app()
"""The ClientApp for ``flwr run`` (``fedmoa.federation.flower.client_app:app``)."""
