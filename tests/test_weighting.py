"""Reward weighting: the FedMOA hypergradient rule on synthetic policies, then in the trainer.

Most tests use a "direct" policy whose per-sequence log-probs are the probe
parameter itself, ``logp = θ``, with the GRPO-like surrogate ``L(a) = -mean(a·logp)``.
Then ``g_i = ∇_θ L(Â_i) = -Â_i / N``, so each objective's probe gradient is chosen
exactly by its advantage column.
"""

from __future__ import annotations

import gc
import io
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.loss import LossSettings, LossType, policy_loss
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer
from fedmoa.models import LoraSettings, attach_lora, tiny_random_model
from fedmoa.weighting import (
    HypergradientWeighting,
    RewardBatch,
    SAWWeighting,
    StaticWeighting,
    StepSignals,
    VarianceWeighting,
    WeightingConfig,
    build_weighting,
    select_probe_params,
)
from fedmoa.weighting.config import DEFAULT_ETA


class DirectPolicy:
    """``logp = θ`` over ``N`` sampled sequences: advantages choose the probe gradients."""

    def __init__(self, n: int) -> None:
        self.theta = torch.nn.Parameter(torch.zeros(n))

    def signals(self, advantages: torch.Tensor) -> StepSignals:
        logp = self.theta * 1.0  # a fresh graph per step, as in the trainer

        def objective_loss(adv: torch.Tensor) -> torch.Tensor:
            return -(adv * logp).mean()

        m = advantages.shape[1]
        return StepSignals(advantages, objective_loss, torch.zeros(m))


def make_hg(names: list[str], policy: DirectPolicy, **kwargs) -> HypergradientWeighting:
    """The primary objective is the first one unless ``primary`` says otherwise."""
    initial = kwargs.pop("initial", [1.0] * len(names))
    primary = kwargs.pop("primary", names[0])
    return HypergradientWeighting(names, primary, initial, [policy.theta], **kwargs)


