"""Benchmark what a client sends and receives per round: LoRA adapters vs full-model FedAvg.

Why: FedMOA clients exchange only the LoRA tensors (the start adapter down, ``Δθ`` up); a
full-model FedAvg of the same base model would move every parameter both ways. This prints,
for each model:

1. sizes: base-model parameters (tied embeddings counted once) in float32 and in the training
   dtype (``dtype = "auto"``: bfloat16 where the hardware runs it natively, else float32), the
   LoRA adapter with the default LoRA settings (r=8, q/k/v/o projections), and the ratios
   full model / adapter per client per round (the same down and up), in float32 and with the
   adapter in a 16-bit ``server.transport_dtype``; also the bytes of the Flower ``ArrayRecord``
   that carries the adapter (numpy headers included);
2. measured (tiny model only): ``bytes_down`` / ``bytes_up`` per client per round from the
   ``metrics.jsonl`` of real runs, one per ``server.transport_dtype``;
3. the accuracy effect of a 16-bit transport: the same run with ``float32``, ``float16`` and
   ``bfloat16`` transport, the final global adapter's distance to the float32 run's (relative
   to how far training moved it) and the final evaluation metrics side by side. A float32 run
   with another seed is the yardstick: sampling makes any small change grow over rounds, so
   the distance means little unless it is well below the seed-to-seed one (which also
   starts from another LoRA init).

    .venv/bin/python benchmarks/communication.py               # tiny model + SmolLM2-135M sizes
    .venv/bin/python benchmarks/communication.py --smoke       # tiny model only, seconds
    .venv/bin/python benchmarks/communication.py --accuracy-model smollm2-135m --rounds 2

SmolLM2 is only loaded to count its parameters and LoRA tensors (no training) unless it is
given as ``--accuracy-model``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish
from local_step import LoadMeter, machine_info
from scale import experiment, read_records, write_experiment, write_rewards

from fedmoa.federation.client import adapter_state, through_transport, transport_bytes
from fedmoa.models import (
    LoraSettings,
    attach_lora,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
)
from fedmoa.weighting.probe import select_probe_params

TRANSPORTS = ("float32", "float16", "bfloat16")
RUNS = (
    ("float32", "float32", 0),
    ("float16", "float16", 0),
    ("bfloat16", "bfloat16", 0),
    ("float32-seed1", "float32", 1),
)  # (label, transport, seed); float32 = reference
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TINY = "tiny-random-qwen2"
SMOLLM2 = "smollm2-135m"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[TINY, SMOLLM2])
    parser.add_argument(
        "--accuracy-model", default=TINY, help="model of the transport runs (section 2 and 3)"
    )
    parser.add_argument("--clients", type=int, default=4, help="clients of the transport runs")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the transport runs")
    parser.add_argument("--test-prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: temp)")
    parser.add_argument("--smoke", action="store_true", help="tiny model only, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.accuracy_model = [TINY], TINY
        args.clients, args.rounds, args.test_prompts = 3, 2, 2
    return args


# ---------------------------------------------------------------------------------------------
# 1. sizes
# ---------------------------------------------------------------------------------------------


def model_sizes(name: str) -> dict[str, Any]:
    """Parameter and adapter sizes of ``name`` as the engines build it (CPU, dtype "auto")."""
    from fedmoa.federation.flower.records import adapter_to_record

    train_dtype = resolve_dtype("auto", resolve_device("cpu"))
    began = time.perf_counter()
    model, _ = load_model_and_tokenizer(name, dtype="auto", device="cpu")
    params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    policy = attach_lora(model, LoraSettings())
    adapter = adapter_state(policy)
    lora = sum(t.numel() for t in adapter.values())
    # What the embedded engine keeps per client that has trained (fedmoa / fedmoa-hg): the
    # hypergradient's cached gradients, [objectives, probe] float32, besides tiny scalars.
    probe = sum(p.numel() for _, p in select_probe_params(policy, "last2"))
    full = {"float32": 4 * params, "train": params * (torch.finfo(train_dtype).bits // 8)}
    adapter_bytes = {t: transport_bytes(adapter, t) for t in TRANSPORTS}
    record_bytes = {
        t: sum(len(a.data) for a in adapter_to_record(adapter, t).values()) for t in TRANSPORTS
    }
    return {
        "model": name,
        "load_s": time.perf_counter() - began,
        "params": params,
        "train_dtype": str(train_dtype).removeprefix("torch."),
        "adapter_dtype": str(next(iter(adapter.values())).dtype).removeprefix("torch."),
        "lora_params": lora,
        "lora_tensors": len(adapter),
        "lora_share": lora / params,
        "probe_last2_params": probe,
        "full_bytes": full,
        "adapter_bytes": adapter_bytes,
        "record_bytes": record_bytes,
        "ratio": {
            f"full_{f}/adapter_{t}": full[f] / adapter_bytes[t] for f in full for t in TRANSPORTS
        },
    }


# ---------------------------------------------------------------------------------------------
# 2. and 3. runs, one per transport dtype
# ---------------------------------------------------------------------------------------------


def run_transport(
    args: argparse.Namespace, label: str, transport: str, seed: int, root: Path
) -> dict[str, Any]:
    """One embedded run with ``server.transport_dtype = transport``; its bytes and final state."""
    from fedmoa.federation.config import load_experiment
    from fedmoa.federation.embedded import EmbeddedFederation
    from fedmoa.runs import RunDirectory

    config = experiment(
        args.clients,
        args.clients,
        args.rounds,
        write_rewards(root),
        seed=seed,
        transport_dtype=transport,
        model=args.accuracy_model,
    )
    config["server"]["test_prompts"] = args.test_prompts
    if args.accuracy_model != TINY:  # a real model: its own dtype, the default learning rate
        config["model"]["dtype"] = "auto"
        config["client_defaults"]["grpo"].update({"max_new_tokens": 32, "lr": 1e-5})
        config["server"]["eval_max_new_tokens"] = 32
        # enough rows for test_prompts test rows per client (the test split is 10%)
        config["client_defaults"]["data"]["size"] = max(24, 10 * args.test_prompts + 10)
    path = write_experiment(root / label / "experiment.toml", config)
    cfg = load_experiment(path)
    run = RunDirectory(root / label / "run")
    run.save_config(path, dataclasses.asdict(cfg))
    federation = EmbeddedFederation(cfg, run)
    initial = {k: v.clone() for k, v in federation.server.state.global_adapter.items()}
    began = time.perf_counter()
    summary = federation.run_rounds()
    records = read_records(run.path)
    clients = [r for r in records if r.get("type") == "client" and "failed" not in r]
    return {
        "transport": transport,
        "seed": seed,
        "seconds": time.perf_counter() - began,
        "bytes_down_per_client_round": sorted({r["bytes_down"] for r in clients}),
        "bytes_up_per_client_round": sorted({r["bytes_up"] for r in clients}),
        "client_rounds": len(clients),
        "final_eval": {
            k: v for k, v in (summary["final_eval"] or {}).items() if k not in ("type", "round")
        },
        "initial": initial,
        "final": federation.server.state.global_adapter,
    }


def norm(adapter: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in adapter.values()))


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k].double() - b[k].double() for k in a}


def transport_effect(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each run's final global adapter against the float32 run's, and the eval metrics."""
    ref = runs["float32"]
    moved = norm(diff(ref["final"], ref["initial"]))
    out: dict[str, Any] = {"float32_moved_norm": moved}
    # One transfer's rounding alone: the float32 run's whole update sent once in 16 bits.
    update = {k: v.float() for k, v in diff(ref["final"], ref["initial"]).items()}
    out["one_transfer_rel_error"] = {
        t: norm(diff(through_transport(update, t), update)) / moved if moved else float("nan")
        for t in ("float16", "bfloat16")
    }
    for transport, run in runs.items():
        gap = diff(run["final"], ref["final"])
        out[transport] = {
            "diff_norm": norm(gap),
            "diff_rel_to_moved": norm(gap) / moved if moved else float("nan"),
            "max_abs_diff": max(float(t.abs().max()) for t in gap.values()),
            "moved_norm": norm(diff(run["final"], run["initial"])),
        }
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:10.3f}"


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "== fedmoa communication benchmark ==",
        f"command: {shlex.join([Path(sys.executable).name, *argv])}",
        f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average']}",
        "",
        "1. per client per round, each direction (down: start adapter, up: delta; a full-model "
        "FedAvg sends the whole model both ways); MB = 2^20 bytes",
        f"   {'model':18}{'params':>12}{'LoRA':>10}{'share':>8}{'full f32':>10}"
        f"{'full train':>16}{'LoRA f32':>10}{'LoRA f16':>10}{'f32/f32':>9}{'train/f32':>10}"
        f"{'f32/f16':>9}{'train/f16':>10}",
    ]
    for s in results["sizes"]:
        r = s["ratio"]
        lines.append(
            f"   {s['model']:18}{s['params']:12,d}{s['lora_params']:10,d}"
            f"{100 * s['lora_share']:7.3f}%{_mb(s['full_bytes']['float32'])}"
            f"{_mb(s['full_bytes']['train'])} ({SHORT.get(s['train_dtype'], s['train_dtype'])})"
            f"{_mb(s['adapter_bytes']['float32'])}{_mb(s['adapter_bytes']['float16'])}"
            f"{r['full_float32/adapter_float32']:9.0f}{r['full_train/adapter_float32']:10.0f}"
            f"{r['full_float32/adapter_float16']:9.0f}{r['full_train/adapter_float16']:10.0f}"
        )
    lines.append(
        "   ratios: full model (float32 or training dtype) / LoRA adapter (float32 or float16 "
        "transport); the same each direction and for down+up"
    )
    for s in results["sizes"]:
        rb = s["record_bytes"]
        lines.append(
            f"   {s['model']}: {s['lora_tensors']} LoRA tensors in {s['adapter_dtype']}; Flower "
            f"ArrayRecord bytes float32 {rb['float32']:,} / float16 {rb['float16']:,} / "
            f"bfloat16 {rb['bfloat16']:,} (tensor bytes {s['adapter_bytes']['float32']:,} / "
            f"{s['adapter_bytes']['float16']:,}); hypergradient probe 'last2' "
            f"{s['probe_last2_params']:,} entries (state kept per client: objectives x probe x 4 B)"
        )
    runs, effect = results["runs"], results["effect"]
    lines += [
        "",
        f"2. measured: {args.accuracy_model}, {args.clients} clients, all per round, "
        f"{args.rounds} rounds, fedmoa; bytes per client per round from metrics.jsonl",
        f"   machine load during the runs: other jobs {results['machine_load']['other_cores']:.2f}"
        " cores",
        f"   {'run':14}{'bytes down':>12}{'bytes up':>12}{'client-rounds':>15}{'run s':>8}",
    ]
    for t, run in runs.items():
        lines.append(
            f"   {t:14}{run['bytes_down_per_client_round'][0]:12,d}"
            f"{run['bytes_up_per_client_round'][0]:12,d}{run['client_rounds']:15d}"
            f"{run['seconds']:8.1f}"
        )
    lines += [
        "",
        "3. accuracy effect of the transport dtype (seed 0; reference: the float32 run; "
        "float32-seed1: seed 1, i.e. another LoRA init and other samples, for scale)",
        f"   float32 run moved the global adapter by {effect['float32_moved_norm']:.6g} (L2); "
        "sending that whole update once rounds it by "
        + ", ".join(f"{v:.3g} ({t})" for t, v in effect["one_transfer_rel_error"].items())
        + " of its norm",
        f"   {'run':14}{'|Δ final| L2':>14}{'rel. to moved':>15}{'max |Δ|':>12}"
        + "".join(f"{k:>22}" for k in results["eval_keys"]),
    ]
    for t, run in runs.items():
        e = effect[t]
        lines.append(
            f"   {t:14}{e['diff_norm']:14.4g}{e['diff_rel_to_moved']:15.4g}"
            f"{e['max_abs_diff']:12.4g}"
            + "".join(
                f"{run['final_eval'].get(k, float('nan')):22.4f}" for k in results["eval_keys"]
            )
        )
    return "\n".join(lines)


