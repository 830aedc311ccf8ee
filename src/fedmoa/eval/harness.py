"""``fedmoa eval``: score a base model (plus an optional PEFT adapter) on a benchmark, standalone.

The figures are the ones a federation reports, computed the same way: greedy decoding through
``evaluate_rows``, rewards loaded like a run's (``build_reward_funcs``), and, with a ``[split]``
table, the same deterministic train/validation/test partition a client uses
(``load_client_data``), so ``limit = server.test_prompts`` re-evaluates a run's test rows.

Outputs, written atomically into ``output_dir``: ``results.json`` (summary, resolved config,
package versions) and ``samples.csv`` (one line per row: prompt, completion, every reward).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from fedmoa.config import (
    STRICT,
    ModelConfig,
    RewardConfig,
    check_rewards,
    load_config,
    merge_defaults,
    parse_config,
)
from fedmoa.data import DataConfig, SplitConfig, load_rows, load_split
from fedmoa.errors import DataError, FedMOAError, ModelLoadError
from fedmoa.eval.evaluate import evaluate_rows
from fedmoa.runs import write_json_atomic
from fedmoa.train_local import build_reward_funcs

Row = dict[str, Any]
# (rows done, rows in all): once with 0 when decoding starts, then after every batch.
ProgressFn = Callable[[int, int], None]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VERSIONED_PACKAGES = (
    "fedmoa",
    "torch",
    "transformers",
    "peft",
    "math-verify",
    "reasoning-gym",
    "datasets",
)


@dataclass(config=STRICT)
class EvalSplitConfig(SplitConfig):
    """A run's train/validation/test fractions (seeded by ``data.seed``) and which part to score."""

    use: Literal["train", "validation", "test"] = "test"  # the part that is scored


def default_rewards() -> list[RewardConfig]:
    """Math correctness alone, the objective every built-in math benchmark is scored by."""
    return [RewardConfig(name="accuracy", function="math_accuracy", role="primary")]


@dataclass(config=STRICT)
class EvalConfig:
    """``fedmoa eval``: which policy, on which rows, scored by which objectives."""

    model: ModelConfig = field(default_factory=ModelConfig)  # [model]: the base model
    adapter: str | None = None  # PEFT adapter dir, e.g. RUN/adapter or RUN/adapters/global
    data: DataConfig = field(default_factory=DataConfig)  # [data]: the rows to score
    # objectives to score with; default: math correctness
    rewards: list[RewardConfig] = field(default_factory=default_rewards)
    split: EvalSplitConfig | None = None  # None: every row the data source gives
    limit: int | None = Field(None, gt=0)  # the first N rows (of the chosen split)
    max_new_tokens: int = Field(256, gt=0)  # most tokens per greedy answer
    batch_size: int = Field(8, gt=0)  # prompts decoded together
    output_dir: str = "runs/eval"  # where results.json and samples.csv go; --output overrides it

    @field_validator("rewards")
    @classmethod
    def _rewards_valid(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        return check_rewards(rewards)  # as a field check, so errors name ``rewards``

    @property
    def primary_reward(self) -> str:
        return next(r.name for r in self.rewards if r.role == "primary")


@dataclasses.dataclass
class SampleRecord:
    """One evaluated row, as a line of ``samples.csv``."""

    index: int  # position among the evaluated rows
    id: str | None  # the row's stable ``id`` when the source gives one (the benchmarks do)
    prompt: str  # the last user turn (the system prompt is in the config)
    answer: str | None  # the gold ``answer`` column, when the source has one
    completion: str
    rewards: dict[str, float | None]  # None: the objective does not apply to this row
    num_tokens: int
    truncated: bool  # stopped by ``max_new_tokens``, not by EOS


@dataclasses.dataclass
class EvalReport:
    """What ``run_eval`` measured; ``summary()`` is the ``results.json`` summary."""

    primary: str
    pass_at_1: float  # mean of the primary objective over the rows it applies to (NaN if none)
    reward_means: dict[str, float]
    records: list[SampleRecord]
    load_s: float  # model, adapter and data
    generation_s: float
    scoring_s: float
    wall_s: float
    device: str
    dtype: str
    results_path: Path | None = None
    samples_path: Path | None = None

    @property
    def num_rows(self) -> int:
        return len(self.records)

    @property
    def completion_tokens(self) -> int:
        return sum(r.num_tokens for r in self.records)

    @property
    def truncated(self) -> int:
        return sum(r.truncated for r in self.records)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "pass_at_1": self.pass_at_1,
            "reward_means": self.reward_means,
            "num_rows": self.num_rows,
            "truncated": self.truncated,
            "completion_tokens": self.completion_tokens,
            "mean_completion_tokens": self.completion_tokens / max(self.num_rows, 1),
            "tokens_per_s": self.tokens_per_s,
            "load_s": self.load_s,
            "generation_s": self.generation_s,
            "scoring_s": self.scoring_s,
            "wall_s": self.wall_s,
            "device": self.device,
            "dtype": self.dtype,
        }


