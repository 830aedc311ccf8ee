"""What client-level DP adds to a round: clipping, the server's noise, the accountant; and bytes.

Why: ``[privacy]`` clips every client's LoRA update (on the client, and again on the server),
draws Gaussian noise of the adapter's size for the global aggregate and each task adapter, and
steps opacus's accountant. This times each part on the adapter of a real model (LoRA on all
seven projections by default) against the aggregation it is added to (FedAvg of the same
updates), median of ``--repeats``. Bytes on the wire do not change: the noise is added to
tensors of the same shapes and dtype (printed from ``transport_bytes``).

    .venv/bin/python benchmarks/privacy_cost.py --threads 1
    .venv/bin/python benchmarks/privacy_cost.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, report_header, start
from local_step import SMOKE_MODEL, machine_info

from fedmoa.aggregation import ClientUpdate, fedavg_aggregate
from fedmoa.federation.client import adapter_state, transport_bytes
from fedmoa.models import LoraSettings, attach_lora, load_model_and_tokenizer
from fedmoa.privacy import PrivacyAccountant, add_gaussian_noise, clip_update

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def median_seconds(func: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        func()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device="cpu")
    policy = attach_lora(model, LoraSettings(r=args.rank, target_modules=ALL_PROJECTIONS))
    adapter = adapter_state(policy)
    generator = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(
            f"c{i}",
            f"task{i % args.tasks}",
            32,
            {k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in adapter.items()},
            0.5,
            {},
            8,
        )
        for i in range(args.clients)
    ]
    accountant = PrivacyAccountant("rdp", 1.0, 1.0, 2)
    timings = {
        "aggregate (FedAvg, reference)": median_seconds(
            lambda: fedavg_aggregate(adapter, updates), args.repeats
        ),
        "clip one update": median_seconds(
            lambda: clip_update(updates[0].delta, 1e-3), args.repeats
        ),
        "noise one aggregate": median_seconds(
            lambda: add_gaussian_noise(adapter, 0.01, generator), args.repeats
        ),
        "accountant step + ε": median_seconds(
            lambda: (accountant.step(), accountant.epsilon(1e-5)), args.repeats
        ),
    }
    # A round: every client clips (in parallel, on its node), the server clips again and noises
    # the global aggregate and one adapter per task.
    server = (
        args.clients * timings["clip one update"]
        + (1 + args.tasks) * timings["noise one aggregate"]
        + timings["accountant step + ε"]
    )
    return {
        "parameters": sum(v.numel() for v in adapter.values()),
        "timings": timings,
        "server_added": server,
        "ratio": server / timings["aggregate (FedAvg, reference)"],
        "bytes_per_update": transport_bytes(updates[0].delta, "float32"),
        "machine": machine_info(args),
    }


def format_report(args: argparse.Namespace, argv: Sequence[str], r: dict[str, Any]) -> str:
    lines = report_header("cost of client-level DP per round", argv, r["machine"])
    lines.append(
        f"model {args.model}, LoRA r {args.rank} on 7 projections: {r['parameters']:,} "
        f"parameters; {args.clients} clients, {args.tasks} tasks; median of {args.repeats}"
    )
    for name, seconds in r["timings"].items():
        lines.append(f"  {name:<30} {seconds * 1e3:9.2f} ms")
    lines.append(
        f"server side of a private round (clip {args.clients} updates, noise {1 + args.tasks} "
        f"aggregates, one accountant step): {r['server_added'] * 1e3:.1f} ms = "
        f"{r['ratio']:.2f}× the FedAvg aggregation itself"
    )
    lines.append(
        f"bytes per update: {r['bytes_per_update']:,} with or without DP (same shapes, dtype)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", help="the adapter's dtype (fp32: AdamW's)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.repeats = SMOKE_MODEL, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    return finish(args, argv, run(args), format_report)


if __name__ == "__main__":
    raise SystemExit(main())