EVAL_KEYS = ("global/accuracy", "personal/accuracy")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(argparse.Namespace(dtype="auto")),
        "sizes": [model_sizes(name) for name in args.models],
    }
    with contextlib.ExitStack() as stack:
        if args.out is not None:
            root = args.out
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmoa-comm-")))
        with LoadMeter() as load:
            runs = {label: run_transport(args, label, t, seed, root) for label, t, seed in RUNS}
    results["machine_load"] = load.figures
    results["effect"] = transport_effect(runs)
    reward_keys = sorted(
        {k for run in runs.values() for k in run["final_eval"] if k.startswith("personal/")}
        - {"personal/accuracy"}
    )
    mean_rewards = {}
    for t, run in runs.items():  # mean personal reward per objective name, over clients
        per_name: dict[str, list[float]] = {}
        for k in reward_keys:
            if "/rewards/" in k:
                per_name.setdefault(k.rsplit("/", 1)[1], []).append(run["final_eval"][k])
        mean_rewards[t] = {f"reward/{n}": sum(v) / len(v) for n, v in per_name.items()}
        run["final_eval"].update(mean_rewards[t])
    results["eval_keys"] = [*EVAL_KEYS, *sorted(mean_rewards["float32"])]
    results["runs"] = {
        t: {k: v for k, v in run.items() if k not in ("initial", "final")}
        for t, run in runs.items()
    }
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
