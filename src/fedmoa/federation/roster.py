"""Which node runs which client: the server admits nodes from what they say about themselves.

In a deployment whose experiment lists no clients, the server learns each client's id,
task and data size from the node's reply to a ``query`` message. A node is refused, with
a one-line reason that names it and the field, when it failed to load its client, claims
an id another node has, is not in the experiment's list, names a task the server does not
take, or runs other model or LoRA settings than the server. The federation goes on
without refused nodes as long as ``server.min_clients`` of them joined.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmoa.errors import FedMOAError
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.node import shared_settings


@dataclass(frozen=True)
class RosterEntry:
    """A client as its node announced it."""

    node_id: int
    client_id: str
    task: str
    num_train: int
    num_test: int


def expected_clients(cfg: ExperimentConfig) -> int:
    return len(cfg.clients) or cfg.server.num_clients or 0


def admit(
    node_id: int,
    identity: Mapping[str, Any],
    cfg: ExperimentConfig,
    roster: Mapping[str, RosterEntry],
) -> RosterEntry:
    """The roster entry for ``node_id``'s reply, or a ``FedMOAError`` saying why it is refused."""
    if "error" in identity:
        raise FedMOAError(f"node {node_id}: {identity['error']}")
    try:
        client_id, task = str(identity["client-id"]), str(identity["task"])
        num_train, num_test = int(identity["num-train"]), int(identity["num-test"])
    except (KeyError, TypeError, ValueError) as err:
        raise FedMOAError(f"node {node_id}: its identity reply is malformed ({err!r})") from None
    name = f"node {node_id} (client {client_id!r})"
    taken = roster.get(client_id)
    if taken is not None:
        raise FedMOAError(f"{name}: client id {client_id!r} is already node {taken.node_id}'s")
    if len(roster) >= expected_clients(cfg):
        raise FedMOAError(f"{name}: the federation is full (server.num_clients = {len(roster)})")
    listed = {c.id: c for c in cfg.clients}
    if listed and client_id not in listed:
        raise FedMOAError(f"{name}: id: the experiment lists no such client")
    if client_id in listed and listed[client_id].task != task:
        raise FedMOAError(
            f"{name}: task = {task!r}, the experiment says {listed[client_id].task!r}"
        )
    if cfg.server.tasks is not None and task not in cfg.server.tasks:
        raise FedMOAError(
            f"{name}: task = {task!r} is not in server.tasks ({', '.join(cfg.server.tasks)})"
        )
    shared = json.loads(shared_settings(cfg))
    for table in ("model", "lora"):
        theirs = json.loads(str(identity.get(table, "{}")))
        for key, ours in shared[table].items():
            if theirs.get(key) != ours:
                raise FedMOAError(
                    f"{name}: {table}.{key} = {theirs.get(key)!r}, the server's is {ours!r}"
                )
    return RosterEntry(node_id, client_id, task, num_train, num_test)


def in_order(roster: Mapping[str, RosterEntry], cfg: ExperimentConfig) -> dict[str, RosterEntry]:
    """The experiment's client order when it lists them, else by client id (as a one-file
    experiment listing the same client files in id order would have them)."""
    order = [c.id for c in cfg.clients] or sorted(roster)
    return {cid: roster[cid] for cid in order if cid in roster}
