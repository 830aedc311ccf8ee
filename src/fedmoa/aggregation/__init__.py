"""Server-side aggregation: pure functions over adapters (no I/O, no Flower objects).

- ``task_accuracy``: the FedMOA server (task- and accuracy-aware aggregation);
- ``fedavg``: the FedAvg baseline;
- ``server_optimizers``: FedAdam / FedYogi / FedAvgM, driving Flower's own strategies;
- ``updates``: the ``ClientUpdate`` type, sanitation and adapter arithmetic.

LoRA ``A`` and ``B`` are averaged separately (FedIT convention); this is inexact
because ``avg(B)·avg(A) ≠ avg(B·A)``.
"""

from fedmoa.aggregation.fedavg import fedavg, fedavg_aggregate
from fedmoa.aggregation.server_optimizers import (
    FlowerServerOptimizer,
    ServerOptimizer,
    ServerOptimizerName,
    check_server_optimizer,
    make_server_optimizer,
    server_optimizer_aggregate,
)
from fedmoa.aggregation.task_accuracy import (
    ACCURACY_RULES,
    AccuracyEvidence,
    AccuracyRule,
    GainEvidence,
    HarmEvidence,
    TaskAccuracySettings,
    accumulate_evidence,
    accumulate_gain_evidence,
    accuracy_weights,
    cap_shares,
    gain_weights,
    harmful,
    noise_aware_weights,
    task_accuracy_aggregate,
    task_shares,
    within_task_weights,
)
from fedmoa.aggregation.updates import (
    Adapter,
    AggregationResult,
    ClientUpdate,
    Rejection,
    adapter_norm,
    sanitize,
)

__all__ = [
    "ACCURACY_RULES",
    "AccuracyEvidence",
    "AccuracyRule",
    "Adapter",
    "AggregationResult",
    "ClientUpdate",
    "FlowerServerOptimizer",
    "GainEvidence",
    "HarmEvidence",
    "Rejection",
    "ServerOptimizer",
    "ServerOptimizerName",
    "TaskAccuracySettings",
    "accumulate_evidence",
    "accumulate_gain_evidence",
    "accuracy_weights",
    "adapter_norm",
    "cap_shares",
    "check_server_optimizer",
    "fedavg",
    "fedavg_aggregate",
    "gain_weights",
    "harmful",
    "make_server_optimizer",
    "noise_aware_weights",
    "sanitize",
    "server_optimizer_aggregate",
    "task_accuracy_aggregate",
    "task_shares",
    "within_task_weights",
]
