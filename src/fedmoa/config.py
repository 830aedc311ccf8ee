"""TOML configs validated into dataclasses, with one-line errors naming the field path.

The algorithm code takes plain (pydantic) dataclasses; this module only parses
files and turns validation failures into ``ConfigError("file: a.b[2].c: why")``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from fedmoa.data import DataConfig
from fedmoa.errors import ConfigError, ModelLoadError
from fedmoa.grpo.decode import set_decode
from fedmoa.grpo.trainer import GRPOSettings
from fedmoa.models import (
    DEFAULT_MODEL,
    default_cache_dir,
    load_model_and_tokenizer,
    resolve_dtype,
)
from fedmoa.weighting.config import WeightingConfig, resolve_method, unread_keys

STRICT = ConfigDict(extra="forbid")
T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass(config=STRICT)
class ModelConfig:
    """Which base model, in which dtype, on which device."""

    name: str = DEFAULT_MODEL  # "smollm2-135m", a hub id, a local HF dir or a .gguf file
    # "auto" (bf16 where the hardware runs it natively, else fp32), "bf16", "fp16", "fp32"
    dtype: str = "auto"
    device: str = "auto"  # CUDA when present, else CPU
    # attention kernel; auto: FlashAttention-2 on CUDA when installed, else SDPA
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # Expected sha256 of a .gguf ``name``: models repackaged by third parties load only when
    # they are the file you meant.
    sha256: str | None = None
    # How sampling and greedy evaluation run decode steps: "compiled" (static KV cache and
    # torch.compile, LoRA live in the graph), "eager", or "auto": what measured faster, i.e.
    # compiled on CUDA, eager on CPU (docs/performance.md). A failed compile falls back to eager.
    decode: Literal["auto", "compiled", "eager"] = "auto"

    def load(self) -> tuple[Any, Any]:
        """The model and tokenizer this section describes (``fedmoa.models`` does the work)."""
        model, tokenizer = load_model_and_tokenizer(
            self.name,
            dtype=self.dtype,
            device=self.device,
            attention=self.attention,
            sha256=self.sha256,
        )
        set_decode(model, self.decode, cache_dir=default_cache_dir())
        return model, tokenizer

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"expected 64 hex digits, got {value!r}")
        return value.lower() if value is not None else None

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value != "auto":
            try:
                resolve_dtype(value)
            except ModelLoadError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("device")
    @classmethod
    def _parsable_device(cls, value: str) -> str:
        """Only the spelling is checked here: a config may be written for another machine, so
        whether the device exists is checked when the model loads."""
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"invalid device {value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
                ) from None
        return value


@dataclass(config=STRICT)
class LoraConfig:
    r: int = Field(8, gt=0)  # LoRA rank
    alpha: int = Field(16, gt=0)  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA input during training
    target_modules: list[str] = field(  # names of the linear layers that get an adapter
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass(config=STRICT)
class RewardConfig:
    """One objective: a TRL-style reward function with a role and an initial weight.

    ``on_error`` is what a failing call does (see ``fedmoa.rewards.base.compute_rewards``):
    ``"raise"`` stops the run with a ``RewardError`` naming the function and sample; ``"none"``
    scores the failed call (or just the bad samples) None, "not applicable", logs a warning and
    goes on. ``timeout``: seconds one call may take (None: no limit); a call past it counts as
    failed. The call then runs in a worker thread that cannot be killed, so a function that
    truly hangs keeps its thread until the process ends.
    """

    name: str  # objective name, unique within the client
    function: str  # built-in name, "module:function" or "path.py:function"
    # primary (correctness, exactly one) or auxiliary
    role: Literal["primary", "auxiliary"] = "auxiliary"
    # initial (static: fixed) weight, normalised over the client's objectives
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    # keyword arguments bound to the reward function (with factory = true: passed to the factory)
    params: dict[str, Any] = field(default_factory=dict)
    # function is a factory (e.g. trl.rewards:get_soft_overlong_punishment): it is called once
    # with params when rewards load, and the callable it returns is the reward function
    factory: bool = False
    # a failing call stops the run (raise) or scores None and goes on (none)
    on_error: Literal["raise", "none"] = "raise"
    # seconds one call may take; none: no limit
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)


@dataclass(config=STRICT)
class CheckConfig:
    """An evaluation-only score: a TRL-style reward function that is never trained on.

    Scored beside the objectives on every evaluation's test rows and reported as
    ``<kind>/<client>/checks/<name>`` (and aggregated like accuracy), so that a verifier's
    accuracy can be read next to an independent check of the same completions.
    """

    name: str  # check name, unique within the client and apart from its objectives' names
    function: str  # built-in name, "module:function" or "path.py:function"
    # keyword arguments bound to the function (with factory = true: passed to the factory)
    params: dict[str, Any] = field(default_factory=dict)
    factory: bool = False  # function is a factory that returns the check function
    # a failing call stops the run (raise) or scores None and goes on (none)
    on_error: Literal["raise", "none"] = "raise"
    # seconds one call may take; none: no limit
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False)


def check_unique(values: list[str], what: str) -> None:
    """A one-line ``ValueError`` naming the repeated values, if any."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} must be unique, repeated: {', '.join(repeated)}")


