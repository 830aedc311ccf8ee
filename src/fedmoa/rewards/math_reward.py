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
from fedmoa.rewards.answers import last_boxed, last_marker_answer
from fedmoa.rewards.base import Completion, completion_text

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")
_START_TIMEOUT_S = 60.0
_BATCH_SLACK_S = 10.0

Item = tuple[str, list[str]]


def math_accuracy(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    answer: Sequence[Any],
    *,
    require_final_answer: bool = True,
    timeout: float = 5,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold ``answer`` under math-verify, else 0.0.

    The prediction is the last ``\\boxed{}``, else the last "#### X", "Final answer: X" or "The
    answer is X". Without one the score is 0.0: truncated text often ends in an expression that
    evaluates to the gold answer. ``require_final_answer=False`` checks the whole text instead.
    A gold answer of None scores None. ``timeout`` is math-verify's per-step limit in seconds;
    SIGALRM counts whole seconds, so a fraction rounds up (0 or less: no limit).
    """
    timeout = max(0, math.ceil(timeout))  # signal.alarm(0.5) fails, and every answer would score 0
    scores: list[float | None] = [None] * len(completions)
    items: list[Item] = []
    rows: list[int] = []
    for row, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        if gold is None:
            continue
        scores[row] = 0.0
        candidates = prediction_candidates(completion_text(completion), require_final_answer)
        if candidates:
            items.append((gold_latex(gold), candidates))
            rows.append(row)
    for row, score in zip(rows, verify_batch(items, timeout), strict=True):
        scores[row] = score
    return scores


def gold_latex(gold: object) -> str:
    """A gold answer (number, LaTeX, ``\\boxed{}``, GSM8K "... #### 72") as ``$...$`` to parse."""
    text = str(gold).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    return text if text.startswith("$") and text.endswith("$") else f"${text}$"


def prediction_candidates(text: str, require_final_answer: bool) -> list[str]:
    """Strings to parse as the prediction, in order; empty if a required final answer is missing."""
    boxed = last_boxed(text)
    if boxed is not None:
        return [f"\\boxed{{{boxed}}}"]
    marked = last_marker_answer(text)
    if marked is not None:
        return [marked, f"${marked}$"]  # "72 apples" parses as plain text, "x^2+1" only as LaTeX
    return [] if require_final_answer else [text]


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
