"""Chat prompts in TRL's conversational format (a list of ``{"role", "content"}`` messages)."""

from __future__ import annotations

from typing import Any

from fedmoa.errors import DataError

DEFAULT_SYSTEM_PROMPT = "Solve the problem. Put the final answer in \\boxed{}."

Message = dict[str, str]
_ROLES = frozenset({"system", "user", "assistant"})


def build_prompt(question: str, system_prompt: str | None) -> list[Message]:
    """One user turn, preceded by the system prompt when one is set."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}]


def as_messages(value: Any, system_prompt: str | None, where: str) -> list[Message]:
    """Normalise a ``prompt`` column from a file: a string becomes a user turn, messages are
    checked and copied. The system prompt is prepended when the messages have none, because
    rewards rely on its instruction (e.g. ``\\boxed{}``); set it to ``None`` to keep them as is.
    """
    if isinstance(value, str):
        return build_prompt(value, system_prompt)
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
