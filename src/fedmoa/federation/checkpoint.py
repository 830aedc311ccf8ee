"""Per-round checkpoints, written atomically so a crash never leaves a half-written one."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from fedmoa.errors import FedMOAError, one_line

PATTERN = "round-{:04d}.pt"


def save_checkpoint(directory: Path, completed_round: int, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus the RNG states (:func:`save_atomic`)."""
    state = {
        **payload,
        "completed_round": completed_round,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    return save_atomic(directory / PATTERN.format(completed_round), state)


def save_atomic(target: Path, obj: Any) -> Path:
    """``torch.save`` to a temp file, fsync, rename: a crash leaves the old file or the new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(target)
    _fsync_dir(target.parent)
    return target


def latest_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; an unreadable newer one is reported and skipped.

    ``state["skipped"]`` lists the newer files that did not load, each as
    ``"round-NNNN.pt (Error: message)"``; the caller logs them.
    """
    candidates = sorted(directory.glob("round-*.pt"), reverse=True)
    errors = []
    for path in candidates:
        try:
            state = torch.load(path, weights_only=False)
            if not isinstance(state, dict) or not {"completed_round", "rng"} <= state.keys():
                raise ValueError("not a fedmoa checkpoint")
        except Exception as err:  # a truncated or corrupt file: fall back to the previous one
            message = one_line(err)[:200]
            errors.append(f"{path.name} ({type(err).__name__}: {message})")
            continue
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        state["skipped"] = errors
        return state
    if candidates:
        raise FedMOAError(f"no readable checkpoint in {directory} ({'; '.join(errors)})")
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