def load_eval_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> EvalConfig:
    """The config file (or the defaults) with ``overrides`` deep-merged on top, validated.

    A file error names the file and field; an override error names ``command line`` and the
    field. Tables such as ``data.params`` are replaced whole, as in ``[client_defaults]``.
    """
    cfg = load_config(path, EvalConfig) if path is not None else None
    if not overrides:
        return cfg if cfg is not None else EvalConfig()
    base = dataclasses.asdict(cfg) if cfg is not None else {}
    return parse_config(merge_defaults(base, overrides), EvalConfig, "command line")


def adapter_dir(adapter: str | Path) -> Path:
    """The adapter directory, checked before anything slow is loaded; errors name the path."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise ModelLoadError(f"adapter directory not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"adapter must be a directory saved by PEFT, got a file: {path}")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = next(
            (
                f"; did you mean {path / sub}?"
                for sub in ("adapter", "adapters/global")
                if (path / sub / ADAPTER_CONFIG).is_file()
            ),
            "",
        )
        raise ModelLoadError(f"not a PEFT adapter directory (no {ADAPTER_CONFIG}): {path}{hint}")
    return path


def load_policy(model: ModelConfig, adapter: str | Path | None = None) -> tuple[Any, Any]:
    """The base model, wrapped in the saved LoRA adapter when one is given (kept unmerged, as
    a federation evaluates it, so the figures match a run's to the last bit in fp32)."""
    path = adapter_dir(adapter) if adapter is not None else None

    base, tokenizer = model.load()
    if path is None:
        return base, tokenizer
    import peft

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = peft.PeftModel.from_pretrained(base, str(path), is_trainable=False)
    except Exception as err:  # peft raises ValueError, RuntimeError (shapes), KeyError, OSError
        raise ModelLoadError(
            f"cannot load adapter {path} onto {model.name}: {_one_line(err)}"
        ) from err
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise ModelLoadError(
                f"adapter {path} does not fit {model.name}: some LoRA weights are missing"
            )
    _check_no_unexpected_keys(policy, path, model.name)
    policy.eval()
    return policy, tokenizer


def _check_no_unexpected_keys(policy: Any, path: Path, model_name: str) -> None:
    """PEFT ignores saved tensors the model has no place for (an adapter from a deeper model);
    an evaluation of such a half-loaded adapter would be silently wrong."""
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        return
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        saved = set(fh.keys())
    unexpected = sorted(saved - set(get_peft_model_state_dict(policy)))
    if unexpected:
        raise ModelLoadError(
            f"adapter {path} does not fit {model_name}: {len(unexpected)} saved tensors have no "
            f"place in the model, e.g. {unexpected[0]}"
        )


def select_rows(cfg: EvalConfig) -> list[Row]:
    """The rows to score: every row, or one part of a run's split, then the first ``limit``."""
    if cfg.split is None:
        rows = load_rows(cfg.data)
    else:
        use = cfg.split.use
        rows = getattr(load_split(cfg.data, cfg.split, "data"), use)
        if not rows:
            raise DataError(f"the {use} split is empty: raise split.{use} or data.size")
    return rows[: cfg.limit] if cfg.limit is not None else rows


def run_eval(cfg: EvalConfig, progress: ProgressFn | None = None) -> EvalReport:
    """Load, decode greedily, score every objective, write ``results.json`` and ``samples.csv``."""
    began = time.perf_counter()
    reward_funcs = build_reward_funcs(cfg.rewards)  # fail fast, before anything slow loads
    if cfg.adapter is not None:
        adapter_dir(cfg.adapter)
    output_dir = _make_output_dir(cfg.output_dir)
    rows = select_rows(cfg)
    policy, tokenizer = load_policy(cfg.model, cfg.adapter)
    load_s = time.perf_counter() - began

    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(rows))

    if progress is not None:
        progress(0, len(rows))
    started = time.perf_counter()
    result = evaluate_rows(
        policy,
        tokenizer,
        rows,
        reward_funcs,
        cfg.primary_reward,
        cfg.max_new_tokens,
        cfg.batch_size,
        on_batch,
    )
    scoring_s = time.perf_counter() - started - result.generation_s
    names = [name for name, _ in reward_funcs]
    records = [
        SampleRecord(
            index=i,
            id=None if row.get("id") is None else str(row["id"]),
            prompt=_prompt_text(row["prompt"]),
            answer=None if row.get("answer") is None else str(row["answer"]),
            completion=result.completions[i],
            rewards={
                name: _or_none(result.rewards[i, j].item()) if result.rewards is not None else None
                for j, name in enumerate(names)
            },
            num_tokens=result.num_tokens[i],
            truncated=result.truncated[i],
        )
        for i, row in enumerate(rows)
    ]
    parameter = next(policy.parameters())
    report = EvalReport(
        primary=cfg.primary_reward,
        pass_at_1=result.accuracy,
        reward_means=result.reward_means,
        records=records,
        load_s=load_s,
        generation_s=result.generation_s,
        scoring_s=scoring_s,
        wall_s=time.perf_counter() - began,
        device=str(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
    )
    write_report(report, cfg, output_dir)
    return report


def write_report(report: EvalReport, cfg: EvalConfig, output_dir: str | Path) -> None:
    """``results.json`` and ``samples.csv``, each replaced atomically (no half-written file)."""
    output_dir = Path(output_dir)
    report.results_path = output_dir / "results.json"
    report.samples_path = output_dir / "samples.csv"
    write_json_atomic(
        report.results_path,
        {
            "summary": report.summary(),
            "config": dataclasses.asdict(cfg),
            "versions": package_versions(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )
    names = list(report.reward_means)
    header = ["index", "id", "prompt", "answer", "completion", *(f"reward/{n}" for n in names)]
    lines = [
        [
            r.index,
            "" if r.id is None else r.id,
            r.prompt,
            "" if r.answer is None else r.answer,
            r.completion,
            *("" if r.rewards[n] is None else r.rewards[n] for n in names),
            r.num_tokens,
            r.truncated,
        ]
        for r in report.records
    ]
    _write_csv_atomic(report.samples_path, [[*header, "tokens", "truncated"], *lines])


def package_versions() -> dict[str, str | None]:
    """Versions that change the numbers: decoding (torch, transformers, peft) and scoring."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _write_csv_atomic(path: Path, lines: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(lines)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _make_output_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedMOAError(f"cannot create output directory {path}: {err.strerror}") from None
    return path


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in prompt)


def _or_none(value: float) -> float | None:
    return None if value != value else value  # NaN: the objective does not apply


def _one_line(err: BaseException) -> str:
    """The exception's most telling line: torch's state-dict errors put the shape clash second."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    telling = next((line for line in lines if line.startswith("size mismatch")), lines[0])
    return f"{type(err).__name__}: {telling[:300]}"
