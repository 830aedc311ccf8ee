"""Brevity reward: full score up to a target length, less above it.

Long completions cost decoding time on the client (Qwen needs 400-512 new tokens for GSM8K), so a
brevity objective trades a little accuracy for cheaper rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fedmoa.rewards.base import Completion, completion_text

LengthMode = Literal["linear", "step"]


def length_reward(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    *,
    target: int,
    mode: LengthMode = "linear",
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Scores in [0, 1] against ``target`` length.

    The length is in tokens when ``completion_ids`` is passed (TRL and the trainer pass it), else
    in whitespace-separated words. ``linear``: 1.0 up to ``target``, falling linearly to 0.0 at
    ``2 * target``. ``step``: 1.0 up to ``target``, else 0.0.
    """
    if target <= 0:
        raise ValueError(f"target must be a positive length, got {target}")
    if mode not in ("linear", "step"):
        raise ValueError(f"unknown length mode {mode!r}; expected 'linear' or 'step'")
    if completion_ids is None:
        lengths = [len(completion_text(c).split()) for c in completions]
    else:
        lengths = [len(ids) for ids in completion_ids]
    if mode == "step":
        return [float(n <= target) for n in lengths]
    return [min(1.0, max(0.0, 2.0 - n / target)) for n in lengths]
