"""``fedmoa train-local``: build one client's trainer from a config and run it."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedmoa.config import CheckConfig, RewardConfig, TrainLocalConfig
from fedmoa.data import load_rows
from fedmoa.errors import ConfigError, DataError, RewardError
from fedmoa.grpo.trainer import LocalTrainer
from fedmoa.models import LoraSettings, attach_lora
from fedmoa.rewards import RewardFunc, load_reward_function
from fedmoa.rewards.base import with_policy
from fedmoa.runs import RunDirectory
from fedmoa.weighting import build_weighting


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_reward_funcs(
    rewards: Sequence[RewardConfig | CheckConfig], field: str = "rewards"
) -> list[tuple[str, RewardFunc]]:
    """Load every objective's function under its failure policy (``on_error``, ``timeout``);
    a bad spec, or a function that cannot take TRL's reward call, names its config field.

    Every engine (embedded, Flower, node files, centralized, eval, train-local) loads its rewards
    here, so a ``factory`` entry is called when its rewards load, before any training."""
    funcs = []
    for i, reward in enumerate(rewards):
        try:
            func = load_reward_function(
                reward.function, reward.params, factory=reward.factory, name=reward.name
            )
        except RewardError as err:
            raise ConfigError(f"{field}[{i}].function: {err}") from None
        funcs.append((reward.name, with_policy(reward.name, func, reward.on_error, reward.timeout)))
    return funcs


def lora_settings(cfg: TrainLocalConfig) -> LoraSettings:
    lora = cfg.lora
    return LoraSettings(
        r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules)
    )


def build_local_trainer(cfg: TrainLocalConfig) -> LocalTrainer:
    """Everything a client needs, from the config; user errors surface as ``FedMOAError``."""
    reward_funcs = build_reward_funcs(cfg.rewards)  # fail fast, before the model loads
    try:
        rows = load_rows(cfg.data)
    except DataError as err:
        raise DataError(f"data: {err}") from err
    seed_everything(cfg.seed)
    model, tokenizer = cfg.model.load()
    policy = attach_lora(model, lora_settings(cfg))
    weighting = build_weighting(
        cfg.weighting,
        [r.name for r in cfg.rewards],
        cfg.primary_reward,
        [r.weight for r in cfg.rewards],
        policy,
    )
    return LocalTrainer(policy, tokenizer, rows, reward_funcs, weighting, cfg.grpo, seed=cfg.seed)


def start_run(
    cfg: TrainLocalConfig, config_path: str | Path, output_dir: str | Path
) -> RunDirectory:
    run = RunDirectory(output_dir)
    run.save_config(config_path, dataclasses.asdict(cfg))
    return run


def train_into(
    trainer: LocalTrainer,
    run: RunDirectory,
    steps: int,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> None:
    """Train, logging each step to ``metrics.jsonl`` as it ends, then save the adapter."""

    def record(metrics: dict[str, Any]) -> None:
        run.log(metrics)
        if on_step is not None:
            on_step(metrics)

    trainer.train(steps, record)
    run.save_adapter(trainer.policy)


def run_train_local(
    cfg: TrainLocalConfig,
    config_path: str | Path,
    output_dir: str | Path,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> RunDirectory:
    """Train and write the run directory: config, ``metrics.jsonl``, ``adapter/``."""
    trainer = build_local_trainer(cfg)
    run = start_run(cfg, config_path, output_dir)
    train_into(trainer, run, cfg.steps, on_step)
    return run
