"""Configuration of where training prompts come from."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from fedmoa.data.partition import PartitionConfig
from fedmoa.data.prompts import DEFAULT_SYSTEM_PROMPT
from fedmoa.data.sources import SOURCES


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class DataConfig:
    """Which rows to load and how to turn them into prompts.

    ``source`` picks a loader from ``fedmoa.data.sources.SOURCES``. ``size`` is the number of
    generated rows for ``reasoning_gym`` and the maximum number of rows read from a file or hub
    dataset (``None``: all of them). ``columns`` maps our column names to the file's
    (``{"question": "problem"}``). ``params`` are the reasoning-gym dataset's config kwargs (or a
    benchmark's options, e.g. MATH ``levels``). ``partition`` keeps one client's share of the
    loaded rows (``fedmoa.data.partition``).
    """

    source: str = "reasoning_gym"
    name: str = "basic_arithmetic"
    path: str | None = None
    split: str = "train"
    size: int | None = Field(default=256, ge=1)
    params: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    seed: int = 0
    partition: PartitionConfig | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"unknown data source {value!r}; known: {', '.join(sorted(SOURCES))}")
        return value
