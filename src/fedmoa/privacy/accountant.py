"""ε at δ for the rounds so far, from opacus's accountants (not a hand-written one).

Each round is a subsampled Gaussian mechanism: a client takes part with probability
``q = clients per round / clients`` and each aggregate that holds its update gets noise with
multiplier ``z``; a client's update enters ``releases`` aggregates a round (the global one and
its task's), and the accountant composes them all.
"""

from __future__ import annotations

import importlib
from typing import Any

# opacus is imported when an accountant is made, never at fedmoa's import: importing it adds a
# handler to the root logger, after which an application's logging.basicConfig does nothing.
ACCOUNTANTS = {"rdp": "RDPAccountant", "prv": "PRVAccountant"}


def _accountant(kind: str) -> Any:
    return getattr(importlib.import_module("opacus.accountants"), ACCOUNTANTS[kind])()


class PrivacyAccountant:
    """The composition of every release so far; its history is what a checkpoint keeps."""

    def __init__(self, kind: str, noise_multiplier: float, sample_rate: float, releases: int):
        self.kind = kind
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.releases = releases
        self._accountant = _accountant(kind)

    def step(self) -> None:
        """One round."""
        for _ in range(self.releases):
            self._accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )

    def epsilon(self, delta: float) -> float:
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta))

    def epsilon_after(self, rounds: int, delta: float) -> float:
        """ε if ``rounds`` more rounds ran; the accountant itself is left as it is."""
        trial = _accountant(self.kind)
        trial.history = list(self._accountant.history)
        for _ in range(rounds * self.releases):
            trial.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(trial.get_epsilon(delta)) if trial.history else 0.0

    def rounds_within(self, budget: float, delta: float, limit: int) -> int:
        """How many rounds, counted from the start, keep ε at δ within ``budget`` (≤ limit)."""
        trial = PrivacyAccountant(self.kind, self.noise_multiplier, self.sample_rate, self.releases)
        for rounds in range(limit):
            trial.step()
            if trial.epsilon(delta) > budget:
                return rounds
        return limit

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self._accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._accountant.history = [tuple(h) for h in state["history"]]


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, releases: int, kind: str
) -> float:
    """The noise multiplier at which ``rounds`` rounds spend ``target_epsilon`` (opacus's
    search over its accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds * releases,
            accountant=kind,
        )
    )


def resolve_noise_multiplier(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    *,
    sample_rate: float,
    rounds: int,
    releases: int,
    kind: str,
) -> float:
    """The configured multiplier, or the one at which the planned rounds spend the target."""
    if noise_multiplier is not None:
        return noise_multiplier
    assert target_epsilon is not None  # PrivacyConfig requires one of the two
    return noise_for_target(target_epsilon, delta, sample_rate, rounds, releases, kind)
