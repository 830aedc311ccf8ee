"""One client's round, shared by every engine (embedded loop and Flower ClientApp).

The engines differ only in how the global adapter, the client state and the
reply travel; what a client does with them is this file, read top to bottom:
load the start adapter, restore the weighting and prompt sampler, run ``E``
local GRPO steps, measure validation accuracy, and reply with ``Δθ``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedmoa.aggregation import Adapter, ClientUpdate
from fedmoa.data import ClientData, load_split
from fedmoa.eval import EvalResult, evaluate_rows
from fedmoa.federation.config import (
    PRIMARY_ONLY_METHODS,
    TASK_ACCURACY_METHODS,
    ClientConfig,
    ServerConfig,
)
from fedmoa.grpo.trainer import STEP_PHASES, LocalTrainer
from fedmoa.privacy import (
    PrivacyConfig,
    add_gaussian_noise,
    clip_update,
    resolve_noise_multiplier,
    sensitivity,
)
from fedmoa.rewards import RewardFunc
from fedmoa.rewards.base import CheckedRewardError, checked_call
from fedmoa.train_local import build_reward_funcs
from fedmoa.weighting import RewardWeighting, WeightingConfig, build_weighting
from fedmoa.weighting.hypergradient import HypergradientWeighting


def load_client_data(client: ClientConfig, field: str = "data") -> ClientData:
    """The client's private rows, split deterministically into disjoint train/validation/test;
    every data error names the client and ``field`` (its config path, e.g. ``clients[2].data``)."""
    return load_split(client.data, client.split, f"client {client.id!r} ({field})")


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process and engine (``hash()`` is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def adapter_state(policy: Any) -> Adapter:
    """The LoRA tensors only, detached copies on CPU: what travels between client and server."""
    return {
        k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(policy).items()
    }


def load_adapter(policy: Any, adapter: Adapter) -> None:
    result = set_peft_model_state_dict(policy, adapter)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter has keys the model lacks: {sorted(unexpected)[:3]}")


def adapter_bytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.values())


TRANSPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""``server.transport_dtype`` values that round adapters; ``"float32"`` sends them as they are."""


def through_transport(adapter: Adapter, transport_dtype: str) -> Adapter:
    """``adapter`` as it arrives after travelling in ``transport_dtype``: each tensor rounded to
    that dtype and cast back to its own. ``"float32"`` returns ``adapter`` itself, unchanged."""
    wire = TRANSPORT_DTYPES.get(transport_dtype)
    if wire is None:
        return adapter
    return {k: v.to(wire).to(v.dtype) for k, v in adapter.items()}


def transport_bytes(adapter: Adapter, transport_dtype: str) -> int:
    """Bytes of ``adapter``'s tensors in ``transport_dtype`` (``"float32"``: their own dtypes)."""
    wire = TRANSPORT_DTYPES.get(transport_dtype)
    if wire is None:
        return adapter_bytes(adapter)
    return sum(t.numel() for t in adapter.values()) * torch.finfo(wire).bits // 8


def proximal_term(policy: Any, anchor: Adapter, mu: float) -> Callable[[], torch.Tensor]:
    """FedProx: ``μ/2·‖θ − θ_t‖²`` over the LoRA tensors."""
    # PEFT's state-dict names drop the adapter name that parameter names carry.
    named = {n.replace(f".{policy.active_adapter}", ""): p for n, p in policy.named_parameters()}
    pairs = [(named[k], v.to(named[k].device, named[k].dtype)) for k, v in anchor.items()]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum(((p - s) ** 2).sum() for p, s in pairs)

    return penalty


class ClientTimeout(RuntimeError):
    """A client's round ran past ``server.round_timeout``; the engine leaves the client out."""


class RoundDeadline:
    """``server.round_timeout`` for one client's round, enforced cooperatively.

    The embedded engine runs clients one after another on one shared model, so a
    late client cannot be abandoned in a thread: the thread could not be killed and
    would keep using the model while the next client trains on it. Instead a
    forward pre-hook checks the deadline before every forward pass of the model
    (each decoding step of ``generate``, each training forward, validation)
    and raises :class:`ClientTimeout`, which unwinds the round like any client
    crash; :meth:`check` is also called at the end of the round. A client stuck
    *inside* one call (a reward function that never returns) is only caught when
    that call returns; Flower's ServerApp drops late replies without waiting.
    """

    def __init__(self, client_id: str, timeout: float | None, started: float | None = None):
        self.client_id = client_id
        self.timeout = timeout
        self.started = time.monotonic() if started is None else started

    def check(self, *_: Any) -> None:
        if self.timeout is None:
            return
        elapsed = time.monotonic() - self.started
        if elapsed > self.timeout:
            raise ClientTimeout(
                f"client {self.client_id!r} still running {elapsed:.1f}s after its round "
                f"began, past server.round_timeout = {self.timeout:g}s"
            )

    @contextlib.contextmanager
    def watch(self, policy: Any) -> Iterator[None]:
        """Check the deadline before every forward of ``policy`` (a hook on its input
        embeddings, which every forward runs, whatever calls it: ``generate``, PEFT's
        ``forward``, the reference pass)."""
        if self.timeout is None:
            yield
            return
        handle = policy.get_input_embeddings().register_forward_pre_hook(self.check)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class ClientRoundResult:
    update: ClientUpdate
    state: dict[str, Any]  # what the client keeps for its next round
    history: list[dict[str, float]]  # per-step metrics
    bytes_down: int
    bytes_up: int


