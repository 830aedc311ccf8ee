"""Code reward: 1.0 when the completion's code passes the sample's tests in the sandbox.

Two test formats: MBPP's ``test_list`` (assert statements, with optional ``test_setup_code``) and
HumanEval's ``test`` (a ``check(candidate)`` function) with ``entry_point`` and ``code_prompt``.

Generated code is untrusted, so it never runs in the trainer's process: every sample runs in
``fedmoa.rewards.sandbox`` (own uid, process group, namespaces, rlimits, wall clock; see
``docs/sandbox.md``). ``run_python`` is kept as a small wrapper for running one plain program.
"""

from __future__ import annotations

import ast
import builtins
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmoa.errors import ConfigError, RewardError
from fedmoa.rewards.base import Completion, completion_text
from fedmoa.rewards.sandbox import Outcome, Program, SandboxLimits, run_many, run_program

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class RunResult:
    """Outcome of one program run; ``returncode`` is None when the run hit its timeout."""

    returncode: int | None
    stdout: str


def code_execution(
    prompts: Sequence[Any],
    completions: Sequence[Completion],
    test_list: Sequence[Sequence[str] | str | None] | None = None,
    *,
    test_setup_code: Sequence[str | None] | None = None,
    test: Sequence[str | None] | None = None,
    entry_point: Sequence[str | None] | None = None,
    code_prompt: Sequence[str | None] | None = None,
    timeout: float = 5.0,
    max_workers: int = 4,
    limits: Mapping[str, Any] | SandboxLimits | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if the extracted code passes the sample's tests, else 0.0; None without tests.

    The code is the last fenced python (or untagged) block, else the whole text. A sample with
    ``test_list`` (a list of assert statements or one string of test code) runs the code, then
    ``test_setup_code``, then the tests (MBPP). Otherwise a sample with ``test`` runs
    ``code_prompt`` + code + ``test`` + ``check(entry_point)`` (HumanEval). ``code_prompt`` (the
    imports, signature and docstring) is always prepended: a body-only completion continues it, and
    a completion that writes the whole function redefines it while still getting the imports and
    helper functions it may have left out (``List`` in an annotation would otherwise fail).

    A sample scores 1.0 only when the sandbox reports ``passed``: the tests ran to the end, after
    which the sandbox's launcher (not the program) writes a random nonce to the real stdout, so a
    solution that exits early (``sys.exit(0)``) or patches ``print``/``check``/builtins fails.
    Samples run in parallel, at most ``max_workers`` at a time. ``timeout`` is the wall clock in
    seconds (the CPU limit is one more, rounded up); ``limits`` overrides any
    ``SandboxLimits`` field, e.g. ``{"memory_bytes": 536870912, "processes": 4}``. A run that
    times out, crashes or hits a sandbox error scores 0.0; sandbox errors are logged.
    """
    try:
        sandbox_limits = (
            limits
            if isinstance(limits, SandboxLimits)
            else SandboxLimits.for_timeout(timeout).updated(limits or {})
        )
    except ConfigError as exc:
        raise RewardError(f"code_execution: {exc}") from exc
    n = len(completions)
    columns = {
        "test_list": test_list,
        "test_setup_code": test_setup_code,
        "test": test,
        "entry_point": entry_point,
        "code_prompt": code_prompt,
    }
    for name, values in columns.items():
        if values is not None and len(values) != n:
            raise RewardError(
                f"code_execution: column '{name}' has {len(values)} values for {n} completions"
            )
    jobs = {
        row: job
        for row, completion in enumerate(completions)
        if (
            job := _job(
                row, completion, {k: None if v is None else v[row] for k, v in columns.items()}
            )
        )
    }
    scores: list[float | None] = [None] * n
    results = run_many(list(jobs.values()), sandbox_limits, max_workers)
    for row, result in zip(jobs, results, strict=True):
        if result.outcome is Outcome.SANDBOX_ERROR:
            logger.warning("code_execution: sample %d: sandbox error: %s", row, result.detail)
        scores[row] = 1.0 if result.passed else 0.0
    return scores


def _job(row: int, completion: Completion, sample: dict[str, Any]) -> Program | None:
    """The program (the code) and its tests for one sample, or None when it has no tests.

    The tests run after the code, in its namespace, so a completion cannot pre-empt them by
    defining ``check``; they see the builtins as before the code ran."""
    code = extract_code(completion_text(completion))
    if (tests := sample["test_list"]) is not None:
        lines = [tests] if isinstance(tests, str) else list(tests)
        setup = sample["test_setup_code"] or ""
        return Program(code, "\n".join([setup, *lines, ""]), _tested_names(lines))
    if (check := sample["test"]) is None:
        return None
    entry = sample["entry_point"]
    if not (isinstance(entry, str) and entry.isidentifier()):
        raise RewardError(
            f"code_execution: sample {row} has a 'test' but its entry_point is {entry!r}, "
            "not a function name"
        )
    stub = sample["code_prompt"] or ""
    return Program(f"{stub}\n{code}" if stub else code, f"{check}\ncheck({entry})\n", (entry,))


def _tested_names(tests: list[str]) -> tuple[str, ...]:
    """Functions under test named like a builtin (MBPP has a ``sum``): the callee on the left of
    each ``assert f(...) == ...``, looking inside builtin wrappers (``set(f(...))``)."""
    names = set()
    for text in tests:
        try:
            statements = ast.parse(text).body
        except SyntaxError:
            continue
        for node in statements:
            if not isinstance(node, ast.Assert):
                continue
            expr = node.test
            if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
                expr = expr.operand
            if isinstance(expr, ast.Compare):
                expr = expr.left
            while isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
                inner = [a for a in expr.args if isinstance(a, ast.Call)]
                if expr.func.id in _BUILTINS and inner:
                    expr = inner[0]
                    continue
                if expr.func.id in _BUILTINS:
                    names.add(expr.func.id)
                break
    return tuple(sorted(names))


def extract_code(text: str) -> str:
    """The last fenced code block (tagged python/py/python3 or untagged), else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def run_python(source: str, timeout: float) -> RunResult:
    """Runs one plain program in the sandbox with the limits for ``timeout`` (see
    ``SandboxLimits.for_timeout``); ``returncode`` is None on a timeout, minus the signal number
    when a signal ended it."""
    result = run_program(source, SandboxLimits.for_timeout(timeout))
    if result.outcome is Outcome.TIMEOUT:
        return RunResult(None, result.stdout)
    code = result.returncode if result.signal is None else -result.signal
    return RunResult(code, result.stdout)
