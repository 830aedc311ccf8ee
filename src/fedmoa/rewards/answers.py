"""Finds a completion's final answer (``\\boxed{}`` or a marker line).

Shared by ``math_accuracy`` and ``format`` so that "has a final answer" means the same in both:
text cut off by ``max_new_tokens`` before its final answer must not count as answered.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\s*\{")
_MARKER = re.compile(
    r"(?:####|final answer(?:[ \t]+is)?|the (?:final )?answer is)"
    r"[ \t]*:?[ \t]*(?P<answer>[^\s:][^\n]*)",
    re.IGNORECASE,
)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``; None if there is none or it is empty or unclosed."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    depth, begin = 1, starts[-1].end()
    for pos in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            content = text[begin:pos].strip()
            return content or None
    return None


def last_marker_answer(text: str) -> str | None:
    """The rest of the line after the last "####", "Final answer:" or "The answer is"."""
    matches = list(_MARKER.finditer(text))
    return matches[-1].group("answer").strip() if matches else None
