"""Toy rewards a tiny random model scores on, for the report fixture's recorded runs.

Math accuracy is always 0 for a random model; these character shares vary per sample, so GRPO
has advantages to learn from and the hypergradient weights move.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedmoa.rewards.base import Completion, completion_text


def char_share(
    prompts: Sequence[Any], completions: Sequence[Completion], *, kind: str = "alpha", **kwargs: Any
) -> list[float | None]:
    """Share of a completion's characters that are ASCII letters (``alpha``) or digits."""
    test = {"alpha": lambda c: c.isascii() and c.isalpha(), "digit": lambda c: c.isdigit()}[kind]
    out: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        out.append(sum(map(test, text)) / len(text) if text else 0.0)
    return out
