"""Data layer: load prompt rows from a registered source and split them deterministically.

Sources: ``reasoning_gym``, ``jsonl``, ``parquet``, ``hub`` (``sources``) and the offline test
sets ``gsm8k``, ``math``, ``math500``, ``mbpp``, ``humaneval`` (``benchmarks``). A
``PartitionConfig`` gives each federated client its share of the rows.

>>> rows = load_rows(DataConfig(params={"min_terms": 2, "max_terms": 2}, size=8))
>>> train, val, test = split_rows(rows, (0.5, 0.25, 0.25), seed=0)
"""

from fedmoa.data import benchmarks  # registers the benchmark sources
from fedmoa.data.benchmarks import CODE_SYSTEM_PROMPT, MATH_SUBJECTS
from fedmoa.data.config import DataConfig, SplitConfig
from fedmoa.data.partition import PartitionConfig, partition_indices, partition_rows
from fedmoa.data.prompts import DEFAULT_SYSTEM_PROMPT, as_messages, build_prompt
from fedmoa.data.sources import SOURCES, load_rows, register_source
from fedmoa.data.splits import ClientData, load_split, split_rows

__all__ = [
    "CODE_SYSTEM_PROMPT",
    "DEFAULT_SYSTEM_PROMPT",
    "MATH_SUBJECTS",
    "SOURCES",
    "ClientData",
    "DataConfig",
    "PartitionConfig",
    "SplitConfig",
    "as_messages",
    "benchmarks",
    "build_prompt",
    "load_rows",
    "load_split",
    "partition_indices",
    "partition_rows",
    "register_source",
    "split_rows",
]