def run_client_round(
    policy: Any,
    tokenizer: Any,
    client: ClientConfig,
    data: ClientData,
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    start: Adapter,
    state: dict[str, Any] | None,
    *,
    method: str,
    server: ServerConfig,
    weighting_config: WeightingConfig,
    seed: int,
    server_round: int,
    started: float | None = None,
    privacy: PrivacyConfig | None = None,
) -> ClientRoundResult:
    """One round of local GRPO for ``client`` starting from ``start``; pure in its inputs.

    With ``server.round_timeout`` set, the round raises :class:`ClientTimeout` at the first
    model forward (or at the end) after ``started + round_timeout`` (``started``: a
    ``time.monotonic()`` value, default now); see :class:`RoundDeadline`.
    """
    deadline = RoundDeadline(client.id, server.round_timeout, started)
    client, reward_funcs = training_objectives(client, reward_funcs, method)
    reward_funcs = with_scale_check(reward_funcs, client.primary_reward, method)
    if next(policy.parameters()).device.type == "cpu":
        # Per thread: an engine may run this round on a thread other than the one that loaded
        # the model, and denormals must flush alike on every engine for bit-equal adapters.
        torch.set_flush_denormal(True)
    primary = client.primary_reward
    max_new = server.eval_max_new_tokens or client.grpo.max_new_tokens
    paired = method in TASK_ACCURACY_METHODS and server.accuracy_rule == "gain"
    rows = validation_indices(
        len(data.validation), server.validation_prompts, paired, seed, client.id, server_round
    )
    validation = [data.validation[i] for i in rows]
    with deadline.watch(policy):
        torch.manual_seed(stable_seed(seed, client.id, server_round))
        load_adapter(policy, start)
        if paired:  # the start adapter on the same prompts: the "before" of the update's gain
            primary_func = [(n, f) for n, f in reward_funcs if n == primary]
            before = evaluate_rows(policy, tokenizer, validation, primary_func, primary, max_new)
        weighting = build_weighting(
            weighting_config,
            [r.name for r in client.rewards],
            client.primary_reward,
            [r.weight for r in client.rewards],
            policy,
            run_method=method,
            normalize=method != "centralized",
        )
        trainer = LocalTrainer(
            policy,
            tokenizer,
            data.train,
            reward_funcs,
            weighting,
            client.grpo,
            seed=stable_seed(seed, client.id, "prompts"),
            regularizer=proximal_term(policy, start, server.fedprox_mu)
            if method == "fedprox"
            else None,
        )
        if state:
            weighting.load_state_dict(state["weighting"])
            trainer.sampler.load_state_dict(state["sampler"])
            if trainer.scaler.is_enabled() and state.get("grad_scaler"):
                trainer.scaler.load_state_dict(state["grad_scaler"])
            if client.optimizer_state == "keep" and state.get("optimizer"):
                trainer.optimizer.load_state_dict(state["optimizer"])
        weighting.begin_round()
        try:
            history = trainer.train(client.local_steps)
        finally:
            if isinstance(weighting, HypergradientWeighting):
                weighting.remove_hooks()  # the model is shared with the next client

        began = time.perf_counter()
        result = evaluate_rows(policy, tokenizer, validation, reward_funcs, primary, max_new)
        validation_seconds = time.perf_counter() - began
        deadline.check()  # a reward function may have run past it after the last forward
    # V_k counts the rows the primary scored: a row it scored None is no evidence either way,
    # and a pass without any (V_k = 0) reports 0.0, which the server reads as no evidence.
    validation_size = result.accuracy_rows
    accuracy = result.accuracy if validation_size else 0.0

    after = adapter_state(policy)
    # Δθ as the server receives it; ``start`` already arrived through the transport
    # (``FederatedServer.configure_round``).
    delta = through_transport({k: after[k] - start[k] for k in start}, server.transport_dtype)
    metrics = uniform_metrics(history, weighting, primary)
    if privacy is not None:
        delta, norm = clip_update(delta, privacy.clip)
        metrics["privacy/update_norm"] = norm
        metrics["privacy/clipped"] = float(norm > privacy.clip)
        if privacy.where == "client":  # local DP: noised before it leaves
            delta = add_gaussian_noise(
                delta,
                local_noise_std(privacy, server.rounds),
                torch.Generator().manual_seed(
                    stable_seed(seed, client.id, "privacy", server_round)
                ),
            )
    metrics["timing/validation"] = validation_seconds
    update = ClientUpdate(
        client_id=client.id,
        task=client.task,
        num_examples=client.local_steps * client.grpo.batch_size,
        delta=delta,
        accuracy=float(accuracy),
        metrics=metrics,
        validation_size=validation_size,
        validation_pairs=paired_scores(rows, before, result, primary) if paired else (),
    )
    new_state = {"weighting": weighting.state_dict(), "sampler": trainer.sampler.state_dict()}
    if client.optimizer_state == "keep":
        new_state["optimizer"] = trainer.optimizer.state_dict()
    if trainer.scaler.is_enabled():
        # fp16: the loss scale found so far, or every round would start again from 2^16 and
        # skip steps (all of them, with one local step a round) until it had come down.
        new_state["grad_scaler"] = trainer.scaler.state_dict()
    return ClientRoundResult(
        update,
        new_state,
        history,
        transport_bytes(start, server.transport_dtype),
        transport_bytes(delta, server.transport_dtype),
    )


