"""Benchmark one local GRPO step of fedmoa on this machine, side by side with TRL.

Why: a client's round time is dominated by rollout generation, so fedmoa's sampler must not be
slower than TRL's ``GRPOTrainer`` generation path on the same model, and a GRPO step must not
need much more memory than plain LoRA training of a batch of the same shape.

It prints (and with ``--json`` also writes):

1. rollout generation throughput of ``generate_rollouts`` and of ``trl.GRPOTrainer._generate``
   on the *same* PEFT model object, interleaved, in two modes:
   ``forced``  EOS is masked out of the logits on both sides (a hook on the shared output
               embedding), so every sequence decodes exactly ``max_new_tokens`` tokens and both
               sides do identical work; the primary, apples-to-apples comparison;
   ``natural`` EOS allowed, same seed for each pair of calls; tokens are counted both through
               EOS (sum of completion lengths) and padded (B·G·T, T = longest completion);
2. the time split of one ``LocalTrainer.step()`` (its ``timing/*`` metrics);
3. the peak RSS (``VmHWM``) of a fresh process running GRPO steps and of a fresh process
   running plain LoRA training (forward + backward + AdamW) on a batch of the same shape.

    python benchmarks/local_step.py                 # SmolLM2-135M, B=2, G=4, 64 new tokens
    python benchmarks/local_step.py --threads 1     # steadier figures on a busy machine
    python benchmarks/local_step.py --smoke         # tiny random model, finishes in seconds

Timings on a shared machine are noisy: ours and TRL run interleaved on one model, ratios are
taken between adjacent calls, and every section prints how busy the machine was meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import finish, report_header, start
from transformers import LogitsProcessorList

from fedmoa.data import DataConfig, load_rows
from fedmoa.grpo.rollout import SamplingSettings, encode_prompts, eos_token_ids, generate_rollouts
from fedmoa.grpo.trainer import GRPOSettings, LocalTrainer, PromptSampler
from fedmoa.models import (
    LoraSettings,
    attach_lora,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
)
from fedmoa.rewards import RewardFunc, load_reward_function
from fedmoa.weighting import StaticWeighting

Row = dict[str, Any]

SMOKE_MODEL = "tiny-random-qwen2"
DATA_PARAMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
PHASES = ("generate", "reward", "forward_backward", "optimizer")
MODES = ("forced", "natural")
SIDES = ("ours", "trl")
RSS_STEPS = 2  # the allocator's high-water mark settles after the second step


# ---------------------------------------------------------------------------------------------
# setup shared by every measurement (and by both memory children, so imports cost the same)
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=2, help="B prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="G completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and mode")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model and tiny sizes")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler top ops of one call per side"
    )
    parser.add_argument("--child", choices=("step", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = SMOKE_MODEL
        args.batch_size, args.group_size = 2, 2
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.repeats = 1
    return args


def rows_for(args: argparse.Namespace) -> list[Row]:
    """Easy reasoning-gym sums, the data SmolLM2 gets 20-60% right (docs/offline-assets.md)."""
    size = max(8, 2 * args.batch_size)
    return load_rows(DataConfig(name="basic_arithmetic", params=DATA_PARAMS, size=size, seed=0))


def reward_funcs_for(args: argparse.Namespace) -> list[tuple[str, RewardFunc]]:
    target = max(1, args.max_new_tokens // 2)
    return [
        ("math_accuracy", load_reward_function("math_accuracy")),
        ("format", load_reward_function("format", {"style": "boxed"})),
        ("length", load_reward_function("length", {"target": target})),
    ]


def grpo_settings_for(args: argparse.Namespace) -> GRPOSettings:
    return GRPOSettings(
        batch_size=args.batch_size,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
    )


def load_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model exactly as ``fedmoa train-local`` builds it: loaded, then LoRA-wrapped."""
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    return attach_lora(model, LoraSettings()), tokenizer


