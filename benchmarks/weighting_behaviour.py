"""Does each reward weighting do its job? Real GRPO steps on scenarios built to show it.

Every run is ``LocalTrainer`` (the trainer ``fedmoa train-local`` uses) on one LoRA-wrapped
model, with its weighting built by ``fedmoa.weighting.build_weighting`` from a ``[weighting]``
table, for every method in ``METHODS`` and every seed, on three scenarios:

* ``saturating``: accuracy (primary, weight 1), ``style`` (weight 2: a brevity score against 24
  tokens that, from step ``--saturate-at`` on, gives every completion 1.0) and ``brevity``
  (weight 1, 8 tokens). Target for the persistent rule: ``style`` within ``w_min + 0.05``
  within 8 steps after it saturates, and the primary's weight up by at least 0.2.
* ``noise``: accuracy and ``noise``, a uniform random score unrelated to the completion (equal
  weights). Target: the noise weight down by at least 0.1 within 16 steps.
* ``conflict``: accuracy and ``no_digits`` (1.0 for a completion without a digit, which no
  correct answer can be; equal weights). Target: final accuracy, mean over seeds, at least
  static weighting's.

Data: one-digit sums from reasoning-gym (SmolLM2 gets 20-60% right), a held-out set of
``--test-prompts`` for the greedy accuracy before and after. Each finished run is written to
``--out`` as JSON and skipped when the command is run again, so an interrupted benchmark resumes.

    python benchmarks/weighting_behaviour.py                 # SmolLM2-135M, 3 seeds, ~1 h on 2 cores
    python benchmarks/weighting_behaviour.py --smoke         # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from _common import finish, report_header, start
from local_step import SMOKE_MODEL, load_policy, machine_info

from fedmoa.data import DataConfig, load_rows
from fedmoa.eval import evaluate_rows
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer
from fedmoa.rewards import RewardFunc, load_reward_function
from fedmoa.rewards.base import completion_text
from fedmoa.weighting import HypergradientWeighting, WeightingConfig, build_weighting

Row = dict[str, Any]
HERE = Path(__file__).resolve().parent
METHODS: dict[str, dict[str, Any]] = {
    "static": {"method": "static"},
    "cosine": {"method": "hypergradient", "rule": "cosine"},
    "persistent": {"method": "hypergradient", "rule": "persistent"},
    "saw": {"method": "saw"},
    "variance": {"method": "variance"},
}
SCENARIOS = ("saturating", "noise", "conflict")
PRIMARY = "accuracy"
SYSTEM_PROMPT = "Reply with one line: The answer is <number>."
DATA_PARAMS = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--saturate-at", type=int, default=6, help="first saturated step (1-based)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--test-prompts", type=int, default=48)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--eta", type=float, help="the persistent rule's eta (default: its own)")
    parser.add_argument(
        "--out",
        type=Path,
        help="run records (default: benchmarks/records/weighting; a temp dir with --smoke)",
    )
    parser.add_argument("--png", type=Path, default=None, help="default: OUT/weights.png")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random model and tiny sizes")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.seeds, args.steps, args.saturate_at = SMOKE_MODEL, 1, 4, 2
        args.batch_size, args.group_size, args.max_new_tokens, args.test_prompts = 2, 2, 4, 4
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="weighting-smoke-"))
            if args.smoke
            else HERE / "records" / "weighting"
        )
    args.png = args.png or args.out / "weights.png"
    return args


# -- rewards of the scenarios ---------------------------------------------------------------------


class Saturating:
    """``inner``'s scores until call ``at`` (one call per GRPO step), then 1.0 for everything:
    an objective that every completion has learned."""

    def __init__(self, inner: RewardFunc, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        self.calls += 1
        if self.calls >= self.at:
            return [1.0] * len(completions)
        return self.inner(prompts, completions, **kwargs)


def noise_reward(seed: int) -> RewardFunc:
    rng = random.Random(seed)

    def noise(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return [rng.random() for _ in completions]

    return noise


def no_digits(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for a completion without a digit: what no correct answer to a sum can be."""
    return [float(not any(ch.isdigit() for ch in completion_text(c))) for c in completions]


def objectives(scenario: str, seed: int, saturate_at: int) -> list[tuple[str, RewardFunc, float]]:
    accuracy = load_reward_function("math_accuracy")
    if scenario == "saturating":
        style = Saturating(load_reward_function("length", {"target": 24}), saturate_at)
        brevity = load_reward_function("length", {"target": 8})
        return [(PRIMARY, accuracy, 1.0), ("style", style, 2.0), ("brevity", brevity, 1.0)]
    if scenario == "noise":
        return [(PRIMARY, accuracy, 1.0), ("noise", noise_reward(seed), 1.0)]
    return [(PRIMARY, accuracy, 1.0), ("no_digits", no_digits, 1.0)]


