"""Client-side reward weighting strategies (static; hypergradient in FedMOA)."""

from fedmoa.weighting.base import RewardWeighting, StepSignals, normalize_weights
from fedmoa.weighting.hypergradient import HypergradientWeighting, select_probe_params
from fedmoa.weighting.static import StaticWeighting

__all__ = [
    "HypergradientWeighting",
    "RewardWeighting",
    "StaticWeighting",
    "StepSignals",
    "normalize_weights",
    "select_probe_params",
]
