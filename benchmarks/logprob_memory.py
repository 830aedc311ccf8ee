"""Peak memory of the loss's forward and backward, with and without chunked log-probs.

The training half of a GRPO step holds, for the backward, every sequence's float32
log-softmax over the vocabulary (``[T, V]`` per sequence); ``grpo.logprob_chunk`` runs the LM
head and the log-softmax over that many positions at a time and recomputes them in the
backward. One fresh child process per setting (its own model copy and high-water mark):
load the model with its LoRA, make ``--sequences`` random completions of
``--completion-tokens`` after ``--prompt-tokens`` of prompt, then time one forward and
backward of a masked log-prob loss; the peak is the rise of ``VmHWM`` over the RSS after
setup. The children's log-probs and gradients are compared, so the figures are of the same
computation.

    python benchmarks/logprob_memory.py --sequences 32 --completion-tokens 256 --chunk 64
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="grpo.gradient_checkpointing on: the decoder's activations recomputed too",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
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
    began = time.perf_counter()
    logps = completion_logps(policy, prompt, ones_p, completion, mask, 1.0, args.child)
    (-(logps * mask).sum() / mask.sum()).backward()
    seconds = time.perf_counter() - began
    end = memory_mb()
    grads = [q.grad for q in policy.parameters() if q.requires_grad]
    return {
        "chunk": args.child,
        "seconds": seconds,
        "setup_rss_mb": setup["rss_mb"],
        "peak_rise_mb": end["peak_mb"] - setup["rss_mb"] if reset else float("nan"),
        "logps": logps.detach().flatten()[:: max(1, logps.numel() // 4096)].tolist(),
        "grad_norm": float(torch.cat([g.flatten().float() for g in grads]).norm()),
        "vocab": vocab,
    }


def run_child(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", str(chunk)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child chunk={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    whole, chunked = run_child(args, 0), run_child(args, args.chunk)
    difference = max(abs(a - b) for a, b in zip(whole["logps"], chunked["logps"], strict=True))
    return {
        "machine": machine_info(args),
        "whole": {k: v for k, v in whole.items() if k != "logps"},
        "chunked": {k: v for k, v in chunked.items() if k != "logps"},
        "max_logp_difference": difference,
        "grad_norm_relative_difference": abs(whole["grad_norm"] - chunked["grad_norm"])
        / whole["grad_norm"],
    }


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    whole, chunked = results["whole"], results["chunked"]
    lines = report_header("log-prob memory: whole vs chunked", argv, results["machine"])
    lines.append(
        f"{args.sequences} sequences × ({args.prompt_tokens} prompt + {args.completion_tokens} "
        f"completion) tokens, vocabulary {whole['vocab']}, {args.model} {args.dtype}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    lines.append(f"{'setting':<22}{'peak rise MB':>14}{'seconds':>10}")
    for label, side in (("whole (chunk 0)", whole), (f"chunk {args.chunk}", chunked)):
        lines.append(f"{label:<22}{side['peak_rise_mb']:>14.0f}{side['seconds']:>10.2f}")
    lines.append(
        f"peak ratio whole/chunked: {whole['peak_rise_mb'] / chunked['peak_rise_mb']:.2f}×, "
        f"time ratio chunked/whole: {chunked['seconds'] / whole['seconds']:.2f}×"
    )
    lines.append(
        f"same computation: max |Δ log-prob| {results['max_logp_difference']:.2e}, "
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
