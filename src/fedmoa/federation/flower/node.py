"""What a federation node holds, built once and kept: its client, the model, its data and rewards.

A node is a SuperNode's ClientApp (one process per message with Flower's own
``flwr-clientapp``, one long-lived process with ``fedmoa clientapp``), or a Ray actor
of the simulation. It knows its client in one of two ways:

* a **client file** of its own (``--node-config "client-config='/path/client.toml'"``):
  the federation's shared settings (model, LoRA, server, weighting, seed) come from
  the server in every message, so the node needs nothing but its own file;
* ``partition-id = i``: client ``i`` of the experiment file named in the run config
  (the one-file form, which the simulation uses).

Everything here is cached per process by content, so a process that lives across
messages builds the model once per run; each build is logged (``MODEL_BUILD_LOG``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmoa.aggregation import Adapter
from fedmoa.config import parse_config
from fedmoa.errors import ConfigError, FedMOAError
from fedmoa.federation.client import (
    ClientData,
    client_check_funcs,
    client_reward_funcs,
    load_client_data,
)
from fedmoa.federation.config import (
    ClientConfig,
    ExperimentConfig,
    check_client_fits,
    load_client_file,
    load_experiment,
)
from fedmoa.federation.runtime import build_policy
from fedmoa.rewards import RewardFunc

logger = logging.getLogger(__name__)

MODEL_BUILD_LOG = "fedmoa node: building the model"
"""The start of the line logged at every model build (a test counts them)."""


@dataclass
class NodePolicy:
    """The base model with its LoRA, built from the seed as on every engine."""

    policy: Any
    tokenizer: Any
    initial: Adapter  # the LoRA as built: names and dtypes that incoming adapters take


@dataclass
class NodeClient:
    """The client this node runs for one message, with the settings it runs under."""

    cfg: ExperimentConfig  # the federation's settings as this node has them
    client: ClientConfig
    source: int | str  # its index in the experiment file, or its client file

    @property
    def in_experiment(self) -> bool:
        """Client ``source`` of the experiment file (the one-file form), not a file of its own."""
        return isinstance(self.source, int)

    @property
    def where(self) -> str:
        """Where the client was defined, for error messages."""
        return f"clients[{self.source}]" if self.in_experiment else str(self.source)


_POLICIES: dict[str, NodePolicy] = {}
_INPUTS: dict[str, tuple[ClientData, list[tuple[str, RewardFunc]]]] = {}
_CHECKS: dict[str, list[tuple[str, RewardFunc]]] = {}
_SETTINGS: dict[str, ExperimentConfig] = {}
_FILES: dict[tuple[str, str, str], Any] = {}


def shared_settings(cfg: ExperimentConfig) -> str:
    """The experiment without its clients, as JSON: what a node with its own client file needs
    from the server. ``server.num_clients`` says how many clients the federation has."""
    shared = dataclasses.asdict(cfg)
    del shared["clients"]
    shared["server"]["num_clients"] = len(cfg.clients) or cfg.server.num_clients
    return json.dumps(shared, default=str, sort_keys=True)


def settings_from_json(text: str) -> ExperimentConfig:
    """The inverse of :func:`shared_settings` (validated as strictly as a file)."""
    if text not in _SETTINGS:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"the server's settings are not JSON: {err}") from None
        _SETTINGS.clear()
        _SETTINGS[text] = parse_config(data, ExperimentConfig, "the server's settings", strict=True)
    return _SETTINGS[text]


def _cached_file(path: Path, load: Any, *context: Any) -> Any:
    """``load(path, *context)``, again only when the file's bytes or the context change."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return load(path, *context)  # its own one-line error (not found, unreadable)
    key = (str(path), digest, json.dumps(context, default=str, sort_keys=True))
    if key not in _FILES:
        _FILES[key] = load(path, *context)
    return _FILES[key]


def client_from_file(path: str | Path, cfg: ExperimentConfig) -> NodeClient:
    """The node's own client file under the server's settings ``cfg``, merged over the
    server's ``[client_defaults]`` as the one-file form merges a listed client file."""
    file = Path(path).expanduser().absolute()
    client = _cached_file(file, load_client_file, cfg.client_defaults)
    check_client_fits(cfg, client, str(file))
    return NodeClient(cfg, client, str(file))


def client_from_experiment(experiment: Path, partition: Any) -> NodeClient:
    """Client ``partition`` of the experiment file (the one-file form)."""
    cfg = _cached_file(experiment, load_experiment)
    try:
        index = int(partition)
    except (TypeError, ValueError):
        raise FedMOAError(f"partition-id must be an integer, got {partition!r}") from None
    if not 0 <= index < len(cfg.clients):
        raise FedMOAError(
            f"partition-id = {index}, but {experiment} lists {len(cfg.clients)} client(s)"
        )
    return NodeClient(cfg, cfg.clients[index], index)


def node_policy(cfg: ExperimentConfig) -> NodePolicy:
    """The model for ``cfg``'s model, LoRA and seed: built at most once per process and run."""
    key = json.dumps(
        [dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.lora), cfg.seed],
        default=str,
        sort_keys=True,
    )
    if key not in _POLICIES:
        _POLICIES.clear()  # one model per process: free the previous one first
        logger.info("%s (%s)", MODEL_BUILD_LOG, cfg.model.name)
        _POLICIES[key] = NodePolicy(*build_policy(cfg))
    return _POLICIES[key]


def client_inputs(node: NodeClient) -> tuple[ClientData, list[tuple[str, RewardFunc]]]:
    """The client's rows (split) and reward functions, loaded once per client definition."""
    key = json.dumps(dataclasses.asdict(node.client), default=str, sort_keys=True)
    if key not in _INPUTS:
        field = f"{node.where}.data" if node.in_experiment else f"{node.where}: data"
        data = load_client_data(node.client, field)
        _INPUTS[key] = (data, client_reward_funcs(node.client, node.source))
        _CHECKS[key] = client_check_funcs(node.client, node.source)
    return _INPUTS[key]


def client_checks(node: NodeClient) -> list[tuple[str, RewardFunc]]:
    """The client's evaluation-only checks, loaded with its rewards."""
    client_inputs(node)
    return _CHECKS[json.dumps(dataclasses.asdict(node.client), default=str, sort_keys=True)]


def identity(node: NodeClient) -> dict[str, Any]:
    """What a node tells the server about itself: who it is and what it trains with."""
    data, _ = client_inputs(node)  # reads the data and imports the rewards: errors show now
    cfg = node.cfg
    return {
        "client-id": node.client.id,
        "task": node.client.task,
        "num-train": len(data.train),
        "num-test": len(data.test),
        "torch-threads": torch.get_num_threads(),
        "model": json.dumps(dataclasses.asdict(cfg.model), default=str, sort_keys=True),
        "lora": json.dumps(dataclasses.asdict(cfg.lora), default=str, sort_keys=True),
    }