def local_trainer(args: argparse.Namespace, policy: Any, tokenizer: Any) -> LocalTrainer:
    funcs = reward_funcs_for(args)
    names = [name for name, _ in funcs]
    weighting = StaticWeighting(names, "math_accuracy", [1.0, 0.5, 0.5])
    return LocalTrainer(
        policy, tokenizer, rows_for(args), funcs, weighting, grpo_settings_for(args), seed=0
    )


def memory_mb() -> dict[str, float]:
    """Current and peak RSS of this process in MB.

    ``VmHWM`` belongs to the process's own address space. ``ru_maxrss`` is not used as the
    figure: Linux carries the parent's high-water mark into an exec'd child, so a child started
    by a big parent would report at least the parent's size.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        kb = {k: float(fields[k].split()[0]) for k in ("VmRSS", "VmHWM") if k in fields}
        if len(kb) == 2:
            return {"rss_mb": kb["VmRSS"] / 1024, "peak_mb": kb["VmHWM"] / 1024}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"rss_mb": float("nan"), "peak_mb": peak}


class LoadMeter:
    """How busy the machine was with other work while a section ran.

    ``other_cores``: CPU time of every process on the machine (``/proc/stat``) minus our own
    (this process and its children), per wall second; on 2 cores, 1.0 means another job used a
    whole core. ``cpu_pressure``: share of the time some task waited for a CPU (Linux PSI).
    """

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}

    @staticmethod
    def _busy_s() -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        return float("nan")

    @staticmethod
    def _own_s() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    @staticmethod
    def _pressure_us() -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
            return float(some.rsplit("total=", 1)[1])
        return float("nan")

    def __enter__(self) -> LoadMeter:
        self._start = (time.perf_counter(), self._busy_s(), self._own_s(), self._pressure_us())
        return self

    def __exit__(self, *_: object) -> None:
        wall0, busy0, own0, psi0 = self._start
        wall = time.perf_counter() - wall0
        other = (self._busy_s() - busy0) - (self._own_s() - own0)
        self.figures = {
            "wall_s": wall,
            "other_cores": max(0.0, other / wall),
            "cpu_pressure": (self._pressure_us() - psi0) / 1e6 / wall,
        }


# ---------------------------------------------------------------------------------------------
# 1. rollout generation: ours vs TRL on the same PEFT model
# ---------------------------------------------------------------------------------------------


@dataclass
class GenCall:
    """One timed generation call of B·G sequences."""

    side: str
    mode: str
    wall_s: float
    cpu_s: float
    tokens: int  # sum of completion lengths, through EOS
    padded_tokens: int  # N · T, T = longest completion (what the decoder actually ran)
    width: int
    step_s: list[float]  # wall time between consecutive decoding forwards (prefill excluded)
    step_cpu_s: list[float]  # process CPU time of the same intervals


class StepClock:
    """Wall and CPU time at the start of every forward of the shared model.

    On a shared 2-core machine a call's wall time swings by 10x when another job runs. Each
    interval between consecutive decoding forwards holds exactly one forward plus that side's
    logits processing and sampling, so the median over hundreds of intervals is a far steadier
    figure; with ``--threads 1`` the CPU time of an interval hardly depends on other jobs at all.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.times: list[tuple[float, float]] = []
        self.handle = module.register_forward_pre_hook(self._tick)

    def _tick(self, *_: Any) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def take(self) -> tuple[list[float], list[float]]:
        """(wall, CPU) intervals since the last ``take``; the prefill interval is dropped."""
        times, self.times = self.times[1:], []
        pairs = list(itertools.pairwise(times))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def build_trl_trainer(
    policy_base: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    args: argparse.Namespace,
    out: Path,
    reward_funcs: Sequence[RewardFunc] | None = None,
    **overrides: Any,
) -> Any:
    """A ``trl.GRPOTrainer`` on the CPU with our LoRA settings; it wraps ``policy_base`` itself.

    ``gradient_checkpointing`` is off (TRL turns it on by default) because fedmoa's step does not
    checkpoint; TRL disables it during generation anyway. Without ``reward_funcs`` it scores every
    completion 0 (enough for generation) and sees only the prompts; ``overrides`` are further
    ``GRPOConfig`` fields (``benchmarks/memory_vs_trl.py`` sets ``beta``, ``max_steps``, ...).
    """
    import datasets
    import trl
    from peft import LoraConfig

    lora = LoraSettings()
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "bf16": policy_base.dtype == torch.bfloat16,
        "per_device_train_batch_size": args.batch_size * args.group_size,
        "num_generations": args.group_size,
        "max_completion_length": args.max_new_tokens,
        "temperature": 1.0,
        "gradient_checkpointing": False,
        "report_to": "none",
        "use_vllm": False,
        "logging_steps": 1,
    }
    if reward_funcs is None:
        reward_funcs = [lambda prompts, completions, **_: [0.0] * len(completions)]
        rows = [{"prompt": r["prompt"]} for r in rows]
    return trl.GRPOTrainer(
        model=policy_base,
        processing_class=tokenizer,
        reward_funcs=list(reward_funcs),
        args=trl.GRPOConfig(**(settings | overrides)),
        train_dataset=datasets.Dataset.from_list(list(rows)),
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        ),
    )


