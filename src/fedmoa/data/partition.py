"""Splitting one source's rows among federated clients, with flwr-datasets' partitioners.

Every client loads the same rows (same ``DataConfig`` except ``partition.partition_id``) and
keeps its own partition, so partitions are disjoint without any coordination. Schemes:

- ``iid``: rows shuffled with ``seed``, then cut into ``num_partitions`` near-equal shards
  (``IidPartitioner``; it cuts contiguous shards, hence the shuffle: benchmark rows are sorted).
- ``dirichlet``: label skew. For each value of the ``label`` column, the share of each partition
  is drawn from Dirichlet(``alpha``) (``DirichletPartitioner``): small ``alpha``, few labels per
  client. No resampling and no self-balancing, so every row lands in exactly one partition and
  the draw never fails; a partition can come out empty, which is an error for that client.
- ``by_label``: the rows whose ``label`` equals ``value`` (or one of the values), e.g. one MATH
  subject per client. Clients that share a value split its rows IID among ``num_partitions``.

Only the row indices and labels go into the ``datasets.Dataset`` that the partitioners see, so
row values that Arrow cannot hold (nested messages, mixed types) are untouched. A partition keeps
the rows' original order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from fedmoa.errors import DataError

if TYPE_CHECKING:
    import datasets

Row = dict[str, Any]
Scheme = Literal["iid", "dirichlet", "by_label"]
LabelValue = str | int
_INDEX = "__index"
_LABEL = "__label"


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PartitionConfig:
    """Which share of the loaded rows this client keeps (see the module docstring).

    ``label`` names a row column (e.g. ``subject`` or ``level`` of the MATH sources) and is
    required by ``dirichlet`` and ``by_label``; ``value`` is required by ``by_label`` only and
    ``alpha`` is used by ``dirichlet`` only. ``seed`` must be the same for all clients.
    """

    scheme: Scheme  # how rows are shared out: iid, dirichlet over a label, or by label value
    num_partitions: int = Field(default=1, ge=1)  # number of shares the rows are split into
    partition_id: int = Field(default=0, ge=0)  # which share this client keeps
    label: str | None = None  # row column to partition by (dirichlet, by_label)
    # label value(s) this client keeps (by_label)
    value: LabelValue | list[LabelValue] | None = None
    # Dirichlet concentration: smaller is more skewed (dirichlet)
    alpha: float = Field(default=0.5, gt=0)
    seed: int = 0  # partition seed; the same on every client

    @model_validator(mode="after")
    def _consistent(self) -> PartitionConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition_id ({self.partition_id}) must be below "
                f"num_partitions ({self.num_partitions})"
            )
        if self.scheme != "iid" and not self.label:
            raise ValueError(f"label is required by scheme '{self.scheme}' (a column name)")
        if self.scheme == "by_label" and self.value in (None, []):
            raise ValueError("value is required by scheme 'by_label' (the label value(s) to keep)")
        if self.scheme != "by_label" and self.value is not None:
            raise ValueError(f"value is only used by scheme 'by_label', not '{self.scheme}'")
        return self

    @property
    def values(self) -> list[LabelValue]:
        """``value`` as a list (``by_label``)."""
        if self.value is None:
            return []
        return list(self.value) if isinstance(self.value, list) else [self.value]


def partition_rows(rows: Sequence[Row], cfg: PartitionConfig, where: str = "rows") -> list[Row]:
    """The rows of partition ``cfg.partition_id``; a DataError (naming ``where``) if it is empty."""
    indices = partition_indices(rows, cfg, where)[cfg.partition_id]
    if not indices:
        raise DataError(
            f"{where}: partition {cfg.partition_id} of {cfg.num_partitions} "
            f"(scheme '{cfg.scheme}') is empty; {_empty_hint(cfg)}"
        )
    return [rows[i] for i in indices]


def partition_indices(
    rows: Sequence[Row], cfg: PartitionConfig, where: str = "rows"
) -> list[list[int]]:
    """Row indices of every partition (``cfg.partition_id`` is ignored), each list ascending.

    The same rows and config always give the same partitions. For ``iid`` and ``dirichlet``
    they cover every row exactly once; for ``by_label`` every row with a matching label.
    """
    if cfg.scheme == "iid":
        return _iid(list(range(len(rows))), cfg, where)
    labels = _labels(rows, cfg, where)
    if cfg.scheme == "dirichlet":
        _check_enough(len(labels), cfg, where)
        return _dirichlet(labels, cfg)
    wanted = {_key(v) for v in cfg.values}
    chosen = [i for i, label in enumerate(labels) if label in wanted]
    if not chosen:
        present = sorted(set(labels))
        shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
        raise DataError(
            f"{where}: no row has partition.label '{cfg.label}' equal to partition.value "
            f"{cfg.value!r}; values present: {shown}"
        )
    return _iid(chosen, cfg, where)


def _labels(rows: Sequence[Row], cfg: PartitionConfig, where: str) -> list[str]:
    """Each row's label as canonical JSON, so that any JSON value (None, numbers, lists) works."""
    assert cfg.label is not None
    missing = [i for i, row in enumerate(rows) if cfg.label not in row]
    if missing:
        columns = ", ".join(sorted(rows[missing[0]]))
        raise DataError(
            f"{where}: partition.label '{cfg.label}' is not a column of row {missing[0]} "
            f"(columns: {columns})"
        )
    try:
        return [_key(row[cfg.label]) for row in rows]
    except TypeError as exc:
        raise DataError(f"{where}: partition.label '{cfg.label}' has non-JSON values") from exc


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _check_enough(n: int, cfg: PartitionConfig, where: str) -> None:
    """Fewer rows than partitions leaves some client empty (and flwr-datasets' shards fail)."""
    if cfg.num_partitions > n:
        raise DataError(
            f"{where}: cannot split {n} rows into partition.num_partitions = {cfg.num_partitions}"
        )


