"""The Gaussian mechanism on a released aggregate ``Σ_k w_k Δ_k`` (weights summing to 1).

Replacing one client's update (‖Δ‖ ≤ C) changes the aggregate by at most ``2·w_max·C`` when the
other clients' weights only rescale in proportion (docs/design.md, "Differential privacy"), so
the noise std is ``z·2·w_max·C`` for noise multiplier ``z``.
"""

from __future__ import annotations

import torch

from fedmoa.aggregation import Adapter


def sensitivity(max_weight: float, clip: float) -> float:
    """L2 sensitivity of a weighted mean of clipped updates to one client: ``2·w_max·C``."""
    return 2.0 * max_weight * clip


def add_gaussian_noise(delta: Adapter, std: float, generator: torch.Generator) -> Adapter:
    """``delta`` plus N(0, std²) on every entry, drawn in float32 from ``generator`` (on CPU, in
    the order of the keys), so every engine draws the same noise for the same seed."""
    out = {}
    for name in sorted(delta):
        tensor = delta[name]
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
        out[name] = (tensor.float() + noise.to(tensor.device)).to(tensor.dtype)
    return {name: out[name] for name in delta}
