"""Correctness reward for math answers, checked with math-verify and safe to call from any thread.

math-verify's timeouts use ``signal.alarm``, which works on the main thread only, and Flower runs
the server app in a worker thread. Off the main thread the checks therefore run in a long-lived
child process (see ``_math_worker``) that keeps those per-check timeouts; the batch as a whole also
has a deadline, after which the child is killed and the batch scores 0.0.

Timeout rule: an answer whose parsing or comparison runs past ``timeout`` scores 0.0 (math-verify
logs "Timeout during ..."), on the main thread of any process (a ``multiprocessing`` or
``ProcessPoolExecutor`` worker included) and from any other thread alike. SIGALRM interrupts
Python code only, so on the main thread a check stuck inside one long C call ends when that
call returns; in the child process the batch deadline bounds even that.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmoa.errors import RewardError
from fedmoa.rewards._math_worker import check
from fedmoa.rewards.answer_form import AnswerForm, final_number, restates_prompt
from fedmoa.rewards.answers import last_boxed, last_marker_answer
from fedmoa.rewards.base import Completion, completion_text

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")
_START_TIMEOUT_S = 60.0
_BATCH_SLACK_S = 10.0

Item = tuple[str, list[str]]


def math_accuracy(
    prompts: Sequence[Any] | None,
    completions: Sequence[Completion],
    answer: Sequence[Any],
    *,
    require_final_answer: bool = True,
    answer_form: AnswerForm = "auto",
    timeout: float = 5,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion's final answer is in final form and equals the gold ``answer`` under
    math-verify, else 0.0.

    The final answer is the last ``\\boxed{}``, else the last "#### X", "Final answer: X" or "The
    answer is X". Without one the score is 0.0: truncated text often ends in an expression that
    evaluates to the gold answer. ``answer_form`` says what final form is (``answer_form.py``):
    ``number``, a number as written (no "-1 + 7" for 6); ``expression``, any expression but one
    copied from the prompt; ``auto`` (default), ``number`` where the gold is a number.
    ``require_final_answer=False`` checks the whole text when there is no final answer: GRPO
    learns to game that within tens of steps (docs/reward_hacking.md), so it logs a warning.
    A gold answer of None scores None. ``timeout`` is math-verify's per-step limit in seconds;
    SIGALRM counts whole seconds, so a fraction rounds up (0 or less: no limit).
    """
    if answer_form not in ("auto", "number", "expression"):
        raise ValueError(
            f"unknown answer_form {answer_form!r}; expected 'auto', 'number' or 'expression'"
        )
    if not require_final_answer:
        _warn_lenient_once()
    timeout = max(0, math.ceil(timeout))  # signal.alarm(0.5) fails, and every answer would score 0
    scores: list[float | None] = [None] * len(completions)
    items: list[Item] = []
    rows: list[int] = []
    for row, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        if gold is None:
            continue
        scores[row] = 0.0
        prompt = None if prompts is None else completion_text(prompts[row])
        checked = checkable(
            completion_text(completion), gold_text(gold), prompt, require_final_answer, answer_form
        )
        if checked is not None:
            items.append(checked)
            rows.append(row)
    for row, score in zip(rows, verify_batch(items, timeout), strict=True):
        scores[row] = score
    return scores


def gold_text(gold: object) -> str:
    """The gold answer of a number, LaTeX, ``\\boxed{}`` or GSM8K "... #### 72", without ``$``."""
    text = str(gold).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] == "$" else text


def checkable(
    text: str,
    gold: str,
    prompt: str | None,
    require_final_answer: bool,
    answer_form: AnswerForm,
) -> Item | None:
    """The (gold, prediction candidates) pair math-verify checks; None when the completion
    scores 0.0 without a check: no final answer where one is required, or not in final form."""
    gold_number = final_number(gold)
    if answer_form == "auto":
        answer_form = "number" if gold_number is not None else "expression"
    boxed = last_boxed(text)
    final = boxed if boxed is not None else last_marker_answer(text)
    if final is None:
        return None if require_final_answer else (f"${gold}$", [text])
    if answer_form == "number":
        if boxed is None:  # a marker's line may go on: "The answer is 6. It is the sum of ..."
            final = re.split(r"(?<=\.)\s", final, maxsplit=1)[0]
        number = final_number(final)
        if number is None:
            return None
        return f"${gold if gold_number is None else gold_number}$", [f"${number}$"]
    if prompt is not None and restates_prompt(final, prompt, gold):
        return None
    if boxed is not None:
        return f"${gold}$", [f"\\boxed{{{boxed}}}"]
    return f"${gold}$", [final, f"${final}$"]  # "72 apples" parses as plain text, "x^2+1" as LaTeX


_warned_lenient = False


def _warn_lenient_once() -> None:
    global _warned_lenient
    if not _warned_lenient:
        _warned_lenient = True
        logger.warning(
            "math_accuracy with require_final_answer = false scores the whole text when there is no"
            " final answer: GRPO learns to game it (docs/reward_hacking.md)"
        )


def verify_batch(items: Sequence[Item], timeout: int) -> list[float]:
    """Scores (gold, candidates) pairs in-process on the main thread, else in the worker process."""
    if not items:
        return []
    if threading.current_thread() is threading.main_thread():
        return [check(gold, candidates, timeout) for gold, candidates in items]
    return _WORKER.score(items, timeout)


class _VerifyWorker:
    """The child process that runs checks requested off the main thread, one batch at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def score(self, items: Sequence[Item], timeout: int) -> list[float]:
        with self._lock:
            proc = self._running()
            assert proc.stdin is not None
            try:
                proc.stdin.write((json.dumps([timeout, items]) + "\n").encode())
                proc.stdin.flush()
                reply = _read_line(proc, time.monotonic() + _BATCH_SLACK_S + timeout * len(items))
            except OSError:  # the child died between batches
                reply = None
            if reply is None:
                self.stop()
                logger.warning(
                    "math-verify worker timed out or died; %d answers score 0.0", len(items)
                )
                return [0.0] * len(items)
            return [float(score) for score in json.loads(reply)]

    def forget(self) -> None:
        """In a forked child: the process and the lock belong to the parent, so start afresh."""
        self._lock = threading.Lock()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.communicate()
            self._proc = None

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        if _read_line(proc, time.monotonic() + _START_TIMEOUT_S) != b"ready\n":
            proc.kill()
            proc.communicate()
            raise RewardError(
                f"math-verify worker {_WORKER_SCRIPT} failed to start under {sys.executable}"
                " (see its stderr)"
            )
        self._proc = proc
        return proc


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes | None:
    """One line from the child's stdout, or None at EOF or once ``deadline`` (monotonic) passes."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        data += chunk
    return data


_WORKER = _VerifyWorker()
atexit.register(_WORKER.stop)
os.register_at_fork(after_in_child=_WORKER.forget)
