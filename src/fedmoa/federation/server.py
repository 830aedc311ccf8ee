"""The server side of every method, split like a Flower strategy: ``configure`` / ``aggregate``.

``FederatedServer`` decides which clients train in a round and from which adapter
they start (``configure_round``), and turns their replies into the next global
and task adapters (``aggregate_round``) with the pure functions of
``fedmoa.aggregation``. The embedded loop and the Flower ServerApp both drive it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmoa.aggregation import (
    AccuracyEvidence,
    Adapter,
    AggregationResult,
    ClientUpdate,
    GainEvidence,
    TaskAccuracySettings,
    accumulate_evidence,
    accumulate_gain_evidence,
    fedavg_aggregate,
    make_server_optimizer,
    server_optimizer_aggregate,
    task_accuracy_aggregate,
)
from fedmoa.aggregation.updates import apply_delta, group_by_task, sanitize
from fedmoa.errors import FedMOAError
from fedmoa.federation.client import REQUIRED_METRICS, stable_seed, through_transport
from fedmoa.federation.config import (
    SERVER_OPTIMIZER_METHODS,
    TASK_ACCURACY_METHODS,
    ExperimentConfig,
    ServerConfig,
)
from fedmoa.privacy import (
    PrivacyAccountant,
    add_gaussian_noise,
    clip_update,
    resolve_noise_multiplier,
    sensitivity,
)

logger = logging.getLogger(__name__)
# Aggregates a client's update enters each round under central DP: the global one and its task's.
RELEASES_PER_ROUND = 2


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
    # each client's validation record, for the noise-aware (or, paired, the gain) weights
    accuracy_evidence: dict[str, AccuracyEvidence] = field(default_factory=dict)
    gain_evidence: dict[str, GainEvidence] = field(default_factory=dict)


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
        self.accountant = central_accountant(cfg, len(self.client_tasks))

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
        """The sampled clients' start adapters as they arrive (``server.transport_dtype``)."""
        sent: dict[int, Adapter] = {}  # one copy per distinct start adapter
        starts = {}
        for cid in self.sample_clients(server_round):
            start = self.start_adapter(cid)
            if id(start) not in sent:
                sent[id(start)] = through_transport(start, self.cfg.server.transport_dtype)
            starts[cid] = sent[id(start)]
        return RoundPlan(server_round, starts)

    # -- aggregate -----------------------------------------------------------------
    def aggregate_round(
        self, plan: RoundPlan, updates: Sequence[ClientUpdate]
    ) -> AggregationResult:
        """Next global and task adapters from the replies.

        Updates are sanitised first (``sanitize``: tensors, accuracy (a rate in [0, 1] under
        the methods that weigh by it, any finite number otherwise), the metrics of
        :data:`REQUIRED_METRICS`, ``robust_norm``); each rejection is logged with the
        client id and returned in ``result.rejected``. With fewer usable updates than
        ``server.min_clients`` (capped at the number of learners sampled) the round
        fails with a ``FedMOAError`` before anything changes, so the last checkpoint
        stays the state to resume from.
        """
        server = self.cfg.server
        current = self.state.global_adapter
        accepted, rejected = sanitize(
            updates,
            current,
            server.robust_norm,
            REQUIRED_METRICS,
            rate_accuracy=self.method in TASK_ACCURACY_METHODS,
        )
        privacy = self.cfg.privacy
        if self.accountant is not None and privacy is not None:
            # central DP: a client's clip is not taken on trust
            accepted = [
                dataclasses.replace(u, delta=clip_update(u.delta, privacy.clip)[0])
                for u in accepted
            ]
        needed = min(server.min_clients, len(plan.starts))
        if len(accepted) < needed:
            dropped = len(plan.starts) - len(updates)
            raise FedMOAError(
                f"round {plan.server_round}: {len(accepted)} usable client update(s) of "
                f"{len(plan.starts)} sampled, fewer than server.min_clients = {needed} "
                f"({dropped} failed, {len(rejected)} rejected: "
                + ("; ".join(f"{r.client_id!r}: {r.reason}" for r in rejected) or "see the log")
                + f"); nothing was aggregated, the adapters stay as after round "
                f"{self.state.completed_rounds}"
            )
        # Already sanitised (robust_norm included: a second pass would use another median).
        if self.method == "local":  # every learner keeps its own adapter; nothing is averaged
            for update in accepted:
                start = plan.starts[update.client_id]
                self.state.client_adapters[update.client_id] = apply_delta(start, update.delta, 1.0)
            result = AggregationResult(
                global_adapter=current,
                global_delta={},
                task_adapters={},
                client_weights={},
                task_shares={},
                rejected=[],
            )
        elif self.method in TASK_ACCURACY_METHODS:
            settings = task_accuracy_settings(server, private=self.accountant is not None)
            if settings.rule == "gain":
                gains = accumulate_gain_evidence(
                    self.state.gain_evidence, accepted, settings.memory
                )
                result = task_accuracy_aggregate(current, accepted, settings, evidence=gains)
                self.state.gain_evidence = gains
            else:
                evidence = accumulate_evidence(
                    self.state.accuracy_evidence, accepted, settings.memory
                )
                result = task_accuracy_aggregate(current, accepted, settings, evidence=evidence)
                self.state.accuracy_evidence = evidence
        elif self.optimizer is not None:
            result = server_optimizer_aggregate(current, accepted, self.optimizer, server.server_lr)
        else:
            result = fedavg_aggregate(current, accepted, server.server_lr)
        if self.accountant is not None:
            result = self.add_privacy_noise(current, result, accepted, plan.server_round)
        result.rejected = rejected + result.rejected
        self.state.global_adapter = result.global_adapter
        self.state.task_adapters.update(result.task_adapters)
        self.state.completed_rounds = plan.server_round
        return result

    # -- privacy -------------------------------------------------------------------------
    def add_privacy_noise(
        self,
        current: Adapter,
        result: AggregationResult,
        accepted: Sequence[ClientUpdate],
        server_round: int,
    ) -> AggregationResult:
        """Central DP: Gaussian noise on the global update and on every task adapter, each
        with std ``z·2·w_max·C`` for the largest weight one client can carry in it (docs/design.md,
        "Differential privacy"), drawn from the server's seeded generator; then one accountant
        step."""
        privacy, accountant = self.cfg.privacy, self.accountant
        assert privacy is not None and accountant is not None
        global_weight, task_weights = max_client_weights(
            accepted, result.task_shares, self.method, self.cfg.server.max_client_share
        )
        z, lr = accountant.noise_multiplier, self.cfg.server.server_lr
        generator = torch.Generator().manual_seed(
            stable_seed(self.cfg.seed, "privacy", server_round)
        )
        stds = {"global": z * sensitivity(global_weight, privacy.clip)}
        global_delta = add_gaussian_noise(result.global_delta, stds["global"], generator)
        task_adapters = {}
        for task in sorted(result.task_adapters):
            stds[task] = z * sensitivity(task_weights[task], privacy.clip)
            task_adapters[task] = add_gaussian_noise(
                result.task_adapters[task], lr * stds[task], generator
            )
        accountant.step()
        metrics = {f"privacy/noise_std/{name}": std for name, std in stds.items()}
        metrics["privacy/epsilon"] = accountant.epsilon(privacy.delta)
        return dataclasses.replace(
            result,
            global_adapter=apply_delta(current, global_delta, lr),
            global_delta=global_delta,
            task_adapters=task_adapters,
            metrics={**result.metrics, **metrics},
        )

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_rounds": self.state.completed_rounds,
            "global_adapter": self.state.global_adapter,
            "task_adapters": self.state.task_adapters,
            "client_adapters": self.state.client_adapters,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "accuracy_evidence": {
                cid: [e.successes, e.trials] for cid, e in self.state.accuracy_evidence.items()
            },
            "privacy": self.accountant.state_dict() if self.accountant else None,
            "gain_evidence": {
                cid: [[row, *sums] for row, sums in e.rows.items()]
                for cid, e in self.state.gain_evidence.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = ServerState(
            state["completed_rounds"],
            state["global_adapter"],
            state["task_adapters"],
            state["client_adapters"],
            {  # absent from checkpoints written before the noise-aware rule
                cid: AccuracyEvidence(*record)
                for cid, record in state.get("accuracy_evidence", {}).items()
            },
            {  # absent from checkpoints written before the gain rule
                cid: GainEvidence({int(row): (d, c, w) for row, d, c, w in rows})
                for cid, rows in state.get("gain_evidence", {}).items()
            },
        )
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.accountant is not None and state.get("privacy"):
            self.accountant.load_state_dict(state["privacy"])


def central_accountant(cfg: ExperimentConfig, num_clients: int) -> PrivacyAccountant | None:
    """The accountant of central DP (``[privacy] where = "server"``); None otherwise.

    A client is sampled with probability ``clients_per_round / clients`` and its update enters
    two released aggregates a round (the global one and its task's).
    """
    privacy = cfg.privacy
    if privacy is None or privacy.where != "server" or not num_clients:
        return None  # (a deployment's server is rebuilt once its clients have joined)
    per_round = min(cfg.server.clients_per_round or num_clients, num_clients)
    rate = per_round / num_clients
    z = resolve_noise_multiplier(
        privacy.noise_multiplier,
        privacy.target_epsilon,
        privacy.delta,
        sample_rate=rate,
        rounds=cfg.server.rounds,
        releases=RELEASES_PER_ROUND,
        kind=privacy.accountant,
    )
    return PrivacyAccountant(privacy.accountant, z, rate, RELEASES_PER_ROUND)


def max_client_weights(
    accepted: Sequence[ClientUpdate],
    task_shares: dict[str, float],
    method: str,
    max_client_share: float,
) -> tuple[float, dict[str, float]]:
    """The largest weight one client can carry in the global update and in each task adapter.

    By samples (FedAvg and its kin): ``max n_k / Σ n`` over the aggregate's clients, with
    ``n_k`` from their configs. Accuracy-aware: at most the cap ``max(c, 1/K_τ)`` within a task,
    times its share ``π_τ`` in the global update, whatever the clients report.
    """
    groups = group_by_task(accepted)
    if method in TASK_ACCURACY_METHODS:
        tasks = {t: max(max_client_share, 1.0 / len(m)) for t, m in groups.items()}
        return max(task_shares[t] * w for t, w in tasks.items()), tasks
    total = sum(u.num_examples for u in accepted)
    tasks = {
        t: max(u.num_examples for u in m) / sum(u.num_examples for u in m)
        for t, m in groups.items()
    }
    return max(u.num_examples for u in accepted) / total, tasks


def task_accuracy_settings(server: ServerConfig, private: bool = False) -> TaskAccuracySettings:
    """The ``[server]`` keys of the task- and accuracy-aware aggregation; ``private``: under
    central client-level DP (``[privacy] where = "server"``)."""
    return TaskAccuracySettings(
        t_acc=server.t_acc,
        gamma=server.gamma,
        server_lr=server.server_lr,
        rule=server.accuracy_rule,
        noise_scale=server.accuracy_noise_scale,
        memory=server.accuracy_memory,
        max_client_share=server.max_client_share,
        # client-level DP: no client's report may move another's weight ratios
        worst_case_prompts=server.validation_prompts if private else 0,
        harm_z=server.accuracy_harm_z,
        harm_evidence=server.accuracy_harm_evidence,
    )
