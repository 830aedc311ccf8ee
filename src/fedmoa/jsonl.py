"""Reading JSON Lines files (data files, a run's ``metrics.jsonl``) with errors that name the line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmoa.errors import DataError


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; ``.gz`` files are decompressed.

    A line that is not a JSON object raises a one-line ``DataError`` naming file and line;
    I/O errors propagate, so callers can say what they were reading the file for.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record
