"""Online reward weighting by hypergradient descent (the FedMOA client part).

The weights live on a floored simplex, ``w = w_min + (1 - m·w_min)·softmax(z + log γ)``,
so that no objective ever vanishes (``γ`` is the saturation gate, 1 unless the rule
gates). Every step the weighting takes each objective's gradient on a small probe set of
LoRA parameters, ``g_i = ∇_P L(θ; Â_i)``, and asks how well objective ``i``'s *earlier*
update direction lines up with the direction that *now* improves the primary objective:
the one-step-delayed hypergradient of Baydin et al. (2018). Two rules:

``persistent`` (default; derived in docs/design.md, "Hypergradient weighting"):

    m_i ← EMA_ema(g_i)                  objective i's persistent direction
    q_i ← EMA_ema(‖g_i‖²)               its running squared scale
    u_i = ⟨g_p^s, m_i^{s-1}⟩ / (‖g_p^s‖·√q_i^{s-1})   ∈ [-1, 1]
    d_i = ∂(Σ_j w_j u_j)/∂z_i = (1 − m·w_min)·s_i·(u_i − Σ_j s_j u_j),  s = softmax(z + log γ)
    z ← z + η·m/(√v̂ + ε) − λ_anchor·(z − z⁰)   (m: momentum of d from 0; v̂: Adam's
                                               bias-corrected second moment; η in logits)

  ``u_i`` is a cosine with the persistent direction, shrunk by how persistent that
  direction is (``‖m_i‖/√q_i``, 1 for a fixed direction, about ``√((1−ema)/(1+ema))`` for
  pure noise). Saturation is explicit: an auxiliary whose groups all had zero reward spread
  for ``saturation_window`` steps in a row is *saturated*; its gate decays by
  ``saturation_decay`` per step (its weight goes to ``w_min``) and its logit is frozen; each
  step in which it has spread again multiplies the gate back by ``1/saturation_decay`` up
  to 1. A step in which the primary has no gradient (no group with spread) moves nothing.

``cosine`` (the rule of fedmoa-algorithm.md, step 6):

    u_i = cos(g_p^s, g_i^{s-1}),  z_i ← z_i + η·w_i·(u_i − Σ_j w_j u_j) − λ_anchor·(z_i − z_i⁰)

Cost: the m probe gradients reuse the step's forward graph, and backward stops at
the probe (by default the LoRA ``B`` matrices of the last two layers). How they are taken,
one partial backward per objective or one for all m through forward hooks, is plumbing, in
``fedmoa.weighting.probe``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmoa.weighting.base import (
    RewardBatch,
    RewardWeighting,
    StepSignals,
    check_floor,
    floored,
    normalize_weights,
)
from fedmoa.weighting.probe import ProbeGradients, select_probe_params

# Floor for ``w0_i - w_min`` when initialising the logits: a configured weight at or
# below the floor maps to a finite, very negative logit (weight ≈ w_min), not -inf,
# which would turn the anchor term ``z - z0`` into NaN.
_TINY = 1e-8
# A fully closed saturation gate, as a log: weight w_min up to 1e-9, and still finite.
_LOG_GATE_MIN = -20.0
RULES = ("persistent", "cosine")
# The persistent rule's second-moment factor and epsilon, Adam's defaults: with a few dozen
# steps the bias-corrected v̂ is the plain mean of the squared logit gradients so far.
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-12
# Logit gradients below this are rounding residue (e.g. ``u_i − Σ s_j u_j`` with equal ``u``),
# not signal: the Adam normalisation would turn them into full ``η`` steps whose sign depends
# on the last bit of a sum, so they count as 0. A real ``d_i`` is ``s_i·Δu`` with ``Δu`` ≫ 1e-9.
_GRAD_DEADBAND = 1e-9


def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` divided by its largest entry (per row), and that entry.

    Norms of the scaled rows neither underflow (gradients of 1e-30) nor overflow
    (1e25) in float32, where squaring would.
    """
    scale = x.abs().amax(dim=-1, keepdim=True)
    return x / torch.where(scale > 0, scale, torch.ones_like(scale)), scale


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    scaled, scale = _scaled(rows)
    return torch.linalg.vector_norm(scaled, dim=-1) * scale.squeeze(-1)


