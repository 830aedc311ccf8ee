"""Distance of rollout decoding from this machine's memory-bandwidth limit.

A decode step of batch ``b`` reads every weight once (plus each sequence's KV cache) and emits
``b`` tokens, so on a bandwidth-bound machine

    bound tokens/s = b × bandwidth / bytes read per decode step.

It prints (and with ``--json`` also writes):

1. memory bandwidth: best of ``--copies`` ``dst.copy_(src)`` of a ``--bandwidth-mib`` array,
   counted as read + write = 2 × size bytes (the STREAM "copy" convention), on 1 thread and on
   all of torch's threads;
2. bytes read per decode step: every parameter once in the model's dtype (tied input/output
   embeddings once: the LM head reads the whole matrix; an untied input embedding is left out,
   a lookup reads ``b`` rows of it), LoRA adapter weights included where attached; and,
   separately, the KV cache read at the mean context of a call (padded prompt + half the new
   tokens);
3. achieved decode tokens/s of ``generate_rollouts`` (the sampler training uses), EOS masked so
   every call decodes exactly ``max_new_tokens`` tokens: the median wall time between
   consecutive decoding forwards (``local_step.StepClock``; prefill excluded), at batch 1 and at
   the step's batch ``B·G``, with the LoRA adapter attached (``fedmoa.models.attach_lora``, as
   training decodes) and without it (the base model, i.e. a merged fresh adapter); calls of the
   two models alternate;
4. achieved / bound, with the bound taken at the bandwidth measured on the decode's own threads;
5. the compiled decode (``[model] decode = "compiled"``, ``fedmoa.grpo.decode``) against the
   eager one on the same LoRA model: the compile time of the first call, cold (an empty inductor
   cache in a temporary folder) and warm (``torch._dynamo.reset()`` then the same call: traced
   again, graphs from the on-disk cache, as a later process finds them), and the decode step of
   each, taken as (wall time of a call of ``8 + max_new_tokens`` tokens − one of 8) / max_new_tokens
   (the compiled step cannot carry the forward hook that the figures above use), at batch 1 and
   ``B·G``, modes alternating, ``--repeats`` pairs; its fraction of the bound.

    python benchmarks/roofline.py --threads 1    # SmolLM2-135M, batch 1 and B·G = 8
    python benchmarks/roofline.py --smoke        # tiny random model, seconds

The model, batch, dtype, thread, repeat, ``--smoke`` and ``--json`` options are those of
``benchmarks/local_step.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import local_step
from _common import finish, parse_on_top, parser_on_top, report_header, start

from fedmoa.grpo.decode import decode_mode, set_decode
from fedmoa.grpo.rollout import encode_prompts, eos_token_ids
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer

GB = 1e9
MB = 1024 * 1024
VARIANTS = ("lora", "base")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = parser_on_top(__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the copied array")
    parser.add_argument("--copies", type=int, default=5, help="timed copies; the best counts")
    args = parse_on_top(parser, argv, local_step.parse_args)
    if args.smoke:
        args.bandwidth_mib = min(args.bandwidth_mib, 64)
        args.copies = min(args.copies, 3)
    return args


# ---------------------------------------------------------------------------------------------
# 1. bandwidth
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(mib: int, threads: int, copies: int) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` on ``threads`` threads, 2 × size bytes per copy, best of N.

    ``*_cpu_gb_s`` divides by the process CPU time per thread instead of the wall time: on a
    busy machine a copy is descheduled part of the time, which the wall figure counts as slow
    memory. It pairs with the decode steps' CPU time.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(mib * MB, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch: page faults are not bandwidth
        seconds, cpu_seconds = [], []
        for _ in range(copies):
            start, cpu = time.perf_counter(), time.process_time()
            dst.copy_(src)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append((time.process_time() - cpu) / threads)
    finally:
        torch.set_num_threads(saved)
    moved = 2 * src.numel() * src.element_size()
    return {
        "threads": threads,
        "best_gb_s": moved / min(seconds) / GB,
        "median_gb_s": moved / statistics.median(seconds) / GB,
        "best_cpu_gb_s": moved / min(cpu_seconds) / GB,
    }


def bench_bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    thread_counts = sorted({1, torch.get_num_threads(), os.cpu_count() or 1})
    with local_step.LoadMeter() as load:
        runs = [copy_bandwidth(args.bandwidth_mib, n, args.copies) for n in thread_counts]
    return {"mib": args.bandwidth_mib, "runs": runs, "machine_load": load.figures}


# ---------------------------------------------------------------------------------------------
# 2. bytes read per decode step
# ---------------------------------------------------------------------------------------------


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: each storage once, an untied input embedding not."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if (
        head is None
        or head.weight.untyped_storage().data_ptr() != embedding.untyped_storage().data_ptr()
    ):
        storages.pop(embedding.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V cached per token of context, all layers."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = torch.finfo(model.dtype).bits // 8
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


# ---------------------------------------------------------------------------------------------
# 3. decode rate
# ---------------------------------------------------------------------------------------------


def decode_call(
    model: Any,
    clock: local_step.StepClock,
    tokenizer: Any,
    prompts: list[Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One ``generate_rollouts`` call; its decode-step intervals and padded prompt length."""
    clock.take()
    local_step.call_ours(model, tokenizer, prompts, args)
    wall, cpu = clock.take()
    encoded = encode_prompts(tokenizer, prompts, torch.device("cpu"))
    return {"step_s": wall, "step_cpu_s": cpu, "prompt_tokens": int(encoded["input_ids"].shape[1])}


