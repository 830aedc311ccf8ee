"""This data owner's own reward: the answer comes first (TRL's reward-function signature)."""

import re


def answer_first(prompts, completions, **kwargs):
    """1.0 when the completion starts with a number, else 0.0."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.match(r"\s*-?\d", text) else 0.0 for text in texts]