def persistent_primary(
    steps: int, n: int, noise: float, seed: int, noise_seed: int | None = None
) -> list[torch.Tensor]:
    """Advantages around a fixed direction (drawn from ``seed``): an objective that keeps
    its course. ``noise_seed`` gives other noise draws around the same direction."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, generator=gen)
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
    return [direction + noise * torch.randn(n, generator=gen) for _ in range(steps)]


def run(weighting: HypergradientWeighting, policy: DirectPolicy, columns: list[torch.Tensor]):
    """Feed one [N, m] advantage matrix per step; returns the weights after each step."""
    trajectory = []
    for adv in columns:
        weighting.observe(policy.signals(adv))
        trajectory.append(weighting.weights())
    return trajectory


N = 16


def test_initial_weights_are_reproduced_and_on_the_floored_simplex():
    policy = DirectPolicy(N)
    hg = make_hg(["p", "a", "b"], policy, initial=[3.0, 1.0, 0.0], w_min=0.05)
    w = hg.weights()
    # 3:1:0 normalised is 0.75/0.25/0; the zero weight is lifted to the floor.
    assert w[2] == pytest.approx(0.05, abs=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    exact = make_hg(["p", "a"], policy, initial=[0.7, 0.3]).weights()
    torch.testing.assert_close(exact, torch.tensor([0.7, 0.3]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("primary_first", [True, False])
def test_saturated_auxiliary_loses_weight_to_the_primary(primary_first):
    policy = DirectPolicy(N)
    names = ["correct", "format"] if primary_first else ["format", "correct"]
    hg = make_hg(names, policy, primary="correct")
    # The format reward is constant for every completion: Â_format = 0, so g_format = 0.
    columns = [(p, torch.zeros(N)) for p in persistent_primary(8, N, 0.3, 0)]
    steps = [torch.stack(c if primary_first else c[::-1], 1) for c in columns]
    trajectory = run(hg, policy, steps)
    aux = [float(w[names.index("format")]) for w in trajectory]
    assert aux[0] == pytest.approx(0.5)  # first step: no cached gradient yet
    assert all(b < a for a, b in itertools.pairwise(aux)), aux
    assert aux[-1] < 0.2
    assert aux[-1] >= hg.w_min


def test_aligned_auxiliary_keeps_or_gains_weight():
    policy = DirectPolicy(N)
    hg = make_hg(["correct", "steps"], policy, initial=[0.6, 0.4])
    # Both objectives push along the same direction, each with its own noise of the same
    # size: each one's last step predicts the primary's next one equally well.
    primary = persistent_primary(8, N, 0.3, 1)
    auxiliary = persistent_primary(8, N, 0.3, 1, noise_seed=101)
    steps = [torch.stack(pair, 1) for pair in zip(primary, auxiliary, strict=True)]
    aux = [float(w[1]) for w in run(hg, policy, steps)]
    assert all(abs(w - 0.4) < 0.03 for w in aux), aux


def test_aligned_auxiliary_gains_against_a_noisy_primary():
    """Baydin's rule rewards the objective whose last step best predicts the primary's next one."""
    policy = DirectPolicy(N)
    hg = make_hg(["correct", "steps"], policy)
    direction = persistent_primary(1, N, 0.0, 2)[0]
    noisy = persistent_primary(8, N, 1.0, 2)  # same direction, much noisier
    steps = [torch.stack([p, direction], 1) for p in noisy]
    aux = [float(w[1]) for w in run(hg, policy, steps)]
    assert aux[-1] > 0.55, aux


def test_conflicting_auxiliary_loses_weight():
    policy = DirectPolicy(N)
    hg = make_hg(["correct", "short"], policy)
    gen = torch.Generator().manual_seed(3)
    steps = [
        torch.stack([p, -p + 0.3 * torch.randn(N, generator=gen)], 1)
        for p in persistent_primary(6, N, 0.3, 3)
    ]
    trajectory = run(hg, policy, steps)
    aux = [float(w[1]) for w in trajectory]
    assert aux[-1] < 0.2, aux
    # A conflicting objective loses faster than a merely saturated one.
    saturated = make_hg(["correct", "short"], policy)
    run(saturated, policy, [torch.stack([s[:, 0], torch.zeros(N)], 1) for s in steps])
    assert aux[-1] < float(saturated.weights()[1])


@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e25])
def test_alignment_metrics_have_fixed_keys_and_match_the_cosines(scale):
    """Cosines against the previous step's gradients, whatever the gradients' scale."""
    policy = DirectPolicy(4)
    hg = make_hg(["p", "a", "z"], policy, eta=0.0)
    first = torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    second = torch.tensor([[1.0, 5.0, 0.0], [1.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    third = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    m1 = hg.observe(policy.signals(scale * first))
    m2 = hg.observe(policy.signals(scale * second))
    m3 = hg.observe(policy.signals(scale * third))
    assert m1.keys() == m2.keys() == m3.keys()
    assert {f"alignment/{n}" for n in "paz"} <= m1.keys()
    assert m1["hypergrad/updated"] == 0.0 and m2["hypergrad/updated"] == 1.0
    assert all(m1[f"alignment/{n}"] == 0.0 for n in "paz")
    # g_p^2 ∝ -(1,1,0,0); g_p^1 ∝ -(1,0,0,0); g_a^1 ∝ -(1,-1,0,0); g_z^1 = 0.
    assert m2["alignment/p"] == pytest.approx(1 / math.sqrt(2))
    assert m2["alignment/a"] == pytest.approx(0.0, abs=1e-7)
    assert m2["alignment/z"] == 0.0
    assert m2["probe_grad_norm/z"] == 0.0
    assert m2["probe_grad_norm/p"] == pytest.approx(scale * math.sqrt(2) / 4)
    # Step 3 compares with step 2's gradients (the cache moves on): g_p^3 ∝ -(0,0,0,1),
    # g_p^2 ∝ -(1,1,0,0) is orthogonal to it, g_a^2 ∝ -(1,1,1,1) is not.
    assert m3["alignment/p"] == pytest.approx(0.0, abs=1e-7)
    assert m3["alignment/a"] == pytest.approx(0.5)


def test_logit_update_follows_the_formula_with_anchor():
    policy = DirectPolicy(4)
    eta, anchor = 2.0, 0.25
    hg = make_hg(["p", "a"], policy, initial=[0.5, 0.5], eta=eta, anchor=anchor, w_min=0.1)
    z0 = hg.z.clone()
    hg.observe(policy.signals(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])))
    w = hg.weights().double()
    hg.observe(policy.signals(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])))
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)  # primary repeats, aux was orthogonal
    expected = z0 + eta * w * (u - (w * u).sum()) - anchor * (z0 - z0)
    torch.testing.assert_close(hg.z, expected)
    # The anchor then pulls the logits back towards z0 when nothing more is learnt.
    before = (hg.z - z0).abs().sum()
    hg.observe(policy.signals(torch.zeros(4, 2)))
    assert (hg.z - z0).abs().sum() == pytest.approx(float(before) * (1 - anchor))


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 5),
    steps=st.integers(1, 8),
    eta=st.floats(0.0, 1e3, allow_subnormal=False),
    floor_share=st.floats(0.0, 0.99, allow_subnormal=False),
    anchor=st.floats(0.0, 1.0, allow_subnormal=False),
    seed=st.integers(0, 2**31 - 1),
    zero_prob=st.floats(0.0, 1.0, allow_subnormal=False),
    scale_exp=st.integers(-30, 30),
)
def test_weights_stay_on_the_simplex_with_the_floor(
    m, steps, eta, floor_share, anchor, seed, zero_prob, scale_exp
):
    gen = torch.Generator().manual_seed(seed)
    w_min = floor_share / m
    initial = (torch.rand(m, generator=gen) * (torch.rand(m, generator=gen) > 0.3)).tolist()
    initial[0] += 0.1  # not all zero
    policy = DirectPolicy(6)
    names = [f"o{i}" for i in range(m)]
    hg = make_hg(names, policy, initial=initial, eta=eta, w_min=w_min, anchor=anchor)
    for _ in range(steps + 1):
        adv = torch.randn(6, m, generator=gen) * 10.0**scale_exp
        adv[:, torch.rand(m, generator=gen) < zero_prob] = 0.0
        metrics = hg.observe(policy.signals(adv))
        w = hg.weights()
        assert torch.isfinite(w).all()
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(w.min()) >= w_min - 1e-6
        assert all(-1.0 <= metrics[f"alignment/o{i}"] <= 1.0 for i in range(m))


def test_invalid_settings_are_rejected():
    policy = DirectPolicy(2)
    with pytest.raises(ValueError, match="w_min"):
        make_hg(["p", "a"], policy, w_min=0.5)
    with pytest.raises(ValueError, match="eta"):
        make_hg(["p", "a"], policy, eta=-1.0)
    with pytest.raises(ValueError, match="anchor"):
        make_hg(["p", "a"], policy, anchor=1.5)
    with pytest.raises(ValueError, match="initial weights"):
        make_hg(["p", "a"], policy, initial=[1.0])
    with pytest.raises(ValueError, match="empty"):
        HypergradientWeighting(["p"], "p", [1.0], [])
    hg = make_hg(["p", "a"], policy)
    with pytest.raises(ValueError, match="entries"):
        hg.set_probe_params([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("carry", [False, True])
def test_first_step_of_a_round_updates_only_when_the_cache_carries_over(carry):
    policy = DirectPolicy(N)
    hg = make_hg(["correct", "format"], policy, carry_across_rounds=carry)
    steps = [torch.stack([p, torch.zeros(N)], 1) for p in persistent_primary(4, N, 0.3, 4)]
    run(hg, policy, steps[:2])
    hg.begin_round()
    before = hg.weights()
    metrics = hg.observe(policy.signals(steps[2]))
    assert torch.equal(hg.weights(), before) is not carry
    assert metrics["hypergrad/updated"] == float(carry)
    hg.observe(policy.signals(steps[3]))  # the second step of the round always updates
    assert not torch.equal(hg.weights(), before)


@pytest.mark.parametrize("via", ["torch.save", "numpy"])
def test_state_dict_round_trip_reproduces_future_updates(via):
    policy = DirectPolicy(N)
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(N, 3, generator=gen) for _ in range(7)]
    kwargs = {"eta": 3.0, "anchor": 0.1, "initial": [2.0, 1.0, 1.0]}
    original = make_hg(["p", "a", "b"], policy, **kwargs)
    run(original, policy, steps[:3])
    state = original.state_dict()
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)
    else:  # what the Flower adapter will do with context.state
        state = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    restored = make_hg(["p", "a", "b"], policy, **kwargs)
    restored.load_state_dict(state)
    assert restored.steps == 3 and restored.updates == 2
    for adv in steps[3:]:
        expected = original.observe(policy.signals(adv))
        got = restored.observe(policy.signals(adv))
        assert torch.equal(restored.weights(), original.weights())
        assert {k: v for k, v in got.items() if not k.startswith("timing/")} == {
            k: v for k, v in expected.items() if not k.startswith("timing/")
        }
    # Without the cached gradients the first restored step could not have updated.
    fresh = make_hg(["p", "a", "b"], policy, **kwargs)
    fresh.load_state_dict({**original.state_dict(), "has_cache": 0})
    before = fresh.weights()
    fresh.observe(policy.signals(steps[0]))
    assert torch.equal(fresh.weights(), before)


def test_load_state_dict_rejects_a_different_probe_size():
    hg = make_hg(["p", "a"], DirectPolicy(4))
    other = make_hg(["p", "a"], DirectPolicy(5))
    with pytest.raises(ValueError, match="probe"):
        other.load_state_dict(hg.state_dict())


@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_probe_gradients_match_autograd_on_the_grpo_surrogate(beta):
    """On the real clipped surrogate: g_i = ∇L(Â_i) − ∇L(0), i.e. the KL term is left out."""
    torch.manual_seed(6)
    layer = torch.nn.Linear(5, 7)
    n, t = 6, 4
    x = torch.randn(n, t, 5)
    actions = torch.randint(0, 7, (n, t))
    mask = torch.ones(n, t)
    mask[0, 3] = 0
    logps = torch.log_softmax(layer(x), -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    ref = logps.detach() - 0.1 * torch.rand(n, t)
    loss_settings = LossSettings(beta=beta)

    def objective_loss(adv: torch.Tensor) -> torch.Tensor:
        return policy_loss(logps, logps.detach(), adv, mask, loss_settings, ref)[0]

    adv = torch.randn(n, 3)
    adv[:, 2] = 0.0  # saturated
    probe = [layer.weight, layer.bias]
    hg = HypergradientWeighting(["p", "a", "s"], "p", [1, 1, 1], probe)
    got = hg.probe_gradients(StepSignals(adv, objective_loss, torch.zeros(3)))

    def flat(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, probe, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    baseline = flat(objective_loss(torch.zeros(n)))
    if beta == 0.0:
        assert torch.count_nonzero(baseline) == 0
    else:
        assert baseline.norm() > 0  # the KL gradient, which must not count as an objective
    for i in range(3):
        expected = flat(objective_loss(adv[:, i])) - baseline
        torch.testing.assert_close(got[i], expected, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(got[2]) == 0


def tiny_peft(target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")):
    model, tokenizer = tiny_random_model("qwen2", seed=0)
    return attach_lora(model, LoraSettings(r=4, alpha=8, target_modules=target_modules)), tokenizer


def test_select_probe_params_on_a_tiny_peft_model():
    policy, _ = tiny_peft()
    prefix = "base_model.model.model.layers"
    last2 = [name for name, _ in select_probe_params(policy)]
    assert last2 == [
        f"{prefix}.{layer}.self_attn.{proj}.lora_B.default.weight"
        for layer in (0, 1)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    last1 = [name for name, _ in select_probe_params(policy, "last1")]
    assert last1 == [n for n in last2 if ".layers.1." in n]
    embed = policy.get_input_embeddings().weight
    embed.requires_grad_(True)  # trainable but not LoRA (as with modules_to_save)
    every = select_probe_params(policy, "all")
    assert all(p is not embed for _, p in every)
    assert [n for n, _ in every] == [n for n, p in policy.named_parameters() if "lora_" in n]
    assert len(every) == 16 and sum("lora_A" in n for n, _ in every) == 8
    named = dict(policy.named_parameters())
    assert all(p is named[n] for n, p in every)
    with pytest.raises(ValueError, match="unknown probe"):
        select_probe_params(policy, "first2")
    bare, _ = tiny_random_model("qwen2", seed=0)
    with pytest.raises(ValueError, match="no trainable LoRA"):
        select_probe_params(bare)


def tiny_batch_signals(policy, loss_type: LossType, beta: float, m: int = 3) -> StepSignals:
    """One forward of the tiny PEFT model on a padded random batch, as the trainer builds it."""
    gen = torch.Generator().manual_seed(7)
    n, p_len, c_len = 6, 5, 7
    prompt_ids = torch.randint(3, 200, (n, p_len), generator=gen)
    prompt_mask = torch.ones(n, p_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, 200, (n, c_len), generator=gen)
    completion_mask = torch.ones(n, c_len)
    completion_mask[1, 4:] = 0  # stopped early
    inputs = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    logps = completion_logps(policy, *inputs)
    with torch.no_grad(), policy.disable_adapter():
        ref = completion_logps(policy, *inputs)
    loss_settings = LossSettings(loss_type=loss_type, beta=beta)
    adv = torch.randn(n, m, generator=gen)
    adv[:, -1] = 0.0  # saturated

    def objective_loss(a: torch.Tensor) -> torch.Tensor:
        return policy_loss(logps, logps.detach(), a, completion_mask, loss_settings, ref)[0]

    return StepSignals(adv, objective_loss, torch.zeros(m))


@pytest.mark.parametrize(
    ("probe", "loss_type", "beta"), [("last2", "grpo", 0.1), ("all", "dapo", 0.0)]
)
def test_per_sample_path_equals_one_backward_per_objective(probe, loss_type, beta):
    policy, _ = tiny_peft(("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():  # LoRA B starts at 0; make the adapter non-trivial
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    names = ["p", "a", "s"]
    fast = HypergradientWeighting.for_model(policy, names, "p", [1, 1, 1], probe=probe)
    slow = HypergradientWeighting.for_model(
        policy, names, "p", [1, 1, 1], probe=probe, per_sample=False
    )
    signals = tiny_batch_signals(policy, loss_type, beta)
    got, expected = fast.probe_gradients(signals), slow.probe_gradients(signals)
    assert (fast.last_path, slow.last_path) == ("per_sample", "per_objective")
    assert expected[0].norm() > 0 and torch.count_nonzero(got[2]) == 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


class SharedLayerNet(torch.nn.Module):
    """Per-token log-probs from a layer applied twice and a second layer tied to it;
    ``packed`` flattens the batch into one row (as padding-free packing does), so rows
    are no longer sequences."""

    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed = packed
        self.inner = torch.nn.Linear(4, 4)
        self.twin = torch.nn.Linear(4, 4)
        self.twin.weight = self.inner.weight
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        h = x.reshape(1, -1, 4) if self.packed else x
        h = torch.tanh(self.twin(torch.tanh(self.inner(torch.tanh(self.inner(h))))))
        logits = self.head(h).reshape(*x.shape[:2], 3)
        return torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("packed", [False, True])
def test_per_sample_path_on_a_shared_layer_and_on_packed_rows(packed):
    torch.manual_seed(8)
    net = SharedLayerNet(packed)
    names = ["p", "a"]
    fast = HypergradientWeighting(names, "p", [1, 1], [net.inner.weight])
    fast.hook_model(net)
    slow = HypergradientWeighting(names, "p", [1, 1], [net.inner.weight])
    x, actions = torch.randn(5, 3, 4), torch.randint(0, 3, (5, 3))
    logp = net(x, actions)
    signals = StepSignals(
        torch.randn(5, 2), lambda a: -(a.unsqueeze(1) * logp).mean(), torch.zeros(2)
    )
    got, expected = fast.probe_gradients(signals), slow.probe_gradients(signals)
    assert fast.last_path == ("per_objective" if packed else "per_sample")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_per_sample_path_falls_back_when_the_forward_was_not_hooked():
    policy, _ = tiny_peft()
    signals = tiny_batch_signals(policy, "grpo", 0.0)  # forward before the hooks exist
    hooked = HypergradientWeighting.for_model(policy, ["p", "a", "s"], "p", [1, 1, 1])
    metrics = hooked.observe(signals)
    assert hooked.last_path == "per_objective" and metrics["hypergrad/per_sample"] == 0.0
    hooked.observe(tiny_batch_signals(policy, "grpo", 0.0))
    assert hooked.last_path == "per_sample"
    # Re-pointing the probe at other tensors drops the hooks; the same tensors keep them.
    hooked.set_probe_params(list(hooked.probe_params))
    assert hooked._hooks
    hooked.set_probe_params([p.detach().clone().requires_grad_() for p in hooked.probe_params])
    assert not hooked._hooks
    hooked.set_probe_params([p for _, p in select_probe_params(policy)])
    hooked.hook_model(policy)
    hooked.remove_hooks()
    hooked.observe(tiny_batch_signals(policy, "grpo", 0.0))
    assert hooked.last_path == "per_objective"


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_hooks_are_removed_with_the_weighting():
    """The engine builds a weighting per round; dropped ones must not leave hooks behind."""
    policy, _ = tiny_peft()
    before = hook_count(policy)
    for _ in range(3):
        weighting = HypergradientWeighting.for_model(policy, ["p", "a"], "p", [1, 1])
        assert hook_count(policy) == before + 8  # q/k/v/o lora_B of both layers
        weighting.hook_model(policy)  # re-hooking replaces, never stacks
        assert hook_count(policy) == before + 8
    del weighting
    gc.collect()
    assert hook_count(policy) == before


def closeness_to_seven(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [
        sum(max(0.0, 1 - abs(ord(ch) - ord("7")) / 64) for ch in t) / max(len(t), 1) for t in texts
    ]


def shortness(prompts, completions, **kwargs):
    return [-len(c[0]["content"]) / 8 for c in completions]


def test_trainer_logs_alignment_and_moves_the_weights():
    torch.manual_seed(0)
    policy, tokenizer = tiny_peft(("q_proj", "v_proj", "up_proj", "down_proj"))
    names = ["sevens", "short"]
    weighting = HypergradientWeighting.for_model(policy, names, "sevens", [0.5, 0.5], eta=5.0)
    rows = [{"prompt": [{"role": "user", "content": f"Answer {i}:"}]} for i in range(8)]
    # Whole sequences (not prompt_once), so that the probe takes the per-sample path.
    settings = GRPOSettings(
        batch_size=2, group_size=4, max_new_tokens=6, lr=1e-2, beta=0.05, prompt_once=False
    )
    trainer = LocalTrainer(
        policy,
        tokenizer,
        rows,
        [("sevens", closeness_to_seven), ("short", shortness)],
        weighting,
        settings,
        seed=0,
    )
    history = trainer.train(3)
    keys = {f"{kind}/{n}" for kind in ("alignment", "weights") for n in names}
    assert all(keys <= m.keys() for m in history)
    assert history[0].keys() == history[1].keys() == history[2].keys()
    weights = [torch.tensor([m[f"weights/{n}"] for n in names]) for m in history]
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]))  # no cache on step 1
    assert [m["hypergrad/updated"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["hypergrad/per_sample"] == 1.0 for m in history)
    assert not torch.equal(weights[1], weights[0])
    assert not torch.equal(weights[2], weights[1])
    for w in weights:
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(w.min()) >= weighting.w_min
    assert all(math.isfinite(v) for m in history for v in m.values())
    assert any(m["alignment/short"] != 0.0 for m in history[1:])


def test_static_weighting_ignores_rounds_and_keeps_its_state_empty():
    static = StaticWeighting(["p", "a"], "p", [3.0, 1.0])
    static.begin_round()
    assert static.state_dict() == {}
    torch.testing.assert_close(static.weights(), torch.tensor([0.75, 0.25]))


# ---------------------------------------------------------------------------- persistent rule


def zero_spread(m: int, *saturated: int) -> RewardBatch:
    """A batch whose objectives ``saturated`` had zero spread in every group."""
    zero = torch.zeros(m)
    zero[list(saturated)] = 1.0
    return RewardBatch(torch.zeros(4, m), 2, zero)


def run_persistent(
    hg: HypergradientWeighting,
    policy: DirectPolicy,
    columns: list[torch.Tensor],
    batches: list[RewardBatch] | None = None,
) -> list[torch.Tensor]:
    """Like ``run``, with the trainer's order: the batch first, then the step's graph."""
    trajectory = []
    for k, adv in enumerate(columns):
        m = adv.shape[1]
        batch = batches[k] if batches is not None else zero_spread(m)
        hg.observe_batch(batch)
        hg.observe(policy.signals(adv))
        trajectory.append(hg.weights())
    return trajectory


def persistent(names, policy, **kwargs) -> HypergradientWeighting:
    return make_hg(names, policy, rule="persistent", eta=kwargs.pop("eta", 0.25), **kwargs)


def test_persistent_rule_pure_noise_objective_loses_weight():
    """A noise objective's EMA averages out, so its alignment is shrunk by its persistence,
    while the primary's own persistent direction keeps lining up: weight flows to the primary."""
    policy = DirectPolicy(N)
    hg = persistent(["correct", "noise"], policy)
    gen = torch.Generator().manual_seed(7)
    primary = persistent_primary(16, N, 0.5, 7)
    steps = [torch.stack([p, torch.randn(N, generator=gen)], 1) for p in primary]
    noise = [float(w[1]) for w in run_persistent(hg, policy, steps)]
    assert noise[-1] < 0.5 - 0.2, noise
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(noise[3:])), noise


