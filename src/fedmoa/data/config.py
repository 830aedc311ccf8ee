"""Configuration of where training prompts come from."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from fedmoa.data.partition import PartitionConfig
from fedmoa.data.sources import SOURCES


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DataConfig:
    """Which rows to load and how to turn them into prompts.

    ``source`` picks a loader from ``fedmoa.data.sources.SOURCES``. ``size`` is the number of
    generated rows for ``reasoning_gym`` and the maximum number of rows read from a file or hub
    dataset (``None``: all of them). ``columns`` maps our column names to the file's
    (``{"question": "problem"}``). ``params`` are the reasoning-gym dataset's config kwargs (or a
    benchmark's options, e.g. MATH ``levels``). ``partition`` keeps one client's share of the
    loaded rows (``fedmoa.data.partition``). ``system_prompt`` None means unset (see
    ``fedmoa.data.prompts.question_system_prompt`` and ``as_messages``).
    """

    # loader: reasoning_gym, gsm8k, math, math500, mbpp, humaneval, jsonl, parquet or hub
    source: str = "reasoning_gym"
    # dataset name (reasoning-gym dataset, benchmark subset or hub id)
    name: str = "basic_arithmetic"
    path: str | None = None  # data file for jsonl and parquet, relative to the config file
    split: str = "train"  # dataset split to read (hub and benchmark sources)
    # rows generated (reasoning_gym) or the most rows read; none: all
    size: int | None = Field(default=256, ge=1)
    # the dataset's own options (reasoning-gym config, MATH levels, ...)
    params: dict[str, Any] = field(default_factory=dict)
    # our column name -> the file's, e.g. { question = "problem" }
    columns: dict[str, str] = field(default_factory=dict)
    # system message. Unset: "Solve the problem. Put the final answer in \boxed{}." (mbpp,
    # humaneval: a code instruction) before each plain-text question, while a "prompt" column of
    # messages is used as written, as TRL does; "": no system message at all; a text: this
    # system message before each question and each messages prompt that starts without one
    system_prompt: str | None = None
    seed: int = 0  # seed of generation and of the train/validation/test split
    # keep one client's share of the rows (iid, dirichlet, by_label)
    partition: PartitionConfig | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"unknown data source {value!r}; known: {', '.join(sorted(SOURCES))}")
        return value


@dataclass(config=ConfigDict(extra="forbid"))
class SplitConfig:
    """Fractions of a client's rows for train / validation / test (disjoint, seeded)."""

    train: float = Field(0.8, gt=0, le=1)  # fraction of the rows for training
    # fraction for validation (the accuracy a_k a client reports)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)  # fraction for test evaluation

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if not math.isclose(self.train + self.validation + self.test, 1.0, abs_tol=1e-6):
            raise ValueError("train + validation + test must sum to 1")
        return self
