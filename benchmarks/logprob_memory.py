"""Peak memory of the loss's forward and backward: whole, chunked log-probs, micro-batches.

The training half of a GRPO step holds, for the backward, every sequence's float32
log-softmax over the vocabulary (``[T, V]`` per sequence); ``grpo.logprob_chunk`` runs the LM
head and the log-softmax over that many positions at a time and recomputes them in the
backward. One fresh child process per setting (its own model copy and high-water mark):
load the model with its LoRA, make ``--sequences`` random completions of
``--completion-tokens`` after ``--prompt-tokens`` of prompt, then time one forward and
backward of a masked log-prob loss; the peak is the rise of ``VmHWM`` over the RSS after
setup. The children's log-probs and gradients are compared, so the figures are of the same
computation. Settings: the whole batch at once; ``grpo.logprob_chunk = --chunk``;
``grpo.micro_batch_size = --micro`` (rows per forward and backward, gradients accumulated, each
micro-batch's loss normalised by the whole batch's token count, as ``grpo_step`` does); both.

    python benchmarks/logprob_memory.py --sequences 32 --completion-tokens 256 --chunk 64 --micro 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import finish, report_header, start
from local_step import machine_info, memory_mb
from memory_vs_trl import reset_peak

from fedmoa.grpo.logprobs import completion_logps
from fedmoa.grpo.trainer import set_gradient_checkpointing
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sequences", type=int, default=32, help="B·G completions")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64, help="grpo.logprob_chunk to compare")
    parser.add_argument("--micro", type=int, default=8, help="grpo.micro_batch_size to compare")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="grpo.gradient_checkpointing on: the decoder's activations recomputed too",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting: setup, then one forward and backward; figures and a digest of the result."""
    model, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    torch.manual_seed(0)  # the same LoRA initialisation in every child
    policy = attach_lora(model, LoraSettings())
    set_gradient_checkpointing(policy, args.gradient_checkpointing)
    policy.train()
    vocab = policy.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    n, p, t = args.sequences, args.prompt_tokens, args.completion_tokens
    prompt = torch.randint(0, vocab, (n, p), generator=gen)
    completion = torch.randint(0, vocab, (n, t), generator=gen)
    ones_p, mask = torch.ones(n, p, dtype=torch.long), torch.ones(n, t, dtype=torch.long)
    setup = memory_mb()
    reset = reset_peak()
    chunk, micro = (int(x) for x in args.child.split(","))
    began = time.perf_counter()
    parts = []
    for first in range(0, n, micro or n):
        rows = slice(first, first + (micro or n))
        part = completion_logps(
            policy, prompt[rows], ones_p[rows], completion[rows], mask[rows], 1.0, chunk
        )
        (-(part * mask[rows]).sum() / mask.sum()).backward()
        parts.append(part.detach())
    logps = torch.cat(parts)
    seconds = time.perf_counter() - began
    end = memory_mb()
    grads = [q.grad for q in policy.parameters() if q.requires_grad]
    return {
        "chunk": chunk,
        "micro_batch_size": micro,
        "seconds": seconds,
        "setup_rss_mb": setup["rss_mb"],
        "peak_rise_mb": end["peak_mb"] - setup["rss_mb"] if reset else float("nan"),
        "logps": logps.detach().flatten()[:: max(1, logps.numel() // 4096)].tolist(),
        "grad_norm": float(torch.cat([g.flatten().float() for g in grads]).norm()),
        "vocab": vocab,
    }


def run_child(args: argparse.Namespace, chunk: int, micro: int) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    argv += ["--child", f"{chunk},{micro}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child chunk={chunk} micro={micro} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SETTINGS = ("whole", "chunked", "micro", "micro_chunked")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    shapes = {
        "whole": (0, 0),
        "chunked": (args.chunk, 0),
        "micro": (0, args.micro),
        "micro_chunked": (args.chunk, args.micro),
    }
    runs = {name: run_child(args, *shape) for name, shape in shapes.items()}
    whole = runs["whole"]

    def differences(other: dict[str, Any]) -> tuple[float, float]:
        logp = max(abs(a - b) for a, b in zip(whole["logps"], other["logps"], strict=True))
        return logp, abs(whole["grad_norm"] - other["grad_norm"]) / whole["grad_norm"]

    figures: dict[str, Any] = {"machine": machine_info(args)}
    for name, run in runs.items():
        figures[name] = {k: v for k, v in run.items() if k != "logps"}
    figures["max_logp_difference"], figures["grad_norm_relative_difference"] = max(
        differences(run) for run in runs.values()
    )
    return figures


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    whole, chunked = results["whole"], results["chunked"]
    lines = report_header("log-prob memory: whole vs chunked", argv, results["machine"])
    lines.append(
        f"{args.sequences} sequences × ({args.prompt_tokens} prompt + {args.completion_tokens} "
        f"completion) tokens, vocabulary {whole['vocab']}, {args.model} {args.dtype}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    lines.append(f"{'setting':<34}{'peak rise MB':>14}{'seconds':>10}{'peak whole/this':>17}")
    labels = {
        "whole": "whole (chunk 0, one batch)",
        "chunked": f"chunk {args.chunk}",
        "micro": f"micro-batches of {args.micro}",
        "micro_chunked": f"micro-batches of {args.micro}, chunk {args.chunk}",
    }
    for name in SETTINGS:
        side = results[name]
        lines.append(
            f"{labels[name]:<34}{side['peak_rise_mb']:>14.0f}{side['seconds']:>10.2f}"
            f"{whole['peak_rise_mb'] / side['peak_rise_mb']:>16.2f}×"
        )
    lines.append(
        f"peak ratio whole/chunked: {whole['peak_rise_mb'] / chunked['peak_rise_mb']:.2f}×, "
        f"time ratio chunked/whole: {chunked['seconds'] / whole['seconds']:.2f}×"
    )
    lines.append(
        f"same computation (largest over the settings): max |Δ log-prob| "
        f"{results['max_logp_difference']:.2e}, "
        f"relative Δ‖grad‖ {results['grad_norm_relative_difference']:.2e}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    return finish(args, argv, bench(args), format_report)


if __name__ == "__main__":
    raise SystemExit(main())