def local_noise_std(privacy: PrivacyConfig, rounds: int) -> float:
    """Local DP: ``z·2C``, the std that covers replacing one clipped update by any other; ``z``
    spends ``target_epsilon`` over ``rounds`` releases of the client's own update (no
    amplification by sampling: the client knows it was sampled)."""
    z = local_noise_multiplier(
        privacy.noise_multiplier, privacy.target_epsilon, privacy.delta, rounds, privacy.accountant
    )
    return z * sensitivity(1.0, privacy.clip)


@functools.lru_cache(maxsize=16)
def local_noise_multiplier(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    rounds: int,
    kind: str,
) -> float:
    """Cached: the search for a target's multiplier takes opacus seconds, every client round."""
    return resolve_noise_multiplier(
        noise_multiplier,
        target_epsilon,
        delta,
        sample_rate=1.0,
        rounds=rounds,
        releases=1,
        kind=kind,
    )


def validation_indices(
    available: int, count: int, fresh: bool, seed: int, client_id: str, server_round: int
) -> list[int]:
    """The validation rows a client scores this round.

    The first ``count`` rows every round, or with ``fresh`` (the gain rule) ``count`` rows
    drawn afresh each round without replacement, so that rounds do not keep measuring the
    same prompts; seeded per client and round, so every engine draws the same.
    """
    count = min(count, available)
    if not fresh:
        return list(range(count))
    return sorted(
        random.Random(stable_seed(seed, client_id, "validation", server_round)).sample(
            range(available), count
        )
    )


def paired_scores(
    rows: Sequence[int], before: EvalResult, after: EvalResult, primary: str
) -> tuple[tuple[int, float, float], ...]:
    """(row, before, after) of the primary for every row it scored both times."""
    if before.rewards is None or after.rewards is None:
        return ()
    first = before.rewards[:, list(before.reward_means).index(primary)].tolist()
    second = after.rewards[:, list(after.reward_means).index(primary)].tolist()
    return tuple(
        (row, b, a)
        for row, b, a in zip(rows, first, second, strict=True)
        if not (math.isnan(b) or math.isnan(a))
    )


def training_objectives(
    client: ClientConfig, reward_funcs: Sequence[tuple[str, RewardFunc]], method: str
) -> tuple[ClientConfig, list[tuple[str, RewardFunc]]]:
    """The objectives ``client`` trains on under ``method``: all of them, or under
    ``fedavg-primary`` its primary alone (weight 1), the reference of what the primaries reach
    without the auxiliaries. Evaluation still scores every objective."""
    if method not in PRIMARY_ONLY_METHODS:
        return client, list(reward_funcs)
    primary = client.primary_reward
    rewards = [dataclasses.replace(r, weight=1.0) for r in client.rewards if r.name == primary]
    return (
        dataclasses.replace(client, rewards=rewards),
        [(name, func) for name, func in reward_funcs if name == primary],
    )


