"""Benchmark the cost of FedMOA's hypergradient weighting in one local GRPO step.

Targets (docs/performance.md): a ``LocalTrainer.step()`` with ``HypergradientWeighting`` (default
probe, ``last2``) takes at most 1.10x the time of the same step with ``StaticWeighting`` under the
``cosine`` rule, and at most 1.05x under the ``persistent`` rule (the default).

Variants, each its own ``LocalTrainer`` on its own copy of one LoRA-wrapped model (so one
variant's hooks never run in another's forward), each weighting built by ``build_weighting``:
static weights, the cosine rule with the default probe, the persistent rule with the default
probe and with ``probe="all"``, for 2 objectives (math_accuracy, length) and for 4
(plus boxed format and "####"-marker format).

Method: every timed step of every variant does the same work. Before step ``k`` each variant's
LoRA weights are restored to one shared snapshot and torch is seeded with ``seed + k``; the
samplers of all trainers draw the same prompts. So all variants sample the *same* completions at
step ``k`` (the script checks the completion lengths and rewards agree) and the steps differ only
by what the weighting does; generation and reward time cancel in the ratios instead of drifting
with completion lengths once the weights differ. Steps are interleaved across variants, in an
order that rotates every round, so machine-load drift hits all of them alike. Each variant runs
one untimed warm-up step first (it also fills the hypergradient's gradient cache, so every timed
step takes the full path: probe gradients, cosines and a logit update).

Per variant it prints medians of: the step's wall and process CPU time; the training part
(step minus ``timing/generate`` and ``timing/reward``); ``timing/weighting`` (exclusive, so
exactly the weighting's own cost); and against the static step of the same round (paired
medians): step ratio, training-part ratio and overhead = weighting / static step. With
``--threads 1`` process CPU time hardly depends on other jobs, so the CPU ratios are the robust
figures on a busy machine.

    python benchmarks/hypergradient_overhead.py --threads 1   # SmolLM2-135M, B=2, G=4, 64 tokens
    python benchmarks/hypergradient_overhead.py --smoke       # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import torch

import fedmoa.grpo.trainer as trainer_module
from fedmoa.grpo.rollout import eos_token_ids
from fedmoa.grpo.trainer import LocalTrainer, PhaseTimer
from fedmoa.rewards import RewardFunc, load_reward_function
from fedmoa.weighting import RewardWeighting, WeightingConfig, build_weighting

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
import local_step
from _common import finish, report_header, start

PRIMARY = "math_accuracy"
# Weighting of each variant: static, or the hypergradient as "<rule>-<probe>".
KINDS = ("static", "cosine-last2", "persistent-last2", "persistent-all")
OBJECTIVES = (2, 4)
TARGETS = {"cosine-last2": 1.10, "persistent-last2": 1.05}  # issue 5's and issue 12's


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Also takes local_step.py's --model, --batch-size, --group-size, "
        "--max-new-tokens, --dtype, --threads, --smoke and --json.",
    )
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--seed", type=int, default=1000, help="torch seed of timed step 0")
    parser.add_argument(
        "--forced",
        action="store_true",
        help="mask EOS so every completion has max_new_tokens tokens (default: EOS allowed)",
    )
    own, rest = parser.parse_known_args(argv)
    args = argparse.Namespace(**(vars(local_step.parse_args(rest)) | vars(own)))
    if args.smoke:
        args.repeats = min(args.repeats, 2)
        args.threads = args.threads or 1  # no idle OpenMP spinning on a busy machine
    return args


def objectives_for(args: argparse.Namespace, m: int) -> list[tuple[str, RewardFunc, float]]:
    """(name, reward function, initial weight) of the first ``m`` objectives, primary first.

    Length comes second: SmolLM2 rarely writes the required final answer, so math_accuracy and
    the format rewards are often 0 for a whole batch, and a weighting whose advantages are all
    zero skips its backward; the length of natural completions always varies.
    """
    funcs = dict(local_step.reward_funcs_for(args))  # math_accuracy, format (boxed), length
    funcs["marker"] = load_reward_function("format", {"style": "marker"})
    order = (PRIMARY, "length", "format", "marker")
    return [(name, funcs[name], 1.0 if name == PRIMARY else 0.5) for name in order[:m]]


def make_weighting(
    kind: str, policy: Any, names: list[str], initial: list[float]
) -> RewardWeighting:
    """Through ``build_weighting``, as ``train-local`` and the federated clients build it."""
    if kind == "static":
        cfg = WeightingConfig(method="static")
    else:
        rule, probe = kind.split("-")
        cfg = WeightingConfig(method="hypergradient", rule=rule, probe=probe)
    return build_weighting(cfg, names, PRIMARY, initial, policy)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class CpuPhaseTimer(PhaseTimer):
    """``PhaseTimer`` that also records the process CPU time of each phase.

    CPU seconds are inclusive of nested phases; the phases used here nest only ``weighting``
    inside ``forward_backward``, and ``generate``, ``reward`` and ``weighting`` contain none.
    ``LocalTrainer.step`` builds its own timer, so the benchmark swaps the class it looks up.
    """

    cpu_seconds: dict[str, float] = field(default_factory=dict)
    latest: ClassVar[Any] = None  # the timer of the step that ran last

    def __post_init__(self) -> None:
        type(self).latest = self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.process_time()
        try:
            with super().phase(name):
                yield
        finally:
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - start


@dataclass
class Variant:
    name: str
    objectives: int
    kind: str
    trainer: LocalTrainer
    steps: list[dict[str, float]] = field(default_factory=list)


def build_variants(args: argparse.Namespace) -> tuple[list[Variant], list[torch.Tensor]]:
    """All variants on copies of one freshly LoRA-wrapped model, plus its LoRA snapshot."""
    torch.manual_seed(0)
    base, tokenizer = local_step.load_policy(args)
    snapshot = [p.detach().clone() for p in base.parameters() if p.requires_grad]
    rows, settings = local_step.rows_for(args), local_step.grpo_settings_for(args)
    variants = []
    for m in OBJECTIVES:
        objectives = objectives_for(args, m)
        names = [name for name, _, _ in objectives]
        funcs = [(name, func) for name, func, _ in objectives]
        initial = [w for _, _, w in objectives]
        for kind in KINDS:
            policy = copy.deepcopy(base)
            weighting = make_weighting(kind, policy, names, initial)
            trainer = LocalTrainer(policy, tokenizer, rows, funcs, weighting, settings, seed=0)
            variants.append(Variant(f"{m}obj/{kind}", m, kind, trainer))
    del base
    return variants, snapshot


def run_step(
    variant: Variant, snapshot: list[torch.Tensor], seed: int, forced: bool
) -> dict[str, float]:
    """One ``LocalTrainer.step()`` from the shared LoRA snapshot, with wall and CPU times."""
    policy = variant.trainer.policy
    with torch.no_grad():
        trainable = [p for p in policy.parameters() if p.requires_grad]
        for param, saved in zip(trainable, snapshot, strict=True):
            param.copy_(saved)
    eos = local_step.suppress_eos(policy, eos_token_ids(policy, variant.trainer.tokenizer))
    torch.manual_seed(seed)
    with eos if forced else contextlib.nullcontext():
        cpu = time.process_time()
        metrics = variant.trainer.step()
        cpu = time.process_time() - cpu
    timer = CpuPhaseTimer.latest
    metrics["cpu/step"] = cpu
    for phase in ("generate", "reward", "weighting"):
        metrics[f"cpu/{phase}"] = timer.cpu_seconds.get(phase, 0.0)
    metrics["train_time"] = (
        metrics["step_time"] - metrics["timing/generate"] - metrics["timing/reward"]
    )
    metrics["cpu/train"] = metrics["cpu/step"] - metrics["cpu/generate"] - metrics["cpu/reward"]
    return metrics


def run_all(args: argparse.Namespace, variants: list[Variant], snapshot: list[torch.Tensor]) -> Any:
    """A warm-up step per variant, then ``repeats`` rounds of one step per variant."""
    with mock.patch.object(trainer_module, "PhaseTimer", CpuPhaseTimer):
        for variant in variants:
            run_step(variant, snapshot, args.seed - 1, args.forced)
        with local_step.LoadMeter() as load:
            for k in range(args.repeats):
                shift = k % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    variant.steps.append(run_step(variant, snapshot, args.seed + k, args.forced))
    return load.figures


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

FIGURES = {  # per-variant median: label -> step metric
    "step_s": "step_time",
    "step_cpu_s": "cpu/step",
    "train_s": "train_time",
    "train_cpu_s": "cpu/train",
    "weighting_s": "timing/weighting",
    "weighting_cpu_s": "cpu/weighting",
    "generate_s": "timing/generate",
}


RATIOS = {  # against the static step of the same round: label -> (numerator, denominator)
    "step_wall": ("step_time", "step_time"),
    "step_cpu": ("cpu/step", "cpu/step"),
    "train_wall": ("train_time", "train_time"),
    "train_cpu": ("cpu/train", "cpu/train"),
    "overhead_wall": ("timing/weighting", "step_time"),
    "overhead_cpu": ("cpu/weighting", "cpu/step"),
}


def summarize(variants: list[Variant]) -> dict[str, Any]:
    """Medians per variant, and paired (same round) ratios against that round's static step."""
    out: dict[str, Any] = {}
    static = {v.objectives: v for v in variants if v.kind == "static"}
    for v in variants:
        s = v.steps
        figures: dict[str, Any] = {
            label: statistics.median(x[key] for x in s) for label, key in FIGURES.items()
        }
        figures["per_sample_steps"] = sum(x.get("hypergrad/per_sample", 0.0) == 1.0 for x in s)
        figures["updated_steps"] = sum(x.get("hypergrad/updated", 0.0) == 1.0 for x in s)
        figures["steps"] = len(s)
        ref = static[v.objectives].steps
        figures["ratio"] = {
            label: statistics.median(x[num] / y[den] for x, y in zip(s, ref, strict=True))
            for label, (num, den) in RATIOS.items()
        }
        out[v.name] = figures
    return out


