"""One place that turns a ``[weighting]`` table into a client's weighting, for every engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedmoa.weighting.base import RewardWeighting
from fedmoa.weighting.batch_statistics import SAWWeighting, VarianceWeighting
from fedmoa.weighting.config import WeightingConfig, resolve_method
from fedmoa.weighting.hypergradient import HypergradientWeighting
from fedmoa.weighting.static import StaticWeighting


def build_weighting(
    cfg: WeightingConfig,
    names: Sequence[str],
    primary: str,
    initial: Sequence[float],
    policy: Any,
    run_method: str | None = None,
    normalize: bool = True,
) -> RewardWeighting:
    """The weighting ``cfg`` asks for, for a client of ``run_method`` (``None``: train-local).

    ``policy`` is the PEFT model, whose LoRA tensors the hypergradient probes (and hooks).
    ``normalize=False`` keeps static weights as given (the centralized learner's weights are
    already normalised per source client).
    """
    method = resolve_method(cfg.method, run_method)
    if method == "static":
        return StaticWeighting(names, primary, initial, normalize=normalize)
    if method in ("saw", "variance"):
        cls = SAWWeighting if method == "saw" else VarianceWeighting
        return cls(names, primary, initial, w_min=cfg.w_min, smoothing=cfg.smoothing)
    assert cfg.eta is not None  # filled in from the rule by WeightingConfig
    return HypergradientWeighting.for_model(
        policy,
        names,
        primary,
        initial,
        probe=cfg.probe,
        rule=cfg.rule,
        eta=cfg.eta,
        w_min=cfg.w_min,
        anchor=cfg.anchor,
        carry_across_rounds=cfg.carry_across_rounds,
        ema=cfg.ema,
        momentum=cfg.momentum,
        saturation_window=cfg.saturation_window,
        saturation_decay=cfg.saturation_decay,
    )
