"""Is a final answer in final form? The gate that keeps ``math_accuracy`` from paying for the
question restated.

math-verify evaluates what it parses, so "The answer is -1 + 7" verifies against a gold 6, and GRPO
finds that within tens of steps (``benchmarks/reward_hacking.py``). Where the gold is a number, the
answer must be a number as people write one: a sign, thousands separators, a decimal point, a
fraction, a currency sign, a percent sign or a unit, a trailing period, "x = 6". Where the gold is
symbolic, the answer may be any expression except one copied from the prompt.
"""

from __future__ import annotations

import re
from typing import Literal

AnswerForm = Literal["auto", "number", "expression"]

_INTEGER = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_DECIMAL = rf"(?:{_INTEGER}(?:\.\d+)?|\.\d+)"
_FRACTION = r"(?:\d+\s*/\s*\d+|\\[dt]?frac\s*(?:\{\s*\d+\s*\}\s*\{\s*\d+\s*\}|\d\d))"
_NUMBER = re.compile(rf"[-+]?\s*(?:{_FRACTION}|{_DECIMAL})")
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("(", ")"))
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,!;: ]|~")
# What may follow a number: a percent or degree sign, then words of a unit ("apples", "cm^2",
# "dollars per hour"), then sentence punctuation.
_SUFFIX = re.compile(
    r"\s*(?:\\?%|\^\s*\{?\\circ\}?|°)?"
    r"(?:\s*[A-Za-z]+(?:\^\s*\{?\d\}?)?(?:\s+[A-Za-z]+(?:\^\s*\{?\d\}?)?)*)?"
    r"\s*[.!;,]*\s*"
)
_OPERATOR = re.compile(r"(?<=\S)\s*(?:[-+*/^=<>]|\\(?:cdot|times|div|pm|frac|sqrt))")


def final_number(answer: str) -> str | None:
    """The number ``answer`` states, as plain LaTeX for math-verify; None if it is not one.

    Only the right-hand side of a last ``=`` counts, so "x = 6" and "3 + 4 = 7" state 6 and 7.
    """
    text = _unwrap(_TEXT.sub(r" \1", _SPACING.sub(" ", answer.replace("\u2212", "-"))))
    text = _unwrap(text.rsplit("=", 1)[-1])
    text = _unwrap(re.sub(r"^(?:\\\$|\$(?=\s*[-+]?\s*[\d.]))", "", text))  # a currency sign
    number = _NUMBER.match(text)
    if number is None or not _SUFFIX.fullmatch(text, number.end()):
        return None
    return re.sub(r"\s+", "", number.group()).replace(",", "")


def _unwrap(text: str) -> str:
    """``text`` without the math delimiters or parentheses around all of it."""
    text = text.strip()
    for _ in range(3):
        for left, right in _WRAPPERS:
            if text.startswith(left) and text.endswith(right) and len(text) > len(left + right):
                text = text[len(left) : -len(right)].strip()
    return text


def restates_prompt(answer: str, prompt: str, gold: str) -> bool:
    """True when ``answer`` is an unevaluated expression copied from ``prompt`` (and not the
    gold as written): "Simplify (x+1)^2-1" answered "(x+1)^2-1"."""
    copied = _normalise(answer)
    return (
        bool(copied)
        and _OPERATOR.search(answer) is not None
        and copied in _normalise(prompt)
        and copied != _normalise(gold)
    )


def _normalise(text: str) -> str:
    """Spacing, ``$`` and ``\\left``/``\\right`` removed: the same expression, typed differently."""
    text = _SPACING.sub("", text.replace("\u2212", "-"))
    text = re.sub(r"\\(?:left|right|displaystyle)|\$|\s", "", text)
    return text.rstrip(".")
