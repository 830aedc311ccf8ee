"""Time of the loss's forward and backward with each group's prompt run once (``grpo.prompt_once``).

In a GRPO batch the ``G`` completions of a prompt share it; the whole-sequence forward runs every
prompt token ``G`` times, forward and backward, and ``completion_logps(..., group_size=G)`` runs
it once and shares its KV cache. One model with its LoRA (random ``B`` matrices, so the adapter
matters), ``B`` left-padded prompts of ``--prompt-tokens`` tokens (each shorter by one more
padding token than the last), each repeated ``G`` times, and random completions of
``--max-new-tokens`` tokens, some stopping early; then one forward and backward of a masked
log-prob loss per call, whole vs prompt-once, one untimed warm-up each and ``--repeats`` timed
calls each, interleaved in an order that alternates every round. It prints the medians of
the wall and process CPU time and the ratio whole / prompt-once, and checks that both give the
same log-probs and gradients (the warm-up calls').

``--compiled`` adds a third side: whole sequences through ``torch.compile(policy)`` (inductor,
static shapes, the LoRA trainable), with the time of its first call (the compile) printed
apart: the alternative to prompt-once that the fast-rollouts issue asked to measure.

    python benchmarks/prompt_once.py --threads 2    # SmolLM2-135M bf16, B=4, G=8, 35 + 24 tokens
    python benchmarks/prompt_once.py --smoke        # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_step
from _common import finish, parse_on_top, parser_on_top, report_header, start

from fedmoa.grpo.logprobs import completion_logps
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIDES = ("whole", "prompt_once")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = parser_on_top(__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="B distinct prompts")
    parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=35, help="P, the padded prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="T completion tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--chunk", type=int, default=0, help="grpo.logprob_chunk of both sides")
    parser.add_argument("--compiled", action="store_true", help="also time a compiled forward")
    args = parse_on_top(parser, argv, local_step.parse_args)
    if args.smoke:
        args.model = local_step.SMOKE_MODEL
        args.batch_size, args.group_size = 2, 3
        args.prompt_tokens = min(args.prompt_tokens, 9)
        args.max_new_tokens = min(args.max_new_tokens, 6)
        args.repeats = min(args.repeats, 2)
    return args


def make_batch(args: argparse.Namespace, vocab: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    b, g, p, t = args.batch_size, args.group_size, args.prompt_tokens, args.max_new_tokens
    prompt_ids = torch.randint(0, vocab, (b, p), generator=gen)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    for row in range(b):
        prompt_mask[row, : min(row, p - 1)] = 0
    prompt_ids[prompt_mask == 0] = pad_id
    completion_ids = torch.randint(0, vocab, (b * g, t), generator=gen)
    completion_mask = torch.ones(b * g, t)
    for row in range(0, b * g, 3):  # every third completion stops early
        completion_mask[row, max(1, t - 1 - row % t) :] = 0
    return (
        prompt_ids.repeat_interleave(g, dim=0),
        prompt_mask.repeat_interleave(g, dim=0),
        completion_ids,
        completion_mask,
    )


def forward_backward(
    policy: Any,
    inputs: tuple[torch.Tensor, ...],
    chunk: int,
    group_size: int,
    model: Any = None,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(wall s, process CPU s, log-probs, flat gradient) of one forward and backward of
    ``model`` (default ``policy``; a compiled wrapper of it)."""
    mask = inputs[3]
    wall, cpu = time.perf_counter(), time.process_time()
    model = policy if model is None else model
    logps = completion_logps(model, *inputs, 1.0, chunk, group_size=group_size)
    (-(logps * mask).sum() / mask.sum()).backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grad = torch.cat([q.grad.flatten().float() for q in policy.parameters() if q.requires_grad])
    policy.zero_grad(set_to_none=True)
    return wall, cpu, logps.detach().float(), grad


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    torch.manual_seed(0)  # the LoRA A initialisation
    policy = attach_lora(
        model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, target_modules=TARGETS)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    policy.train()
    vocab = policy.get_output_embeddings().weight.shape[0]
    inputs = make_batch(args, vocab, tokenizer.pad_token_id)
    sides = [*SIDES, *(["compiled"] if args.compiled else [])]
    group = {"whole": 1, "prompt_once": args.group_size, "compiled": 1}
    models = {"compiled": torch.compile(policy, dynamic=False)} if args.compiled else {}
    warm, first_call_s = {}, {}
    for side in sides:
        warm[side] = forward_backward(policy, inputs, args.chunk, group[side], models.get(side))
        first_call_s[side] = warm[side][0]
    times: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": []} for s in sides}
    for round_ in range(args.repeats):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            wall, cpu, _, _ = forward_backward(
                policy, inputs, args.chunk, group[side], models.get(side)
            )
            times[side]["wall"].append(wall)
            times[side]["cpu"].append(cpu)
    medians = {
        side: {f"median_{k}_s": statistics.median(v) for k, v in times[side].items()}
        | {f"{k}_s": v for k, v in times[side].items()}
        | {"first_call_s": first_call_s[side]}
        for side in sides
    }
    (_, _, logps_a, grad_a), (_, _, logps_b, grad_b) = warm["whole"], warm["prompt_once"]
    return {
        "machine": local_step.machine_info(args),
        "vocab": vocab,
        **medians,
        "ratio_wall_whole_over_prompt_once": medians["whole"]["median_wall_s"]
        / medians["prompt_once"]["median_wall_s"],
        "ratio_cpu_whole_over_prompt_once": medians["whole"]["median_cpu_s"]
        / medians["prompt_once"]["median_cpu_s"],
        "max_logp_difference": float((logps_a - logps_b).abs().max()),
        "grad_relative_difference": float((grad_a - grad_b).norm() / grad_a.norm()),
        **(
            {
                "ratio_wall_whole_over_compiled": medians["whole"]["median_wall_s"]
                / medians["compiled"]["median_wall_s"],
                "compiled_max_logp_difference": float((logps_a - warm["compiled"][2]).abs().max()),
                "compiled_grad_relative_difference": float(
                    (grad_a - warm["compiled"][3]).norm() / grad_a.norm()
                ),
            }
            if args.compiled
            else {}
        ),
    }


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = report_header("loss forward+backward: whole vs prompt once", argv, results["machine"])
    n = args.batch_size * args.group_size
    lines.append(
        f"B={args.batch_size} × G={args.group_size} = {n} sequences × ({args.prompt_tokens} prompt "
        f"+ {args.max_new_tokens} completion) tokens, {args.model} {args.dtype}, LoRA r "
        f"{args.lora_r} on {', '.join(TARGETS)}, logprob_chunk {args.chunk}, "
        f"median of {args.repeats} interleaved calls"
    )
    lines.append(f"{'side':<14}{'wall s':>10}{'CPU s':>10}{'1st call s':>12}{'whole/side':>12}")
    for side in [s for s in (*SIDES, "compiled") if s in results]:
        fig = results[side]
        lines.append(
            f"{side:<14}{fig['median_wall_s']:>10.3f}{fig['median_cpu_s']:>10.3f}"
            f"{fig['first_call_s']:>12.1f}"
            f"{results['whole']['median_wall_s'] / fig['median_wall_s']:>11.2f}×"
        )
    lines.append(
        f"ratio whole/prompt_once: {results['ratio_wall_whole_over_prompt_once']:.2f}× wall, "
        f"{results['ratio_cpu_whole_over_prompt_once']:.2f}× CPU"
    )
    lines.append(
        f"same computation: max |Δ log-prob| {results['max_logp_difference']:.2e}, "
        f"relative ‖Δgrad‖ {results['grad_relative_difference']:.2e}"
    )
    if "compiled" in results:
        lines.append(
            f"compiled vs whole: max |Δ log-prob| {results['compiled_max_logp_difference']:.2e}, "
            f"relative ‖Δgrad‖ {results['compiled_grad_relative_difference']:.2e}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    return finish(args, argv, bench(args), format_report)


if __name__ == "__main__":
    raise SystemExit(main())