@contextlib.contextmanager
def suppress_eos(model: Any, eos_ids: Sequence[int]) -> Iterator[None]:
    """Mask EOS out of the output embedding's logits, so every sequence runs to the limit.

    The hook sits on the model both sides share, so it costs both the same (one indexed fill of
    an [N, 1, V] tensor per decoding step) and does not touch either side's generation config.
    """
    index = torch.tensor(sorted(set(eos_ids)))

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output.index_fill(-1, index, float("-inf"))

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_processors(seen: list[str]) -> Iterator[None]:
    """Record which logits processors/warpers ``generate`` applies (first decoding step only)."""
    original = LogitsProcessorList.__call__

    def spy(self: LogitsProcessorList, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.extend(type(p).__name__ for p in self)
            seen.append("")  # marks "captured" even when the list is empty
        return original(self, input_ids, scores, **kwargs)

    LogitsProcessorList.__call__ = spy  # type: ignore[method-assign]
    try:
        yield
    finally:
        LogitsProcessorList.__call__ = original  # type: ignore[method-assign]


def _timed(fn: Any) -> tuple[Any, float, float]:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def call_ours(policy: Any, tokenizer: Any, prompts: list[Any], args: argparse.Namespace) -> Any:
    sampling = SamplingSettings(
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=1.0
    )
    return generate_rollouts(policy, tokenizer, prompts, sampling)


def time_ours(
    policy: Any,
    tokenizer: Any,
    prompts: list[Any],
    args: argparse.Namespace,
    mode: str,
    clock: StepClock,
) -> GenCall:
    clock.take()
    rollout, wall, cpu = _timed(lambda: call_ours(policy, tokenizer, prompts, args))
    n, width = rollout.completion_ids.shape
    tokens = int(rollout.completion_lengths.sum())
    return GenCall("ours", mode, wall, cpu, tokens, n * width, width, *clock.take())


def time_trl(
    trainer: Any, prompts: list[Any], args: argparse.Namespace, mode: str, clock: StepClock
) -> GenCall:
    """TRL's own entry point: ``_generate`` tokenizes, generates and decodes, like ours."""
    repeated = [p for p in prompts for _ in range(args.group_size)]  # what TRL's sampler yields
    clock.take()
    output, wall, cpu = _timed(lambda: trainer._generate(repeated))
    completion_ids = output[1]  # lists, each cut after its first EOS
    lengths = [len(ids) for ids in completion_ids]
    width = max(lengths)
    return GenCall("trl", mode, wall, cpu, sum(lengths), len(lengths) * width, width, *clock.take())


def _side_summary(own: list[GenCall], sequences: int) -> dict[str, Any]:
    walls = [c.wall_s for c in own]
    steps = [x for c in own for x in c.step_s]
    step = statistics.median(steps) if steps else float("nan")
    step_cpu = statistics.median(x for c in own for x in c.step_cpu_s) if steps else float("nan")
    return {
        "calls": len(own),
        "wall_s_median": statistics.median(walls),
        "wall_s_best": min(walls),
        "cpu_s_median": statistics.median(c.cpu_s for c in own),
        "tokens_median": statistics.median(c.tokens for c in own),
        "padded_tokens_median": statistics.median(c.padded_tokens for c in own),
        "tok_s_median": statistics.median(c.tokens / c.wall_s for c in own),
        "tok_s_best": max(c.tokens / c.wall_s for c in own),
        "padded_tok_s_median": statistics.median(c.padded_tokens / c.wall_s for c in own),
        "decode_steps": len(steps),
        "decode_step_ms_median": 1e3 * step,
        "decode_step_ms_p10": 1e3 * _quantile(steps, 0.1),
        "decode_tok_s": sequences / step,
        "decode_step_cpu_ms_median": 1e3 * step_cpu,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize_calls(calls: list[GenCall], sequences: int) -> dict[str, Any]:
    """Per side and mode: call medians/bests and decode-step medians, plus ours/TRL ratios.

    Ratios > 1 mean ours is faster. ``*_paired_median`` is the median over adjacent ours/TRL
    pairs (same seed, alternating order), which cancels slow drifts in machine load.
    """
    summary: dict[str, Any] = {}
    for mode in MODES:
        ours = [c for c in calls if c.mode == mode and c.side == "ours"]
        trl = [c for c in calls if c.mode == mode and c.side == "trl"]
        if not ours or not trl:
            continue
        per_side = {"ours": _side_summary(ours, sequences), "trl": _side_summary(trl, sequences)}
        pairs = list(zip(ours, trl, strict=True))
        per_side["ratio_ours_over_trl"] = {
            "decode_step": per_side["trl"]["decode_step_ms_median"]
            / per_side["ours"]["decode_step_ms_median"],
            "decode_step_cpu": per_side["trl"]["decode_step_cpu_ms_median"]
            / per_side["ours"]["decode_step_cpu_ms_median"],
            "tok_s_paired_median": statistics.median(
                (o.tokens / o.wall_s) / (t.tokens / t.wall_s) for o, t in pairs
            ),
            "padded_tok_s_paired_median": statistics.median(
                (o.padded_tokens / o.wall_s) / (t.padded_tokens / t.wall_s) for o, t in pairs
            ),
            "tok_s_best": per_side["ours"]["tok_s_best"] / per_side["trl"]["tok_s_best"],
            "tok_per_cpu_s_paired_median": statistics.median(
                (o.tokens / o.cpu_s) / (t.tokens / t.cpu_s) for o, t in pairs
            ),
        }
        summary[mode] = per_side
    return summary


def profile_one_call(fn: Any, label: str) -> str:
    """Top operators by self CPU time of one call: where the time goes on each side."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return f"--- torch.profiler, {label} ---\n{table}"


def bench_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Ours vs TRL on one shared PEFT model; pairs alternate which side runs first."""
    rows = rows_for(args)
    prompts = [r["prompt"] for r in rows[: args.batch_size]]
    repeated = [p for p in prompts for _ in range(args.group_size)]
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    with tempfile.TemporaryDirectory(prefix="fedmoa-bench-") as tmp:
        trainer = build_trl_trainer(base, tokenizer, rows, args, Path(tmp))
        policy = trainer.model  # the PeftModel TRL built: both sides sample from this object
        eos_ids = [*eos_token_ids(policy, tokenizer), *trainer.eos_token_ids]
        encoded = encode_prompts(tokenizer, prompts, torch.device("cpu"))

        # Warm-up (not timed) and a record of the sampling processors each side applies.
        processors: dict[str, list[str]] = {"ours": [], "trl": []}
        saved_limit = trainer.generation_config.max_new_tokens
        warm = argparse.Namespace(**{**vars(args), "max_new_tokens": min(4, saved_limit)})
        trainer.generation_config.max_new_tokens = warm.max_new_tokens
        try:
            with capture_processors(processors["ours"]):
                call_ours(policy, tokenizer, prompts, warm)
            with capture_processors(processors["trl"]):
                trainer._generate(repeated)
        finally:
            trainer.generation_config.max_new_tokens = saved_limit

        clock = StepClock(policy.get_base_model())
        calls: list[GenCall] = []
        with LoadMeter() as load:
            for mode in MODES:
                hook = (
                    suppress_eos(policy, eos_ids) if mode == "forced" else contextlib.nullcontext()
                )
                with hook:
                    for repeat in range(args.repeats):
                        order = SIDES if repeat % 2 == 0 else SIDES[::-1]
                        for side in order:
                            torch.manual_seed(1000 + repeat)  # same seed for both calls of a pair
                            if side == "ours":
                                call = time_ours(policy, tokenizer, prompts, args, mode, clock)
                            else:
                                call = time_trl(trainer, prompts, args, mode, clock)
                            calls.append(call)
        clock.handle.remove()

        profiles: list[str] = []
        if args.profile:
            with suppress_eos(policy, eos_ids):
                profiles.append(
                    profile_one_call(
                        lambda: call_ours(policy, tokenizer, prompts, args), "ours, forced"
                    )
                )
                profiles.append(
                    profile_one_call(lambda: trainer._generate(repeated), "TRL, forced")
                )
    return {
        "prompt_tokens_padded": int(encoded["input_ids"].shape[1]),
        "sequences": len(repeated),
        "processors": {k: [p for p in v if p] for k, v in processors.items()},
        "calls": [asdict(c) for c in calls],
        "summary": summarize_calls(calls, len(repeated)),
        "machine_load": load.figures,
        "profiles": profiles,
    }


# ---------------------------------------------------------------------------------------------
# 2. the time split of one GRPO step
# ---------------------------------------------------------------------------------------------


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    """``LocalTrainer.step()`` timings: one warm-up step, then ``repeats`` measured steps."""
    torch.manual_seed(0)
    policy, tokenizer = load_policy(args)
    trainer = local_trainer(args, policy, tokenizer)
    trainer.step()  # warm-up: first-call kernel selection, math-verify's first parse
    with LoadMeter() as load:
        steps = [trainer.step() for _ in range(args.repeats)]
    figures: dict[str, Any] = {"machine_load": load.figures}
    for phase in PHASES:
        figures[phase] = statistics.median(s.get(f"timing/{phase}", 0.0) for s in steps)
    figures["step_time"] = statistics.median(s["step_time"] for s in steps)
    figures["other"] = max(0.0, figures["step_time"] - sum(figures[p] for p in PHASES))
    figures["mean_completion_length"] = statistics.median(
        s["completions/mean_length"] for s in steps
    )
    figures["max_completion_length"] = max(s["completions/max_length"] for s in steps)
    figures["steps"] = [
        {k: v for k, v in s.items() if k.startswith(("timing/", "step_time", "completions/"))}
        for s in steps
    ]
    return figures


# ---------------------------------------------------------------------------------------------
# 3. peak RSS, each workload in its own fresh process
# ---------------------------------------------------------------------------------------------


def reference_batch(args: argparse.Namespace, tokenizer: Any, rows: Sequence[Row]) -> Any:
    """B·G sequences of (padded prompt + ``max_new_tokens``) tokens, prompts as the step draws them."""
    picked = PromptSampler(len(rows), seed=0).next(args.batch_size)
    encoded = encode_prompts(tokenizer, [rows[i]["prompt"] for i in picked], torch.device("cpu"))
    prompt_ids = encoded["input_ids"].repeat_interleave(args.group_size, dim=0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(args.group_size, dim=0)
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    completion = torch.randint(
        min(100, vocab - 1), vocab, (prompt_ids.shape[0], args.max_new_tokens), generator=generator
    )
    input_ids = torch.cat([prompt_ids, completion], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def child_main(args: argparse.Namespace) -> None:
    """Run one workload and print its memory figures as one JSON line (last line of stdout)."""
    torch.manual_seed(0)
    policy, tokenizer = load_policy(args)
    trainer = local_trainer(args, policy, tokenizer)  # both children build the same state
    setup = memory_mb()
    detail: dict[str, Any] = {}
    if args.child == "step":
        widths = []
        for _ in range(RSS_STEPS):
            metrics = trainer.step()
            widths.append(metrics["completions/max_length"])
        detail["completion_width"] = max(widths)
    else:
        input_ids, attention_mask, labels = reference_batch(args, tokenizer, trainer.rows)
        params = [p for p in policy.parameters() if p.requires_grad]
        policy.train()
        for _ in range(RSS_STEPS):
            loss = policy(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            trainer.optimizer.step()
        detail["batch_shape"] = list(input_ids.shape)
    print(json.dumps({"setup": setup, "end": memory_mb(), **detail}))


def child_args(args: argparse.Namespace, kind: str) -> list[str]:
    argv = [
        "--model", args.model,
        "--batch-size", str(args.batch_size),
        "--group-size", str(args.group_size),
        "--max-new-tokens", str(args.max_new_tokens),
        "--dtype", args.dtype,
        "--threads", str(args.threads),
        "--child", kind,
    ]  # fmt: skip
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a GRPO-step process and of a plain-LoRA-training process, each fresh."""
    results: dict[str, Any] = {}
    with LoadMeter() as load:
        for kind in ("step", "lora"):  # one after the other: two models at once would compete
            proc = subprocess.run(
                child_args(args, kind), capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {kind!r} failed:\n{proc.stderr[-3000:]}")
            results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    results["machine_load"] = load.figures
    results["ratio_peak"] = results["step"]["end"]["peak_mb"] / results["lora"]["end"]["peak_mb"]
    results["ratio_peak_above_setup"] = (
        results["step"]["end"]["peak_mb"] - results["step"]["setup"]["rss_mb"]
    ) / max(1e-9, results["lora"]["end"]["peak_mb"] - results["lora"]["setup"]["rss_mb"])
    return results


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags.update(value.split())

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "trl": version("trl"),
        "peft": version("peft"),
        "dtype": str(resolve_dtype(args.dtype, resolve_device("cpu"))).removeprefix("torch."),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _load_text(load: dict[str, float]) -> str:
    return (
        f"other jobs used {load.get('other_cores', float('nan')):.2f} cores, "
        f"CPU pressure {100 * load.get('cpu_pressure', float('nan')):.0f}%"
    )


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    """The human-readable table; tests/test_benchmarks.py checks its figure labels."""
    m = results["machine"]
    gen, step, mem = results["generation"], results["step"], results["memory"]
    lines = [
        *report_header("fedmoa local GRPO step benchmark", argv, m),
        f"model: {args.model}, dtype {m['dtype']}, B={args.batch_size}, G={args.group_size} "
        f"({gen['sequences']} sequences), max_new_tokens={args.max_new_tokens}, padded prompt "
        f"{gen['prompt_tokens_padded']} tokens, repeats={args.repeats}",
        "",
        "1. rollout generation, temperature 1.0: ours = generate_rollouts, TRL = "
        "GRPOTrainer._generate, same PeftModel",
        f"   machine load during section: {_load_text(gen['machine_load'])}",
        f"   sampling processors: ours {gen['processors']['ours']}, TRL {gen['processors']['trl']}",
        "   per call: median [best]; tokens = sum of completion lengths through EOS; "
        "padded = B*G*T (T = longest completion)",
        f"   {'mode':8}{'side':5}{'s/call':>15}{'cpu-s':>7}{'tokens':>7}{'tok/s':>15}"
        f"{'padded':>7}{'padded tok/s':>13}{'decode step ms':>15}{'cpu ms':>7}{'decode tok/s':>13}",
    ]
    for mode, per_side in gen["summary"].items():
        for side in SIDES:
            s = per_side[side]
            lines.append(
                f"   {mode:8}{side:5}{s['wall_s_median']:8.2f} [{s['wall_s_best']:5.2f}]"
                f"{s['cpu_s_median']:7.2f}{s['tokens_median']:7.0f}"
                f"{s['tok_s_median']:7.1f} [{s['tok_s_best']:5.1f}]"
                f"{s['padded_tokens_median']:7.0f}{s['padded_tok_s_median']:13.1f}"
                f"{s['decode_step_ms_median']:15.1f}{s['decode_step_cpu_ms_median']:7.1f}"
                f"{s['decode_tok_s']:13.1f}"
            )
    for mode, per_side in gen["summary"].items():
        r = per_side["ratio_ours_over_trl"]
        lines.append(
            f"   ours/TRL tok/s ({mode}): decode step {r['decode_step']:.3f} "
            f"(CPU {r['decode_step_cpu']:.3f}), per call "
            f"{r['tok_s_paired_median']:.3f} (paired median), {r['tok_s_best']:.3f} (best vs best), "
            f"padded {r['padded_tok_s_paired_median']:.3f}, per CPU-s "
            f"{r['tok_per_cpu_s_paired_median']:.3f}"
        )
    lines += [
        "",
        f"2. GRPO step time split (LocalTrainer.step, median of {args.repeats} steps "
        "after 1 warm-up)",
        f"   machine load during section: {_load_text(step['machine_load'])}",
    ]
    for key in (*PHASES, "other"):
        share = 100 * step[key] / step["step_time"] if step["step_time"] else 0.0
        lines.append(f"   timing/{key:17}{step[key]:8.2f} s {share:5.1f}%")
    lines.append(f"   step_time {'':15}{step['step_time']:8.2f} s")
    lines.append(
        f"   completion length: mean {step['mean_completion_length']:.1f}, "
        f"max {step['max_completion_length']:.0f} of {args.max_new_tokens}"
    )
    lines += [
        "",
        f"3. peak RSS (VmHWM of a fresh process each, {RSS_STEPS} steps; "
        f"setup = model + LoRA + AdamW + data loaded)",
        f"   machine load during section: {_load_text(mem['machine_load'])}",
    ]
    for kind, label in (("step", "GRPO step"), ("lora", "LoRA training")):
        fig = mem[kind]
        lines.append(
            f"   peak RSS {label:14}{fig['end']['peak_mb']:8.1f} MB "
            f"(RSS after setup {fig['setup']['rss_mb']:.1f} MB, "
            f"peak during setup {fig['setup']['peak_mb']:.1f} MB)"
        )
    lines.append(
        f"   GRPO completion width {mem['step']['completion_width']:.0f}; "
        f"LoRA reference batch shape {mem['lora']['batch_shape']}"
    )
    lines.append(
        f"   peak RSS ratio step/LoRA: {mem['ratio_peak']:.3f} "
        f"(growth above setup RSS: {mem['ratio_peak_above_setup']:.3f})"
    )
    for text in gen["profiles"]:
        lines += ["", text]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    if args.child:
        child_main(args)
        return 0
    results: dict[str, Any] = {}
    # Memory first: the children are measured before this process grows.
    results["memory"] = bench_memory(args)
    results["machine"] = machine_info(args)
    results["generation"] = bench_generation(args)
    results["step"] = bench_step(args)
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
