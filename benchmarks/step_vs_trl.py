"""Whole GRPO training steps: fedmoa's ``LocalTrainer.step()`` against TRL's ``GRPOTrainer``.

Every figure is a whole optimiser step (generate, score, log-probs, loss, backward, AdamW), each
side in its own fresh process, sides alternating (``--rounds`` times, the order rotated each
round), so that a slow minute of a busy machine hurts every side alike:

``ours`` / ``ours-gc``   ``fedmoa.grpo.LocalTrainer.step()``, gradient checkpointing off / on;
``trl`` / ``trl-gc``     TRL's ``GRPOTrainer.train()`` (its own loop): same model and dtype, same
                         ``LoraConfig``, ``B·G`` completions per optimiser step
                         (``per_device_train_batch_size = B·G``, ``num_generations = G``,
                         ``steps_per_generation = 1``), same ``max_new_tokens``, temperature,
                         ``beta``, ``loss_type``, ε, learning rate, reward functions and weights;
``base`` / ``base-gc``   ``LocalTrainer.step()`` of the commit before the speed work
                         (``--baseline-ref``, checked out as a git worktree), so that the speed-up
                         is measured in the same run, not remembered.
``--prompt-once``        ``ours`` sides with ``grpo.prompt_once = true`` (each group's prompt once
                         in the training forward; ``ours-gc`` falls back to whole sequences).

EOS is masked out of the logits while sampling (only then) on every side, so every step trains
on exactly ``B·G`` sequences of padded prompt + ``max_new_tokens`` tokens: equal work. Per step:
samples per second (``B·G`` / wall seconds), CPU seconds per sample (process CPU time, every
thread), and each process's peak RSS during its steps (``VmHWM``, reset after setup). The first
``--warmup`` steps of a process are not timed.

    python benchmarks/step_vs_trl.py --threads 2                  # SmolLM2-135M, study settings
    python benchmarks/step_vs_trl.py --smoke                      # tiny random model, CI
    python benchmarks/step_vs_trl.py --sides ours trl --rounds 1  # a subset

The model, batch, dtype, thread, ``--smoke`` and ``--json`` options are those of
``benchmarks/local_step.py``; the defaults here are the study's (B = 2, G = 4, 32 new tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_step
from _common import finish, parse_on_top, parser_on_top, report_header, start
from memory_vs_trl import eos_masked, reset_peak

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "trl", "base", "ours-gc", "trl-gc", "base-gc")
LABELS = {
    "ours": "fedmoa LocalTrainer",
    "ours-gc": "fedmoa, grad ckpt",
    "trl": "TRL GRPOTrainer",
    "trl-gc": "TRL, grad ckpt",
    "base": "fedmoa before (base)",
    "base-gc": "base, grad ckpt",
}
# The last commit before the step-speed work (issue 13): the "today" every speed-up is against.
BASELINE_REF = "ed6fb79"
REWARD_WEIGHTS = (1.0, 0.5, 0.5)  # local_step.local_trainer's static weights, given to TRL too
LR = 1e-5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = parser_on_top(__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient")
    parser.add_argument("--loss-type", default="grpo", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of 'base'")
    parser.add_argument(
        "--prompt-once",
        action="store_true",
        help="ours: grpo.prompt_once = true (each group's prompt once in the training forward)",
    )
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    argv = list(argv or [])
    # The study's step unless the command line says otherwise.
    defaults = {"--max-new-tokens": "32"}
    argv += [x for k, v in defaults.items() if k not in argv for x in (k, v)]
    args = parse_on_top(parser, argv, local_step.parse_args)
    if args.smoke:
        args.steps, args.rounds = min(args.steps, 2), 1
    return args


# ---------------------------------------------------------------------------------------------
# inside one child process
# ---------------------------------------------------------------------------------------------

Side = Iterator[Callable[[int], list[dict[str, float]]]]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def ours_side(args: argparse.Namespace, checkpointing: bool) -> Side:
    """A function running n ``LocalTrainer.step()`` calls, returning each one's figures."""
    import fedmoa.grpo.trainer as trainer_module
    from fedmoa.grpo.rollout import eos_token_ids

    policy, tokenizer = local_step.load_policy(args)
    trainer = local_step.local_trainer(args, policy, tokenizer)
    trainer.settings = dataclasses.replace(
        trainer.settings,
        beta=args.beta,
        loss_type=args.loss_type,
        lr=LR,
        gradient_checkpointing=checkpointing,
        **({"prompt_once": True} if args.prompt_once else {}),  # base's settings lack the key
    )
    for group in trainer.optimizer.param_groups:
        group["lr"] = LR
    trainer_module.set_gradient_checkpointing(policy, checkpointing)
    sampler = trainer_module.generate_rollouts
    trainer_module.generate_rollouts = eos_masked(sampler, policy, eos_token_ids(policy, tokenizer))

    def run(n: int) -> list[dict[str, float]]:
        steps = []
        for _ in range(n):
            wall, cpu = _clock()
            metrics = trainer.step()
            end_wall, end_cpu = _clock()
            steps.append(
                {
                    "wall_s": end_wall - wall,
                    "cpu_s": end_cpu - cpu,
                    "width": metrics["completions/max_length"],
                    **{k: v for k, v in metrics.items() if k.startswith("timing/")},
                }
            )
        return steps

    try:
        yield run
    finally:
        trainer_module.generate_rollouts = sampler


