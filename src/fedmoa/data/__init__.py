"""Data layer: load prompt rows from a registered source and split them deterministically.

>>> rows = load_rows(DataConfig(params={"min_terms": 2, "max_terms": 2}, size=8))
>>> train, val, test = split_rows(rows, (0.5, 0.25, 0.25), seed=0)
"""

from fedmoa.data.config import DataConfig
from fedmoa.data.prompts import DEFAULT_SYSTEM_PROMPT, as_messages, build_prompt
from fedmoa.data.sources import SOURCES, load_rows, register_source
from fedmoa.data.splits import split_rows

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "SOURCES",
    "DataConfig",
    "as_messages",
    "build_prompt",
    "load_rows",
    "register_source",
    "split_rows",
]
