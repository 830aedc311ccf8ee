"""Do the accuracy-aware weights follow the quality of the clients' updates, or validation noise?

Simulated clients of one task with known true qualities; every round each client's start
adapter and trained adapter are scored on ``V`` of its validation prompts, and the server's
within-task weights ``α_k`` (``fedmoa.aggregation.within_task_weights``, the function both
engines call) are computed from these reports, round after round, over many independent
draws. A client is its start adapter's accuracy ``s`` on its own validation split and the true
gain ``g`` of its update: the update turns a wrong answer right with probability ``up`` and a
right one wrong with probability ``DOWN`` (0.1), so that the trained adapter's accuracy is
``s + g``. Three scenarios, each with ``K`` clients of equal ``n_k``, peers at ``s = p − 0.2``
and ``g = 0.2`` (trained accuracy ``p``):

* ``equal``: every client is a peer. Target: every share within ``[0.7/K, 1.3/K]``
  (``[0.35, 0.65]`` for two clients) in ≥ 90% of draws, at every ``V``.
* ``worse``: one client's update gains nothing (``g = 0``, trained accuracy ``p − 0.2``).
  Target: its share is below every peer's in ≥ 90% of draws at ``V = 16``.
* ``easier``: the same useless update on an easier validation set (``s = p + 0.1``): its
  trained accuracy ``p + 0.1`` is *above* its peers'. Target as for ``worse``.
* ``collapsed``: one update turns every right answer wrong (``down = 1``, gain ``−s``), as
  ``sums-b``'s did in the study. Target as for ``worse``; the ``excluded`` columns count the
  draws where the harm test gave a client 0 (for ``equal``, a false exclusion).
* ``late``: a peer in every round but the last, where its update collapses (as ``code-a``'s
  did at seed 1); ``excl``: draws where the harm test caught it in that round.
* ``recovered``: collapsed in every round but the last, where it is a peer again (as
  ``code-b`` at seed 2); ``excl``: draws where the test excluded its good update (a false
  exclusion). These two tell the harm test's evidence apart: this round's pairs or the record
  (docs/design.md, "Which pairs the harm test reads").

Rules side by side: the paper's ``softmax`` (``exp(a_k/T_acc)`` on this round's ``a_k``), the
``noise-aware`` rule with ``ρ = 0`` (this round's outcomes only) and with the default ρ, all
three on the first ``V`` rows of the split every round, and the ``gain`` rule (paired
``after − before`` on ``V`` of the split's ``M`` rows drawn afresh each round) with ``ρ = 0``
and the default ρ, and the default ρ with the harm test (``--harm-z``) on this round's pairs,
on the record and on either. The ``bound`` column is the best any rule that sees only this round's
trained accuracies can do in ``worse``: the chance that the worse client's ``a_k`` is strictly
below every peer's.

    python benchmarks/aggregation_noise.py            # 4000 draws per cell, a few minutes
    python benchmarks/aggregation_noise.py --smoke    # 200 draws, seconds
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from _common import main_of

from fedmoa.aggregation import (
    ClientUpdate,
    TaskAccuracySettings,
    accumulate_evidence,
    accumulate_gain_evidence,
    within_task_weights,
)

EQUAL_BAND = (0.7, 1.3)  # × 1/K
TARGET = 0.90
GAP = 0.2  # the peers' true gain; the worse client's is 0
DOWN = 0.1  # chance that an update turns a right answer wrong
EASIER = 0.3  # how much easier the ``easier`` client's validation set is than its peers'
SCENARIOS = ("equal", "worse", "easier", "collapsed", "late", "recovered")


@dataclass(frozen=True)
class SimulatedClient:
    start: float  # accuracy of the start adapter on the client's validation split
    gain: float  # true gain of the client's update
    down: float = DOWN  # chance that the update turns a right answer wrong

    @property
    def up(self) -> float:
        """Chance that the update turns a wrong answer right, for a trained accuracy s + g."""
        return (self.gain + self.down * self.start) / (1.0 - self.start)


def scenario(name: str, p: float, clients: int, rounds: int) -> list[list[SimulatedClient]]:
    """The ``K`` clients of a scenario in each round; the odd one (if any) first."""
    peer = SimulatedClient(p - GAP, GAP)
    collapsed = SimulatedClient(p - GAP, GAP - p, down=1.0)
    odd = {
        "equal": [peer] * rounds,
        "worse": [SimulatedClient(p - GAP, 0.0)] * rounds,
        "easier": [SimulatedClient(p - GAP + EASIER, 0.0)] * rounds,
        "collapsed": [collapsed] * rounds,
        "late": [peer] * (rounds - 1) + [collapsed],
        "recovered": [collapsed] * (rounds - 1) + [peer],
    }[name]
    return [[client] + [peer] * (clients - 1) for client in odd]


def rules(defaults: TaskAccuracySettings, harm_z: float) -> dict[str, TaskAccuracySettings]:
    return {
        "softmax": replace(defaults, rule="softmax"),
        "noise-aware ρ=0": replace(defaults, rule="noise-aware", memory=0.0),
        f"noise-aware ρ={defaults.memory:g}": replace(defaults, rule="noise-aware"),
        "gain ρ=0": replace(defaults, rule="gain", memory=0.0),
        f"gain ρ={defaults.memory:g}": replace(defaults, rule="gain"),
        f"gain ρ={defaults.memory:g} z={harm_z:g}": replace(defaults, rule="gain", harm_z=harm_z),
        **{
            f"gain ρ={defaults.memory:g} z={harm_z:g} {read}": replace(
                defaults, rule="gain", harm_z=harm_z, harm_evidence=read
            )
            for read in ("record", "either")
        },
    }


def simulate(
    clients: Sequence[Sequence[SimulatedClient]],
    validation_size: int,
    split_size: int,
    settings: TaskAccuracySettings,
    rounds: int,
    draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Shares ``[draws, K]`` after ``rounds`` rounds of fresh validation outcomes; ``clients``:
    the K clients of each round."""
    ids = [f"c{i}" for i in range(len(clients[0]))]
    shape = (draws, rounds, len(ids), validation_size)
    start = np.array([[c.start for c in r] for r in clients[:rounds]])[..., None]
    up = np.array([[c.up for c in r] for r in clients[:rounds]])[..., None]
    down = np.array([[c.down for c in r] for r in clients[:rounds]])[..., None]
    before = rng.random(shape) < start
    flip = rng.random(shape)
    after = np.where(before, flip >= down, flip < up)
    paired = settings.rule == "gain"
    if paired:  # V of the split's M rows, drawn afresh per round and client
        rows = rng.random((draws, rounds, len(ids), split_size)).argsort(axis=-1)
        rows = rows[..., :validation_size]
    shares = np.empty((draws, len(ids)))
    for d in range(draws):
        records: dict[str, Any] = {}
        for t in range(rounds):
            updates = [
                ClientUpdate(
                    cid,
                    "task",
                    8,
                    {},
                    float(after[d, t, k].mean()),
                    {},
                    validation_size,
                    tuple(
                        zip(
                            rows[d, t, k].tolist(),
                            before[d, t, k] * 1.0,
                            after[d, t, k] * 1.0,
                            strict=True,
                        )
                    )
                    if paired
                    else (),
                )
                for k, cid in enumerate(ids)
            ]
            accumulate = accumulate_gain_evidence if paired else accumulate_evidence
            records = accumulate(records, updates, settings.memory)
        shares[d] = within_task_weights(updates, settings, records)
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
                for name, settings in rules(defaults, args.harm_z).items():
                    for rounds in sorted({1, args.rounds}):
                        cell: dict[str, Any] = {
                            "clients": clients,
                            "p": p,
                            "V": v,
                            "rule": name,
                            "rounds": rounds,
                        }
                        for kind in SCENARIOS:
                            shares = simulate(
                                scenario(kind, p, clients, rounds),
                                v,
                                args.split_size,
                                settings,
                                rounds,
                                args.draws,
                                rng,
                            )
                            # equal: any client (a false exclusion); else the odd one
                            watched = shares if kind == "equal" else shares[:, :1]
                            cell[f"{kind}_excluded"] = float((watched == 0).any(axis=1).mean())
                            if kind in ("late", "recovered"):
                                continue
                            if kind == "equal":
                                low, high = (b / clients for b in EQUAL_BAND)
                                inside = (shares >= low) & (shares <= high)
                                cell["equal_in_band"] = float(inside.all(axis=1).mean())
                            else:
                                below = (shares[:, :1] < shares[:, 1:]).all(axis=1)
                                cell[f"{kind}_below_peers"] = float(below.mean())
                                cell[f"{kind}_mean_share"] = float(shares[:, 0].mean())
                        cell["bound"] = single_round_bound(p, v, clients - 1, args.draws, rng)
                        cells.append(cell)
    return {"cells": cells, "settings": vars(defaults), "split_size": args.split_size}


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = [
        "== accuracy-aware weights under validation noise ==",
        f"command: {shlex.join(['python', *argv])}",
        f"settings: T_acc {args.t_acc:g}, κ {args.noise_scale:g}, ρ {args.memory:g}; "
        f"{args.draws} draws per cell, shares after round 1 and round {args.rounds}",
        f"targets: equal: every share in [{EQUAL_BAND[0]:g}/K, {EQUAL_BAND[1]:g}/K] in ≥ {TARGET:.0%} "
        f"of draws at every V; worse, easier and collapsed (gain {GAP:g} below its peers', or "
        f"every right answer turned wrong): below every peer in ≥ {TARGET:.0%} at V = 16; gain "
        f"rules draw V of {args.split_size} rows; 'excl': draws where a client got 0 (the harm "
        f"test, z = {args.harm_z:g}); late: a peer that collapses in the last round (excl: "
        f"caught), recovered: collapsed until the last round, a peer in it (excl: a false one)",
        "",
        f"{'K':>2} {'p':>4} {'V':>3} {'rule':<24} {'round':>5} {'equal in band':>14} "
        f"{'equal excl':>10} {'worse below':>12} {'worse share':>12} {'worse excl':>10} "
        f"{'easier below':>13} {'easier share':>13} {'collapsed below':>16} "
        f"{'collapsed share':>16} {'collapsed excl':>15} {'late excl':>10} "
        f"{'recovered excl':>15} {'bound':>6}",
    ]
    for c in results["cells"]:
        lines.append(
            f"{c['clients']:>2} {c['p']:>4.2f} {c['V']:>3} {c['rule']:<24} {c['rounds']:>5} "
            f"{c['equal_in_band']:>14.3f} {c['equal_excluded']:>10.3f} "
            f"{c['worse_below_peers']:>12.3f} {c['worse_mean_share']:>12.3f} "
            f"{c['worse_excluded']:>10.3f} {c['easier_below_peers']:>13.3f} "
            f"{c['easier_mean_share']:>13.3f} {c['collapsed_below_peers']:>16.3f} "
            f"{c['collapsed_mean_share']:>16.3f} {c['collapsed_excluded']:>15.3f} "
            f"{c['late_excluded']:>10.3f} {c['recovered_excluded']:>15.3f} {c['bound']:>6.3f}"
        )
    lines.append("")
    for name in rules(TaskAccuracySettings(memory=args.memory), args.harm_z):
        mine = [c for c in results["cells"] if c["rule"] == name and c["rounds"] == args.rounds]
        equal_ok = all(c["equal_in_band"] >= TARGET for c in mine)
        at16 = [c for c in mine if c["V"] == 16]
        lowest = min((c["equal_in_band"] for c in mine), default=float("nan"))
        verdicts = [f"equal target {'met' if equal_ok else 'MISSED'} (lowest {lowest:.3f})"]
        for kind in ("worse", "easier", "collapsed"):
            weakest = min((c[f"{kind}_below_peers"] for c in at16), default=float("nan"))
            met = bool(at16) and weakest >= TARGET
            verdicts.append(
                f"{kind} target {'met' if met else 'MISSED'} (lowest at V = 16: {weakest:.3f})"
            )
        lines.append(f"{name:<24} round {args.rounds}: " + "; ".join(verdicts))
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
    parser.add_argument("--split-size", type=int, default=40, help="validation rows M")
    parser.add_argument("--harm-z", type=float, default=2.33, help="z of the harm test's rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="200 draws, 2 clients, p = 0.5")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.draws, args.clients, args.accuracy = 200, [2], [0.5]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(argv, parse_args, run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