def test_persistent_rule_aligned_objective_gains_against_noise():
    policy = DirectPolicy(N)
    hg = persistent(["correct", "steps", "noise"], policy)
    gen = torch.Generator().manual_seed(8)
    primary = persistent_primary(16, N, 1.0, 8)
    aligned = persistent_primary(16, N, 0.3, 8, noise_seed=108)
    steps = [
        torch.stack([p, a, torch.randn(N, generator=gen)], 1)
        for p, a in zip(primary, aligned, strict=True)
    ]
    w = run_persistent(hg, policy, steps)[-1]
    assert float(w[1]) > 1 / 3 + 0.1, w  # gained
    assert float(w[1]) > float(w[2]) + 0.2, w  # and far above the noise


def test_persistent_rule_conflicting_objective_loses_weight():
    policy = DirectPolicy(N)
    hg = persistent(["correct", "short"], policy)
    gen = torch.Generator().manual_seed(9)
    steps = [
        torch.stack([p, -p + 0.3 * torch.randn(N, generator=gen)], 1)
        for p in persistent_primary(12, N, 0.3, 9)
    ]
    assert float(run_persistent(hg, policy, steps)[-1][1]) < 0.15


def test_saturated_objective_decays_to_the_floor_and_recovers():
    """Zero spread for ``saturation_window`` steps: saturated, gate decays, logit frozen;
    spread again: the gate reopens step by step, back to the weight it had."""
    policy = DirectPolicy(N)
    hg = persistent(["correct", "format", "brevity"], policy, initial=[1.0, 2.0, 1.0], eta=0.0)
    primary = persistent_primary(30, N, 0.3, 10)
    gen = torch.Generator().manual_seed(10)
    live = [torch.stack([p, torch.randn(N, generator=gen), p], 1) for p in primary]
    dead = [torch.stack([p, torch.zeros(N), p], 1) for p in primary]
    window = hg.saturation_window
    before = run_persistent(hg, policy, live[:4])[-1]
    assert float(before[1]) == pytest.approx(0.5, abs=1e-6)  # eta = 0: only the gate acts
    metrics = []
    for k in range(10):
        hg.observe_batch(zero_spread(3, 1))
        metrics.append(hg.observe(policy.signals(dead[k])))
    flags = [m["saturated/format"] for m in metrics]
    assert flags == [0.0] * (window - 1) + [1.0] * (10 - window + 1)
    assert all(m["saturated/correct"] == 0.0 for m in metrics)
    w = hg.weights()
    assert float(w[1]) <= hg.w_min + 0.01
    assert float(w[0]) > float(before[0]) + 0.2  # the primary took over (with brevity)
    for _ in range(12):  # the objective has spread again
        hg.observe_batch(zero_spread(3))
        hg.observe(policy.signals(live[0]))
    assert not hg.saturated().any()
    torch.testing.assert_close(hg.weights(), before, atol=1e-6, rtol=0)


