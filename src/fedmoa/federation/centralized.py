"""The ``centralized`` baseline: one learner on the union of every client's data.

Each client's objectives become objectives of the pooled learner, named
``<client>/<objective>``, that apply only to that client's rows (``None``
elsewhere), so every row is scored exactly as its owner would score it.
Weights are normalised per source client, so a row's advantage has the scale it
has on its own client. The learner runs ``Σ_k E_k`` steps per round with the
first client's GRPO settings: the same compute budget as the federation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from fedmoa.config import RewardConfig
from fedmoa.federation.client import ClientData
from fedmoa.federation.config import ClientConfig, ExperimentConfig
from fedmoa.rewards import RewardFunc

CENTRAL_ID = "centralized"
SOURCE_COLUMN = "source_client"


def only_for(client_id: str, func: RewardFunc) -> RewardFunc:
    """``func`` on the rows of ``client_id``; ``None`` (not applicable) on the others."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        sources = columns[SOURCE_COLUMN]
        rows = [i for i, s in enumerate(sources) if s == client_id]
        out: list[float | None] = [None] * len(completions)
        if rows:
            subset = {k: [v[i] for i in rows] for k, v in columns.items()}
            values = func([prompts[i] for i in rows], [completions[i] for i in rows], **subset)
            for i, value in zip(rows, values, strict=True):
                out[i] = value
        return out

    reward.__name__ = f"{client_id}/{getattr(func, '__name__', 'reward')}"
    return reward


def _tagged(rows: Sequence[dict[str, Any]], client_id: str) -> list[dict[str, Any]]:
    return [{**row, SOURCE_COLUMN: client_id} for row in rows]


def pooled_client(
    cfg: ExperimentConfig,
    data: dict[str, ClientData],
    reward_funcs: dict[str, list[tuple[str, RewardFunc]]],
) -> tuple[ClientConfig, ClientData, list[tuple[str, RewardFunc]]]:
    """The single learner's config, data and objectives."""
    first = cfg.clients[0]
    rewards: list[RewardConfig] = []
    funcs: list[tuple[str, RewardFunc]] = []
    for client in cfg.clients:
        total = sum(r.weight for r in client.rewards)
        for reward, (name, func) in zip(client.rewards, reward_funcs[client.id], strict=True):
            pooled_name = f"{client.id}/{name}"
            role = "primary" if client is first and reward.role == "primary" else "auxiliary"
            rewards.append(
                dataclasses.replace(
                    reward, name=pooled_name, role=role, weight=reward.weight / total
                )
            )
            funcs.append((pooled_name, only_for(client.id, func)))
    pooled = ClientConfig(
        id=CENTRAL_ID,
        task="all",
        rewards=rewards,
        data=first.data,
        split=first.split,
        local_steps=sum(c.local_steps for c in cfg.clients),
        grpo=first.grpo,
    )
    union = ClientData(
        train=[r for c in cfg.clients for r in _tagged(data[c.id].train, c.id)],
        validation=[r for c in cfg.clients for r in _tagged(data[c.id].validation, c.id)],
        test=[],
    )
    return pooled, union, funcs
