"""The server side of every method, split like a Flower strategy: ``configure`` / ``aggregate``.

``FederatedServer`` decides which clients train in a round and from which adapter
they start (``configure_round``), and turns their replies into the next global
and task adapters (``aggregate_round``) with the pure functions of
``fedmoa.aggregation``. The embedded loop and the Flower ServerApp both drive it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmoa.aggregation import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    TaskAccuracySettings,
    fedavg_aggregate,
    make_server_optimizer,
    task_accuracy_aggregate,
)
from fedmoa.aggregation.updates import apply_delta
from fedmoa.federation.config import (
    SERVER_OPTIMIZER_METHODS,
    TASK_ACCURACY_METHODS,
    ExperimentConfig,
)

logger = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    """Who trains this round, and the adapter each one starts from."""

    server_round: int
    starts: dict[str, Adapter]  # client id -> start adapter


@dataclass
class ServerState:
    completed_rounds: int
    global_adapter: Adapter
    task_adapters: dict[str, Adapter] = field(default_factory=dict)
    client_adapters: dict[str, Adapter] = field(default_factory=dict)  # the "local" baseline


class FederatedServer:
    """Method dispatch over the aggregation functions, with the state a checkpoint needs."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        initial_adapter: Adapter,
        client_tasks: dict[str, str] | None = None,
    ) -> None:
        """``client_tasks`` overrides who trains (the centralized baseline's single learner)."""
        self.cfg = cfg
        self.method = cfg.server.method
        self.client_tasks = client_tasks or {c.id: c.task for c in cfg.clients}
        self.state = ServerState(0, dict(initial_adapter))
        self.optimizer = (
            make_server_optimizer(self.method, **cfg.server.server_optimizer)
            if self.method in SERVER_OPTIMIZER_METHODS
            else None
        )

    # -- configure -----------------------------------------------------------------
    def sample_clients(self, server_round: int) -> list[str]:
        ids = sorted(self.client_tasks)
        per_round = min(self.cfg.server.clients_per_round or len(ids), len(ids))
        if per_round >= len(ids):
            return ids
        return sorted(
            random.Random(f"{self.cfg.seed}/sample/{server_round}").sample(ids, per_round)
        )

    def start_adapter(self, client_id: str) -> Adapter:
        state = self.state
        if self.method == "local":
            return state.client_adapters.get(client_id, state.global_adapter)
        if self.cfg.server.client_init == "task":
            return state.task_adapters.get(self.client_tasks[client_id], state.global_adapter)
        return state.global_adapter

    def configure_round(self, server_round: int) -> RoundPlan:
        return RoundPlan(
            server_round,
            {cid: self.start_adapter(cid) for cid in self.sample_clients(server_round)},
        )

    # -- aggregate -----------------------------------------------------------------
    def aggregate_round(
        self, plan: RoundPlan, updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Next global and task adapters from the replies; too few replies keep the old ones."""
        server = self.cfg.server
        current = self.state.global_adapter
        if len(updates) < server.min_clients:
            logger.warning(
                "round %d: %d replies < min_clients=%d; adapters unchanged",
                plan.server_round,
                len(updates),
                server.min_clients,
            )
            result = AggregationResult(current, {}, dict(self.state.task_adapters), {}, {}, [])
        elif self.method in TASK_ACCURACY_METHODS:
            settings = TaskAccuracySettings(server.t_acc, server.gamma, server.server_lr)
            result = task_accuracy_aggregate(current, updates, settings, server.robust_norm)
        else:
            result = fedavg_aggregate(current, updates, server.server_lr, server.robust_norm)
            if self.optimizer is not None and result.global_delta:
                result.global_adapter = self.optimizer.step(current, result.global_delta)
        if self.method == "local":
            for update in updates:
                start = plan.starts[update.client_id]
                self.state.client_adapters[update.client_id] = apply_delta(start, update.delta, 1.0)
            result.global_adapter = current
        self.state.global_adapter = result.global_adapter
        self.state.task_adapters.update(result.task_adapters)
        self.state.completed_rounds = plan.server_round
        return result

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_rounds": self.state.completed_rounds,
            "global_adapter": self.state.global_adapter,
            "task_adapters": self.state.task_adapters,
            "client_adapters": self.state.client_adapters,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = ServerState(
            state["completed_rounds"],
            state["global_adapter"],
            state["task_adapters"],
            state["client_adapters"],
        )
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