def same_completions(variants: list[Variant]) -> bool:
    """Whether every variant sampled the same completions at each step (lengths and rewards)."""
    keys = ("completions/mean_length", "completions/max_length", "rewards/length/mean")

    def sig(x: dict[str, float]) -> tuple[float, ...]:
        return tuple(round(x[k], 6) for k in keys)

    return all(len({sig(v.steps[k]) for v in variants}) == 1 for k in range(len(variants[0].steps)))


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    """The human-readable table; tests/test_benchmark_hypergradient.py checks its labels."""
    m, fig = results["machine"], results["variants"]
    lines = [
        *report_header("fedmoa hypergradient overhead benchmark", argv, m),
        f"model: {args.model}, dtype {m['dtype']}, B={args.batch_size}, G={args.group_size}, "
        f"max_new_tokens={args.max_new_tokens} ({'EOS masked' if args.forced else 'EOS allowed'})"
        f", {args.repeats} interleaved rounds after 1 warm-up step per variant",
        f"same completions in every variant at each step: {results['same_completions']}; "
        f"median completion length {results['mean_completion_length']:.1f}",
        "machine load during the timed rounds: " + local_step._load_text(results["machine_load"]),
        "",
        "per variant, median over steps (s); train = step - generate - reward",
        f"   {'variant':22}{'step':>7}{'cpu':>7}{'train':>7}{'cpu':>7}{'weighting':>10}{'cpu':>7}"
        f"{'per-sample':>11}",
    ]
    for name, f in fig.items():
        lines.append(
            f"   {name:22}{f['step_s']:7.2f}{f['step_cpu_s']:7.2f}{f['train_s']:7.2f}"
            f"{f['train_cpu_s']:7.2f}{f['weighting_s']:10.3f}{f['weighting_cpu_s']:7.3f}"
            f"{f['per_sample_steps']:>7}/{f['steps']}"
        )
    lines += [
        "",
        "vs static, paired median over rounds (x): overhead = weighting / static step",
        f"   {'variant':22}{'step':>7}{'cpu':>7}{'train':>7}{'cpu':>7}{'overhead':>10}{'cpu':>7}",
    ]
    for name, f in fig.items():
        if name.endswith("/static"):
            continue
        r = f["ratio"]
        lines.append(
            f"   {name:22}{r['step_wall']:7.3f}{r['step_cpu']:7.3f}{r['train_wall']:7.3f}"
            f"{r['train_cpu']:7.3f}{100 * r['overhead_wall']:9.1f}%{100 * r['overhead_cpu']:6.1f}%"
        )
    lines.append("")
    for kind, target in TARGETS.items():
        for n in OBJECTIVES:
            r = fig[f"{n}obj/{kind}"]["ratio"]
            met = r["step_wall"] <= target and r["step_cpu"] <= target
            lines.append(
                f"target step({kind})/step(static) <= {target:.2f}, {n} objectives: "
                f"wall {r['step_wall']:.3f}, CPU {r['step_cpu']:.3f} -> "
                f"{'met' if met else 'NOT met'}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    variants, snapshot = build_variants(args)
    load = run_all(args, variants, snapshot)
    results: dict[str, Any] = {
        "machine": local_step.machine_info(args),
        "machine_load": load,
        "same_completions": same_completions(variants),
        "mean_completion_length": statistics.median(
            x["completions/mean_length"] for x in variants[0].steps
        ),
        "variants": summarize(variants),
        "steps": {v.name: v.steps for v in variants},
    }
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
