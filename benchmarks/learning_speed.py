"""A GRPO run that learns, timed under today's step and under the fast settings, in one run.

The run is the learning probe of ``benchmarks/reward_hacking.py`` (``math-strict`` on ``sums``):
SmolLM2-135M, one-digit sums, the strict math verifier as the only reward, "Reply with one line:
The answer is <number>.", ``B = 4``, ``G = 8``, 24 new tokens, lr 5e-4, LoRA r 16 on all seven
attention and MLP projections, DAPO loss, 60 steps, the same seed and data for every variant.

Variants (``--variants``; a name is a set of ``[grpo]`` / ``[model]`` settings):

``plain``        the step before this work: every row's prompt in the prefill and the
                 training forward (``grpo.prompt_once = false``), eager decode;
``prompt-once``  ``grpo.prompt_once = true`` (the default): each prompt once in sampling's
                 prefill and in the training forward;
``compiled``     ``prompt_once`` and ``[model] decode = "compiled"`` (compile time included).

Each variant starts from a fresh adapter; per variant it prints the wall time of the steps, the
median split of a step (``timing/generate``, ``timing/forward_backward``, the rest), the
training reward (mean of the first and last 10 steps) and the greedy held-out accuracy after
training (125 test rows, the verifier's and an independent exact-number check's), and the ratio
of each variant's wall time to the first variant's.

    python benchmarks/learning_speed.py --threads 2 --json benchmarks/records/learning_speed/figures.json
    python benchmarks/learning_speed.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, report_header, start
from local_step import machine_info
from reward_hacking import (
    CASES,
    LORA_TARGETS,
    add_run_options,
    parse_run_options,
    rows,
    scored,
    train_on_verifier,
)
from weighting_behaviour import reset_adapter

from fedmoa.grpo.decode import decode_mode, set_decode
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"grpo": {"prompt_once": False}, "decode": "eager"},
    "prompt-once": {"grpo": {"prompt_once": True}, "decode": "eager"},
    "compiled": {"grpo": {"prompt_once": True}, "decode": "compiled"},
}
PHASES = ("generate", "forward_backward")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return parse_run_options(parser, argv)


def run_variant(args: argparse.Namespace, policy: Any, tokenizer: Any, name: str) -> dict[str, Any]:
    variant = VARIANTS[name]
    case = CASES["math-strict"]
    train = rows("sums", case.system_prompt, 256, 11)
    test = rows("sums", case.system_prompt, args.test_prompts, 12)
    reset_adapter(policy, args.seed)
    set_decode(policy, variant["decode"])
    history, seconds = train_on_verifier(args, policy, tokenizer, case, train, **variant["grpo"])
    after = scored(policy, tokenizer, case, test, args)
    reward = [m["rewards/verifier/mean"] for m in history]
    split = {p: statistics.median(m[f"timing/{p}"] for m in history) for p in PHASES}
    step = statistics.median(m["step_time"] for m in history)
    widths = [m["completions/max_length"] for m in history]
    return {
        "variant": name,
        "settings": variant,
        "decode_used": decode_mode(policy),
        "train_seconds": seconds,
        "first_step_s": history[0]["step_time"],
        "median_step_s": step,
        "median_split_s": split | {"rest": step - sum(split.values())},
        "train_reward": reward,
        "completion_width": widths,
        "median_width": statistics.median(widths),
        "reward_first10": statistics.fmean(reward[:10]),
        "reward_last10": statistics.fmean(reward[-10:]),
        "test_verifier": after["verifier"],
        "test_reference": after["reference"],
    }


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    runs = results["runs"]
    first = runs[0]["train_seconds"]
    lines = [
        *report_header("a GRPO run that learns: wall time by variant", argv, results["machine"]),
        f"model: {args.model}, B={args.batch_size}, G={args.group_size}, "
        f"max_new_tokens={args.max_new_tokens}, lr={args.lr}, LoRA r {args.rank} on "
        f"{len(LORA_TARGETS)} projections, DAPO, {args.steps} steps, seed {args.seed}",
        "",
        f"{'variant':12}{'decode':>9}{'wall s':>8}{'ratio':>7}{'1st step':>9}{'step s':>8}"
        f"{'gen':>6}{'fwd-bwd':>8}{'rest':>6}{'width':>6}{'reward 1-10':>12}{'last 10':>8}"
        f"{'test acc':>9}{'ref':>6}",
    ]
    for run in runs:
        split = run["median_split_s"]
        lines.append(
            f"{run['variant']:12}{run['decode_used']:>9}{run['train_seconds']:8.0f}"
            f"{first / run['train_seconds']:7.2f}{run['first_step_s']:9.1f}"
            f"{run['median_step_s']:8.2f}{split['generate']:6.2f}"
            f"{split['forward_backward']:8.2f}{split['rest']:6.2f}{run['median_width']:6.0f}"
            f"{run['reward_first10']:12.3f}{run['reward_last10']:8.3f}"
            f"{run['test_verifier']:9.3f}{run['test_reference']:6.3f}"
        )
    lines.append(
        "(ratio: the first variant's wall time / this one's; step, split and width (the longest "
        "completion of a step, tokens): medians over the steps; test acc: greedy, after training)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    lora = LoraSettings(r=args.rank, alpha=2 * args.rank, target_modules=LORA_TARGETS)
    policy = attach_lora(model, lora)
    runs = []
    for name in args.variants:
        runs.append(run_variant(args, policy, tokenizer, name))
        print(f"{name}: {runs[-1]['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    return finish(args, argv, {"machine": machine_info(args), "runs": runs}, format_report)


if __name__ == "__main__":
    sys.exit(main())