# -- one run --------------------------------------------------------------------------------------


def reset_adapter(policy: Any, seed: int) -> None:
    """A fresh LoRA init (PEFT's own: A random, B zero) for every run, drawn from ``seed``."""
    torch.manual_seed(seed)
    for module in policy.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, init_lora_weights=True)


def data(args: argparse.Namespace) -> tuple[list[Row], list[Row]]:
    def rows(size: int, seed: int) -> list[Row]:
        cfg = DataConfig(
            name="basic_arithmetic",
            params=DATA_PARAMS,
            size=size,
            seed=seed,
            system_prompt=SYSTEM_PROMPT,
        )
        return load_rows(cfg)

    return rows(256, 11), rows(args.test_prompts, 12)


def run_one(
    args: argparse.Namespace,
    policy: Any,
    tokenizer: Any,
    scenario: str,
    method: str,
    seed: int,
    train: list[Row],
    test: list[Row],
) -> dict[str, Any]:
    reset_adapter(policy, seed)
    objs = objectives(scenario, seed, args.saturate_at)
    names = [n for n, _, _ in objs]
    funcs = [(n, f) for n, f, _ in objs]
    table = dict(METHODS[method])
    if method == "persistent" and args.eta is not None:
        table["eta"] = args.eta
    cfg = WeightingConfig(**table)
    weighting = build_weighting(cfg, names, PRIMARY, [w for _, _, w in objs], policy)
    settings = GRPOSettings(
        batch_size=args.batch_size,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
    )
    trainer = LocalTrainer(policy, tokenizer, train, funcs, weighting, settings, seed=seed)
    torch.manual_seed(seed)
    began = time.perf_counter()
    try:
        history = trainer.train(args.steps)
    finally:
        if isinstance(weighting, HypergradientWeighting):
            weighting.remove_hooks()
    train_seconds = time.perf_counter() - began
    result = evaluate_rows(policy, tokenizer, test, funcs, PRIMARY, args.max_new_tokens)
    keep = ("weights/", "alignment/", "saturated/", "rewards/", "frac_reward_zero_std/")
    steps = [{k: v for k, v in m.items() if k.startswith(keep)} for m in history]
    return {
        "scenario": scenario,
        "method": method,
        "seed": seed,
        "names": names,
        "weighting": {k: v for k, v in vars(cfg).items()},
        "steps": steps,
        "test_accuracy": result.accuracy,
        "test_rewards": result.reward_means,
        "train_seconds": train_seconds,
    }


def base_accuracy(policy: Any, tokenizer: Any, test: list[Row], args: argparse.Namespace) -> float:
    reset_adapter(policy, 0)  # B = 0: the adapter is the identity, this is the base model
    funcs = [(PRIMARY, load_reward_function("math_accuracy"))]
    return evaluate_rows(policy, tokenizer, test, funcs, PRIMARY, args.max_new_tokens).accuracy


# -- summaries ------------------------------------------------------------------------------------


def weight_series(run: dict[str, Any], name: str) -> list[float]:
    return [s[f"weights/{name}"] for s in run["steps"]]


