"""The embedded engine: a sequential, in-process federation.

One base model stays in memory; each client's turn swaps its start adapter in,
so memory does not grow with the number of clients. Every round ends with a
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

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedmoa.aggregation import Adapter, AggregationResult, ClientUpdate
from fedmoa.aggregation.updates import apply_delta
from fedmoa.errors import ConfigError, FedMOAError, one_line
from fedmoa.federation.centralized import CENTRAL_ID, pooled_client
from fedmoa.federation.checkpoint import latest_checkpoint, save_checkpoint
from fedmoa.federation.client import (
    ClientData,
    adapter_state,
    client_reward_funcs,
    load_adapter,
    load_client_data,
    objective_metrics,
    run_client_round,
)
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.evaluation import (
    aggregate_evaluation,
    evaluate_client,
    evaluate_server_set,
    load_server_set,
)
from fedmoa.federation.server import FederatedServer, RoundPlan
from fedmoa.grpo.trainer import PhaseTimer
from fedmoa.models import attach_lora
from fedmoa.runs import RunDirectory, write_json_atomic
from fedmoa.train_local import lora_settings, seed_everything

logger = logging.getLogger(__name__)
RoundCallback = Callable[[int, list[dict[str, Any]]], None]
ClientCallback = Callable[[dict[str, Any]], None]


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


class EmbeddedFederation:
    """Runs ``cfg`` round by round into ``run``; resumable from the run's checkpoints."""

    def __init__(
        self, cfg: ExperimentConfig, run: RunDirectory, *, load_clients: bool = True
    ) -> None:
        """``load_clients = False``: the server half only (a Flower ServerApp), which never opens
        a client's data or imports its reward code; clients train and evaluate where they are."""
        if load_clients and not cfg.clients:
            raise ConfigError(
                "clients: the embedded engine runs the clients the experiment lists, and it lists "
                "none (server.num_clients is for a deployment's own client files)"
            )
        self.cfg = cfg
        self.run = run
        self.reward_funcs: dict[str, list[tuple[str, Any]]] = {}
        self.data: dict[str, ClientData] = {}
        if load_clients:
            for i, c in enumerate(cfg.clients):
                self.reward_funcs[c.id] = client_reward_funcs(c, i)
                self.data[c.id] = load_client_data(c, f"clients[{i}].data")
        self.clients = {c.id: c for c in cfg.clients}
        self.client_tasks = {c.id: c.task for c in cfg.clients}
        self.policy, self.tokenizer, initial = build_policy(cfg)
        self.initial = initial
        learners = None
        if cfg.server.method == "centralized":
            if not load_clients:
                raise FedMOAError("the centralized baseline runs on the embedded engine only")
            pooled, union, funcs = pooled_client(cfg, self.data, self.reward_funcs)
            self.clients[CENTRAL_ID], self.data[CENTRAL_ID] = pooled, union
            self.reward_funcs[CENTRAL_ID] = funcs
            learners = {CENTRAL_ID: pooled.task}
        self.server = FederatedServer(cfg, initial, learners)
        # the server's own held-out set: the server's data, so it loads here on every engine
        eval_data = cfg.server.eval_data
        self.server_set = load_server_set(eval_data) if eval_data is not None else None
        self.client_states: dict[str, dict[str, Any]] = {}

    def admit_clients(self, client_tasks: Mapping[str, str]) -> None:
        """The clients that joined a deployment (client id -> task), which its experiment may not
        list: the server learns them from the nodes (``fedmoa.federation.roster``)."""
        self.client_tasks = dict(client_tasks)
        self.server = FederatedServer(self.cfg, self.initial, self.client_tasks)

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

    def run_rounds(
        self, on_round: RoundCallback | None = None, on_client: ClientCallback | None = None
    ) -> dict[str, Any]:
        self.evaluate_round0()
        start = self.server.state.completed_rounds
        for server_round in range(start + 1, self.cfg.server.rounds + 1):
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

    def aggregate_replies(
        self, plan: RoundPlan, updates: list[ClientUpdate], records: list[dict[str, Any]]
    ) -> PendingRound:
        """The server half of a round up to evaluation, shared with the Flower ServerApp: only
        how the client replies (and, next, the evaluation scores) arrive differs."""
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
                "bytes_down": sum(r.get("bytes_down", 0) for r in records),
                "bytes_up": sum(r.get("bytes_up", 0) for r in records),
            }
        )
        every = cfg.server.eval_every
        evaluate = bool(every and server_round % every == 0) or server_round == cfg.server.rounds
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

    def evaluate_round0(self) -> None:
        """Score the starting adapter before round 1, logged as round 0 (``server.eval_round0``).

        The same rows, rewards and decoding as every later evaluation, so a run shows what
        training added to the untrained model.
        """
        if self.round0_due():
            self.log_round0(self.evaluate())

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
            )
            for client in self.cfg.clients
        }
        return aggregate_evaluation(scores, {c.id: c.task for c in self.cfg.clients})

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
        "bytes_down": bytes_down,
        "bytes_up": bytes_up,
        "seconds": seconds,
        **update.metrics,
        **objectives,
    }


def failed_client_record(server_round: int, client_id: str, reason: str) -> dict[str, Any]:
    """The record of a client whose round failed: it is left out of aggregation."""
    return {"type": "client", "round": server_round, "client": client_id, "failed": reason}
