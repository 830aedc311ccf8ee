"""Client-side reward weighting: static, FedMOA's hypergradient, and the SAW/variance baselines."""

from fedmoa.weighting.base import (
    RewardBatch,
    RewardWeighting,
    StepSignals,
    floored,
    normalize_weights,
)
from fedmoa.weighting.batch_statistics import SAWWeighting, VarianceWeighting
from fedmoa.weighting.build import build_weighting
from fedmoa.weighting.config import WeightingConfig, resolve_method
from fedmoa.weighting.hypergradient import HypergradientWeighting
from fedmoa.weighting.probe import select_probe_params
from fedmoa.weighting.static import StaticWeighting

__all__ = [
    "HypergradientWeighting",
    "RewardBatch",
    "RewardWeighting",
    "SAWWeighting",
    "StaticWeighting",
    "StepSignals",
    "VarianceWeighting",
    "WeightingConfig",
    "build_weighting",
    "floored",
    "normalize_weights",
    "resolve_method",
    "select_probe_params",
]