def bench_decode(args: argparse.Namespace, bandwidth: dict[str, float]) -> dict[str, Any]:
    """Both models at batch 1 and B·G, interleaved; figures per (variant, batch)."""
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    lora_base, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    models = {"lora": attach_lora(lora_base, LoraSettings()), "base": base}
    clocks = {"lora": local_step.StepClock(lora_base), "base": local_step.StepClock(base)}
    prompts = [r["prompt"] for r in local_step.rows_for(args)]
    shapes = {1: (1, 1), args.batch_size * args.group_size: (args.batch_size, args.group_size)}
    calls: dict[tuple[str, int], list[dict[str, Any]]] = {
        (v, b): [] for v in VARIANTS for b in shapes
    }
    eos = {v: eos_token_ids(m, tokenizer) for v, m in models.items()}
    for variant, model in models.items():  # warm-up, not timed
        with local_step.suppress_eos(model, eos[variant]):
            warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
            local_step.call_ours(model, tokenizer, prompts[:1], warm)
    with local_step.LoadMeter() as load:
        for repeat in range(args.repeats):
            for batch, (b, g) in shapes.items():
                shaped = argparse.Namespace(**{**vars(args), "batch_size": b, "group_size": g})
                order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    model = models[variant]
                    torch.manual_seed(1000 + repeat)
                    with local_step.suppress_eos(model, eos[variant]):
                        call = decode_call(model, clocks[variant], tokenizer, prompts[:b], shaped)
                    calls[variant, batch].append(call)
    rows = []
    for (variant, batch), done in calls.items():
        model = models[variant]
        step_s = statistics.median(s for c in done for s in c["step_s"])
        step_cpu_s = statistics.median(s for c in done for s in c["step_cpu_s"])
        weights = weight_bytes_read(model)
        context = statistics.mean(c["prompt_tokens"] for c in done) + args.max_new_tokens / 2
        kv = kv_bytes_per_token(model) * context * batch
        per_s, cpu_per_s = bandwidth["best_gb_s"] * GB, bandwidth["best_cpu_gb_s"] * GB
        bound = batch * per_s / weights
        bound_kv = batch * per_s / (weights + kv)
        achieved = batch / step_s
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "decode_step_ms": 1e3 * step_s,
                "decode_step_cpu_ms": 1e3 * step_cpu_s,
                "intervals": sum(len(c["step_s"]) for c in done),
                "weight_mb": weights / MB,
                "kv_mb": kv / MB,
                "mean_context": context,
                "bound_step_ms": 1e3 * weights / per_s,
                "bound_step_cpu_ms": 1e3 * weights / cpu_per_s,
                "achieved_tok_s": achieved,
                "bound_tok_s": bound,
                "bound_tok_s_with_kv": bound_kv,
                "fraction_of_bound": achieved / bound,
                "fraction_of_bound_with_kv": achieved / bound_kv,
                "fraction_of_bound_cpu_time": weights / cpu_per_s / step_cpu_s,
            }
        )
    for clock in clocks.values():
        clock.handle.remove()
    return {"rows": rows, "machine_load": load.figures}