def targets(run: dict[str, Any], args: argparse.Namespace, w_min: float) -> dict[str, Any]:
    """The issue's behaviour checks for one run (see the module docstring)."""
    if run["scenario"] == "saturating":
        style, primary = weight_series(run, "style"), weight_series(run, PRIMARY)
        first = args.saturate_at - 1  # 0-based index of the first saturated step
        window = style[first : first + 8]
        within = next((i + 1 for i, w in enumerate(window) if w <= w_min + 0.05), None)
        return {
            "style_final": style[-1],
            "steps_to_floor": within,
            "primary_rise": primary[-1] - primary[0],
            "met": within is not None and primary[-1] - primary[0] >= 0.2,
        }
    if run["scenario"] == "noise":
        noise = weight_series(run, "noise")
        drop = 1 / len(run["names"]) - noise[min(16, len(noise)) - 1]  # at step 16
        return {"noise_final": noise[-1], "noise_drop_16": drop, "met": drop >= 0.1}
    return {"test_accuracy": run["test_accuracy"]}


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = f"{run['scenario']}/{run['method']}"
        w_min = run["weighting"]["w_min"]
        entry = table.setdefault(key, {"runs": []})
        last = run["steps"][-5:]
        entry["runs"].append(
            {
                "seed": run["seed"],
                "test_accuracy": run["test_accuracy"],
                "train_primary_reward": statistics.fmean(
                    s[f"rewards/{PRIMARY}/mean"] for s in last
                ),
                "final_weights": {n: run["steps"][-1][f"weights/{n}"] for n in run["names"]},
                **targets(run, args, w_min),
            }
        )
    for entry in table.values():
        rs = entry["runs"]
        entry["test_accuracy"] = statistics.fmean(r["test_accuracy"] for r in rs)
        entry["train_primary_reward"] = statistics.fmean(r["train_primary_reward"] for r in rs)
        if all("met" in r for r in rs):
            entry["met"] = sum(bool(r["met"]) for r in rs)
    return table


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in runs)]
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    fig, axes = plt.subplots(
        len(scenarios),
        len(methods),
        figsize=(3.2 * len(methods), 2.6 * len(scenarios)),
        squeeze=False,
        sharey=True,
    )
    for row, scenario in enumerate(scenarios):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            mine = [r for r in runs if r["scenario"] == scenario and r["method"] == method]
            for i, name in enumerate(mine[0]["names"] if mine else []):
                for k, run in enumerate(mine):
                    series = weight_series(run, name)
                    ax.plot(
                        range(1, len(series) + 1),
                        series,
                        color=f"C{i}",
                        alpha=0.6,
                        label=name if k == 0 else None,
                    )
            ax.set_title(f"{scenario} / {method}", fontsize=9)
            ax.set_ylim(0, 1)
            if row == len(scenarios) - 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel("weight")
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = report_header("reward weighting behaviour", argv, results["machine"])
    lines.append(
        f"settings: {args.model}, {args.seeds} seeds, {args.steps} steps, B={args.batch_size}, "
        f"G={args.group_size}, {args.max_new_tokens} new tokens, lr {args.lr}, "
        f"{args.test_prompts} test prompts; untrained model's test accuracy "
        f"{results['base_accuracy']:.3f}"
    )
    for scenario in args.scenarios:
        lines.append(f"\n-- {scenario} --")
        for method in args.methods:
            entry = results["summary"].get(f"{scenario}/{method}")
            if entry is None:
                continue
            weights = {
                n: statistics.fmean(r["final_weights"][n] for r in entry["runs"])
                for n in entry["runs"][0]["final_weights"]
            }
            extra = ""
            rs = entry["runs"]
            if scenario == "saturating":
                extra = (
                    f" style→floor in {[r['steps_to_floor'] for r in rs]} steps, primary rise "
                    f"{statistics.fmean(r['primary_rise'] for r in rs):+.3f}"
                )
            elif scenario == "noise":
                extra = f" noise drop (16 steps) {statistics.fmean(r['noise_drop_16'] for r in rs):+.3f}"
            met = f" target met {entry['met']}/{len(rs)}" if "met" in entry else ""
            shown = " ".join(f"{n}={w:.3f}" for n, w in weights.items())
            lines.append(
                f"{method:>10}: final weights {shown}; test acc {entry['test_accuracy']:.3f}, "
                f"train primary reward {entry['train_primary_reward']:.3f};{extra}{met}"
            )
        lines.append(trajectory_lines(results["runs"], scenario, args.methods))
    lines.append(f"\nweights plot: {args.png}")
    return "\n".join(lines)


def trajectory_lines(runs: list[dict[str, Any]], scenario: str, methods: Sequence[str]) -> str:
    """Mean weight of each objective over seeds at every 2nd step, per method."""
    out = ["   trajectories (mean over seeds, every 2nd step):"]
    for method in methods:
        mine = [r for r in runs if r["scenario"] == scenario and r["method"] == method]
        if not mine:
            continue
        for name in mine[0]["names"]:
            series = [weight_series(r, name) for r in mine]
            means = [statistics.fmean(col) for col in zip(*series, strict=True)][1::2]
            out.append(f"   {method:>10} {name:>9}: " + " ".join(f"{w:.2f}" for w in means))
    return "\n".join(out)


def run_all(
    args: argparse.Namespace, log: Callable[[str], None] = print
) -> tuple[list[dict[str, Any]], float]:
    policy, tokenizer = load_policy(args)
    train, test = data(args)
    args.out.mkdir(parents=True, exist_ok=True)
    base_file = args.out / "base.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())["accuracy"]
    else:
        base = base_accuracy(policy, tokenizer, test, args)
        base_file.write_text(json.dumps({"accuracy": base}))
    runs = []
    for seed in range(args.seeds):
        for scenario in args.scenarios:
            for method in args.methods:
                suffix = f"-eta{args.eta:g}" if method == "persistent" and args.eta else ""
                path = args.out / f"{scenario}-{method}{suffix}-s{seed}.json"
                if path.exists():
                    runs.append(json.loads(path.read_text()))
                    continue
                run = run_one(args, policy, tokenizer, scenario, method, seed, train, test)
                path.write_text(json.dumps(run))
                log(f"{path.name}: {run['train_seconds']:.0f} s, acc {run['test_accuracy']:.3f}")
                runs.append(run)
    return runs, base


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    runs, base = run_all(args, lambda line: print(line, file=sys.stderr, flush=True))
    plot(runs, args.png)
    results = {
        "machine": machine_info(args),
        "base_accuracy": base,
        "summary": summarise(runs, args),
        "runs": runs,
    }
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
