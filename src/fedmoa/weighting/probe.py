"""The probe gradients the hypergradient compares: ``g_i = ∇_P L(θ; Â_i)`` for every objective.

Plumbing of the FedMOA client part (``hypergradient.py`` holds the rules): which LoRA parameters
form the probe ``P``, and how the m gradients are taken from the step's own forward graph, by
one partial backward per objective or, through forward hooks on the probe's modules, by one
partial backward for all of them.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from fedmoa.weighting.base import StepSignals

logger = logging.getLogger(__name__)

# Decoder blocks are numbered ``...layers.<i>...`` (Llama, Qwen, Mistral, SmolLM),
# ``...h.<i>...`` (GPT-2, Falcon), ``...blocks.<i>...`` or ``...layer.<i>...`` (BERT-like).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_LAST_K = re.compile(r"last(\d+)")


def select_probe_params(
    model: torch.nn.Module, probe: str = "last2"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA parameters whose gradients the hypergradient compares.

    ``"last2"`` (the default; generally ``"last<k>"``) takes the LoRA ``B`` matrices of
    the last ``k`` decoder layers: backward from the loss stops there, so the probe
    costs a fraction of a full backward, and ``B`` is where LoRA's update starts
    (it is zero at init, so its gradient is never degenerate). ``"all"`` takes every
    trainable LoRA parameter. Names are returned so callers can log the choice.
    """
    lora = [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and "lora_" in name
    ]
    if probe == "all":
        chosen = lora
    else:
        match = _LAST_K.fullmatch(probe)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"unknown probe {probe!r}: expected 'all' or 'last<k>' (e.g. 'last2')")
        k = int(match.group(1))
        indexed = []
        for name, param in lora:
            layer = _LAYER_INDEX.search(name)
            if "lora_B" in name and layer is not None:
                indexed.append((int(layer.group(1)), name, param))
        last = set(sorted({i for i, _, _ in indexed})[-k:])
        chosen = [(name, param) for i, name, param in indexed if i in last]
    if not chosen:
        raise ValueError(
            f"probe {probe!r} found no trainable LoRA parameters in {type(model).__name__}"
            + ("" if probe == "all" else " (looked for 'lora_B' under '...layers.<i>...')")
            + "; attach a LoRA adapter first"
        )
    return chosen