def test_the_primary_is_never_treated_as_saturated():
    policy = DirectPolicy(N)
    hg = persistent(["correct", "format"], policy, eta=0.0)
    for _ in range(10):
        hg.observe_batch(zero_spread(2, 0))
        hg.observe(policy.signals(torch.zeros(N, 2)))
    torch.testing.assert_close(hg.weights(), torch.tensor([0.5, 0.5]))


def test_persistent_alignment_is_the_cosine_times_the_persistence():
    """u_i = ⟨g_p, m̂_i⟩/(‖g_p‖·√q̂_i) by hand, on two steps of a 2-entry probe."""
    policy = DirectPolicy(2)
    hg = persistent(["p", "a"], policy, ema=0.5, eta=0.0)
    # g = -adv/N with N = 2: step 1 g_a = (-0.5, 0), step 2 g_a = (0, -0.5), g_p = (-0.5, 0).
    hg.observe_batch(zero_spread(2))
    hg.observe(policy.signals(torch.tensor([[1.0, 1.0], [0.0, 0.0]])))
    hg.observe_batch(zero_spread(2))
    hg.observe(policy.signals(torch.tensor([[1.0, 0.0], [0.0, 1.0]])))
    hg.observe_batch(zero_spread(2))
    metrics = hg.observe(policy.signals(torch.tensor([[1.0, 0.0], [0.0, 0.0]])))
    # m̂_a = (0.25·(-0.5,0) + 0.5·(0,-0.5)) / 0.75, q̂_a = (0.25 + 0.5)·0.25 / 0.75 = 0.25.
    m_hat = torch.tensor([-0.125, -0.25]) / 0.75
    g_p = torch.tensor([-0.5, 0.0])
    expected = float(g_p @ m_hat) / (0.5 * 0.5)
    assert metrics["alignment/a"] == pytest.approx(expected)
    assert metrics["alignment/p"] == pytest.approx(1.0)  # the primary kept its direction


