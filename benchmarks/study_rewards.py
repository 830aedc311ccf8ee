"""Study rewards that no built-in provides: one that conflicts with the primary, one that is broken.

``no_digits`` scores 1.0 for a completion without a digit. Every correct answer to the study's
arithmetic problems has one, so the more a client's policy serves this objective, the fewer
answers it gets right: a reward definition a data owner might plausibly hold (a "write it in
words" style rule), and one a fixed weight keeps pulling against the primary.

``wrong_answer`` is correctness turned upside down: the training signal of a client whose
reward code is broken (benchmarks/broken_client.toml), while its primary, which its reported
validation accuracy uses, stays honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedmoa.rewards.base import Completion, completion_text
from fedmoa.rewards.math_reward import math_accuracy


def no_digits(
    prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any
) -> list[float | None]:
    return [0.0 if any(ch.isdigit() for ch in completion_text(c)) else 1.0 for c in completions]


def wrong_answer(
    prompts: Sequence[Any], completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """A broken correctness reward: 1.0 for a wrong answer, 0.0 for a right one (strict check)."""
    scores = math_accuracy(prompts, completions, answer)
    return [None if s is None else 1.0 - s for s in scores]