def _remove_handles(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class ProbeGradients:
    """The probe and its gradients, for a weighting over ``self.names`` (``RewardWeighting``).

    A base of ``HypergradientWeighting``: ``init_probe`` sets the probe up, ``probe_gradients``
    returns the [m, |P|] gradients of a step, ``hook_model`` turns on the one-backward path.
    """

    names: list[str]

    def init_probe(self, probe_params: Sequence[torch.Tensor]) -> None:
        self.probe_params: list[torch.Tensor] = []
        self.probe_size = 0
        # Per-sample fast path (see hook_model): hook handles, probe indices whose module
        # ran in grad mode since the last observe(), and the capture in progress.
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # A weighting built per round and dropped must not leave hooks on the model.
        weakref.finalize(self, _remove_handles, self._hooks)
        self._seen: set[int] = set()
        self._capture: torch.Tensor | None = None
        self._capture_failed = False
        self._parts: dict[int, torch.Tensor] = {}
        # Micro-batches: the sum of their probe gradients so far and the paths they took.
        self._summed: torch.Tensor | None = None
        self._summed_paths: set[str] = set()
        self.last_path = "none"  # how the last probe gradients were computed
        self.set_probe_params(probe_params)

    def set_probe_params(self, params: Sequence[torch.Tensor]) -> None:
        """Point the probe at (new) parameter tensors, e.g. after the engine swaps adapters.

        The total size must not change once set, because the cached gradients are
        compared with the new ones entry by entry. Tensors other than the hooked
        ones drop the per-sample hooks (call ``hook_model`` again to restore them).
        """
        params = list(params)
        if not params:
            raise ValueError("probe_params is empty; use select_probe_params(model)")
        if not all(p.requires_grad for p in params):
            raise ValueError("every probe parameter must require grad")
        size = sum(p.numel() for p in params)
        if self.probe_size and size != self.probe_size:
            raise ValueError(f"probe has {size} entries, expected {self.probe_size}")
        if self._hooks and [id(p) for p in params] != [id(p) for p in self.probe_params]:
            self.remove_hooks()
        self.probe_params = params
        self.probe_size = size

    def hook_model(self, model: torch.nn.Module) -> None:
        """Install forward hooks on the ``nn.Linear`` modules that own the probe parameters.

        Why: with hooks, all m probe gradients cost one partial backward instead of m.
        A decoder LM treats the sequences of a batch independently, and the surrogate
        is linear in the per-sequence advantage, so the gradient reaching a probe
        module's output for objective i is row j of the gradient for ``a = 1`` scaled
        by ``Â_ij``. One backward with ``a = 1`` therefore gives per-sequence weight
        gradients ``Σ_t δ_jt x_jtᵀ`` (``x`` saved by the hook, ``δ`` caught by a tensor
        hook), and ``g_i = Σ_j Â_ij Σ_t δ_jt x_jtᵀ``. Only the model's forward after
        this call is hooked; ``observe`` falls back to one backward per objective
        when a probe module did not run in grad mode or rows are not sequences (a
        packed, padding-free batch). Not for reentrant activation checkpointing.
        """
        self.remove_hooks()
        owners: dict[int, list[torch.nn.Module]] = {}
        for owner in model.modules():
            if isinstance(owner, torch.nn.Linear):
                owners.setdefault(id(owner.weight), []).append(owner)  # tied: several
        missing = [i for i, p in enumerate(self.probe_params) if id(p) not in owners]
        if missing:
            raise ValueError(
                f"probe parameters {missing} are not weights of nn.Linear modules of "
                f"{type(model).__name__}; use the per-objective backward (no hooks)"
            )
        me = weakref.ref(self)  # the model's hooks must not keep a dropped weighting alive
        for index, param in enumerate(self.probe_params):

            def hook(
                module: torch.nn.Module,
                inputs: tuple[Any, ...],
                output: torch.Tensor,
                index: int = index,
            ) -> None:
                weighting = me()
                if weighting is not None:
                    weighting._on_forward(index, inputs[0], output)

            for owner in owners[id(param)]:
                self._hooks.append(owner.register_forward_hook(hook))

    def remove_hooks(self) -> None:
        """Remove the per-sample hooks; ``observe`` then takes one backward per objective."""
        _remove_handles(self._hooks)  # the same list object: the finalizer holds it
        self._seen = set()

    def _on_forward(self, index: int, x: torch.Tensor, output: torch.Tensor) -> None:
        """Forward hook: remember that probe module ``index`` ran in grad mode, and catch
        the gradient of its output when ``_per_sample_gradients`` asks for it."""
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # generation, reference and old-policy forwards
        self._seen.add(index)
        x = x.detach()

        def on_grad(grad: torch.Tensor) -> None:
            adv = self._capture
            if adv is None:
                return  # the real backward
            n = adv.shape[0]
            if grad.shape[0] != n or x.shape[0] != n:
                self._capture_failed = True
                return
            delta = grad.reshape(n, -1, grad.shape[-1]).float()
            inp = x.reshape(n, -1, x.shape[-1]).float()
            # Per-sequence weight gradients first (one bmm), then mix them per objective;
            # a single einsum would contract the m-fold larger adv ⊗ delta first.
            per_sequence = torch.bmm(delta.transpose(1, 2), inp).reshape(n, -1)
            part = adv.T @ per_sequence
            previous = self._parts.get(index)
            self._parts[index] = part if previous is None else previous + part

        output.register_hook(on_grad)

    def probe_gradients(self, signals: StepSignals) -> torch.Tensor:
        """``g_i = ∇_P L(θ; Â_i)`` for every objective, as rows of a float32 [m, |P|] tensor.

        The surrogate is linear in the advantage inside the clip region, so we take
        its per-sequence coefficients once, ``c = ∂L/∂a`` at ``a = 0`` (cheap: only the
        loss head is differentiated, with ``create_graph``), and then backpropagate
        ``c·Â_i`` to the probe alone, reusing the step's forward graph. This equals
        ``autograd.grad(L(Â_i), P)`` at β = 0 and drops the advantage-free KL term
        when β > 0, so a saturated objective's gradient is exactly zero. At a = 0 the
        clip's two branches tie and PyTorch splits the gradient between them, which
        differs from L(Â_i) only for tokens outside the clip region; on the step's
        first iteration (where the trainer calls ``observe``) the ratio is 1.
        With ``hook_model`` one backward serves all objectives (see there); without
        it, one backward per objective, skipping objectives with ``Â_i ≡ 0``.
        """
        if signals.objective_loss is None:
            raise ValueError("probe gradients need the step's objective_loss")
        adv = torch.nan_to_num(signals.objective_advantages.detach(), nan=0.0)
        m = len(self.names)
        if adv.dim() != 2 or adv.shape[1] != m:
            raise ValueError(f"objective_advantages must be [N, {m}], got {tuple(adv.shape)}")
        device = self.probe_params[0].device
        grads = torch.zeros(m, self.probe_size, dtype=torch.float32, device=device)
        self.last_path = "none"
        if not adv.any():
            return grads
        a = torch.zeros(adv.shape[0], dtype=torch.float32, device=adv.device, requires_grad=True)
        (coef,) = torch.autograd.grad(
            signals.objective_loss(a), a, create_graph=True, allow_unused=True
        )
        if coef is None or not coef.requires_grad:
            return grads  # the loss does not depend on the probe through the advantage
        # fp16: backpropagate at the loss's scale, so that gradients through float16
        # activations do not underflow, and divide it out below.
        scale = float(signals.loss_scale)
        per_sample = self._per_sample_gradients(coef, adv, scale)
        if per_sample is not None:
            grads, self.last_path = per_sample, "per_sample"
        else:
            self.last_path = "per_objective"
            for i in range(m):
                column = adv[:, i].to(coef.device, coef.dtype)
                if scale != 1.0:
                    column = column * scale
                if not column.any():
                    continue
                parts = torch.autograd.grad(
                    coef, self.probe_params, column, retain_graph=True, allow_unused=True
                )
                grads[i] = torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1).float()
                        for g, p in zip(parts, self.probe_params, strict=True)
                    ]
                )
        if scale != 1.0:
            grads = grads / scale
        finite = torch.isfinite(grads).all(dim=1)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(self.names, finite.tolist(), strict=True) if not ok]
            logger.warning("non-finite probe gradient for %s; treated as zero", bad)
            grads[~finite] = 0.0
        return grads

    def add_part_gradients(self, signals: StepSignals) -> None:
        """Add one micro-batch's probe gradients to the step's sum (the loss is the sum of the
        micro-batches' shares, so its probe gradients are the sum of theirs)."""
        grads = self.probe_gradients(signals)
        self._summed = grads if self._summed is None else self._summed + grads
        self._summed_paths.add(self.last_path)

    def drop_part_gradients(self) -> None:
        """Forget micro-batch gradients a failed step left without its ``observe``."""
        self._summed, self._summed_paths = None, set()

    def summed_gradients(self) -> torch.Tensor | None:
        """The micro-batches' summed probe gradients since the last call (None if none were
        added); ``last_path`` says ``per_objective`` if any of them fell back."""
        grads, paths = self._summed, self._summed_paths
        self._summed, self._summed_paths = None, set()
        if grads is not None:
            self.last_path = next(
                (p for p in ("per_objective", "per_sample") if p in paths), "none"
            )
        return grads

    def _per_sample_gradients(
        self, coef: torch.Tensor, adv: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor | None:
        """All m probe gradients from one backward through the hooks, or None to fall back."""
        if not self._hooks or len(self._seen) != len(self.probe_params):
            return None
        device = self.probe_params[0].device
        self._capture = adv.to(device, torch.float32)
        self._capture_failed = False
        self._parts = {}
        seed = torch.ones_like(coef) if scale == 1.0 else torch.full_like(coef, scale)
        try:
            torch.autograd.grad(coef, self.probe_params, seed, retain_graph=True, allow_unused=True)
        finally:
            self._capture = None
        parts, self._parts = self._parts, {}
        if self._capture_failed:
            return None
        m = adv.shape[1]
        return torch.cat(
            [
                parts[i] if i in parts else torch.zeros(m, p.numel(), device=device)
                for i, p in enumerate(self.probe_params)
            ],
            dim=1,
        )