def test_persistent_step_is_normalised_in_logits():
    """The first update moves each logit by η·(1 − momentum)·sign(d_i), whatever the
    gradients' scale: η reads as logits per step once the sign has been consistent."""
    for scale, momentum in itertools.product((1e-6, 1.0, 1e6), (0.0, 0.9)):
        policy = DirectPolicy(N)
        hg = persistent(["correct", "noise"], policy, eta=0.3, momentum=momentum)
        steps = [
            torch.stack([p, torch.zeros(N)], 1) * scale for p in persistent_primary(2, N, 0, 11)
        ]
        z0 = hg.z.clone()
        run_persistent(hg, policy, steps)
        expected = 0.3 * (1 - momentum) * torch.tensor([1.0, -1.0], dtype=torch.float64)
        torch.testing.assert_close(hg.z - z0, expected)


def test_persistent_rule_skips_steps_without_a_primary_gradient():
    policy = DirectPolicy(N)
    hg = persistent(["correct", "noise"], policy)
    gen = torch.Generator().manual_seed(14)
    steps = [
        torch.stack([p, torch.randn(N, generator=gen)], 1)
        for p in persistent_primary(3, N, 0.3, 14)
    ]
    run_persistent(hg, policy, steps)
    before = hg.z.clone()
    metrics = hg.observe(
        policy.signals(torch.stack([torch.zeros(N), torch.randn(N, generator=gen)], 1))
    )
    assert metrics["hypergrad/updated"] == 0.0 and torch.equal(hg.z, before)


