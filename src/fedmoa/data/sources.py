"""Data sources: one registry maps ``DataConfig.source`` to a loader returning finished rows.

A row is TRL's conversational format: ``"prompt"`` (chat messages) plus the columns rewards
read, e.g. ``"answer"`` (gold answer as a string) or ``"test_list"``. New sources register with
``@register_source("name")``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoa.data.partition import partition_rows
from fedmoa.data.prompts import as_messages, build_prompt, question_system_prompt
from fedmoa.errors import DataError
from fedmoa.jsonl import iter_jsonl

if TYPE_CHECKING:
    from fedmoa.data.config import DataConfig

Row = dict[str, Any]
Loader = Callable[["DataConfig"], list[Row]]

SOURCES: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Add a loader to ``SOURCES`` so ``DataConfig`` accepts ``source=name``."""

    def add(loader: Loader) -> Loader:
        SOURCES[name] = loader
        return loader

    return add


def load_rows(cfg: DataConfig) -> list[Row]:
    """Load the rows ``cfg`` describes; the same config always gives the same rows.

    With ``cfg.partition`` set, only that partition of the loaded (size-capped) rows is kept.
    """
    rows = SOURCES[cfg.source](cfg)
    if not rows:
        raise DataError(f"no rows from {cfg.source} ({cfg.path or cfg.name})")
    if cfg.partition is not None:
        where = f"data source '{cfg.source}' ({cfg.path or cfg.name})"
        rows = partition_rows(rows, cfg.partition, where)
    return rows


@register_source("reasoning_gym")
def _load_reasoning_gym(cfg: DataConfig) -> list[Row]:
    """Generate problems with reasoning-gym; ``metadata`` is kept as a JSON string because its
    values (e.g. ``Fraction``) and keys vary by dataset and would break an Arrow table."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    where = f"reasoning-gym dataset '{cfg.name}'"
    if cfg.name not in DATASETS:
        close = difflib.get_close_matches(cfg.name, DATASETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"unknown {where}{hint}")
    if cfg.size is None:
        raise DataError(f"{where}: size must be set for generated data")
    if clash := sorted({"seed", "size"} & cfg.params.keys()):
        raise DataError(f"{where}: set {', '.join(clash)} in the data config, not in params")
    try:
        dataset = reasoning_gym.create_dataset(
            cfg.name, size=cfg.size, seed=_spread_seed(cfg.seed), **cfg.params
        )
        entries = [dataset[i] for i in range(cfg.size)]
    except Exception as exc:  # reasoning-gym raises TypeError, AssertionError, ValueError, ...
        raise DataError(f"{where} rejected params {cfg.params}: {_one_line(exc)}") from exc
    return [
        {
            "prompt": build_prompt(entry["question"], question_system_prompt(cfg.system_prompt)),
            "question": entry["question"],
            "answer": str(entry["answer"]),
            "metadata": json.dumps(entry.get("metadata", {}), default=str, sort_keys=True),
        }
        for entry in entries
    ]


def _spread_seed(seed: int) -> int:
    """Hash the seed: reasoning-gym seeds item ``i`` with ``seed + i``, so seeds 0 and 1 would
    share all but one row (clients, or train and test, would overlap)."""
    return int.from_bytes(hashlib.sha256(f"fedmoa-data:{seed}".encode()).digest()[:4], "big")


@register_source("jsonl")
def _load_jsonl(cfg: DataConfig) -> list[Row]:
    """JSON Lines (optionally ``.gz``); blank lines are skipped, errors name the line."""
    path = _data_file(cfg)
    try:
        records = list(islice(iter_jsonl(path), cfg.size))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}") from exc
    return [_to_row(record, cfg, f"{path} line {lineno}") for lineno, record in records]


@register_source("parquet")
def _load_parquet(cfg: DataConfig) -> list[Row]:
    """A Parquet file, read with pyarrow (installed with ``datasets``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _data_file(cfg)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read parquet file {path}: {_one_line(exc)}") from exc
    records = table.slice(0, cfg.size).to_pylist()
    return [_to_row(record, cfg, f"{path} row {i}") for i, record in enumerate(records)]


@register_source("hub")
def _load_hub(cfg: DataConfig) -> list[Row]:
    """A Hugging Face hub dataset; offline machines get a one-line error suggesting a file."""
    try:
        import datasets

        dataset = datasets.load_dataset(cfg.name, split=cfg.split)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        raise DataError(
            f"could not fetch hub dataset '{cfg.name}' (split '{cfg.split}'): {_one_line(exc)}; "
            "save it as a local .jsonl file and use source='jsonl'"
        ) from exc
    n = len(dataset) if cfg.size is None else min(cfg.size, len(dataset))
    return [_to_row(dataset[i], cfg, f"hub dataset '{cfg.name}' row {i}") for i in range(n)]


def _data_file(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise DataError(f"data source '{cfg.source}' needs a path to a file")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _to_row(record: dict[str, Any], cfg: DataConfig, where: str) -> Row:
    """Rename mapped columns, build ``prompt`` and pass the other columns through.

    The prompt comes from ``question`` when that is mapped explicitly or there is no ``prompt``
    column; otherwise from ``prompt`` (a string, or messages used as written: ``as_messages``).
    """
    for ours, theirs in cfg.columns.items():
        if theirs not in record:
            raise DataError(
                f"{where}: no column '{theirs}' (mapped to '{ours}'); "
                f"columns: {', '.join(map(str, record))}"
            )
    renamed = set(cfg.columns.values())
    row = {k: v for k, v in record.items() if k not in renamed}
    row.update({ours: record[theirs] for ours, theirs in cfg.columns.items()})
    if "question" in cfg.columns or "prompt" not in row:
        question = row.get("question")
        if not isinstance(question, str):
            raise DataError(
                f"{where}: needs a string 'question' or a 'prompt' column; "
                "map one with columns={'question': '<column>'}"
            )
        row["prompt"] = build_prompt(question, question_system_prompt(cfg.system_prompt))
    else:
        row["prompt"] = as_messages(row["prompt"], cfg.system_prompt, where)
    if isinstance(row.get("answer"), int | float) and not isinstance(row["answer"], bool):
        row["answer"] = str(row["answer"])
    return row


def _one_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, so errors stay one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
