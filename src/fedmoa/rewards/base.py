"""Reward function type, completion text and the checked call that builds the reward matrix.

Reward functions use TRL's signature, ``f(prompts, completions, **columns) -> list[float | None]``,
so that functions written for TRL's ``GRPOTrainer`` work unchanged. They are user code, so every
failure becomes a one-line ``RewardError`` naming the function and, when known, the sample.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedmoa.errors import RewardError

RewardFunc = Callable[..., list[float | None]]
Completion = str | Sequence[Mapping[str, Any]]


def completion_text(completion: Completion) -> str:
    """Text of a completion in TRL's standard (``str``) or conversational (messages) format."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def compute_rewards(
    funcs: Sequence[tuple[str, RewardFunc]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, list[Any]],
) -> torch.Tensor:
    """The ``[N, m]`` float32 reward matrix, NaN where a function returned None.

    Each function is called as TRL calls it: ``func(prompts=..., completions=..., **columns)``.
    """
    n = len(completions)
    matrix = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    for col, (name, func) in enumerate(funcs):
        try:
            values = func(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            index = _failing_sample(func, prompts, completions, columns)
            where = "" if index is None else f" at sample {index}"
            raise RewardError(
                f"reward {name!r} raised {type(exc).__name__}{where}: {one_line(exc)}"
            ) from exc
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RewardError(
                f"reward {name!r} returned {type(values).__name__}, expected a list of {n} values"
            )
        if len(values) != n:
            raise RewardError(
                f"reward {name!r} returned {len(values)} values, expected {n} (one per completion)"
            )
        for row, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                shown = one_line(repr(value))[:80]
                raise RewardError(
                    f"reward {name!r} returned {shown} ({type(value).__name__})"
                    f" at sample {row}; expected a finite float, int, bool or None"
                )
            matrix[row, col] = float(value)
    return matrix


def _failing_sample(
    func: RewardFunc,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, list[Any]],
) -> int | None:
    """Replays a failed batch one sample at a time to find which sample makes ``func`` raise."""
    n = len(completions)
    if len(prompts) != n or any(
        not isinstance(v, Sequence) or len(v) != n for v in columns.values()
    ):
        return None
    for i in range(n):
        try:
            func(
                prompts=prompts[i : i + 1],
                completions=completions[i : i + 1],
                **{k: v[i : i + 1] for k, v in columns.items()},
            )
        except Exception:
            return i
    return None


def one_line(error: BaseException | str) -> str:
    """Collapses a (possibly multi-line) message so that every RewardError stays on one line."""
    return " ".join(str(error).split()) or "(no message)"