class PrimaryScaleCheck:
    """The primary reward under an accuracy-aware method, checked once to be a rate in [0, 1].

    ``fedmoa`` and ``fedmoa-taa`` weigh clients by the primary's validation accuracy, and the
    server rejects an accuracy outside [0, 1]: a primary on another scale would drop every
    update of its client without a word. So the first call that scores a sample (in training
    or validation, whichever comes first) is checked, on the client, and a value outside
    [0, 1] stops the round with a one-line ``RewardError``; later calls pass straight through.
    """

    def __init__(self, name: str, func: RewardFunc, method: str) -> None:
        self.name, self.func, self.method = name, func, method
        self.checked = False

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[float | None]:
        if self.checked:
            return self.func(prompts=prompts, completions=completions, **columns)
        # The function's own failure policy first (``PolicyReward``), then the scale.
        values = checked_call(self.name, self.func, prompts, completions, columns)
        for row, value in enumerate(values):
            if value is not None and not 0.0 <= value <= 1.0:
                raise CheckedRewardError(
                    f"reward {self.name!r} returned {value!r} at sample {row}, outside [0, 1]: "
                    f"it is the primary and server.method = {self.method!r} weighs clients by "
                    f"its validation accuracy, a rate in [0, 1]; rescale it to [0, 1] or use a "
                    f"method that does not weigh by accuracy"
                )
        self.checked = any(value is not None for value in values)
        return values

    def __repr__(self) -> str:
        return f"PrimaryScaleCheck({self.name!r}, {self.func!r})"


def with_scale_check(
    reward_funcs: Sequence[tuple[str, RewardFunc]], primary: str, method: str
) -> Sequence[tuple[str, RewardFunc]]:
    """``reward_funcs`` with the primary wrapped in :class:`PrimaryScaleCheck` when ``method``
    weighs clients by accuracy; unchanged otherwise."""
    if method not in TASK_ACCURACY_METHODS:
        return reward_funcs
    return [
        (name, PrimaryScaleCheck(name, func, method) if name == primary else func)
        for name, func in reward_funcs
    ]


REQUIRED_METRICS = ("reward", "reward/primary", "reward/aux_mean", "weight/primary", "loss")
"""Metrics every reply must carry (a subset of :func:`uniform_metrics`); the server
rejects an update that lacks one."""


def uniform_metrics(
    history: list[dict[str, float]], weighting: RewardWeighting, primary: str
) -> dict[str, float]:
    """Metrics whose keys are the same on every client, whatever its objectives are called.

    Flower's strategies reject replies whose metric keys differ; the per-objective
    details travel separately (``objective_metrics``).
    """
    last = history[-1]
    aux = [n for n in weighting.names if n != primary]
    aux_means = [last[f"rewards/{n}/mean"] for n in aux]
    aux_means = [v for v in aux_means if v == v]
    return {
        "reward": last["reward"],
        "reward/primary": last[f"rewards/{primary}/mean"],
        "reward/aux_mean": sum(aux_means) / len(aux_means) if aux_means else 0.0,
        "weight/primary": float(weighting.weights()[weighting.primary_index]),
        "loss": last["loss"],
        "step_time": sum(m["step_time"] for m in history),
        **{f"timing/{p}": sum(m[f"timing/{p}"] for m in history) for p in STEP_PHASES},
    }


def objective_metrics(history: list[dict[str, float]], names: Sequence[str]) -> dict[str, float]:
    """Per-objective reward means, weights and alignments of the round's last step, and with
    ``grpo.auxiliary_gate`` the round's mean fraction of gated groups."""
    last = history[-1]
    keys = [f"{kind}/{n}" for kind in ("weights", "alignment") for n in names]
    keys += [f"rewards/{n}/mean" for n in names]
    out = {k: last[k] for k in keys if k in last}
    gated = [m["rewards/aux_gated_frac"] for m in history if "rewards/aux_gated_frac" in m]
    if gated:
        out["rewards/aux_gated_frac"] = sum(gated) / len(gated)
    return out


def client_reward_funcs(client: ClientConfig, where: int | str) -> list[tuple[str, RewardFunc]]:
    """``where``: the client's index in the experiment, or the client file it came from."""
    field = f"clients[{where}].rewards" if isinstance(where, int) else f"{where}: rewards"
    return build_reward_funcs(client.rewards, field=field)


def client_check_funcs(client: ClientConfig, where: int | str) -> list[tuple[str, RewardFunc]]:
    """The client's evaluation-only checks, loaded like its rewards; errors name ``checks``."""
    field = f"clients[{where}].checks" if isinstance(where, int) else f"{where}: checks"
    return build_reward_funcs(client.checks, field=field)
