"""Built-in rewards and loading a reward function from a config spec.

Configs name rewards by string, so every way a spec can be wrong (unknown name, missing module,
file or attribute, a non-callable, parameters the function does not take, a function that cannot
take TRL's reward call) is caught at load time with a one-line ``RewardError`` that names the
spec, instead of failing mid-round.

A spec may also name a factory (``factory=True``), as TRL's ``get_soft_overlong_punishment``:
its ``params`` are passed to it once, here, and what it returns is the reward function.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmoa.errors import RewardError
from fedmoa.rewards.base import RewardFunc, one_line
from fedmoa.rewards.code_reward import code_execution
from fedmoa.rewards.format import format_reward
from fedmoa.rewards.length import length_reward
from fedmoa.rewards.math_reward import math_accuracy

BUILTIN_REWARDS: dict[str, RewardFunc] = {
    "math_accuracy": math_accuracy,
    "format": format_reward,
    "length": length_reward,
    "code_execution": code_execution,
}


def load_reward_function(
    spec: str,
    params: dict[str, Any] | None = None,
    *,
    factory: bool = False,
    name: str | None = None,
) -> RewardFunc:
    """Resolves ``spec`` and binds ``params`` as keyword arguments.

    ``spec`` is a built-in name, ``package.module:function`` or ``path/to/file.py:function``. Each
    param must name a parameter of the function, so a typo fails here, not silently in ``**kwargs``.
    With ``factory``, the function is called once with ``params`` and must return the reward
    function. Either way the reward function must take TRL's call (``check_trl_call``). ``name``
    (the objective's name in the config) is added to error messages.
    """
    who = f"reward {name!r} ({spec!r})" if name else f"reward {spec!r}"
    func = _resolve(spec, who)
    if factory:
        return _from_factory(who, func, params or {})
    check_trl_call(who, func)
    if not params:
        return func
    _check_params(who, func, params)
    bound = functools.partial(func, **params)
    functools.update_wrapper(bound, func)
    return bound


def check_trl_call(who: str, func: Any, made_by_factory: bool = False) -> None:
    """Refuses a function that cannot take TRL's reward call, ``f(prompts=..., completions=...,
    completion_ids=..., **columns)``, all by keyword: it must accept ``prompts`` and
    ``completions`` by keyword, each as a parameter of that name or in ``**kwargs``.

    The dataset columns are only known when data loads, so a function without ``**kwargs`` that
    lacks a parameter for one still fails at its first call (one line naming the reward and the
    unexpected column). A callable without an inspectable signature is not checked.
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n in ("prompts", "completions") if n not in by_keyword]
    if not missing:
        return
    takes = ", ".join(p.name for p in parameters) or "none"
    if "completions" in missing and not made_by_factory:
        hint = "did you mean factory = true? (a factory's params make the reward function)"
    else:
        hint = "add **kwargs to its parameters"
    source = "the function its factory returned" if made_by_factory else "it"
    raise RewardError(
        f"{who} cannot take TRL's reward call f(prompts=..., completions=..., "
        f"completion_ids=..., **columns): {source} takes no keyword "
        f"{' or '.join(repr(m) for m in missing)} and no **kwargs (parameters: {takes}); {hint}"
    )


def _from_factory(who: str, factory: Any, params: dict[str, Any]) -> RewardFunc:
    """``factory(**params)``, which must be a reward function that takes TRL's call."""
    _check_params(who, factory, params, factory=True)
    try:
        func = factory(**params)
    except Exception as exc:
        raise RewardError(
            f"{who}: calling the factory raised {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if not callable(func):
        raise RewardError(
            f"{who}: factory = true, but it returned a {type(func).__name__}, "
            "not a reward function (a callable)"
        )
    check_trl_call(who, func, made_by_factory=True)
    return func


def _resolve(spec: str, who: str) -> RewardFunc:
    if ":" not in spec:
        if spec not in BUILTIN_REWARDS:
            raise RewardError(
                f"unknown {who}: expected one of {sorted(BUILTIN_REWARDS)}, "
                "'package.module:function' or 'path/to/file.py:function'"
            )
        return BUILTIN_REWARDS[spec]
    source, _, name = spec.rpartition(":")
    module = _load_file(who, Path(source)) if source.endswith(".py") else _import(who, source)
    if not hasattr(module, name):
        raise RewardError(f"{who}: {source!r} has no attribute {name!r}")
    func = getattr(module, name)
    if not callable(func):
        raise RewardError(f"{who}: {name!r} is a {type(func).__name__}, not a callable")
    return func


def _import(who: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(f"{who}: cannot import {module_name!r}: {one_line(exc)}") from exc


def _load_file(who: str, path: Path) -> ModuleType:
    """Imports a Python file under a name unique to its resolved path (registered, so that pickling
    and dataclasses work), without putting its folder on ``sys.path``."""
    if not path.is_file():
        raise RewardError(f"{who}: file {str(path)!r} not found")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"fedmoa_reward_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"{who}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardError(
            f"{who}: executing {str(path)!r} raised {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    return module


def _check_params(
    who: str, func: RewardFunc, params: dict[str, Any], factory: bool = False
) -> None:
    """Every param names a parameter of ``func`` (a reward function's ``prompts`` and
    ``completions`` are TRL's to pass; a factory with ``**kwargs`` takes any)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and C functions have no signature to check
        return
    parameters = signature.parameters.values()
    if factory and any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    named = {
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and (factory or p.name not in ("prompts", "completions"))
    }
    unknown = sorted(set(params) - named)
    if unknown:
        raise RewardError(
            f"{who}{' factory' if factory else ''} does not take parameter(s) {unknown}; "
            f"it takes {sorted(named) or 'none'}"
        )
