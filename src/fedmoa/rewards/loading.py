"""Built-in rewards and loading a reward function from a config spec.

Configs name rewards by string, so every way a spec can be wrong (unknown name, missing module,
file or attribute, a non-callable, parameters the function does not take) is caught at load time
with a one-line ``RewardError`` that names the spec, instead of failing mid-round.
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


def load_reward_function(spec: str, params: dict[str, Any] | None = None) -> RewardFunc:
    """Resolves ``spec`` and binds ``params`` as keyword arguments.

    ``spec`` is a built-in name, ``package.module:function`` or ``path/to/file.py:function``. Each
    param must name a parameter of the function, so a typo fails here, not silently in ``**kwargs``.
    """
    func = _resolve(spec)
    if not params:
        return func
    _check_params(spec, func, params)
    bound = functools.partial(func, **params)
    functools.update_wrapper(bound, func)
    return bound


def _resolve(spec: str) -> RewardFunc:
    if ":" not in spec:
        if spec not in BUILTIN_REWARDS:
            raise RewardError(
                f"unknown reward {spec!r}: expected one of {sorted(BUILTIN_REWARDS)}, "
                "'package.module:function' or 'path/to/file.py:function'"
            )
        return BUILTIN_REWARDS[spec]
    source, _, name = spec.rpartition(":")
    module = _load_file(spec, Path(source)) if source.endswith(".py") else _import(spec, source)
    if not hasattr(module, name):
        raise RewardError(f"reward {spec!r}: {source!r} has no attribute {name!r}")
    func = getattr(module, name)
    if not callable(func):
        raise RewardError(f"reward {spec!r}: {name!r} is a {type(func).__name__}, not a callable")
    return func


def _import(spec: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(
            f"reward {spec!r}: cannot import {module_name!r}: {one_line(exc)}"
        ) from exc


def _load_file(spec: str, path: Path) -> ModuleType:
    """Imports a Python file under a name unique to its resolved path (registered, so that pickling
    and dataclasses work), without putting its folder on ``sys.path``."""
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: file {str(path)!r} not found")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"fedmoa_reward_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardError(
            f"reward {spec!r}: executing {str(path)!r} raised {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    return module


def _check_params(spec: str, func: RewardFunc, params: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and C functions have no signature to check
        return
    named = {
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("prompts", "completions")
    }
    unknown = sorted(set(params) - named)
    if unknown:
        raise RewardError(
            f"reward {spec!r} does not take parameter(s) {unknown}; "
            f"it takes {sorted(named) or 'none'}"
        )