def _iid(indices: list[int], cfg: PartitionConfig, where: str) -> list[list[int]]:
    _check_enough(len(indices), cfg, where)
    dataset = _dataset({_INDEX: indices}).shuffle(seed=cfg.seed)
    partitioner = _partitioners().IidPartitioner(num_partitions=cfg.num_partitions)
    return _all_partitions(partitioner, dataset, cfg.num_partitions)


def _dirichlet(labels: list[str], cfg: PartitionConfig) -> list[list[int]]:
    codes = {label: code for code, label in enumerate(sorted(set(labels)))}
    dataset = _dataset({_INDEX: list(range(len(labels))), _LABEL: [codes[x] for x in labels]})
    partitioner = _partitioners().DirichletPartitioner(
        num_partitions=cfg.num_partitions,
        partition_by=_LABEL,
        alpha=float(cfg.alpha),
        min_partition_size=0,  # never resample (a retry limit could fail); rows stay covered once
        self_balancing=False,  # the plain Dirichlet draw: alpha alone sets the skew
        shuffle=False,
        seed=cfg.seed,
    )
    return _all_partitions(partitioner, dataset, cfg.num_partitions)


def _partitioners() -> ModuleType:
    """``flwr_datasets.partitioner``, imported on first use (it pulls in datasets and pandas)."""
    try:
        import flwr_datasets.partitioner
    except ImportError as exc:
        raise DataError(
            f"partitioning needs flwr-datasets: pip install 'flwr-datasets>=0.6' ({exc})"
        ) from exc
    return flwr_datasets.partitioner


def _dataset(columns: dict[str, list[int]]) -> datasets.Dataset:
    _partitioners()  # a missing flwr-datasets is reported before datasets is needed
    import datasets

    return datasets.Dataset.from_dict(columns)


def _all_partitions(partitioner: Any, dataset: datasets.Dataset, n: int) -> list[list[int]]:
    partitioner.dataset = dataset
    return [sorted(partitioner.load_partition(pid)[_INDEX]) for pid in range(n)]


def _empty_hint(cfg: PartitionConfig) -> str:
    if cfg.scheme == "dirichlet":
        return "raise partition.alpha, lower partition.num_partitions or change partition.seed"
    return "lower partition.num_partitions or load more rows (data size)"
