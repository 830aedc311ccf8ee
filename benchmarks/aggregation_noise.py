"""Do the accuracy-aware weights follow the clients' quality or their validation noise?

Simulated clients of one task with known true accuracies; every round each reports the
share of ``V`` validation prompts it got right (a binomial draw), and the server's
within-task weights ``α_k`` (``fedmoa.aggregation.within_task_weights``, the function both
engines call) are computed from these reports, round after round, over many independent
draws. Two scenarios, each with ``K`` clients of equal ``n_k``:

* ``equal``: every client truly has accuracy ``p``. Target: every share within
  ``[0.7/K, 1.3/K]`` (``[0.35, 0.65]`` for two clients) in ≥ 90% of draws, at every ``V``.
* ``worse``: one client truly has ``p − 0.2``, its peers ``p``. Target: its share is below
  every peer's in ≥ 90% of draws at ``V = 16``.

Rules side by side: the paper's ``softmax`` (``exp(a_k/T_acc)`` on this round's ``a_k``), the
``noise-aware`` rule with ``ρ = 0`` (this round's outcomes only) and with the default ρ.
The ``bound`` column is the best any rule that sees only this round's outcomes can do in
``worse``: the chance that the worse client's ``a_k`` is strictly below every peer's.

    python benchmarks/aggregation_noise.py            # 4000 draws per cell, ~1 min
    python benchmarks/aggregation_noise.py --smoke    # 200 draws, seconds
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from _common import finish

from fedmoa.aggregation import (
    AccuracyEvidence,
    ClientUpdate,
    TaskAccuracySettings,
    accumulate_evidence,
    within_task_weights,
)

EQUAL_BAND = (0.7, 1.3)  # × 1/K
TARGET = 0.90
GAP = 0.2


def rules(defaults: TaskAccuracySettings) -> dict[str, TaskAccuracySettings]:
    return {
        "softmax": replace(defaults, rule="softmax"),
        "noise-aware ρ=0": replace(defaults, rule="noise-aware", memory=0.0),
        f"noise-aware ρ={defaults.memory:g}": replace(defaults, rule="noise-aware"),
    }


def simulate(
    true_accuracy: Sequence[float],
    validation_size: int,
    settings: TaskAccuracySettings,
    rounds: int,
    draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Shares ``[draws, K]`` after ``rounds`` rounds of fresh validation outcomes."""
    ids = [f"c{i}" for i in range(len(true_accuracy))]
    correct = rng.binomial(validation_size, true_accuracy, size=(draws, rounds, len(ids)))
    shares = np.empty((draws, len(ids)))
    for d in range(draws):
        evidence: dict[str, AccuracyEvidence] = {}
        for t in range(rounds):
            updates = [
                ClientUpdate(
                    cid, "task", 8, {}, correct[d, t, k] / validation_size, {}, validation_size
                )
                for k, cid in enumerate(ids)
            ]
            evidence = accumulate_evidence(evidence, updates, settings.memory)
        shares[d] = within_task_weights(updates, settings, evidence)
    return shares


def single_round_bound(
    p: float, validation_size: int, peers: int, draws: int, rng: np.random.Generator
) -> float:
    worse = rng.binomial(validation_size, p - GAP, size=draws)
    better = rng.binomial(validation_size, p, size=(draws, peers))
    return float((worse[:, None] < better).all(axis=1).mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    defaults = TaskAccuracySettings(
        t_acc=args.t_acc, noise_scale=args.noise_scale, memory=args.memory
    )
    rng = np.random.default_rng(args.seed)
    cells = []
    for clients in args.clients:
        for p in args.accuracy:
            for v in args.validation_sizes:
                for name, settings in rules(defaults).items():
                    for rounds in sorted({1, args.rounds}):
                        equal = simulate([p] * clients, v, settings, rounds, args.draws, rng)
                        low, high = (b / clients for b in EQUAL_BAND)
                        in_band = float(((equal >= low) & (equal <= high)).all(axis=1).mean())
                        worse = simulate(
                            [p - GAP] + [p] * (clients - 1), v, settings, rounds, args.draws, rng
                        )
                        below = float((worse[:, :1] < worse[:, 1:]).all(axis=1).mean())
                        cells.append(
                            {
                                "clients": clients,
                                "p": p,
                                "V": v,
                                "rule": name,
                                "rounds": rounds,
                                "equal_in_band": in_band,
                                "worse_below_peers": below,
                                "worse_mean_share": float(worse[:, 0].mean()),
                                "bound": single_round_bound(p, v, clients - 1, args.draws, rng),
                            }
                        )
    return {"cells": cells, "settings": vars(defaults)}


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = [
        "== accuracy-aware weights under validation noise ==",
        f"command: {shlex.join(['python', *argv])}",
        f"settings: T_acc {args.t_acc:g}, κ {args.noise_scale:g}, ρ {args.memory:g}; "
        f"{args.draws} draws per cell, shares after round 1 and round {args.rounds}",
        f"targets: equal: every share in [{EQUAL_BAND[0]:g}/K, {EQUAL_BAND[1]:g}/K] in ≥ {TARGET:.0%} "
        f"of draws at every V; worse (−{GAP:g}): below every peer in ≥ {TARGET:.0%} at V = 16",
        "",
        f"{'K':>2} {'p':>4} {'V':>3} {'rule':<18} {'round':>5} {'equal in band':>14} "
        f"{'worse below':>12} {'worse share':>12} {'bound':>6}",
    ]
    for c in results["cells"]:
        lines.append(
            f"{c['clients']:>2} {c['p']:>4.2f} {c['V']:>3} {c['rule']:<18} {c['rounds']:>5} "
            f"{c['equal_in_band']:>14.3f} {c['worse_below_peers']:>12.3f} "
            f"{c['worse_mean_share']:>12.3f} {c['bound']:>6.3f}"
        )
    lines.append("")
    for name in rules(TaskAccuracySettings(memory=args.memory)):
        mine = [c for c in results["cells"] if c["rule"] == name and c["rounds"] == args.rounds]
        equal_ok = all(c["equal_in_band"] >= TARGET for c in mine)
        worse = [c for c in mine if c["V"] == 16]
        worse_ok = bool(worse) and all(c["worse_below_peers"] >= TARGET for c in worse)
        lowest = min((c["equal_in_band"] for c in mine), default=float("nan"))
        weakest = min((c["worse_below_peers"] for c in worse), default=float("nan"))
        lines.append(
            f"{name:<18} round {args.rounds}: equal target {'met' if equal_ok else 'MISSED'} "
            f"(lowest {lowest:.3f}); worse target {'met' if worse_ok else 'MISSED'} "
            f"(lowest at V = 16: {weakest:.3f})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=6, help="rounds before the shares are read")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4], help="K per task")
    parser.add_argument("--accuracy", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--validation-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--t-acc", type=float, default=TaskAccuracySettings.t_acc)
    parser.add_argument("--noise-scale", type=float, default=TaskAccuracySettings.noise_scale)
    parser.add_argument("--memory", type=float, default=TaskAccuracySettings.memory)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="200 draws, 2 clients, p = 0.5")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.draws, args.clients, args.accuracy = 200, [2], [0.5]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return finish(args, argv, run(args), format_report)


if __name__ == "__main__":
    raise SystemExit(main())
