"""FedMOA as a Flower strategy: ``configure_*`` sends, ``aggregate_*`` hands replies to the run-time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmoa.aggregation import Adapter, ClientUpdate
from fedmoa.errors import FedMOAError, one_line
from fedmoa.federation.evaluation import aggregate_evaluation
from fedmoa.federation.flower.node import shared_settings
from fedmoa.federation.flower.records import (
    ADAPTER,
    METRICS,
    ROUND_CONFIG,
    SETTINGS,
    adapter_to_record,
    reply_to_update,
)
from fedmoa.federation.flower.roster import RosterEntry
from fedmoa.federation.runtime import PendingRound, ServerRuntime, failed_client_record
from fedmoa.federation.server import RoundPlan

logger = logging.getLogger(__name__)
RoundCallback = Callable[[int, list[dict[str, Any]]], None]


class FedMOAStrategy(Strategy):
    """Flower's strategy contract over the server run-time.

    ``configure_train`` sends each client of ``FederatedServer.configure_round``
    its start adapter; ``aggregate_train`` turns the replies into ``ClientUpdate``
    objects and hands them, with the client records, to
    ``ServerRuntime.aggregate_replies``. On evaluation rounds
    ``configure_evaluate`` sends every client the adapters it scores (global,
    personalized, its local model) and each ClientApp scores them on its own test
    rows (:func:`evaluate`); ``aggregate_evaluate`` combines the metrics-only
    replies (``aggregate_evaluation``, as the embedded engine does), then the round
    is logged and checkpointed (``ServerRuntime.finish_round``).

    ``Strategy.start`` numbers the rounds of its own call from 1; a resumed run's call starts
    after the rounds the run-time had completed, so each method adds those
    (:meth:`run_round`) and every message and record carries the run's round.
    """

    def __init__(
        self,
        runtime: ServerRuntime,
        roster: Mapping[str, RosterEntry],
        *,
        reply_timeout: float | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.runtime = runtime
        self.roster = dict(roster)  # the clients that joined (discover_clients)
        self.reply_timeout = reply_timeout  # only for the log: Strategy.start applies it
        self.on_round = on_round
        self.nodes = {cid: entry.node_id for cid, entry in roster.items()}
        self.settings = shared_settings(runtime.cfg)  # sent with every message
        self.plan: RoundPlan | None = None
        self.pending: PendingRound | None = None  # aggregated, waiting for its evaluation
        self.evaluate_sent = 0.0  # perf_counter when the evaluate messages went out
        self.rounds_before = runtime.server.state.completed_rounds  # > 0 when resumed
        self.run_key = runtime.run.run_key  # the nodes keep their client state under it

    def run_round(self, flower_round: int) -> int:
        """The run's round for the ``server_round`` of Flower's loop."""
        return self.rounds_before + flower_round

    def summary(self) -> None:
        """Logged by ``Strategy.start`` on Flower's logger, next to Flower's own lines."""
        cfg = self.runtime.cfg
        logging.getLogger("flwr").info(
            "FedMOA strategy: method %s, %d clients, %d rounds, run directory %s",
            cfg.server.method,
            len(self.roster),
            cfg.server.rounds,
            self.runtime.run.path,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client the server samples, to the node of its partition."""
        del arrays, config  # the FederatedServer's state is the source of truth
        server_round = self.run_round(server_round)
        self.plan = self.runtime.server.configure_round(server_round)
        transport = self.runtime.cfg.server.transport_dtype
        return [
            self.message_to(
                client_id,
                server_round,
                MessageType.TRAIN,
                {ADAPTER: adapter_to_record(start, transport)},
            )
            for client_id, start in self.plan.starts.items()
        ]

    def message_to(
        self, client_id: str, server_round: int, kind: str, adapters: Mapping[str, ArrayRecord]
    ) -> Message:
        """A message to ``client_id``'s node: the adapters, the round, the run key (under which
        the node keeps its client state) and the shared settings."""
        content = RecordDict(
            {
                **adapters,
                ROUND_CONFIG: ConfigRecord(
                    {"server-round": server_round, "client-id": client_id, "run-key": self.run_key}
                ),
                SETTINGS: ConfigRecord({"experiment": self.settings}),
            }
        )
        return Message(
            content=content,
            dst_node_id=self.nodes[client_id],
            message_type=kind,
            group_id=str(server_round),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies → ``ClientUpdate``s, in the plan's client order; failures are logged and skipped."""
        server_round = self.run_round(server_round)
        plan = self.plan
        if plan is None or plan.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        client_of_node = {node: cid for cid, node in self.nodes.items()}
        by_client = {client_of_node.get(r.metadata.src_node_id): r for r in replies}
        reference = self.runtime.server.state.global_adapter
        updates: list[ClientUpdate] = []
        records: list[dict[str, Any]] = []
        for client_id in plan.starts:
            reply = by_client.get(client_id)
            try:
                if reply is None:  # hung, too slow or disconnected
                    within = f" ({self.reply_timeout:g}s)" if self.reply_timeout else ""
                    raise FedMOAError(f"no reply within the round timeout{within}")
                if reply.has_error():
                    raise FedMOAError(f"error reply: {reply.error.reason}")
                update, record = reply_to_update(
                    server_round,
                    client_id,
                    reply,
                    reference,
                    self.runtime.cfg.server.transport_dtype,
                )
            except Exception as err:  # one client failing fails the round for itself only
                named = f"{type(err).__name__}: {err}"
                # one line: a Ray error reply spans several
                reason = one_line(err if isinstance(err, FedMOAError) else named)
                logger.warning("round %d: client %r failed: %s", server_round, client_id, reason)
                records.append(failed_client_record(server_round, client_id, reason))
                continue
            updates.append(update)
            records.append(record)
        self.pending = self.runtime.aggregate_replies(plan, updates, records)
        metrics = MetricRecord({"replies": len(updates)})
        return adapter_to_record(self.runtime.server.state.global_adapter), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On an evaluation round, one message per client with the adapters it scores."""
        del arrays, config
        server_round = self.run_round(server_round)
        pending = self.pending
        if pending is None or pending.server_round != server_round or not pending.evaluate:
            return []
        self.evaluate_sent = time.perf_counter()
        return self.evaluate_messages(server_round, pending.local_models)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Combine the clients' scores, then log and checkpoint the round."""
        server_round = self.run_round(server_round)
        pending = self.pending
        if pending is None or pending.server_round != server_round:
            raise RuntimeError(f"aggregate_evaluate({server_round}) without aggregate_train")
        metrics = None
        if pending.evaluate:
            metrics = self.combine_scores(server_round, replies)
            pending.timer.seconds["evaluate"] = time.perf_counter() - self.evaluate_sent
        records = self.runtime.finish_round(pending, metrics)
        self.pending = None
        if self.on_round is not None:
            self.on_round(server_round, records)
        accuracy = (metrics or {}).get("global/accuracy")
        return MetricRecord({"global/accuracy": float(accuracy)}) if accuracy is not None else None

    def evaluate_round0(self, grid: Grid) -> None:
        """Round 0 (``server.eval_round0``): every client scores the starting adapter."""
        if not self.runtime.round0_due():
            return
        replies = grid.send_and_receive(self.evaluate_messages(0, {}), timeout=self.reply_timeout)
        self.runtime.log_round0(self.combine_scores(0, replies))

    def evaluate_messages(
        self, server_round: int, local_models: Mapping[str, Adapter]
    ) -> list[Message]:
        messages = []
        for client_id in self.roster:
            adapters = self.runtime.eval_adapters(client_id, local_models)
            records = {f"{ADAPTER}/{kind}": adapter_to_record(a) for kind, a in adapters.items()}
            messages.append(self.message_to(client_id, server_round, MessageType.EVALUATE, records))
        return messages

    def combine_scores(self, server_round: int, replies: Iterable[Message]) -> dict[str, float]:
        """The eval record from the clients' metrics-only replies; a failed one is logged and
        left out."""
        client_of_node = {node: cid for cid, node in self.nodes.items()}
        scores: dict[str, dict[str, float]] = {}
        for reply in replies:
            client_id = client_of_node.get(reply.metadata.src_node_id)
            if client_id is None:
                continue
            if reply.has_error():
                logger.warning(
                    "round %d: client %r failed to evaluate: %s",
                    server_round,
                    client_id,
                    one_line(reply.error.reason),
                )
                continue
            scores[client_id] = {k: float(v) for k, v in reply.content[METRICS].items()}
        tasks = {cid: entry.task for cid, entry in self.roster.items()}
        return aggregate_evaluation(scores, tasks)
