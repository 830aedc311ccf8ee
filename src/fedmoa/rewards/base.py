"""Reward function type, completion text and the checked call that builds the reward matrix.

Reward functions use TRL's signature, ``f(prompts, completions, **columns) -> list[float | None]``,
so that functions written for TRL's ``GRPOTrainer`` work unchanged. They are user code, so every
failure becomes a one-line ``RewardError`` naming the function and, when known, the sample.

Failure policy (``RewardConfig.on_error`` / ``timeout``, applied by ``PolicyReward``). A call
fails when the function raises, exceeds its ``timeout``, returns something other than a list of
one value per completion, or returns a value that is not a finite real number or None (NaN and
inf included). With ``on_error = "raise"`` (the default) a failure stops the step with a
``RewardError``. With ``on_error = "none"`` a failed call scores None ("not applicable") on
every sample, or only on the bad samples when just some values are bad, and logs a warning: the
advantages leave None out, so the step goes on with the other objectives.

A ``timeout`` runs each call in a daemon worker thread and stops waiting after ``timeout``
seconds. Python cannot kill a thread, so a function that truly hangs keeps its thread (and any
CPU it burns) until the process exits; a daemon thread does not block that exit. A thread keeps
the call cheap (no pickling of the function, the completions or the dataset columns) and works
for any function, where a subprocess pool would need picklable functions and arguments.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from fedmoa.errors import RewardError, one_line

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float | None]]
Completion = str | Sequence[Mapping[str, Any]]
OnError = Literal["raise", "none"]


class CheckedRewardError(RewardError):
    """A RewardError that already names the reward and sample; enclosing checks pass it on."""


class _TimedOut(Exception):
    pass


class PolicyReward:
    """A reward function with its failure policy: calling it applies ``checked_call``.

    Its result is always a clean ``list[float | None]``, so wrappers (the centralized baseline's
    per-client rewards) and ``compute_rewards`` see the policy's outcome.
    """

    def __init__(
        self, name: str, func: RewardFunc, on_error: OnError = "raise", timeout: float | None = None
    ) -> None:
        functools.update_wrapper(self, func)  # __name__, __doc__, __wrapped__ for introspection
        self.name, self.func, self.on_error, self.timeout = name, func, on_error, timeout

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        return checked_call(
            self.name,
            self.func,
            prompts,
            completions,
            columns,
            on_error=self.on_error,
            timeout=self.timeout,
        )

    def __repr__(self) -> str:
        return f"PolicyReward({self.name!r}, on_error={self.on_error!r}, timeout={self.timeout})"


def with_policy(
    name: str, func: RewardFunc, on_error: OnError = "raise", timeout: float | None = None
) -> RewardFunc:
    """``func`` under a failure policy; unchanged under the default (raise, no timeout)."""
    if on_error == "raise" and timeout is None:
        return func
    return PolicyReward(name, func, on_error, timeout)


def completion_text(completion: Completion) -> str:
    """Text of a completion in TRL's standard (``str``) or conversational (messages) format."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def compute_rewards(
    funcs: Sequence[tuple[str, RewardFunc]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, list[Any]],
) -> torch.Tensor:
    """The ``[N, m]`` float32 reward matrix, NaN where a function returned None.

    Each function is called as TRL calls it: ``func(prompts=..., completions=..., **columns)``,
    through ``checked_call``: a ``PolicyReward`` applies its own policy, any other function
    fails with a ``RewardError``.
    """
    n = len(completions)
    matrix = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)
    for col, (name, func) in enumerate(funcs):
        values = checked_call(name, func, prompts, completions, columns)
        for row, value in enumerate(values):
            if value is not None:
                matrix[row, col] = value
    return matrix


def checked_call(
    name: str,
    func: RewardFunc,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Any],
    *,
    on_error: OnError = "raise",
    timeout: float | None = None,
) -> list[float | None]:
    """One call of reward ``name``, checked: one finite float or None per completion.

    A failure (see the module docstring) raises a one-line ``RewardError`` naming ``name`` and,
    when known, the sample (``on_error="raise"``), or scores None and logs a warning
    (``on_error="none"``).
    """
    n = len(completions)
    try:
        values = _call(name, func, prompts, completions, columns, timeout)
    except CheckedRewardError:
        raise
    except _TimedOut:
        return _failed(on_error, n, f"reward {name!r} timed out after {timeout:g}s")
    except Exception as exc:
        if on_error == "none":  # no replay: it would only name the sample in a warning
            return _failed(on_error, n, f"reward {name!r} raised {type(exc).__name__}: {exc}")
        index = _failing_sample(name, func, prompts, completions, columns, timeout)
        where = "" if index is None else f" at sample {index}"
        raise CheckedRewardError(
            f"reward {name!r} raised {type(exc).__name__}{where}: {one_line(exc)}"
        ) from exc
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        message = f"reward {name!r} returned {type(values).__name__}, expected a list of {n} values"
        return _failed(on_error, n, message)
    if len(values) != n:
        message = (
            f"reward {name!r} returned {len(values)} values, expected {n} (one per completion)"
        )
        return _failed(on_error, n, message)
    scores: list[float | None] = []
    bad: list[str] = []
    for row, value in enumerate(values):
        if value is not None and (not isinstance(value, numbers.Real) or not math.isfinite(value)):
            shown = one_line(repr(value))[:80]
            bad.append(
                f"reward {name!r} returned {shown} ({type(value).__name__})"
                f" at sample {row}; expected a finite float, int, bool or None"
            )
            if on_error == "raise":
                raise CheckedRewardError(bad[0])
            value = None
        scores.append(None if value is None else float(value))
    if bad:
        logger.warning(
            "%s (%d bad value(s) of %d scored None: on_error = 'none')", bad[0], len(bad), n
        )
    return scores


def _failed(on_error: OnError, n: int, message: str) -> list[float | None]:
    """The whole call failed: raise, or every sample scores None."""
    if on_error == "raise":
        raise CheckedRewardError(one_line(message))
    logger.warning("%s; its %d scores are None (on_error = 'none')", one_line(message), n)
    return [None] * n


def _call(
    name: str,
    func: RewardFunc,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Any],
    timeout: float | None,
) -> Any:
    """``func(...)``; with a timeout, in a daemon thread that is abandoned when time runs out."""
    if timeout is None:
        return func(prompts=prompts, completions=completions, **columns)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func(prompts=prompts, completions=completions, **columns)
        except BaseException as exc:  # re-raised in the caller, as a direct call would
            outcome["error"] = exc

    worker = threading.Thread(target=target, name=f"fedmoa-reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _TimedOut
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _failing_sample(
    name: str,
    func: RewardFunc,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, list[Any]],
    timeout: float | None = None,
) -> int | None:
    """Replays a failed batch one sample at a time to find which sample makes ``func`` raise
    (None when no single sample does, or a replay runs out of time)."""
    n = len(completions)
    if len(prompts) != n or any(
        not isinstance(v, Sequence) or len(v) != n for v in columns.values()
    ):
        return None
    for i in range(n):
        try:
            _call(
                name,
                func,
                prompts[i : i + 1],
                completions[i : i + 1],
                {k: v[i : i + 1] for k, v in columns.items()},
                timeout,
            )
        except _TimedOut:
            return None
        except Exception:
            return i
    return None
