"""The ``[privacy]`` table: client-level DP of the aggregates the server releases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from fedmoa.config import STRICT


@dataclass(config=STRICT)
class PrivacyConfig:
    """DP-FedAvg-style client-level privacy; docs/design.md, "Differential privacy"."""

    clip: float = Field(gt=0, allow_inf_nan=False)  # L2 bound of each client's LoRA update
    # Gaussian noise std per released aggregate = noise_multiplier × its sensitivity
    noise_multiplier: float | None = Field(None, gt=0, allow_inf_nan=False)
    # ε the planned rounds may spend at delta: the multiplier is found for it (opacus)
    target_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)  # δ of the (ε, δ) guarantee
    # stop cleanly after the last round whose ε stays within this budget; none: no limit
    max_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    # "server": the server adds the noise (central DP); "client": each client noises its own
    # clipped update before sending it (local DP, for owners who do not trust the server)
    where: Literal["server", "client"] = "server"
    accountant: Literal["rdp", "prv"] = "rdp"  # opacus accountant that composes the rounds

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier and target_epsilon")
        return self
