"""Bounding each client's contribution: the L2 norm of its whole LoRA update."""

from __future__ import annotations

import math

import torch

from fedmoa.aggregation import Adapter


def update_norm(delta: Adapter) -> float:
    """L2 norm over every tensor of ``delta`` as one vector, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_update(delta: Adapter, clip: float) -> tuple[Adapter, float]:
    """``Δ·min(1, clip/‖Δ‖)`` and ‖Δ‖ before clipping.

    An update already within the bound comes back as the same tensors, so clipping again on
    the server (which must not trust a client to have clipped) changes nothing for an honest
    client. The scale is rounded down in the update's dtype, so the clipped norm never exceeds
    ``clip`` by rounding.
    """
    norm = update_norm(delta)
    if norm <= clip:
        return delta, norm
    scale = clip / norm
    for _ in range(8):  # rounding to a low-precision dtype can land just above the bound
        clipped = {k: (t.double() * scale).to(t.dtype) for k, t in delta.items()}
        if update_norm(clipped) <= clip:
            return clipped, norm
        # two units of the dtype's precision: every rounded entry moves down by at least one
        scale *= 1 - 2 * max(torch.finfo(t.dtype).eps for t in delta.values())
    raise AssertionError(f"could not clip an update of norm {norm:g} to {clip:g}")
