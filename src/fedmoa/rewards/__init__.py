"""Reward functions with TRL's signature: built-ins, loading from a spec, the reward matrix.

A reward function is ``f(prompts, completions, **columns) -> list[float | None]``: prompts and
completions in TRL's standard (``str``) or conversational (list of messages) format, extra dataset
columns (and ``completion_ids``) as keyword lists aligned with the completions, None meaning "not
applicable to this sample".
"""

from fedmoa.rewards.base import RewardFunc, completion_text, compute_rewards
from fedmoa.rewards.code_reward import RunResult, code_execution, extract_code, run_python
from fedmoa.rewards.format import format_reward
from fedmoa.rewards.length import length_reward
from fedmoa.rewards.loading import BUILTIN_REWARDS, load_reward_function
from fedmoa.rewards.math_reward import math_accuracy
from fedmoa.rewards.sandbox import (
    ExecutionResult,
    Outcome,
    Program,
    SandboxLimits,
    network_isolation,
    run_many,
    run_program,
)

__all__ = [
    "BUILTIN_REWARDS",
    "ExecutionResult",
    "Outcome",
    "Program",
    "RewardFunc",
    "RunResult",
    "SandboxLimits",
    "code_execution",
    "completion_text",
    "compute_rewards",
    "extract_code",
    "format_reward",
    "length_reward",
    "load_reward_function",
    "math_accuracy",
    "network_isolation",
    "run_many",
    "run_program",
    "run_python",
]
