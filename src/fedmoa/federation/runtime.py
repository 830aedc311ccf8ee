"""The server's run-time: one federated run, whichever engine carries its messages.

A round is planned (``FederatedServer.configure_round``), its clients' replies are
aggregated (:meth:`ServerRuntime.aggregate_replies`), scored on evaluation rounds, logged
to ``metrics.jsonl`` and checkpointed (:meth:`ServerRuntime.finish_round`); the last
round's adapters are saved in PEFT format (:meth:`ServerRuntime.finish`). Round 0 scores
the untrained adapter; :meth:`ServerRuntime.resume` restarts after the last checkpointed
round.

Two engines drive it: the embedded engine (``fedmoa.federation.embedded``) calls its
clients in-process, the Flower ServerApp (``fedmoa.federation.flower``) by messages. The
run-time never opens a client's data or imports its reward code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmoa.aggregation import Adapter, AggregationResult, ClientUpdate
from fedmoa.aggregation.updates import apply_delta
from fedmoa.errors import FedMOAError
from fedmoa.federation.checkpoint import latest_checkpoint, save_checkpoint
from fedmoa.federation.client import adapter_state, load_adapter
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.evaluation import evaluate_server_set, load_server_set
from fedmoa.federation.server import FederatedServer, RoundPlan
from fedmoa.grpo.trainer import PhaseTimer
from fedmoa.models import attach_lora
from fedmoa.runs import RunDirectory, write_json_atomic
from fedmoa.train_local import lora_settings, seed_everything

logger = logging.getLogger(__name__)


def build_policy(cfg: ExperimentConfig) -> tuple[Any, Any, Adapter]:
    """Base model + LoRA initialised from the seed; the same on every engine."""
    model, tokenizer = cfg.model.load()
    seed_everything(cfg.seed)
    policy = attach_lora(model, lora_settings(cfg))
    return policy, tokenizer, adapter_state(policy)


@dataclasses.dataclass
class PendingRound:
    """A round aggregated but not yet evaluated, logged or checkpointed."""

    server_round: int
    records: list[dict[str, Any]]
    timer: PhaseTimer
    evaluate: bool  # an evaluation round (server.eval_every, and the last round)
    local_models: dict[str, Adapter]  # each client's trained adapter, when they are scored


class ServerRuntime:
    """The server half of a run of ``cfg`` into ``run``; resumable from the run's checkpoints.

    ``learners``: who trains (client id -> task) when the experiment's list is not the answer
    (the centralized baseline's pooled client); a deployment's joined clients come later,
    through :meth:`admit_clients`.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run: RunDirectory,
        learners: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.client_tasks = {c.id: c.task for c in cfg.clients}
        self.policy, self.tokenizer, initial = build_policy(cfg)
        self.initial = initial
        self.server = FederatedServer(cfg, initial, learners)
        # the server's own held-out set: the server's data, so it loads here on every engine
        eval_data = cfg.server.eval_data
        self.server_set = load_server_set(eval_data) if eval_data is not None else None
        # each client's weighting and sampler state, when the engine keeps it on the server
        self.client_states: dict[str, dict[str, Any]] = {}

    @functools.cached_property
    def rounds_to_run(self) -> int:
        """``server.rounds``, or fewer where ``[privacy] max_epsilon`` runs out first: the run
        stops after the last round within the budget, its checkpoint and adapters intact."""
        rounds, privacy, accountant = (
            self.cfg.server.rounds,
            self.cfg.privacy,
            self.server.accountant,
        )
        if privacy is None or privacy.max_epsilon is None or accountant is None:
            return rounds
        within = accountant.rounds_within(privacy.max_epsilon, privacy.delta, rounds)
        if within < rounds:
            logger.warning(
                "privacy: max_epsilon = %g at delta = %g allows %d of %d rounds; the run stops "
                "after round %d",
                privacy.max_epsilon,
                privacy.delta,
                within,
                rounds,
                within,
            )
        return within

    def admit_clients(self, client_tasks: Mapping[str, str]) -> None:
        """The clients that joined a deployment (client id -> task), which its experiment may not
        list: the server learns them from the nodes (``fedmoa.federation.flower.roster``)."""
        self.client_tasks = dict(client_tasks)
        self.server = FederatedServer(self.cfg, self.initial, self.client_tasks)
        self.__dict__.pop("rounds_to_run", None)  # the sampling rate may have changed

    @property
    def checkpoint_dir(self) -> Path:
        return self.run.path / "checkpoints"

    def resume(self) -> int:
        """Restore the last completed round; returns it (0 when starting fresh)."""
        state = latest_checkpoint(self.checkpoint_dir)
        if state is None:  # keep round 0's evaluation, forget a crashed round 1
            self.run.drop_records_after(0)
            return 0
        for skipped in state["skipped"]:
            logger.warning(
                "checkpoint %s is unreadable (truncated or corrupt); resuming from round %d",
                skipped,
                state["completed_round"],
            )
        self.server.load_state_dict(state["server"])
        self.client_states = state["clients"]
        self.run.drop_records_after(state["completed_round"])
        return state["completed_round"]

    def aggregate_replies(
        self, plan: RoundPlan, updates: list[ClientUpdate], records: list[dict[str, Any]]
    ) -> PendingRound:
        """The replies of a round, aggregated and recorded; what is left is its evaluation (on
        evaluation rounds) and :meth:`finish_round`."""
        cfg, server_round = self.cfg, plan.server_round
        records = list(records)
        timer = PhaseTimer()
        try:
            with timer.phase("aggregate"):
                aggregated = self.server.aggregate_round(plan, updates)
        except FedMOAError:  # too few usable updates: keep the client records, then stop
            for record in records:
                self.run.log(record)
            raise
        records.append(
            {
                "type": "round",
                "round": server_round,
                "replies": len(updates),
                "rejected": [dataclasses.asdict(r) for r in aggregated.rejected],
                "client_weights": aggregated.client_weights,
                "task_shares": aggregated.task_shares,
                **aggregated.metrics,
                "bytes_down": sum(r.get("bytes_down", 0) for r in records),
                "bytes_up": sum(r.get("bytes_up", 0) for r in records),
            }
        )
        every = cfg.server.eval_every
        last = server_round == cfg.server.rounds or server_round == self.rounds_to_run
        evaluate = bool(every and server_round % every == 0) or last
        local = (
            self.local_models(plan, updates, aggregated)
            if evaluate and cfg.server.eval_local_models
            else {}
        )
        return PendingRound(server_round, records, timer, evaluate, local)

    def finish_round(
        self, pending: PendingRound, metrics: Mapping[str, float] | None
    ) -> list[dict[str, Any]]:
        """Add the evaluation (if any), log every record, then checkpoint the round."""
        records, timer, server_round = pending.records, pending.timer, pending.server_round
        if metrics is not None:
            if self.server_set is not None:
                with timer.phase("evaluate_server_set"):
                    metrics = {**metrics, **self.evaluate_server_set()}
            records.append({"type": "eval", "round": server_round, **metrics})
        round_record = next(r for r in records if r["type"] == "round")
        round_record.update({f"timing/{k}": v for k, v in timer.seconds.items()})
        for record in records:  # logged before the checkpoint: resume drops what has none
            self.run.log(record)
        with timer.phase("checkpoint"):
            save_checkpoint(
                self.checkpoint_dir,
                server_round,
                {"server": self.server.state_dict(), "clients": self.client_states},
            )
        self.run.log(
            {
                "type": "timing",
                "round": server_round,
                "timing/checkpoint": timer.seconds["checkpoint"],
            }
        )
        return records

    def round0_due(self) -> bool:
        """On, nothing trained yet, and not already logged by a run that was then resumed."""
        if not self.cfg.server.eval_round0 or self.server.state.completed_rounds:
            return False
        return not any(
            r.get("type") == "eval" and r.get("round") == 0 for r in self.run.read_metrics()
        )

    def log_round0(self, metrics: Mapping[str, float]) -> None:
        self.run.log({"type": "eval", "round": 0, **metrics, **self.evaluate_server_set()})

    def evaluate_server_set(self) -> dict[str, float]:
        """``[server.eval_data]``: the global adapter (and its task's, when set) on the server's
        own set, on the server; nothing when the table is absent."""
        if self.server_set is None:
            return {}
        state = self.server.state
        adapters = {"global": state.global_adapter}
        task = self.server_set.config.task
        if task is not None:
            adapters["task"] = state.task_adapters.get(task, state.global_adapter)
        return evaluate_server_set(self.policy, self.tokenizer, self.server_set, adapters)

    def eval_adapters(
        self, client_id: str, local_models: Mapping[str, Adapter] | None = None
    ) -> dict[str, Adapter]:
        """What ``client_id`` scores: the global adapter, its personalized adapter (its task
        adapter; its own for ``local``; the global one before any exists) and its local model."""
        state = self.server.state
        task = self.client_tasks[client_id]
        personal = state.client_adapters.get(client_id) or state.task_adapters.get(task)
        adapters = {"global": state.global_adapter, "personal": personal or state.global_adapter}
        local = (local_models or {}).get(client_id)
        if local is not None:
            adapters["local_model"] = local
        return adapters

    def local_models(
        self, plan: RoundPlan, updates: list[ClientUpdate], aggregated: AggregationResult
    ) -> dict[str, Adapter]:
        """Each accepted client's adapter after its local training this round: its start adapter
        plus its own update (for ``local``, the very adapter the server keeps for it)."""
        rejected = {r.client_id for r in aggregated.rejected}
        accepted = [u for u in updates if u.client_id not in rejected]
        if self.cfg.server.method == "local":
            return {u.client_id: self.server.state.client_adapters[u.client_id] for u in accepted}
        return {u.client_id: apply_delta(plan.starts[u.client_id], u.delta, 1.0) for u in accepted}

    def finish(self) -> dict[str, Any]:
        """Save the final adapters in PEFT format and write ``summary.json``."""
        state = self.server.state
        final = {
            "global": state.global_adapter,
            **{f"task-{task}": a for task, a in state.task_adapters.items()},
            **{f"client-{cid}": a for cid, a in state.client_adapters.items()},  # "local"
        }
        for name, adapter in final.items():
            load_adapter(self.policy, adapter)
            self.run.save_adapter(self.policy, f"adapters/{name}")
        records = self.run.read_metrics()
        evals = [r for r in records if r.get("type") == "eval"]
        rounds = [r for r in records if r.get("type") == "round"]
        summary = {
            "method": self.cfg.server.method,
            "rounds": state.completed_rounds,
            "final_eval": evals[-1] if evals else None,
            # the starting adapter (server.eval_round0), for base -> final
            "base_eval": next((r for r in evals if r["round"] == 0), None),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
        }
        if self.cfg.privacy is not None and rounds and "privacy/epsilon" in rounds[-1]:
            # ε at δ after the last round (central DP)
            summary["privacy"] = {
                "epsilon": rounds[-1]["privacy/epsilon"],
                "delta": self.cfg.privacy.delta,
                "max_epsilon": self.cfg.privacy.max_epsilon,
                "planned_rounds": self.cfg.server.rounds,
            }
        write_json_atomic(self.run.path / "summary.json", summary)
        return summary


def client_record(
    server_round: int,
    update: ClientUpdate,
    objectives: Mapping[str, float],
    *,
    bytes_down: int,
    bytes_up: int,
    seconds: float,
) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of one client's reply; the same on every engine."""
    return {
        "type": "client",
        "round": server_round,
        "client": update.client_id,
        "task": update.task,
        "accuracy": update.accuracy,
        "validation_size": update.validation_size,
        **paired_summary(update),
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
        "seconds": seconds,
        **update.metrics,
        **objectives,
    }


def paired_summary(update: ClientUpdate) -> dict[str, Any]:
    """Under the gain rule, the start adapter's accuracy and the update's mean paired gain."""
    pairs = update.validation_pairs
    if not pairs:
        return {}
    return {
        "accuracy_before": sum(b for _, b, _ in pairs) / len(pairs),
        "accuracy_gain": sum(a - b for _, b, a in pairs) / len(pairs),
        "validation_pairs": len(pairs),
    }


def failed_client_record(server_round: int, client_id: str, reason: str) -> dict[str, Any]:
    """The record of a client whose round failed: it is left out of aggregation."""
    return {"type": "client", "round": server_round, "client": client_id, "failed": reason}
