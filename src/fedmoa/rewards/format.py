"""Format reward: 1.0 when a completion has the expected output structure, else 0.0.

An auxiliary objective that saturates early; it gives small models a learning signal before they
get answers right (SmolLM2 boxes under 2% of its answers before training).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from fedmoa.rewards.answers import last_boxed, last_marker_answer
from fedmoa.rewards.base import Completion, completion_text

FormatStyle = Literal["think_answer", "boxed", "marker"]

_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    *,
    style: FormatStyle = "boxed",
    **kwargs: Any,
) -> list[float | None]:
    """Scores the structure of each completion.

    ``think_answer``: exactly ``<think>...</think>`` then a non-empty ``<answer>...</answer>``,
    nothing around them. ``boxed``: a closed, non-empty ``\\boxed{...}``. ``marker``: a "#### X",
    "Final answer: X" or "The answer is X" with X on the same line.
    """
    checks = {"think_answer": _is_think_answer, "boxed": _is_boxed, "marker": _has_marker}
    if style not in checks:
        raise ValueError(f"unknown format style {style!r}; expected one of {sorted(checks)}")
    return [float(checks[style](completion_text(c))) for c in completions]


def _is_think_answer(text: str) -> bool:
    match = _THINK_ANSWER.fullmatch(text)
    return (
        match is not None
        and match.group(2).strip() != ""
        and all(text.count(tag) == 1 for tag in _TAGS)
    )


def _is_boxed(text: str) -> bool:
    return last_boxed(text) is not None


def _has_marker(text: str) -> bool:
    return last_marker_answer(text) is not None
