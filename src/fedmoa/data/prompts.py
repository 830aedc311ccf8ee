"""Chat prompts in TRL's conversational format (a list of ``{"role", "content"}`` messages)."""

from __future__ import annotations

from typing import Any

from fedmoa.errors import DataError

DEFAULT_SYSTEM_PROMPT = "Solve the problem. Put the final answer in \\boxed{}."

Message = dict[str, str]
_ROLES = frozenset({"system", "user", "assistant"})


def build_prompt(question: str, system_prompt: str | None) -> list[Message]:
    """One user turn, preceded by the system prompt when one is set (not None or "")."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}]


def question_system_prompt(system_prompt: str | None, default: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The system message put before a plain-text question: ``default`` (the source's
    instruction, which rewards rely on, e.g. ``\\boxed{}``) when the config leaves
    ``system_prompt`` unset (None), else the configured one ("" meaning none)."""
    return default if system_prompt is None else system_prompt


def as_messages(value: Any, system_prompt: str | None, where: str) -> list[Message]:
    """Normalise a ``prompt`` column from a file: a string is a plain-text question (a user turn
    after ``question_system_prompt``); messages are checked and copied, used as written (as TRL
    does) unless ``system_prompt`` is set to a non-empty text, which is put first when they do
    not start with a system message of their own.
    """
    if isinstance(value, str):
        return build_prompt(value, question_system_prompt(system_prompt))
    if not (isinstance(value, list) and value and all(_is_message(m) for m in value)):
        raise DataError(
            f"{where}: 'prompt' must be a string or a non-empty list of "
            f"{{'role': system|user|assistant, 'content': str}} messages"
        )
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _is_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") in _ROLES
        and isinstance(item.get("content"), str)
    )