def check_rewards(rewards: list[RewardConfig]) -> list[RewardConfig]:
    """Exactly one primary objective, unique names, some positive weight."""
    if not rewards:
        raise ValueError("at least one reward is required")
    check_unique([r.name for r in rewards], "reward names")
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

    rewards: list[RewardConfig]  # the objectives, as a client's
    steps: int = Field(20, gt=0)  # GRPO steps
    seed: int = 0  # seeds LoRA init, data split and sampling
    output_dir: str = "runs/train-local"  # run directory; --output overrides it
    model: ModelConfig = field(default_factory=ModelConfig)  # [model]: the base model
    lora: LoraConfig = field(default_factory=LoraConfig)  # [lora]: the adapter that is trained
    data: DataConfig = field(default_factory=DataConfig)  # [data]: the training rows
    grpo: GRPOSettings = field(default_factory=GRPOSettings)  # [grpo]: the GRPO settings
    # ``method = "auto"`` is static here (no federation to imply otherwise).
    weighting: WeightingConfig = field(default_factory=WeightingConfig)

    @field_validator("rewards")
    @classmethod
    def _rewards_valid(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        return check_rewards(rewards)  # as a field check, so errors name ``rewards``

    @property
    def primary_reward(self) -> str:
        return next(r.name for r in self.rewards if r.role == "primary")

    @model_validator(mode="after")
    def _floor_fits(self) -> TrainLocalConfig:
        weighting = resolve_method(self.weighting.method, None)
        if weighting != "static":
            check_weight_floor(self.weighting.w_min, len(self.rewards), "rewards")
        check_advantage(weighting, self.grpo.advantage, "grpo")
        return self


def check_weight_floor(w_min: float, objectives: int, where: str) -> None:
    """``m·w_min < 1``, or the floors alone would take more than the whole simplex."""
    if objectives * w_min >= 1:
        raise ValueError(
            f"weighting.w_min = {w_min:g} is too large for the {objectives} objectives of "
            f"{where}: it must be below 1/{objectives}"
        )


def check_advantage(weighting: str, advantage: str, where: str) -> None:
    """No ``sum_then_normalize`` under the hypergradient weighting: the hypergradient measures
    each objective's own advantage ``Â_i`` as the part it plays in the trained ``Σ w_i Â_i``,
    which ``sum_then_normalize`` does not train on (it normalises the weighted reward sum)."""
    if weighting == "hypergradient" and advantage == "sum_then_normalize":
        raise ValueError(
            f"{where}.advantage = 'sum_then_normalize' contradicts the hypergradient weighting, "
            "which measures the per-objective advantages that only 'normalize_then_sum' trains on"
        )


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log a config warning once per process: a file may be loaded more than once (a Flower
    node and the server in one process, a resume), and saying it again adds nothing."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def given_keys(data: dict[str, Any], table: str) -> frozenset[str]:
    """The keys a config file sets in ``table`` (none when it is absent or not a table)."""
    value = data.get(table)
    return frozenset(value) if isinstance(value, dict) else frozenset()


def report_unread(source: str, find: Callable[[], list[str]]) -> None:
    """Keys a file sets that the run does not read: ``find`` raises ``ValueError`` for one that
    contradicts the file (a one-line ``ConfigError`` here) and returns one line for each left
    over from another method, warned about once.

    Only what the file itself sets counts (``given_keys`` of its raw tables), which is why this
    runs where files are read and not in the models: a config validated again from
    ``dataclasses.asdict`` (the settings a server sends its nodes) has every key.
    """
    try:
        notes = find()
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    for note in notes:
        warn_once(f"{source}: {note}")


Location = Sequence[str | int]


def field_path(loc: Location) -> str:
    """A pydantic error location as the TOML field path ``a.b[2].c``.

    Parts that name a member of a union (``list[str]``, ``function-after[...]``) are dropped.
    """
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in part:
            path += f".{part}" if path else part
    return path


def format_validation_error(
    err: ValidationError, locate: Callable[[Location], str] = field_path
) -> str:
    """First error as ``a.b[2].c: message`` (+ how many more), on one line.

    ``locate`` turns the error's location into the path shown (``load_experiment`` points at
    ``[client_defaults]`` for a value that came from there).
    """
    first = err.errors()[0]
    path = locate(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key"
    message = message.replace("should be an object", "should be a table")  # TOML's word
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    location = f"{path}: " if path else ""
    return " ".join(f"{location}{message}{extra}".split())


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: invalid TOML: not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None


def parse_config(
    data: dict[str, Any],
    schema: type[T],
    source: str = "config",
    *,
    strict: bool = False,
    locate: Callable[[Location], str] = field_path,
) -> T:
    """Validate ``data`` into ``schema``; a failure is a one-line ``ConfigError``.

    ``strict``: values must already have the field's type, as TOML gives them (an int may stand
    for a float), so ``rounds = true`` or ``weight = "0.5"`` is an error rather than coerced.
    Pydantic's strict mode wants dataclass instances for nested sections from Python, but takes
    objects from JSON, hence the round trip.
    """
    try:
        if strict:
            return TypeAdapter(schema).validate_json(json.dumps(data, default=str), strict=True)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err, locate)}") from None


