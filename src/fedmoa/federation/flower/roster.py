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
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmoa.errors import FedMOAError, one_line
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.flower.node import shared_settings
from fedmoa.federation.flower.records import IDENTITY, SETTINGS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RosterEntry:
    """A client as its node announced it."""

    node_id: int
    client_id: str
    task: str
    num_train: int
    num_test: int
    torch_threads: int | None = None  # the node's compute threads, for the run's record


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
    threads = identity.get("torch-threads")
    return RosterEntry(
        node_id, client_id, task, num_train, num_test, int(threads) if threads else None
    )


def in_order(roster: Mapping[str, RosterEntry], cfg: ExperimentConfig) -> dict[str, RosterEntry]:
    """The experiment's client order when it lists them, else by client id (as a one-file
    experiment listing the same client files in id order would have them)."""
    order = [c.id for c in cfg.clients] or sorted(roster)
    return {cid: roster[cid] for cid in order if cid in roster}


def discover_clients(
    grid: Grid, cfg: ExperimentConfig, node_timeout: float
) -> dict[str, RosterEntry]:
    """Ask every node that connects which client it runs, until all of the experiment's clients
    joined, or ``node_timeout`` passed and ``server.min_clients`` of them did.

    A node is asked once, with a ``query`` message that carries the shared settings; refused
    nodes (``roster.admit``) are logged with the reason and left out.
    """
    expected = expected_clients(cfg)
    settings = shared_settings(cfg)
    roster: dict[str, RosterEntry] = {}
    refused: list[str] = []
    asked: set[int] = set()
    deadline = time.monotonic() + node_timeout
    while len(roster) < expected:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            asked.update(new)
            messages = [
                Message(
                    content=RecordDict({SETTINGS: ConfigRecord({"experiment": settings})}),
                    dst_node_id=node,
                    message_type=MessageType.QUERY,
                )
                for node in new
            ]
            replies = {
                r.metadata.src_node_id: r
                for r in grid.send_and_receive(messages, timeout=node_timeout)
            }
            for node in new:
                reply = replies.get(node)
                try:
                    if reply is None:
                        raise FedMOAError(f"node {node}: no reply to the query ({node_timeout:g}s)")
                    if reply.has_error():
                        raise FedMOAError(
                            f"node {node}: error reply: {one_line(reply.error.reason)}"
                        )
                    entry = admit(node, dict(reply.content[IDENTITY]), cfg, roster)
                except FedMOAError as err:
                    logger.warning("refused %s", err)
                    refused.append(str(err))
                    continue
                roster[entry.client_id] = entry
            continue
        if time.monotonic() > deadline:
            if len(roster) >= cfg.server.min_clients:
                logger.warning(
                    "%d of %d clients joined within %.0fs; going on without the others",
                    len(roster),
                    expected,
                    node_timeout,
                )
                break
            raise FedMOAError(
                f"{len(roster)} of {expected} clients joined within {node_timeout:.0f}s, fewer "
                f"than server.min_clients = {cfg.server.min_clients}"
                + (f"; refused: {'; '.join(refused)}" if refused else "")
            )
        time.sleep(0.5)
    return in_order(roster, cfg)
