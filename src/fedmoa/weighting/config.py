"""The ``[weighting]`` table: which rule moves a client's reward weights, with its settings.

One table for every engine: ``fedmoa train-local`` and an experiment's clients build their
weighting from it through ``fedmoa.weighting.build_weighting``, so a key that is accepted
changes what trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

WeightingMethod = Literal["auto", "static", "hypergradient", "saw", "variance"]
"""``auto``: what the run's method implies (hypergradient for ``fedmoa``/``fedmoa-hg``,
static for every other method and for ``train-local``)."""

HypergradientRule = Literal["persistent", "cosine"]
"""``persistent`` (default): EMA-denoised alignment, Adam-normalised logit steps, explicit
saturation (docs/design.md); ``cosine``: the one-step cosine rule of fedmoa-algorithm.md."""

# Default η per rule: the cosine rule's is the spec's; the persistent rule's is in logits per
# step, chosen from benchmarks/weighting_behaviour.py (docs/results.md).
DEFAULT_ETA = {"cosine": 1.0, "persistent": 0.25}


@dataclass(config=ConfigDict(extra="forbid"))
class WeightingConfig:
    """How a client mixes its objectives; every rule's settings, each used by its rule only."""

    # auto: hypergradient for fedmoa and fedmoa-hg, static otherwise
    method: WeightingMethod = "auto"
    # -- hypergradient (FedMOA's client part) --
    # hypergradient rule: persistent (default) or the spec's per-step cosine rule
    rule: HypergradientRule = "persistent"
    eta: float | None = Field(None, gt=0, allow_inf_nan=False)  # None: DEFAULT_ETA[rule]
    w_min: float = Field(0.02, ge=0, lt=1)  # floor of every weight (every dynamic method)
    anchor: float = Field(0.0, ge=0, le=1)  # λ_anchor, pull toward the initial logits
    probe: Literal["last2", "all"] = "last2"  # LoRA B of the last 2 layers, or every LoRA tensor
    carry_across_rounds: bool = True  # keep the gradient cache / EMA across rounds
    # persistent rule: EMA factor of each objective's probe gradient, momentum of the
    # Adam-normalised logit step, saturation window (steps) and per-step gate decay
    ema: float = Field(0.8, ge=0, lt=1)
    # persistent rule: momentum of the Adam-normalised logit step
    momentum: float = Field(0.9, ge=0, lt=1)
    # persistent rule: steps without spread before an objective counts as saturated
    saturation_window: int = Field(3, ge=1)
    # persistent rule: per-step decay of a saturated objective's gate
    saturation_decay: float = Field(0.5, gt=0, lt=1)
    # -- saw / variance baselines: EMA factor of the batch statistics (0: this batch only) --
    # saw / variance baselines: EMA factor of the batch statistics (0: this batch only)
    smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _default_eta(self) -> WeightingConfig:
        if self.eta is None:
            self.eta = DEFAULT_ETA[self.rule]
        return self


def resolve_method(configured: WeightingMethod, run_method: str | None) -> str:
    """The weighting a client of ``run_method`` uses (``None``: train-local, no federation)."""
    if configured != "auto":
        return configured
    return "hypergradient" if run_method in ("fedmoa", "fedmoa-hg") else "static"


# The keys (``method`` aside) each weighting reads; PERSISTENT_KEYS only under the persistent rule.
PERSISTENT_KEYS = ("ema", "momentum", "saturation_window", "saturation_decay")
KEYS_READ: dict[str, frozenset[str]] = {
    "static": frozenset(),
    "saw": frozenset({"w_min", "smoothing"}),
    "variance": frozenset({"w_min", "smoothing"}),
    "hypergradient": frozenset(
        {"rule", "eta", "w_min", "anchor", "probe", "carry_across_rounds", *PERSISTENT_KEYS}
    ),
}


def unread_keys(
    cfg: WeightingConfig, given: Collection[str], run_method: str | None, table: str = "weighting"
) -> list[str]:
    """Why each key in ``given`` (the keys the file sets) does nothing, as one line each.

    A key that contradicts the table itself raises ``ValueError``: one of the persistent rule
    under ``rule = "cosine"``, or one that the explicitly chosen ``method`` does not read. A
    key unread only because ``method = "auto"`` resolves to another weighting for this run
    (settings kept while switching ``server.method``, e.g. fedmoa to fedavg) is returned, for
    the caller to warn about. ``table`` is the name the file uses (``hypergradient``, older).
    """
    method = resolve_method(cfg.method, run_method)
    notes = []
    for key in (f.name for f in dataclasses.fields(cfg) if f.name in given and f.name != "method"):
        if key in PERSISTENT_KEYS and cfg.rule == "cosine":
            raise ValueError(
                f"{table}.{key}: only the persistent rule reads it, and {table}.rule = 'cosine'"
            )
        if key in KEYS_READ[method]:
            continue
        readers = f"read only by {', '.join(m for m, keys in KEYS_READ.items() if key in keys)}"
        if cfg.method != "auto":
            raise ValueError(
                f"{table}.{key}: weighting.method = {method!r} does not read it ({readers})"
            )
        run = f"server.method = {run_method!r}" if run_method else "train-local"
        notes.append(
            f"{table}.{key} is ignored: weighting.method = 'auto' is {method!r} under {run} "
            f"({readers})"
        )
    return notes