def _row_cosines(vector: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``cos(vector, rows[i])`` for every row, 0 where either side is zero."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        x, _ = _scaled(x)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))  # zero stays zero

    return (unit(rows) @ unit(vector)).clamp(-1.0, 1.0)


class HypergradientWeighting(ProbeGradients, RewardWeighting):
    """FedMOA's adaptive weights: ascend the primary objective's alignment with each objective.

    ``probe_params`` are the tensors gradients are taken against (see
    ``select_probe_params``). ``eta`` is the hypergradient step ``η_hg``, ``w_min``
    the per-objective floor, ``anchor`` the pull ``λ_anchor`` back to the initial
    logits. With ``carry_across_rounds`` the cached gradients survive
    ``begin_round()``, so the first step of a round compares the new global model's
    primary direction with last round's local directions; without it that step
    makes no update.

    The logits start at ``z0_i = log(max(w0_i − w_min, 1e-8) / (1 − m·w_min))`` with
    ``w0`` the normalised initial weights, so the mixed weights equal ``w0`` exactly
    whenever every ``w0_i ≥ w_min`` (and lift any smaller weight to about ``w_min``).
    """

    def __init__(
        self,
        names: Sequence[str],
        primary: str,
        initial: Sequence[float],
        probe_params: Sequence[torch.Tensor],
        eta: float = 1.0,
        w_min: float = 0.02,
        anchor: float = 0.0,
        carry_across_rounds: bool = True,
        rule: str = "cosine",
        ema: float = 0.8,
        momentum: float = 0.9,
        saturation_window: int = 3,
        saturation_decay: float = 0.5,
    ) -> None:
        super().__init__(names, primary)
        m = len(self.names)
        if len(initial) != m:
            raise ValueError(f"{m} objectives but {len(initial)} initial weights")
        if rule not in RULES:
            raise ValueError(f"unknown hypergradient rule {rule!r}: expected one of {RULES}")
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be finite and >= 0, got {eta}")
        if not (0 <= anchor <= 1):
            # λ > 1 overshoots z0 every step and λ > 2 diverges.
            raise ValueError(f"anchor must be in [0, 1], got {anchor}")
        for label, value in (("ema", ema), ("momentum", momentum)):
            if not (0 <= value < 1):
                raise ValueError(f"{label} must be in [0, 1), got {value}")
        if not (isinstance(saturation_window, int) and saturation_window >= 1):
            raise ValueError(f"saturation_window must be an integer >= 1, got {saturation_window}")
        if not (0 < saturation_decay < 1):
            raise ValueError(f"saturation_decay must be in (0, 1), got {saturation_decay}")
        self.rule = rule
        self.eta = float(eta)
        self.w_min = check_floor(w_min, m)
        self.anchor = float(anchor)
        self.carry_across_rounds = carry_across_rounds
        self.ema = float(ema)
        self.momentum = float(momentum)
        self.saturation_window = saturation_window
        self.saturation_decay = float(saturation_decay)
        w0 = normalize_weights(initial).double()
        mass = 1.0 - m * self.w_min
        self.z0 = torch.log((w0 - self.w_min).clamp(min=_TINY) / mass)
        self.z = self.z0.clone()
        self.init_probe(probe_params)
        # cosine: g^{s-1}; persistent: the EMA m of each objective's probe gradient.
        # One flattened float32 row per objective, or None before the first step.
        self.cached: torch.Tensor | None = None
        self.ema_sq = torch.zeros(m, dtype=torch.float64)  # q: EMA of ‖g_i‖²
        self.ema_steps = 0  # gradients folded into the EMA (for its bias correction)
        self.adam_m = torch.zeros(m, dtype=torch.float64)
        self.adam_v = torch.zeros(m, dtype=torch.float64)
        self.adam_steps = 0
        self.log_gate = torch.zeros(m, dtype=torch.float64)  # log γ, 0 = open
        self.zero_run = torch.zeros(m, dtype=torch.long)  # consecutive zero-spread steps
        # This step's objectives with zero spread in every group (set by observe_batch): their
        # advantages are rounding residue, so their probe gradients count as exactly zero.
        self._no_spread = torch.zeros(m, dtype=torch.bool)
        self.steps = 0  # observe() calls
        self.updates = 0  # logit updates made
        self._part_seconds = 0.0  # observe_part() time this step, for timing/hypergradient

    # -- weights ---------------------------------------------------------------------------

    def weights(self) -> torch.Tensor:
        return self._mix(self.z).float()

    def _mix(self, z: torch.Tensor) -> torch.Tensor:
        return floored(torch.softmax(z + self.log_gate, dim=0), self.w_min)

    def saturated(self) -> torch.Tensor:
        """[m] bool: auxiliaries with zero spread in every group for the whole window."""
        flags = self.zero_run >= self.saturation_window
        flags[self.primary_index] = False  # the primary is what the weight flows to
        return flags if self.rule == "persistent" else torch.zeros_like(flags)

    # -- probe (the gradients themselves: ``ProbeGradients``) ------------------------------

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        names: Sequence[str],
        primary: str,
        initial: Sequence[float],
        probe: str = "last2",
        per_sample: bool = True,
        **kwargs: Any,
    ) -> HypergradientWeighting:
        """Select the probe on ``model`` and, with ``per_sample``, hook it for the fast path."""
        params = [p for _, p in select_probe_params(model, probe)]
        weighting = cls(names, primary, initial, params, **kwargs)
        if per_sample:
            weighting.hook_model(model)
        return weighting

    # -- update ----------------------------------------------------------------------------

    def observe_batch(self, batch: RewardBatch) -> dict[str, float]:
        """Saturation bookkeeping (persistent rule), before this step's weights are used, so
        that a saturated objective's weight already falls on the step that confirms it."""
        self.drop_part_gradients()  # a new step: nothing of an unfinished one counts
        self._part_seconds = 0.0
        zero = torch.as_tensor(batch.zero_std, dtype=torch.float64).cpu() >= 1.0
        if zero.shape != (len(self.names),):
            raise ValueError(f"zero_std must have shape ({len(self.names)},)")
        self.zero_run = torch.where(zero, self.zero_run + 1, torch.zeros_like(self.zero_run))
        self._no_spread = zero
        if self.rule == "persistent":
            saturated = self.saturated()
            step = math.log(self.saturation_decay)
            gate = torch.where(saturated, self.log_gate + step, self.log_gate)
            gate = torch.where(~zero, gate - step, gate)  # spread again: reopen
            self.log_gate = gate.clamp(_LOG_GATE_MIN, 0.0)
        return {}

    def observe_part(self, signals: StepSignals) -> None:
        """One micro-batch's probe gradients, added up for the step's ``observe``."""
        start = time.perf_counter()
        self.add_part_gradients(signals)
        self._part_seconds += time.perf_counter() - start

    def observe(self, signals: StepSignals) -> dict[str, float]:
        """Update the logits from this step's graph; call after the loss, before backward.

        After ``observe_part`` calls (micro-batches) the step's probe gradients are their sum,
        and ``signals.objective_loss`` is not read.

        Metrics (same keys every step): ``alignment/<name>`` is ``u_i``, and 0.0 on a
        step without cached gradients (the value that makes no update, and a valid
        JSON/Flower metric, unlike NaN); ``saturated/<name>`` is the saturation state
        (always 0 under the cosine rule); ``hypergrad/updated`` says whether the logits
        moved, so a 0 alignment from "no cache" can be told from a saturated objective;
        ``probe_grad_norm/<name>`` is ``‖g_i^s‖``; ``hypergrad/per_sample`` says whether
        the one-backward path of ``hook_model`` was taken; ``timing/hypergradient`` is
        this call's wall time.
        """
        start = time.perf_counter() - self._part_seconds
        self._part_seconds = 0.0
        grads = self.summed_gradients()
        if grads is None:
            grads = self.probe_gradients(signals)
        if self.rule == "persistent" and bool(self._no_spread.any()):
            # No spread, no signal: whatever the advantages hold there is rounding residue,
            # whose direction a cosine would read as meaningful.
            grads[self._no_spread.to(grads.device)] = 0.0
        self._no_spread = torch.zeros_like(self._no_spread)  # one batch, one observe
        m = len(self.names)
        alignment = torch.zeros(m, dtype=torch.float64)
        primary = grads[self.primary_index]
        # Persistent rule: a step whose primary had no gradient (no group with spread) says
        # nothing about any objective's alignment, so it moves nothing, momentum included.
        informative = self.rule == "cosine" or bool(primary.any())
        updated = self.cached is not None and informative
        if updated:
            assert self.cached is not None
            cached = self.cached.to(primary.device)
            if self.rule == "cosine":
                alignment = _row_cosines(primary, cached).double().cpu()
                w = self._mix(self.z)
                step = self.eta * w * (alignment - (w * alignment).sum())
            else:
                alignment = self._persistent_alignment(primary, cached)
                step = self._adam_step(alignment)
            self.z = self.z + step - self.anchor * (self.z - self.z0)
            self.updates += 1
        self._fold(grads.detach())
        self.steps += 1
        self._seen.clear()  # the next step's forward must run through the hooks again
        norms = _row_norms(grads).cpu().tolist()
        saturated = self.saturated().tolist()
        metrics = {f"alignment/{n}": float(u) for n, u in zip(self.names, alignment, strict=True)}
        metrics.update(
            {f"saturated/{n}": float(v) for n, v in zip(self.names, saturated, strict=True)}
        )
        metrics.update({f"probe_grad_norm/{n}": v for n, v in zip(self.names, norms, strict=True)})
        metrics["hypergrad/updated"] = float(updated)
        metrics["hypergrad/per_sample"] = float(self.last_path == "per_sample")
        metrics["timing/hypergradient"] = time.perf_counter() - start
        return metrics

    def _persistent_alignment(self, primary: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """``u_i = ⟨g_p, m̂_i⟩ / (‖g_p‖·√q̂_i)``: the cosine with the persistent direction,
        times its persistence ``‖m̂_i‖/√q̂_i ≤ 1``; 0 where either side is zero."""
        correction = 1.0 - self.ema**self.ema_steps
        cosines = _row_cosines(primary, cached).double().cpu()
        m_norm = _row_norms(cached).double().cpu() / correction
        q_root = (self.ema_sq / correction).sqrt()
        persistence = torch.where(q_root > 0, m_norm / q_root.clamp(min=1e-300), 0.0)
        return cosines * persistence.clamp(max=1.0)

    def _adam_step(self, alignment: torch.Tensor) -> torch.Tensor:
        """Ascent on ``Σ_j w_j u_j`` through the gated softmax, Adam-normalised per logit so
        that ``η`` is the step in logits; saturated objectives' logits stay where they are
        (their gate does the work, and they resume from there when they de-saturate)."""
        m = len(self.names)
        shares = torch.softmax(self.z + self.log_gate, dim=0)
        grad = (1.0 - m * self.w_min) * shares * (alignment - (shares * alignment).sum())
        frozen = self.saturated()
        grad = torch.where(frozen | (grad.abs() < _GRAD_DEADBAND), torch.zeros_like(grad), grad)
        self.adam_steps += 1
        self.adam_m = self.momentum * self.adam_m + (1 - self.momentum) * grad
        self.adam_v = _ADAM_BETA2 * self.adam_v + (1 - _ADAM_BETA2) * grad**2
        # The momentum starts from 0 without Adam's bias correction, so a step is η times how
        # consistent the recent signs were (η·(1 − momentum^k) after k agreeing steps), not a
        # full η on the first, noisiest comparison; v̂ is bias-corrected, so |d|'s scale
        # cancels.
        v_hat = self.adam_v / (1 - _ADAM_BETA2**self.adam_steps)
        step = self.eta * self.adam_m / (v_hat.sqrt() + _ADAM_EPS)
        return torch.where(frozen, torch.zeros_like(step), step)

    def _fold(self, grads: torch.Tensor) -> None:
        """Keep this step's gradients: as they are (cosine), or into the EMAs (persistent)."""
        if self.rule == "cosine" or self.cached is None or self.ema_steps == 0:
            self.cached = (1 - self.ema) * grads if self.rule == "persistent" else grads
            self.ema_sq = (1 - self.ema) * _row_norms(grads).double().cpu() ** 2
            self.ema_steps = 1
            return
        self.cached = self.ema * self.cached.to(grads.device) + (1 - self.ema) * grads
        self.ema_sq = (
            self.ema * self.ema_sq + (1 - self.ema) * _row_norms(grads).double().cpu() ** 2
        )
        self.ema_steps += 1

    def begin_round(self) -> None:
        """Start of a federated round: forget the gradient cache/EMA unless it carries over."""
        if not self.carry_across_rounds:
            self.cached = None
            self.ema_sq = torch.zeros_like(self.ema_sq)
            self.ema_steps = 0

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A flat dict of CPU tensors and plain numbers (easy to turn into numpy for Flower).

        ``cached_grads`` always has shape [m, |P|] (zeros when ``has_cache`` is 0), so
        the layout never changes between rounds; the same keys serve both rules.
        """
        cached = (
            self.cached.detach().float().cpu().clone()
            if self.cached is not None
            else torch.zeros(len(self.names), self.probe_size)
        )
        return {
            "z": self.z.clone(),
            "z0": self.z0.clone(),
            "cached_grads": cached,
            "has_cache": int(self.cached is not None),
            "ema_sq": self.ema_sq.clone(),
            "ema_steps": self.ema_steps,
            "adam_m": self.adam_m.clone(),
            "adam_v": self.adam_v.clone(),
            "adam_steps": self.adam_steps,
            "log_gate": self.log_gate.clone(),
            "zero_run": self.zero_run.clone(),
            "steps": self.steps,
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output; tensors may come back as numpy arrays."""
        m = len(self.names)

        def vector(key: str, dtype: torch.dtype) -> torch.Tensor:
            value = torch.as_tensor(state[key], dtype=dtype).clone()
            if value.shape != (m,):
                raise ValueError(f"state has {key} of shape {tuple(value.shape)}, expected ({m},)")
            return value

        cached = torch.as_tensor(state["cached_grads"], dtype=torch.float32).clone()
        if cached.shape != (m, self.probe_size):
            raise ValueError(
                f"state has cached gradients of shape {tuple(cached.shape)}, "
                f"expected ({m}, {self.probe_size}): was the probe set changed?"
            )
        self.z, self.z0 = vector("z", torch.float64), vector("z0", torch.float64)
        device = self.probe_params[0].device
        self.cached = cached.to(device) if int(state["has_cache"]) else None
        self.ema_sq = vector("ema_sq", torch.float64)
        self.adam_m = vector("adam_m", torch.float64)
        self.adam_v = vector("adam_v", torch.float64)
        self.log_gate = vector("log_gate", torch.float64)
        self.zero_run = vector("zero_run", torch.long)
        self.ema_steps = int(state["ema_steps"])
        self.adam_steps = int(state["adam_steps"])
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
