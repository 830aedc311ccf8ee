"""The embedded engine: a sequential, in-process federation.

The server's run-time (``fedmoa.federation.runtime``) with its clients called in turn in
the same process. One base model stays in memory; each client's turn swaps its start
adapter in, so memory does not grow with the number of clients. Every round ends with a
checkpoint, so ``--resume`` loses at most the round in progress.

Faults: a client that raises (its own code or a user reward function) or runs past
``server.round_timeout`` (:class:`~fedmoa.federation.client.ClientTimeout`, checked
cooperatively at every model forward, see ``RoundDeadline``) is logged with its id
and gets a ``failed`` record; the round goes on with the others. Bad updates are
rejected by the server (``FederatedServer.aggregate_round``). Fewer usable updates
than ``server.min_clients`` stop the run with a ``FedMOAError`` before anything is
aggregated or checkpointed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from fedmoa.aggregation import Adapter, ClientUpdate
from fedmoa.errors import ConfigError, one_line
from fedmoa.federation.centralized import CENTRAL_ID, pooled_client
from fedmoa.federation.client import (
    ClientData,
    client_check_funcs,
    client_reward_funcs,
    load_client_data,
    objective_metrics,
    run_client_round,
)
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.evaluation import aggregate_evaluation, evaluate_client
from fedmoa.federation.runtime import ServerRuntime, client_record, failed_client_record
from fedmoa.federation.server import RoundPlan
from fedmoa.runs import RunDirectory

logger = logging.getLogger(__name__)
RoundCallback = Callable[[int, list[dict[str, Any]]], None]
ClientCallback = Callable[[dict[str, Any]], None]


class EmbeddedFederation(ServerRuntime):
    """Runs ``cfg`` round by round into ``run``, every client in this process."""

    def __init__(self, cfg: ExperimentConfig, run: RunDirectory) -> None:
        if not cfg.clients:
            raise ConfigError(
                "clients: the embedded engine runs the clients the experiment lists, and it lists "
                "none (server.num_clients is for a deployment's own client files)"
            )
        self.reward_funcs: dict[str, list[tuple[str, Any]]] = {}
        self.check_funcs: dict[str, list[tuple[str, Any]]] = {}
        self.data: dict[str, ClientData] = {}
        for i, c in enumerate(cfg.clients):
            self.reward_funcs[c.id] = client_reward_funcs(c, i)
            self.check_funcs[c.id] = client_check_funcs(c, i)
            self.data[c.id] = load_client_data(c, f"clients[{i}].data")
        self.clients = {c.id: c for c in cfg.clients}
        learners = None
        if cfg.server.method == "centralized":
            pooled, union, funcs = pooled_client(cfg, self.data, self.reward_funcs)
            self.clients[CENTRAL_ID], self.data[CENTRAL_ID] = pooled, union
            self.reward_funcs[CENTRAL_ID] = funcs
            learners = {CENTRAL_ID: pooled.task}
        super().__init__(cfg, run, learners)

    def run_rounds(
        self, on_round: RoundCallback | None = None, on_client: ClientCallback | None = None
    ) -> dict[str, Any]:
        self.evaluate_round0()
        start = self.server.state.completed_rounds
        for server_round in range(start + 1, self.rounds_to_run + 1):
            records = self.run_round(server_round, on_client)
            if on_round is not None:
                on_round(server_round, records)
        return self.finish()

    def run_round(
        self, server_round: int, on_client: ClientCallback | None = None
    ) -> list[dict[str, Any]]:
        cfg = self.cfg
        plan = self.server.configure_round(server_round)
        updates, records = [], []
        for client_id, start in plan.starts.items():
            client = self.clients[client_id]
            began = time.perf_counter()
            try:
                result = run_client_round(
                    self.policy,
                    self.tokenizer,
                    client,
                    self.data[client_id],
                    self.reward_funcs[client_id],
                    start,
                    self.client_states.get(client_id),
                    method=cfg.server.method,
                    server=cfg.server,
                    weighting_config=cfg.weighting,
                    privacy=cfg.privacy,
                    seed=cfg.seed,
                    server_round=server_round,
                )
            except Exception as err:  # a crash or a ClientTimeout: this client only
                reason = one_line(f"{type(err).__name__}: {err}")
                logger.warning("round %d: client %r failed: %s", server_round, client_id, reason)
                records.append(failed_client_record(server_round, client_id, reason))
                if on_client is not None:
                    on_client(records[-1])
                continue
            self.client_states[client_id] = result.state
            updates.append(result.update)
            records.append(
                client_record(
                    server_round,
                    result.update,
                    objective_metrics(result.history, [r.name for r in client.rewards]),
                    bytes_down=result.bytes_down,
                    bytes_up=result.bytes_up,
                    seconds=time.perf_counter() - began,
                )
            )
            if on_client is not None:
                on_client(records[-1])
        return self.complete_round(plan, updates, records)

    def complete_round(
        self, plan: RoundPlan, updates: list[ClientUpdate], records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Aggregate the round's replies, evaluate, log every record and checkpoint."""
        pending = self.aggregate_replies(plan, updates, records)
        metrics = None
        if pending.evaluate:
            with pending.timer.phase("evaluate"):
                metrics = self.evaluate(pending.local_models)
        return self.finish_round(pending, metrics)

    def evaluate_round0(self) -> None:
        """Score the starting adapter before round 1, logged as round 0 (``server.eval_round0``).

        The same rows, rewards and decoding as every later evaluation, so a run shows what
        training added to the untrained model.
        """
        if self.round0_due():
            self.log_round0(self.evaluate())

    def evaluate(self, local_models: Mapping[str, Adapter] | None = None) -> dict[str, float]:
        """Every client scores its adapters on its own test rows; the server combines the scores.

        The same two functions as a Flower deployment's evaluate messages
        (``fedmoa.federation.evaluation``), called here for each client in turn.
        """
        scores = {
            client.id: evaluate_client(
                self.policy,
                self.tokenizer,
                client,
                self.data[client.id],
                self.reward_funcs[client.id],
                self.eval_adapters(client.id, local_models),
                self.cfg.server,
                self.check_funcs[client.id],
            )
            for client in self.cfg.clients
        }
        return aggregate_evaluation(scores, {c.id: c.task for c in self.cfg.clients})
