"""Federated evaluation: each client scores adapters on its own test rows; the server combines.

A client's test split never leaves it: :func:`evaluate_client` runs where the data is (a
Flower ClientApp on an evaluate message, or the embedded loop for each client in turn) and
returns metrics only; :func:`aggregate_evaluation` turns every client's metrics into the
``eval`` record, the same on every engine.

Per client, up to three adapters (``EVAL_KINDS``): ``global``, its ``personal`` adapter (its
task adapter; its own for ``local``) and its ``local_model`` (what it trained in the round:
start adapter plus its own update). An adapter equal to one already scored is not scored
again, so a personalized adapter that is the global one costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmoa.aggregation import Adapter
from fedmoa.data import load_rows
from fedmoa.errors import DataError
from fedmoa.eval import EvalResult, evaluate_rows
from fedmoa.federation.client import ClientData, load_adapter
from fedmoa.federation.config import ClientConfig, ServerConfig, ServerEvalConfig
from fedmoa.rewards import RewardFunc
from fedmoa.train_local import build_reward_funcs

EVAL_KINDS = ("global", "personal", "local_model")


def evaluate_client(
    policy: Any,
    tokenizer: Any,
    client: ClientConfig,
    data: ClientData,
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    adapters: Mapping[str, Adapter],
    server: ServerConfig,
    checks: Sequence[tuple[str, RewardFunc]] = (),
) -> dict[str, float]:
    """``client``'s scores under each adapter in ``adapters`` (kind → adapter), and its test size.

    Keys: ``<kind>/<client id>/accuracy``, ``.../hypervolume``, ``.../rewards/<objective>``,
    ``.../checks/<check>`` and ``test_size/<client id>``; greedy decoding on the first
    ``server.test_prompts`` test rows.
    """
    rows = data.test[: server.test_prompts]
    max_new = server.eval_max_new_tokens or client.grpo.max_new_tokens
    out = {f"test_size/{client.id}": float(len(rows))}
    scored: list[tuple[Adapter, EvalResult]] = []
    for kind in EVAL_KINDS:
        adapter = adapters.get(kind)
        if adapter is None:
            continue
        result = next((r for a, r in scored if same_adapter(a, adapter)), None)
        if result is None:
            result = score_adapter(
                policy, tokenizer, client, adapter, rows, reward_funcs, max_new, checks
            )
            scored.append((adapter, result))
        out.update(result.metrics(f"{kind}/{client.id}"))
    return out


@dataclass
class ServerSet:
    """The server's own held-out set (``[server.eval_data]``), loaded on the server."""

    config: ServerEvalConfig
    rows: list[dict[str, Any]]
    reward_funcs: list[tuple[str, RewardFunc]]


def load_server_set(cfg: ServerEvalConfig) -> ServerSet:
    """Its first ``prompts`` rows and its reward functions; errors name ``server.eval_data``."""
    try:
        rows = load_rows(cfg.data)[: cfg.prompts]
    except DataError as err:
        raise DataError(f"server.eval_data.data: {err}") from err
    if not rows:
        raise DataError("server.eval_data.data: no rows")
    return ServerSet(cfg, rows, build_reward_funcs(cfg.rewards, field="server.eval_data.rewards"))


def evaluate_server_set(
    policy: Any, tokenizer: Any, server_set: ServerSet, adapters: Mapping[str, Adapter]
) -> dict[str, float]:
    """``server_eval/<kind>/accuracy``, ``.../hypervolume``, ``.../rewards/<objective>`` for each
    adapter (``global``, ``task``), and ``server_eval/test_size``."""
    cfg = server_set.config
    out = {"server_eval/test_size": float(len(server_set.rows))}
    for kind, adapter in adapters.items():
        result = score_adapter(
            policy,
            tokenizer,
            cfg,
            adapter,
            server_set.rows,
            server_set.reward_funcs,
            cfg.max_new_tokens,
        )
        out.update(result.metrics(f"server_eval/{kind}"))
    return out


def score_adapter(
    policy: Any,
    tokenizer: Any,
    client: ClientConfig | ServerEvalConfig,
    adapter: Adapter,
    rows: Sequence[dict[str, Any]],
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    max_new_tokens: int,
    checks: Sequence[tuple[str, RewardFunc]] = (),
) -> EvalResult:
    """Greedy pass@1 and reward means of ``adapter`` on ``rows`` with ``client``'s rewards (a
    client's, or the server set's), and the means of its ``checks``."""
    load_adapter(policy, adapter)
    return evaluate_rows(
        policy,
        tokenizer,
        list(rows),
        list(reward_funcs),
        client.primary_reward,
        max_new_tokens,
        checks=checks,
    )


def same_adapter(a: Adapter, b: Adapter) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


def aggregate_evaluation(
    scores: Mapping[str, Mapping[str, float]], client_tasks: Mapping[str, str]
) -> dict[str, float]:
    """The ``eval`` record from each client's :func:`evaluate_client` metrics.

    Per-client keys as the clients sent them; ``global/<task>/accuracy``: the task's clients
    weighted by test size; ``global/accuracy``: the mean over tasks (a task with more clients
    does not count more); ``personal/...`` and ``local_model/...`` accuracy and hypervolume:
    over clients, weighted by test size. Each check (``checks/<name>``) is combined as the
    accuracy is, over the clients that have it. A client that sent nothing is left out.
    """
    out: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for cid in client_tasks:
        if cid in scores:
            out.update(scores[cid])
            sizes[cid] = float(scores[cid].get(f"test_size/{cid}", 0.0))
    checks = sorted(
        {k.rsplit("/checks/", 1)[1] for k in out if k.startswith("global/") and "/checks/" in k}
    )
    for metric in ["accuracy", *(f"checks/{name}" for name in checks)]:
        per_task: dict[str, list[tuple[float, float]]] = {}
        for cid, task in client_tasks.items():
            if f"global/{cid}/{metric}" in out:
                per_task.setdefault(task, []).append((out[f"global/{cid}/{metric}"], sizes[cid]))
        for task, values in per_task.items():
            out[f"global/{task}/{metric}"] = weighted_mean(values)
        if per_task:
            out[f"global/{metric}"] = weighted_mean(
                [(out[f"global/{t}/{metric}"], 1.0) for t in per_task]
            )
    for prefix in ("personal", "local_model"):
        for metric in ["accuracy", "hypervolume", *(f"checks/{name}" for name in checks)]:
            ids = [cid for cid in client_tasks if f"{prefix}/{cid}/{metric}" in out]
            if ids:
                out[f"{prefix}/{metric}"] = weighted_mean(
                    [(out[f"{prefix}/{cid}/{metric}"], sizes[cid]) for cid in ids]
                )
    return out


def weighted_mean(values: Sequence[tuple[float, float]]) -> float:
    """Σ w·v / Σ w over the finite values with positive weight; NaN when there are none."""
    kept = [(v, w) for v, w in values if not math.isnan(v) and w > 0]
    total = sum(w for _, w in kept)
    return sum(v * w for v, w in kept) / total if total else math.nan
