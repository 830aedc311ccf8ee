"""Code reward: 1.0 when the completion's code passes the sample's tests in a separate process.

Two test formats: MBPP's ``test_list`` (assert statements, with optional ``test_setup_code``) and
HumanEval's ``test`` (a ``check(candidate)`` function) with ``entry_point`` and ``code_prompt``.

Generated code is untrusted, so it never runs in the trainer's process. ``run_python`` is the one
place that launches it; a hardened sandbox can replace that function without touching the rest.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fedmoa.errors import RewardError
from fedmoa.rewards.base import Completion, completion_text

_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)
_Job = tuple[str, str, list[str]]  # code, setup code, tests
_MEMORY_BYTES = 1 << 30
_OUTPUT_BYTES = 16 << 20

# Runs in the child before the solution: resource limits (set here rather than in preexec_fn, which
# the subprocess docs call unsafe in threaded programs), then the source from stdin as __main__.
_LAUNCHER = """\
import resource
for limit, value in ((resource.RLIMIT_CPU, {cpu}), (resource.RLIMIT_AS, {memory}),
                     (resource.RLIMIT_FSIZE, {output}), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
del resource, limit, value
exec(compile(__import__("sys").stdin.read(), "<solution>", "exec"), globals())
"""


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

    After the tests the program prints a random nonce, and a pass requires it on stdout, so a
    solution that exits early (``sys.exit(0)``) fails. Samples run in parallel on ``max_workers``
    threads, each in its own process with a ``timeout`` in seconds.
    """
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
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs)))) as pool:
        results = pool.map(lambda job: _passes(*job, timeout=timeout), jobs.values())
        for row, passed in zip(jobs, results, strict=True):
            scores[row] = float(passed)
    return scores


def _job(row: int, completion: Completion, sample: dict[str, Any]) -> _Job | None:
    """(code, setup, tests) for one sample, or None when it has no tests."""
    code = extract_code(completion_text(completion))
    if (tests := sample["test_list"]) is not None:
        return (
            code,
            sample["test_setup_code"] or "",
            [tests] if isinstance(tests, str) else list(tests),
        )
    if (check := sample["test"]) is None:
        return None
    entry = sample["entry_point"]
    if not (isinstance(entry, str) and entry.isidentifier()):
        raise RewardError(
            f"code_execution: sample {row} has a 'test' but its entry_point is {entry!r}, "
            "not a function name"
        )
    stub = sample["code_prompt"] or ""
    return f"{stub}\n{code}" if stub else code, "", [check, f"check({entry})"]


def extract_code(text: str) -> str:
    """The last fenced code block (tagged python/py/python3 or untagged), else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _passes(code: str, setup: str, tests: list[str], *, timeout: float) -> bool:
    nonce = secrets.token_hex(16)
    source = "\n".join([code, setup, *tests, f"print({nonce!r})", ""])
    result = run_python(source, timeout)
    return result.returncode == 0 and result.stdout.endswith(f"{nonce}\n")


def run_python(source: str, timeout: float) -> RunResult:
    """Runs ``source`` in a separate, resource-limited Python process: the swap point for a sandbox.

    A fresh ``python -I`` with an empty environment, in a new temporary directory and session, under
    CPU, address-space, file-size and core limits; its process group is killed at ``timeout``
    seconds. Only stdout is kept, in an unlinked file that the file-size limit bounds.
    """
    launcher = _LAUNCHER.format(
        cpu=math.ceil(timeout) + 1, memory=_MEMORY_BYTES, output=_OUTPUT_BYTES
    )
    with (
        tempfile.TemporaryDirectory(prefix="fedmoa-code-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as stdout,
        subprocess.Popen(
            [sys.executable, "-I", "-c", launcher],
            cwd=workdir,
            env={},
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ) as proc,
    ):
        try:
            proc.communicate(source.encode(), timeout=timeout)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # also ends anything the program left running in its session
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        stdout.seek(0)
        return RunResult(returncode, stdout.read().decode(errors="replace"))
