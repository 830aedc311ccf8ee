"""Peak memory of one client's GRPO step with β > 0, against TRL's ``GRPOTrainer``.

The claim under test: a client's peak RSS during a GRPO step with β > 0 is at most that of TRL's
``GRPOTrainer`` with the same PEFT LoRA setup on the same batch (ratio ≤ 1.0), because fedmoa
keeps no reference model copy (the reference is the same weights with the adapter disabled) and
no critic.

Each side runs in its own fresh process, one after the other, and reads its own ``VmHWM``:

``ours``    ``fedmoa.grpo.LocalTrainer`` with ``GRPOSettings(beta=...)``, ``--steps`` steps;
``trl``     TRL's ``GRPOTrainer``, same ``beta``, same ``LoraConfig`` (``fedmoa.models.
            LoraSettings``), same model and dtype, one optimiser step per ``B·G`` completions
            (``per_device_train_batch_size = B·G``, ``num_generations = G``,
            ``steps_per_generation = 1``, no gradient accumulation), ``max_steps = --steps``,
            ``gradient_checkpointing=False`` as in fedmoa's step;
``trl-gc``  the same with TRL's default ``gradient_checkpointing=True`` (what a TRL user gets).

Both sides use the same reward functions (``local_step.reward_funcs_for``) and the same prompts.
EOS is masked out of the logits while sampling (only then), so every step of either side trains
on exactly ``B·G`` sequences of padded prompt + ``max_new_tokens`` tokens.

The peak is reset (``/proc/self/clear_refs``) once the model, LoRA, optimiser and data are set
up, so "peak during steps" is the high-water mark of the steps alone; the setup peak (loading
the model) is printed beside it.

    python benchmarks/memory_vs_trl.py --threads 1   # SmolLM2-135M, B=2, G=4, 64 new tokens
    python benchmarks/memory_vs_trl.py --smoke       # tiny random model, well under 90 s

The model, batch, dtype, thread, ``--smoke`` and ``--json`` options are those of
``benchmarks/local_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_step
from _common import finish, parse_on_top, parser_on_top, report_header, start

import fedmoa.grpo.trainer
from fedmoa.grpo.rollout import eos_token_ids
from fedmoa.models import load_model_and_tokenizer

SIDES = ("ours", "ours-gc", "trl", "trl-gc")
LABELS = {
    "ours": "fedmoa LocalTrainer",
    "ours-gc": "fedmoa, grad ckpt on",
    "trl": "TRL GRPOTrainer",
    "trl-gc": "TRL, grad ckpt on",
}
MB = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = parser_on_top(__doc__.split("\n\n")[0])
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0)")
    parser.add_argument("--steps", type=int, default=local_step.RSS_STEPS)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    return parse_on_top(parser, argv, local_step.parse_args)


# ---------------------------------------------------------------------------------------------
# inside one child process
# ---------------------------------------------------------------------------------------------


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, tied weights counted once."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


def census() -> dict[str, float]:
    """Causal LMs and tensor bytes alive in this process (tensors reachable from Python).

    A reference model copy would show up as a second causal LM and as twice the weight bytes.
    Tensors the autograd graph saved are not Python objects and are not counted.
    """
    models, storages = 0, {}
    for obj in gc.get_objects():
        with contextlib.suppress(Exception):  # exotic objects may fail isinstance or storage
            if isinstance(obj, GenerationMixin) and isinstance(obj, torch.nn.Module):
                models += 1
            elif isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return {"causal_lms": models, "tensor_mb": sum(storages.values()) / MB}


def count_reference_passes(policy: Any, seen: list[dict[str, float]]) -> None:
    """Record a census every time the reference log-probs disable the adapter.

    Both fedmoa (``grpo_step``) and TRL (``use_adapter``) call ``disable_adapter()`` on the PEFT
    model for the reference forward, so this shows what is alive right when the reference runs.
    """
    original = policy.disable_adapter

    @functools.wraps(original)
    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(census())
        return original(*args, **kwargs)

    policy.disable_adapter = recording


def eos_masked(generate: Callable[..., Any], model: Any, eos_ids: Sequence[int]) -> Any:
    """``generate`` with EOS masked out of the logits; training forwards stay untouched."""

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with local_step.suppress_eos(model, eos_ids):
            return generate(*args, **kwargs)

    return wrapper


Side = Iterator[tuple[Any, Callable[[], list[float]]]]


@contextlib.contextmanager
def ours_side(args: argparse.Namespace) -> Side:
    """(the PEFT policy, a function running ``args.steps`` steps and returning their widths)."""
    policy, tokenizer = local_step.load_policy(args)
    trainer = local_step.local_trainer(args, policy, tokenizer)  # as local_step.py's GRPO step
    checkpointing = args.child == "ours-gc"
    trainer.settings = dataclasses.replace(
        trainer.settings, beta=args.beta, gradient_checkpointing=checkpointing
    )
    fedmoa.grpo.trainer.set_gradient_checkpointing(policy, checkpointing)
    sampler = fedmoa.grpo.trainer.generate_rollouts
    fedmoa.grpo.trainer.generate_rollouts = eos_masked(
        sampler, policy, eos_token_ids(policy, tokenizer)
    )
    try:
        yield policy, lambda: [trainer.step()["completions/max_length"] for _ in range(args.steps)]
    finally:
        fedmoa.grpo.trainer.generate_rollouts = sampler


def trl_trainer(args: argparse.Namespace, out: Path) -> tuple[Any, Any]:
    """(TRL's trainer as described above, the tokenizer); ``trl-gc``: gradient checkpointing."""
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    trainer = local_step.build_trl_trainer(
        base,
        tokenizer,
        local_step.rows_for(args),
        args,
        out,
        reward_funcs=[func for _, func in local_step.reward_funcs_for(args)],
        beta=args.beta,
        max_steps=args.steps,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        gradient_checkpointing=args.child == "trl-gc",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if trainer.ref_model is not None:
        raise RuntimeError("TRL built a reference model copy; the comparison assumes PEFT's")
    return trainer, tokenizer


@contextlib.contextmanager
def trl_side(args: argparse.Namespace) -> Side:
    """The same for TRL's trainer."""
    with tempfile.TemporaryDirectory(prefix="fedmoa-mem-") as tmp:
        trainer, tokenizer = trl_trainer(args, Path(tmp))
        policy = trainer.model
        eos_ids = [*eos_token_ids(policy, tokenizer), *trainer.eos_token_ids]
        trainer._generate = eos_masked(trainer._generate, policy, eos_ids)

        def run() -> list[float]:
            trainer.train()
            key = "completions/max_length"
            return [log[key] for log in trainer.state.log_history if key in log]

        yield policy, run


def child_main(args: argparse.Namespace) -> None:
    """Set one side up, run its steps, print its figures as one JSON line (last of stdout)."""
    torch.manual_seed(0)
    reference: list[dict[str, float]] = []
    side = ours_side(args) if args.child.startswith("ours") else trl_side(args)
    with side as (policy, run):
        count_reference_passes(policy, reference)
        weights = weight_bytes(policy)
        gc.collect()
        setup = local_step.memory_mb()
        after_setup = census()
        reset = reset_peak()
        widths = run()
        end = local_step.memory_mb()
    figures = {
        "setup": setup,
        "end": end,
        "peak_reset_after_setup": reset,
        "step_peak_mb": end["peak_mb"] if reset else float("nan"),
        "process_peak_mb": max(setup["peak_mb"], end["peak_mb"]),
        "weight_mb": weights / MB,
        "census_after_setup": after_setup,
        "census_at_reference": reference,
        "completion_widths": widths,
    }
    print(json.dumps(figures))


# ---------------------------------------------------------------------------------------------
# the parent: one fresh child per side
# ---------------------------------------------------------------------------------------------


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    argv = local_step.child_args(args, side)  # [python, local_step.py, options..., --child, side]
    argv[1] = str(Path(__file__).resolve())
    argv += ["--beta", str(args.beta), "--steps", str(args.steps)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {side!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with local_step.LoadMeter() as load:
        for side in SIDES:  # one after the other: two models at once would compete for memory
            results[side] = run_side(args, side)
    results["machine_load"] = load.figures
    ours = results["ours"]
    for ref in ("trl", "trl-gc"):
        theirs = results[ref]
        if ref == "trl-gc":  # like for like: both sides recompute activations
            mine, theirs = results["ours-gc"], results["trl-gc"]
            results["ratio_step_peak_gc_vs_trl-gc"] = mine["step_peak_mb"] / theirs["step_peak_mb"]
        results[f"ratio_step_peak_vs_{ref}"] = ours["step_peak_mb"] / theirs["step_peak_mb"]
        results[f"ratio_process_peak_vs_{ref}"] = (
            ours["process_peak_mb"] / theirs["process_peak_mb"]
        )
        results[f"ratio_growth_vs_{ref}"] = (ours["step_peak_mb"] - ours["setup"]["rss_mb"]) / max(
            1e-9, theirs["step_peak_mb"] - theirs["setup"]["rss_mb"]
        )
    at_ref = ours["census_at_reference"]
    results["no_reference_copy"] = bool(at_ref) and all(
        c["causal_lms"] == 1 and c["tensor_mb"] < 2 * ours["weight_mb"] for c in at_ref
    )
    return results


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        *report_header("fedmoa vs TRL: peak memory of a GRPO step with beta > 0", argv, m),
        f"model: {args.model}, dtype {m['dtype']}, B={args.batch_size}, G={args.group_size} "
        f"({args.batch_size * args.group_size} sequences), max_new_tokens={args.max_new_tokens} "
        f"(EOS masked while sampling), beta={args.beta}, {args.steps} steps per process",
        f"machine load during the children: {local_step._load_text(results['machine_load'])}",
        "",
        "   MB (MiB); growth = peak in steps - RSS after setup; widths = completion tokens per step",
        f"   {'side':22}{'peak in steps':>14}{'RSS after setup':>16}{'growth':>8}"
        f"{'setup peak':>11}{'process peak':>13}{'widths':>8}",
    ]
    for side in SIDES:
        fig = results[side]
        widths = " ".join(f"{w:.0f}" for w in fig["completion_widths"])
        lines.append(
            f"   {LABELS[side]:22}{fig['step_peak_mb']:14.1f}{fig['setup']['rss_mb']:16.1f}"
            f"{fig['step_peak_mb'] - fig['setup']['rss_mb']:8.1f}{fig['setup']['peak_mb']:11.1f}"
            f"{fig['process_peak_mb']:13.1f}{widths:>8}"
        )
    for ref in ("trl", "trl-gc"):
        lines.append(
            f"   ratio ours/{LABELS[ref]}: peak in steps {results[f'ratio_step_peak_vs_{ref}']:.3f}, "
            f"process peak {results[f'ratio_process_peak_vs_{ref}']:.3f}, "
            f"growth above setup {results[f'ratio_growth_vs_{ref}']:.3f}"
        )
    lines.append(
        f"   ratio {LABELS['ours-gc']}/{LABELS['trl-gc']}: peak in steps "
        f"{results['ratio_step_peak_gc_vs_trl-gc']:.3f}"
    )
    ours = results["ours"]
    lines += ["", "second model copy? (census of live objects when the reference forward starts)"]
    for side in SIDES:
        fig = results[side]
        at_ref = fig["census_at_reference"]
        lines.append(
            f"   {LABELS[side]:22}weights {fig['weight_mb']:.1f} MB; after setup: "
            f"{fig['census_after_setup']['causal_lms']} causal LM, "
            f"{fig['census_after_setup']['tensor_mb']:.1f} MB of tensors; reference passes via "
            f"disable_adapter: {len(at_ref)}, causal LMs then "
            f"{max((c['causal_lms'] for c in at_ref), default=0)}, tensors then "
            f"{max((c['tensor_mb'] for c in at_ref), default=float('nan')):.1f} MB"
        )
    growth = ours["end"]["rss_mb"] - ours["setup"]["rss_mb"]
    lines.append(
        f"   ours: RSS after the steps - RSS after setup = {growth:.1f} MB (the allocator keeps "
        f"freed activations; a reference copy would add {ours['weight_mb']:.1f} MB of tensors)"
    )
    lines.append(
        "   no reference model copy (one causal LM, tensors < 2 x weights at every reference "
        f"pass): {results['no_reference_copy']}"
    )
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