def timed_call(model: Any, tokenizer: Any, prompts: list[Any], args: argparse.Namespace) -> float:
    start = time.perf_counter()
    local_step.call_ours(model, tokenizer, prompts, args)
    return time.perf_counter() - start


def bench_compiled(args: argparse.Namespace, bandwidth: dict[str, float]) -> dict[str, Any]:
    """Compile times and decode steps, compiled vs eager, at batch 1 and B·G."""
    cache = tempfile.mkdtemp(prefix="fedmoa-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled before
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    model = attach_lora(base, LoraSettings())
    prompts = [r["prompt"] for r in local_step.rows_for(args)]
    shapes = {1: (1, 1), args.batch_size * args.group_size: (args.batch_size, args.group_size)}
    short, long = 8, 8 + args.max_new_tokens
    eos = eos_token_ids(model, tokenizer)
    rows = []
    with local_step.LoadMeter() as load, local_step.suppress_eos(model, eos):
        for batch, (b, g) in shapes.items():
            at = {
                n: argparse.Namespace(
                    **{**vars(args), "batch_size": b, "group_size": g, "max_new_tokens": n}
                )
                for n in (short, long)
            }
            set_decode(model, "compiled")
            cold = timed_call(model, tokenizer, prompts[:b], at[long])
            torch._dynamo.reset()
            warm = timed_call(model, tokenizer, prompts[:b], at[long])
            compiled_call = timed_call(model, tokenizer, prompts[:b], at[long])
            assert decode_mode(model) == "compiled", "compiling failed: see the log"
            steps: dict[str, list[float]] = {"eager": [], "compiled": []}
            for repeat in range(args.repeats):
                for mode in ("eager", "compiled") if repeat % 2 == 0 else ("compiled", "eager"):
                    set_decode(model, mode)
                    torch.manual_seed(2000 + repeat)
                    t_long = timed_call(model, tokenizer, prompts[:b], at[long])
                    torch.manual_seed(2000 + repeat)
                    t_short = timed_call(model, tokenizer, prompts[:b], at[short])
                    steps[mode].append((t_long - t_short) / (long - short))
            bound_s = weight_bytes_read(model) / (bandwidth["best_gb_s"] * GB)
            row = {
                "batch": batch,
                "cold_first_call_s": cold,
                "warm_first_call_s": warm,
                "compiled_call_s": compiled_call,
                "bound_step_ms": 1e3 * bound_s,
            }
            for mode, values in steps.items():
                step = statistics.median(values)
                row[f"{mode}_step_ms"] = 1e3 * step
                row[f"{mode}_fraction_of_bound"] = bound_s / step
            row["speedup"] = row["eager_step_ms"] / row["compiled_step_ms"]
            rows.append(row)
    set_decode(model, "eager")
    shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows, "machine_load": load.figures, "short": short, "long": long}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    m, bw, dec = results["machine"], results["bandwidth"], results["decode"]
    own = results["bound_bandwidth"]
    lines = [
        *report_header("decode throughput vs the memory-bandwidth bound", argv, m),
        f"model: {args.model}, dtype {m['dtype']}, max_new_tokens={args.max_new_tokens} "
        f"(EOS masked), repeats={args.repeats}",
        "",
        f"1. memory bandwidth: dst.copy_(src), {bw['mib']} MiB, read + write = 2 x size, "
        f"best [median] of {args.copies} by wall time; by CPU time per thread",
        f"   machine load during section: {local_step._load_text(bw['machine_load'])}",
    ]
    for run in bw["runs"]:
        lines.append(
            f"   {run['threads']} thread(s): {run['best_gb_s']:6.2f} GB/s [{run['median_gb_s']:.2f}]"
            f"; by CPU time {run['best_cpu_gb_s']:6.2f} GB/s"
        )
    lines += [
        "",
        "2./3. decode steps of generate_rollouts: median interval between decoding forwards, "
        "wall and CPU time",
        f"   bound = weight bytes (tied embedding once) / bandwidth on {own['threads']} thread(s): "
        f"{own['best_gb_s']:.2f} GB/s for wall time, {own['best_cpu_gb_s']:.2f} GB/s for CPU time",
        "   achieved/bound: by wall time, by wall time with the KV cache bytes added, by CPU time",
        f"   machine load during section: {local_step._load_text(dec['machine_load'])}",
        f"   {'model':6}{'batch':>6}{'weights':>9}{'KV':>6}{'step ms':>9}{'bound':>7}{'cpu ms':>8}"
        f"{'bound':>7}{'tok/s':>8}{'bound tok/s':>12}{'achieved/bound':>15}{'+KV':>7}{'CPU':>7}",
    ]
    for row in dec["rows"]:
        lines.append(
            f"   {row['variant']:6}{row['batch']:6d}{row['weight_mb']:9.1f}{row['kv_mb']:6.1f}"
            f"{row['decode_step_ms']:9.1f}{row['bound_step_ms']:7.1f}"
            f"{row['decode_step_cpu_ms']:8.1f}{row['bound_step_cpu_ms']:7.1f}"
            f"{row['achieved_tok_s']:8.1f}{row['bound_tok_s']:12.1f}"
            f"{row['fraction_of_bound']:15.3f}{row['fraction_of_bound_with_kv']:7.3f}"
            f"{row['fraction_of_bound_cpu_time']:7.3f}"
        )
    lines.append("   (weights and KV in MB = MiB; tok/s = batch / median step time)")
    comp = results["compiled"]
    lines += [
        "",
        "5. compiled decode vs eager, same LoRA model: decode step = (call of "
        f"{comp['long']} tokens - call of {comp['short']}) / {comp['long'] - comp['short']}, "
        "median; first-call times include the compile",
        f"   machine load during section: {local_step._load_text(comp['machine_load'])}",
        f"   {'batch':>5}{'cold 1st s':>11}{'warm 1st s':>11}{'call s':>8}{'eager ms':>9}"
        f"{'compiled ms':>12}{'speedup':>8}{'bound ms':>9}{'eager/bnd':>10}{'comp/bnd':>9}",
    ]
    for row in comp["rows"]:
        lines.append(
            f"   {row['batch']:5d}{row['cold_first_call_s']:11.1f}{row['warm_first_call_s']:11.1f}"
            f"{row['compiled_call_s']:8.2f}{row['eager_step_ms']:9.1f}{row['compiled_step_ms']:12.1f}"
            f"{row['speedup']:8.2f}{row['bound_step_ms']:9.1f}"
            f"{row['eager_fraction_of_bound']:10.3f}{row['compiled_fraction_of_bound']:9.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    results: dict[str, Any] = {"machine": local_step.machine_info(args)}
    results["bandwidth"] = bench_bandwidth(args)
    own = next(r for r in results["bandwidth"]["runs"] if r["threads"] == torch.get_num_threads())
    results["bound_bandwidth"] = own
    results["decode"] = bench_decode(args, own)
    results["compiled"] = bench_compiled(args, own)
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
