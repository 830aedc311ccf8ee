"""How loud central DP's noise is against the updates it hides, from a recorded DP run.

Why: client-level DP noise has a norm of ``std·sqrt(d)`` over a LoRA adapter of ``d``
parameters, while a client's update has a norm of about the clip ``C``. Read from a finished
``[privacy]`` run (``metrics.jsonl``: each client's ``privacy/update_norm``, each round's
``privacy/noise_std/global`` and ``privacy/epsilon``; ``config.toml``), this prints
per round the noise's norm against the updates', and for each ``--epsilons`` the noise
multiplier opacus gives the run's schedule and the number of equally weighted clients per
round at which the noise's norm would fall to a clipped update's (the most favourable case:
every update at the clip, all pointing the same way).

    .venv/bin/python benchmarks/privacy_utility.py benchmarks/records/regime_study_dp8/fedavg-seed0 --epsilons 8 2
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedmoa.config import load_config
from fedmoa.federation.config import ExperimentConfig
from fedmoa.federation.server import central_accountant
from fedmoa.jsonl import iter_jsonl
from fedmoa.privacy import sensitivity


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished fedmoa run with a [privacy] table")
    parser.add_argument(
        "--config", type=Path, help="the run's experiment file (default: RUN/config.toml)"
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 2.0])
    return parser.parse_args(argv)


def read_run(run: Path, source: Path | None) -> tuple[ExperimentConfig, list[dict[str, Any]]]:
    config = load_config(source or run / "config.toml", ExperimentConfig)
    if config.privacy is None or config.privacy.where != "server":
        raise SystemExit(f"{run}: the run has no central [privacy] table")
    return config, [record for _, record in iter_jsonl(run / "metrics.jsonl")]


def noise_multiplier(config: ExperimentConfig, epsilon: float | None = None) -> tuple[float, float]:
    """(z, sampling rate) of the run's accountant, or of the same run spending ``epsilon``."""
    if epsilon is not None:
        assert config.privacy is not None
        privacy = dataclasses.replace(config.privacy, target_epsilon=epsilon, noise_multiplier=None)
        config = dataclasses.replace(config, privacy=privacy)
    accountant = central_accountant(config, len(config.clients))
    assert accountant is not None
    return accountant.noise_multiplier, accountant.sample_rate


def clients_for_parity(z: float, dim: int) -> float:
    """K at which noise of std ``z·2C/K`` over ``dim`` values has the norm ``C`` of a clipped
    update: ``2·z·sqrt(dim)``, whatever ``C`` (the most favourable case, every update at the
    clip and all pointing the same way)."""
    return z * sensitivity(1.0, 1.0) * math.sqrt(dim)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config, records = read_run(args.run, args.config)
    privacy, server = config.privacy, config.server
    assert privacy is not None
    # bytes on the wire per value, from the transport dtype as the client counts them
    value_bytes = torch.empty((), dtype=getattr(torch, server.transport_dtype)).element_size()
    norms: dict[int, list[float]] = defaultdict(list)
    rounds: dict[int, dict[str, Any]] = {}
    dim = 0
    for record in records:
        if "client" in record and "privacy/update_norm" in record:
            norms[record["round"]].append(record["privacy/update_norm"])
            dim = record["bytes_up"] // value_bytes
        elif record.get("type") == "round" and "privacy/noise_std/global" in record:
            rounds[record["round"]] = record
    if not rounds or not dim:
        raise SystemExit(f"{args.run}: no privacy records in metrics.jsonl (an unfinished run?)")
    z, sample_rate = noise_multiplier(config)
    clip = privacy.clip
    print(f"run {args.run}: {server.method}, {len(config.clients)} clients, q = {sample_rate:g}, "
          f"{server.rounds} rounds, C = {clip:g}, delta = {privacy.delta:g}, z = {z:.4g}, "
          f"d = {dim:,} LoRA parameters")  # fmt: skip
    print("\nround  epsilon  noise std  noise norm  client update norms (mean, max)  clipped  "
          "noise / clipped update")  # fmt: skip
    for r in sorted(rounds):
        std = rounds[r]["privacy/noise_std/global"]
        noise_norm = std * math.sqrt(dim)
        mean_norm = statistics.fmean(norms[r])
        clipped = sum(n > clip for n in norms[r])
        print(f"{r:5d}  {rounds[r]['privacy/epsilon']:7.3f}  {std:9.4g}  {noise_norm:10.4g}  "
              f"{mean_norm:17.3f}, {max(norms[r]):.3f}  {clipped:>9d}/{len(norms[r])}  "
              f"{noise_norm / statistics.fmean(min(n, clip) for n in norms[r]):19.0f}x")  # fmt: skip
    print("\nequally weighted clients per round at which the noise's norm falls to a clipped "
          "update's (2·z·sqrt(d)), same schedule and q:")  # fmt: skip
    for epsilon in args.epsilons:
        z_eps, _ = noise_multiplier(config, epsilon)
        print(f"  epsilon {epsilon:g}: z = {z_eps:.4g}, K = {clients_for_parity(z_eps, dim):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