@contextlib.contextmanager
def trl_side(args: argparse.Namespace, checkpointing: bool) -> Side:
    """The same for TRL's ``GRPOTrainer.train()``, timed step by step by a callback."""
    from transformers import TrainerCallback

    from fedmoa.grpo.rollout import eos_token_ids
    from fedmoa.models import load_model_and_tokenizer

    steps: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.began = _clock()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            wall, cpu = _clock()
            steps.append({"wall_s": wall - self.began[0], "cpu_s": cpu - self.began[1]})

    with tempfile.TemporaryDirectory(prefix="fedmoa-step-") as tmp:
        base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
        trainer = local_step.build_trl_trainer(
            base,
            tokenizer,
            local_step.rows_for(args),
            args,
            Path(tmp),
            reward_funcs=[func for _, func in local_step.reward_funcs_for(args)],
            reward_weights=list(REWARD_WEIGHTS),
            beta=args.beta,
            loss_type=args.loss_type,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            max_steps=args.warmup + args.steps,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            gradient_checkpointing=checkpointing,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer.add_callback(StepTimer())
        policy = trainer.model
        eos_ids = [*eos_token_ids(policy, tokenizer), *trainer.eos_token_ids]
        trainer._generate = eos_masked(trainer._generate, policy, eos_ids)
        key = "completions/max_length"

        def run(n: int) -> list[dict[str, float]]:
            trainer.train()  # warm-up and timed steps in one loop: TRL's own
            widths = [log[key] for log in trainer.state.log_history if key in log]
            for step, width in zip(steps, widths, strict=False):
                step["width"] = width
            return steps[-n:] if n else []

        yield run


def child_main(args: argparse.Namespace) -> None:
    """Set one side up, run its steps, print its figures as one JSON line (last of stdout)."""
    torch.manual_seed(0)
    checkpointing = args.child.endswith("-gc")
    side = trl_side if args.child.startswith("trl") else ours_side
    with side(args, checkpointing) as run:
        setup = local_step.memory_mb()
        reset = reset_peak()
        if args.child.startswith("trl"):
            timed = run(args.steps)  # TRL's loop runs warm-up and timed steps together
        else:
            run(args.warmup)
            timed = run(args.steps)
        end = local_step.memory_mb()
    import fedmoa

    print(
        json.dumps(
            {
                "steps": timed,
                "setup_rss_mb": setup["rss_mb"],
                "peak_mb": end["peak_mb"] if reset else float("nan"),
                "fedmoa_path": str(Path(fedmoa.__file__).resolve().parent),
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def baseline_tree(ref: str) -> Iterator[Path | str]:
    """A git worktree of ``ref`` (its ``src`` goes first on ``PYTHONPATH``), or why not."""
    with tempfile.TemporaryDirectory(prefix="fedmoa-base-") as tmp:
        tree = Path(tmp) / "tree"
        added = subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            capture_output=True,
            text=True,
            check=False,
        )
        if added.returncode != 0:
            yield f"git worktree add {ref} failed: {added.stderr.strip().splitlines()[-1:]}"
            return
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
                check=False,
            )


def run_child(args: argparse.Namespace, side: str, base: Path | None) -> dict[str, Any]:
    argv = local_step.child_args(args, "step")[:-2]  # [python, local_step.py, options...]
    argv[1] = str(Path(__file__).resolve())
    argv += ["--child", side, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--beta", str(args.beta), "--loss-type", args.loss_type]
    if args.prompt_once and side.startswith("ours"):
        argv.append("--prompt-once")
    env = dict(os.environ)
    if side.startswith("base"):
        assert base is not None
        env["PYTHONPATH"] = os.pathsep.join([str(base / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"step child {side!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(children: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    steps = [s for child in children for s in child["steps"]]
    walls = [s["wall_s"] for s in steps]
    cpus = [s["cpu_s"] for s in steps]
    phases = sorted({k for s in steps for k in s if k.startswith("timing/")})
    return {
        "steps": len(steps),
        "step_s_median": statistics.median(walls),
        "step_s_best": min(walls),
        "samples_per_s": samples / statistics.median(walls),
        "cpu_s_per_sample": statistics.median(cpus) / samples,
        "peak_mb": max(c["peak_mb"] for c in children),
        "widths": sorted({s.get("width", float("nan")) for s in steps}),
        "phases_s": {p: statistics.median(s.get(p, 0.0) for s in steps) for p in phases},
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    samples = args.batch_size * args.group_size
    sides = [s for s in SIDES if s in args.sides]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    results: dict[str, Any] = {"samples_per_step": samples, "baseline_ref": args.baseline_ref}
    wants_base = any(s.startswith("base") for s in sides)
    tree_cm = baseline_tree(args.baseline_ref) if wants_base else contextlib.nullcontext(None)
    with tree_cm as tree, local_step.LoadMeter() as load:
        if isinstance(tree, str):
            results["baseline_skipped"] = tree
            sides = [s for s in sides if not s.startswith("base")]
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate each round
            for side in order:
                runs[side].append(run_child(args, side, tree if isinstance(tree, Path) else None))
    results["machine_load"] = load.figures
    results["sides"] = {s: summarize(runs[s], samples) for s in sides}
    results["fedmoa_paths"] = {s: runs[s][0]["fedmoa_path"] for s in sides}
    figures = results["sides"]
    for mine, ref in (
        ("ours", "trl"),
        ("ours-gc", "trl-gc"),
        ("ours", "base"),
        ("ours-gc", "base-gc"),
    ):
        if mine in figures and ref in figures:
            a, b = figures[mine], figures[ref]
            results[f"{mine}/{ref}"] = {
                "throughput": a["samples_per_s"] / b["samples_per_s"],
                "cpu_per_sample": b["cpu_s_per_sample"] / a["cpu_s_per_sample"],
                "peak_rss": a["peak_mb"] / b["peak_mb"],
            }
    return results


TARGETS = {"ours/base": 2.0, "ours/trl": 1.5}


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        *report_header("fedmoa vs TRL: whole GRPO training steps", argv, m),
        f"model: {args.model}, dtype {m['dtype']}, B={args.batch_size}, G={args.group_size} "
        f"({results['samples_per_step']} samples per step), max_new_tokens={args.max_new_tokens} "
        f"(EOS masked while sampling), beta={args.beta}, loss_type={args.loss_type}, lr={LR}",
        f"{args.rounds} process(es) per side, alternating; {args.warmup} untimed + {args.steps} "
        f"timed steps each; base = {results['baseline_ref']}",
        f"machine load during the children: {local_step._load_text(results['machine_load'])}",
    ]
    if "baseline_skipped" in results:
        lines.append(f"base not run: {results['baseline_skipped']}")
    lines += [
        "",
        f"   {'side':22}{'step s (median)':>16}{'best':>8}{'samples/s':>11}"
        f"{'CPU s/sample':>14}{'peak RSS MB':>13}{'widths':>9}",
    ]
    for side, fig in results["sides"].items():
        widths = " ".join(f"{w:.0f}" for w in fig["widths"])
        lines.append(
            f"   {LABELS[side]:22}{fig['step_s_median']:16.2f}{fig['step_s_best']:8.2f}"
            f"{fig['samples_per_s']:11.3f}{fig['cpu_s_per_sample']:14.3f}"
            f"{fig['peak_mb']:13.1f}{widths:>9}"
        )
    lines += [
        "",
        "ratios (throughput = samples/s of the first over the second; CPU and RSS alike):",
    ]
    for key in ("ours/trl", "ours-gc/trl-gc", "ours/base", "ours-gc/base-gc"):
        if key in results:
            r = results[key]
            target = TARGETS.get(key)
            verdict = ""
            if target is not None:
                met = r["throughput"] >= target
                verdict = f"  target >= {target}: " + (
                    "met" if met else f"missed by {target - r['throughput']:.2f}"
                )
            lines.append(
                f"   {key:16} throughput {r['throughput']:.3f}, CPU per sample "
                f"{r['cpu_per_sample']:.3f}, peak RSS {r['peak_rss']:.3f}{verdict}"
            )
    ours = results["sides"].get("ours")
    if ours and ours["phases_s"]:
        lines += ["", "fedmoa step phases (median s): " + ", ".join(
            f"{k.split('/', 1)[1]} {v:.2f}" for k, v in ours["phases_s"].items()
        )]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    if args.child:
        child_main(args)
        return 0
    results = bench(args)
    results["machine"] = local_step.machine_info(args)
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
