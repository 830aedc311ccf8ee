"""Client-side reward weighting strategies (static; hypergradient in FedMOA)."""

from fedmoa.weighting.base import RewardWeighting, StepSignals, normalize_weights
from fedmoa.weighting.static import StaticWeighting

__all__ = ["RewardWeighting", "StaticWeighting", "StepSignals", "normalize_weights"]