def load_config(path: str | Path, schema: type[T] = TrainLocalConfig) -> T:  # type: ignore[assignment]
    """Read and validate a TOML config (strictly typed); every failure is a one-line
    ``ConfigError``. Relative paths in it are relative to the file (``anchor_paths``). A
    train-local ``[weighting]`` key the run does not read is refused or warned about
    (``report_unread``)."""
    data = anchor_paths(read_toml(path), config_dir(path))
    cfg = parse_config(data, schema, str(path), strict=True)
    if isinstance(cfg, TrainLocalConfig):
        weighting = cfg.weighting
        report_unread(
            str(path), lambda: unread_keys(weighting, given_keys(data, "weighting"), None)
        )
    return cfg


def config_dir(path: str | Path) -> Path:
    """The folder a config file's relative paths start from (absolute, ``..`` kept)."""
    return Path(path).absolute().parent


def anchor_paths(table: dict[str, Any], base: Path) -> dict[str, Any]:
    """A config table with its relative paths made absolute against ``base``, its file's folder.

    A config file must mean the same wherever it is run from (a SuperNode, another folder):
    ``output_dir``, ``adapter``, ``data.path``, a reward's or check's ``path/to/file.py:function`` and the
    same in each of ``clients`` are relative to the file that names them, never to the working
    directory. Absolute paths, built-in reward names and ``package.module:function`` are kept;
    command-line options (``--output``) stay relative to the working directory.
    """
    out = dict(table)
    for key in ("output_dir", "adapter"):
        if key in out:
            out[key] = _anchored(out[key], base)
    out.update(_anchor_client(out, base))
    if isinstance(out.get("clients"), list):
        out["clients"] = [
            {**c, **_anchor_client(c, base)} if isinstance(c, dict) else c for c in out["clients"]
        ]
    return out


def _anchor_client(table: dict[str, Any], base: Path) -> dict[str, Any]:
    """The ``data``, ``rewards`` and ``checks`` entries of ``table``, anchored (only those it
    has)."""
    out: dict[str, Any] = {}
    data = table.get("data")
    if isinstance(data, dict) and "path" in data:
        out["data"] = {**data, "path": _anchored(data["path"], base)}
    for key in ("rewards", "checks"):
        functions = table.get(key)
        if isinstance(functions, list):
            out[key] = [
                {**r, "function": _anchored_reward(r["function"], base)}
                if isinstance(r, dict) and "function" in r
                else r
                for r in functions
            ]
    return out


def _anchored(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value  # not a path (validation reports it), or nothing to anchor
    return os.path.normpath(base / value)


def _anchored_reward(spec: Any, base: Path) -> Any:
    if not isinstance(spec, str):
        return spec
    source, sep, name = spec.rpartition(":")
    if not sep or not source.endswith(".py"):
        return spec  # a built-in name or package.module:function
    return f"{_anchored(source, base)}:{name}"


# Free-form tables (a dataset's own kwargs, a column mapping) replace the default whole:
# merging two datasets' kwargs would mix options that belong to different generators.
OPAQUE_TABLES = frozenset({"params", "columns"})


def merge_defaults(defaults: dict[str, Any], client: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``defaults`` under ``client``; the client's own values win, lists replace."""
    merged = dict(defaults)
    for key, value in client.items():
        if (
            key not in OPAQUE_TABLES
            and isinstance(value, dict)
            and isinstance(merged.get(key), dict)
        ):
            merged[key] = merge_defaults(merged[key], value)
        else:
            merged[key] = value
    return merged