def test_persistent_rule_does_not_amplify_rounding_residue():
    """Objectives with the same gradients have the same alignment, so ``d`` is 0 up to the last
    bit of a sum; Adam's normalisation must not turn that residue into full ``η`` steps (it
    made the engines' adapters depend on summation order)."""
    policy = DirectPolicy(N)
    names = ["correct", "echo", "copy"]
    hg = persistent(names, policy, initial=[1.0, 2.0, 0.7], eta=1.0)
    primary = persistent_primary(12, N, 0.5, 15)
    metrics = []
    for p in primary:
        hg.observe_batch(zero_spread(3))
        metrics.append(hg.observe(policy.signals(torch.stack([p, p, p], 1))))
    assert all(m["hypergrad/updated"] == 1.0 for m in metrics[1:])
    assert torch.equal(hg.z, hg.z0), hg.z - hg.z0


def test_objective_without_spread_has_no_probe_gradient():
    """Zero spread in every group: the advantages are rounding residue, the gradient is 0, so
    the alignment is 0 rather than the cosine of noise."""
    policy = DirectPolicy(N)
    hg = persistent(["correct", "flat"], policy)
    gen = torch.Generator().manual_seed(16)
    for p in persistent_primary(4, N, 0.3, 16):
        hg.observe_batch(zero_spread(2, 1))
        residue = 1e-7 * torch.randn(N, generator=gen)
        metrics = hg.observe(policy.signals(torch.stack([p, residue], 1)))
        assert metrics["probe_grad_norm/flat"] == 0.0
        assert metrics["alignment/flat"] == 0.0
    hg.observe_batch(zero_spread(2, 0, 1))  # the primary has no spread either: nothing moves
    before = hg.z.clone()
    metrics = hg.observe(policy.signals(1e-7 * torch.randn(N, 2, generator=gen)))
    assert metrics["hypergrad/updated"] == 0.0 and torch.equal(hg.z, before)


