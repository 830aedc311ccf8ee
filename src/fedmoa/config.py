"""TOML configs validated into dataclasses, with one-line errors naming the field path.

The algorithm code takes plain (pydantic) dataclasses; this module only parses
files and turns validation failures into ``ConfigError("file: a.b[2].c: why")``.
"""

from __future__ import annotations

import tomllib
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from fedmoa.data import DataConfig
from fedmoa.errors import ConfigError
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.models import DEFAULT_MODEL

STRICT = ConfigDict(extra="forbid")
T = TypeVar("T")


@dataclass(config=STRICT)
class ModelConfig:
    """Which base model, in which dtype, on which device."""

    name: str = DEFAULT_MODEL  # "smollm2-135m", a hub id, a local HF dir or a .gguf file
    dtype: str = "auto"
    device: str = "auto"  # CUDA when present, else CPU
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"


@dataclass(config=STRICT)
class LoraConfig:
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass(config=STRICT)
class RewardConfig:
    """One objective: a TRL-style reward function with a role and an initial weight."""

    name: str
    function: str  # built-in name, "module:function" or "path.py:function"
    role: Literal["primary", "auxiliary"] = "auxiliary"
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(config=STRICT)
class HypergradientConfig:
    """FedMOA's client weighting (fedmoa-algorithm.md, client step 6)."""

    eta: float = Field(1.0, gt=0, allow_inf_nan=False)  # η_hg
    w_min: float = Field(0.02, ge=0, lt=1)  # floor of every weight
    anchor: float = Field(0.0, ge=0, le=1)  # λ_anchor, pull toward the initial logits
    probe: Literal["last2", "all"] = "last2"  # LoRA B of the last 2 layers, or every LoRA tensor
    carry_across_rounds: bool = True


@dataclass(config=STRICT)
class WeightingConfig(HypergradientConfig):
    """``[weighting]`` of train-local: the method plus the hypergradient's settings."""

    method: Literal["static", "hypergradient"] = "static"


def check_rewards(rewards: list[RewardConfig]) -> list[RewardConfig]:
    """Exactly one primary objective, unique names, some positive weight."""
    if not rewards:
        raise ValueError("at least one reward is required")
    names = [r.name for r in rewards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"reward names must be unique, repeated: {', '.join(duplicates)}")
    primaries = [r.name for r in rewards if r.role == "primary"]
    if len(primaries) != 1:
        found = ", ".join(primaries) if primaries else "none"
        raise ValueError(f"exactly one reward must have role = 'primary' (found: {found})")
    if sum(r.weight for r in rewards) <= 0:
        raise ValueError("reward weights must not all be zero")
    return rewards


@dataclass(config=STRICT)
class TrainLocalConfig:
    """``fedmoa train-local``: one client, local GRPO."""

    rewards: list[RewardConfig]
    steps: int = Field(20, gt=0)
    seed: int = 0
    output_dir: str = "runs/train-local"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)

    @model_validator(mode="after")
    def _rewards_valid(self) -> TrainLocalConfig:
        check_rewards(self.rewards)
        return self

    @property
    def primary_reward(self) -> str:
        return next(r.name for r in self.rewards if r.role == "primary")


def format_validation_error(err: ValidationError) -> str:
    """First error as ``a.b[2].c: message`` (+ how many more), on one line."""
    first = err.errors()[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    location = f"{path}: " if path else ""
    return f"{location}{message}{extra}".replace("\n", " ")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None


def parse_config(data: dict[str, Any], schema: type[T], source: str = "config") -> T:
    try:
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err)}") from None


def load_config(path: str | Path, schema: type[T] = TrainLocalConfig) -> T:  # type: ignore[assignment]
    """Read and validate a TOML config; every failure is a one-line ``ConfigError``."""
    return parse_config(read_toml(path), schema, str(path))