@pytest.mark.parametrize(
    "key, value",
    [
        ("ema", 0.0),
        ("momentum", 0.0),
        ("saturation_window", 1),
        ("saturation_decay", 0.9),
        ("anchor", 0.5),
        ("eta", 1.0),
    ],
)
def test_every_persistent_setting_changes_the_trajectory(key, value):
    policy = DirectPolicy(N)
    gen = torch.Generator().manual_seed(12)
    primary = persistent_primary(10, N, 0.5, 12)
    steps = [torch.stack([p, torch.randn(N, generator=gen), p], 1) for p in primary]
    batches = [zero_spread(3, 1) if k >= 4 else zero_spread(3) for k in range(10)]
    names = ["correct", "noise", "echo"]
    default = run_persistent(persistent(names, policy), policy, steps, batches)
    changed = run_persistent(persistent(names, policy, **{key: value}), policy, steps, batches)
    assert not torch.equal(torch.stack(default), torch.stack(changed))


def test_persistent_state_round_trip_and_carry_across_rounds():
    policy = DirectPolicy(N)
    gen = torch.Generator().manual_seed(13)
    steps = [torch.randn(N, 3, generator=gen) for _ in range(8)]
    batches = [zero_spread(3, 2) for _ in range(8)]
    original = persistent(["p", "a", "b"], policy)
    run_persistent(original, policy, steps[:4], batches[:4])
    state = {
        k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in original.state_dict().items()
    }
    restored = persistent(["p", "a", "b"], policy)
    restored.load_state_dict(state)
    assert torch.equal(
        torch.stack(run_persistent(restored, policy, steps[4:], batches[4:])),
        torch.stack(run_persistent(original, policy, steps[4:], batches[4:])),
    )
    no_carry = persistent(["p", "a", "b"], policy, carry_across_rounds=False)
    run_persistent(no_carry, policy, steps[:2])
    no_carry.begin_round()
    before = no_carry.z.clone()
    no_carry.observe_batch(zero_spread(3))
    assert no_carry.observe(policy.signals(steps[2]))["hypergrad/updated"] == 0.0
    assert torch.equal(no_carry.z, before)


def test_invalid_persistent_settings_are_rejected():
    policy = DirectPolicy(2)
    for kwargs, field in [
        ({"rule": "magic"}, "rule"),
        ({"ema": 1.0}, "ema"),
        ({"momentum": -0.1}, "momentum"),
        ({"saturation_window": 0}, "saturation_window"),
        ({"saturation_decay": 1.0}, "saturation_decay"),
    ]:
        with pytest.raises(ValueError, match=field):
            make_hg(["p", "a"], policy, **kwargs)


# ---------------------------------------------------------------------------- SAW / variance


REWARDS = torch.tensor(
    [
        # accuracy, format, length (two groups of G = 2)
        [1.0, 1.0, 0.2],
        [0.0, 1.0, 0.6],
        [1.0, 1.0, float("nan")],
        [1.0, 1.0, 1.0],
    ]
)


def test_saw_weights_by_the_coefficient_of_variation_by_hand():
    saw = SAWWeighting(["acc", "fmt", "len"], "acc", [1.0, 1.0, 2.0], w_min=0.0)
    saw.observe_batch(RewardBatch(REWARDS, 2, torch.zeros(3)))
    # acc: mean 0.75, Bessel std 0.5 -> CV 2/3; fmt: CV 0; len over (0.2, 0.6, 1.0):
    # mean 0.6, std 0.4 -> CV 2/3. Times w0 = (0.25, 0.25, 0.5): 1/6, 0, 1/3.
    torch.testing.assert_close(saw.weights(), torch.tensor([1 / 3, 0.0, 2 / 3]))
    floored_saw = SAWWeighting(["acc", "fmt", "len"], "acc", [1.0, 1.0, 2.0], w_min=0.05)
    floored_saw.observe_batch(RewardBatch(REWARDS, 2, torch.zeros(3)))
    torch.testing.assert_close(
        floored_saw.weights(), 0.05 + 0.85 * torch.tensor([1 / 3, 0.0, 2 / 3])
    )


def test_variance_weights_by_the_mean_group_std_by_hand():
    var = VarianceWeighting(["acc", "fmt", "len"], "acc", [1.0, 1.0, 1.0], w_min=0.0)
    var.observe_batch(RewardBatch(REWARDS, 2, torch.zeros(3)))
    # Population stds per group: acc (0.5, 0) -> 0.25; fmt 0; len (0.2, one value: 0) -> 0.1.
    torch.testing.assert_close(var.weights(), torch.tensor([0.25, 0.0, 0.1]) / 0.35)


def test_statistic_weightings_keep_the_configured_weights_without_spread_and_smooth():
    flat = torch.ones(4, 2)
    saw = SAWWeighting(["acc", "fmt"], "acc", [3.0, 1.0])
    saw.observe_batch(RewardBatch(flat, 2, torch.ones(2)))
    torch.testing.assert_close(saw.weights(), torch.tensor([0.75, 0.25]))
    batches = [REWARDS[:, :2], torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])]
    plain, smooth = (
        VarianceWeighting(["acc", "fmt"], "acc", [1.0, 1.0], smoothing=s) for s in (0.0, 0.5)
    )
    for rewards in batches:
        for weighting in (plain, smooth):
            weighting.observe_batch(RewardBatch(rewards, 2, torch.zeros(2)))
    # Second batch alone: acc has no spread, fmt 0.5 in both groups -> the floor for acc.
    assert float(plain.weights()[0]) == pytest.approx(plain.w_min)
    # Smoothed: 0.5·(0.25, 0) + 0.5·(0, 0.5) = (0.125, 0.25).
    torch.testing.assert_close(
        smooth.weights(), 0.02 + 0.96 * torch.tensor([1 / 3, 2 / 3]), atol=1e-6, rtol=0
    )
    restored = VarianceWeighting(["acc", "fmt"], "acc", [1.0, 1.0], smoothing=0.5)
    restored.load_state_dict(smooth.state_dict())
    torch.testing.assert_close(restored.weights(), smooth.weights())


# ---------------------------------------------------------------------------- config and build


def test_build_weighting_follows_the_table_and_the_run_method():
    policy, _ = tiny_peft(("q_proj", "v_proj"))
    names, initial = ["acc", "fmt"], [1.0, 1.0]

    def built(run_method=None, **table):
        return build_weighting(WeightingConfig(**table), names, "acc", initial, policy, run_method)

    assert isinstance(built(), StaticWeighting)
    assert isinstance(built("fedavg"), StaticWeighting)
    auto = built("fedmoa")
    assert isinstance(auto, HypergradientWeighting) and auto.rule == "persistent"
    assert auto.eta == DEFAULT_ETA["persistent"]
    auto.remove_hooks()
    cosine = built(method="hypergradient", rule="cosine")
    assert cosine.rule == "cosine" and cosine.eta == 1.0
    cosine.remove_hooks()
    assert isinstance(built("fedavg", method="saw"), SAWWeighting)
    assert isinstance(built(method="variance", smoothing=0.5), VarianceWeighting)
