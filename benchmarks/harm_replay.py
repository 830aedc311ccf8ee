"""What would the harm test have excluded in finished runs, reading this round's pairs or the record?

For each run folder (a ``fedmoa run`` output with its ``checkpoints/``), the server's gain
records are read back round by round; a client's pairs of round ``R`` are its record after
``R`` minus ``ρ`` times its record after ``R − 1`` (``fedmoa.aggregation
.accumulate_gain_evidence`` in reverse). Each update is then tested as the server would
(``fedmoa.aggregation.task_accuracy.harmful``) on both, and the verdicts of the three readings
(``server.accuracy_harm_evidence``: ``round``, ``record``, ``either``) are printed beside the
update's validation accuracy before and after training: the line a reader checks a verdict
against. The weights the runs actually used are not changed: this is a replay of the decisions
on the same evidence, not a rerun (a different decision changes the later rounds).

    python benchmarks/harm_replay.py benchmarks/records/regime_study_harm_v32/fedmoa-seed*/
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, not a package
from _common import main_of

from fedmoa.aggregation.task_accuracy import GainEvidence, gain_z, harmful

Rows = dict[int, tuple[float, float, float]]


def this_round(record: Rows, before: Rows, memory: float) -> Rows:
    """The round's own pairs: the record after it minus ``ρ`` × the record before it."""
    rows = {}
    for row, (d, c, w) in record.items():
        old = before.get(row, (0.0, 0.0, 0.0))
        own = (d - memory * old[0], c - memory * old[1], w - memory * old[2])
        if own[2] > 1e-9:
            rows[row] = own
    return rows


def replay(run: Path, z: float) -> list[dict[str, Any]]:
    config = json.loads((run / "resolved_config.json").read_text())
    memory = float(config["server"]["accuracy_memory"])
    reported: dict[tuple[int, str], dict[str, Any]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "validation_pairs" in entry:
            reported[(entry["round"], entry["client"])] = entry
    checkpoints = sorted((run / "checkpoints").glob("round-*.pt"))
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoints/round-*.pt to replay")
    earlier: dict[str, Rows] = {}
    out = []
    for path in checkpoints:
        state = torch.load(path, weights_only=False)
        round_ = state["completed_round"]
        records = {
            cid: {int(row): (d, c, w) for row, d, c, w in rows}
            for cid, rows in state["server"].get("gain_evidence", {}).items()
        }
        for cid, rows in sorted(records.items()):
            entry = reported.get((round_, cid))
            if entry is None:  # it did not report: its record was carried, not discounted
                continue
            record = GainEvidence(rows)
            own = GainEvidence(this_round(rows, earlier.get(cid, {}), memory))
            verdict = {"round": harmful(own, z), "record": harmful(record, z)}
            out.append(
                {
                    "run": f"{run.parent.name}/{run.name}",
                    "round": round_,
                    "client": cid,
                    "before": entry["accuracy_before"],
                    "after": entry["accuracy"],
                    "pairs": own.weight,
                    "z_round": gain_z(own),
                    "z_record": gain_z(record),
                    **{f"excluded_{k}": v for k, v in verdict.items()},
                    "excluded_either": verdict["round"] or verdict["record"],
                }
            )
        earlier = records
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [row for folder in args.runs for row in replay(folder, args.z)]
    counts = {
        read: sum(r[f"excluded_{read}"] for r in rows) for read in ("round", "record", "either")
    }
    return {"z": args.z, "updates": rows, "excluded": counts}


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = [
        "== the harm test replayed on finished runs ==",
        f"command: {shlex.join(['python', *argv])}",
        f"z = {args.z:g}; a verdict 'x' means the test would exclude the update",
        "",
        f"{'run':<48} {'round':>5} {'client':<10} {'before':>6} {'after':>6} {'pairs':>5} "
        f"{'z round':>8} {'z record':>8} {'round':>5} {'record':>6} {'either':>6}",
    ]
    for r in results["updates"]:
        flags = ["x" if r[f"excluded_{k}"] else "." for k in ("round", "record", "either")]
        lines.append(
            f"{r['run']:<48} {r['round']:>5} {r['client']:<10} {r['before']:>6.3f} "
            f"{r['after']:>6.3f} {r['pairs']:>5.0f} {r['z_round']:>+8.2f} {r['z_record']:>+8.2f} "
            f"{flags[0]:>5} {flags[1]:>6} {flags[2]:>6}"
        )
    counts = results["excluded"]
    lines += [
        "",
        f"updates {len(results['updates'])}; excluded reading the round {counts['round']}, "
        f"the record {counts['record']}, either {counts['either']}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders with checkpoints/")
    parser.add_argument("--z", type=float, default=2.33, help="z of the harm test")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return main_of(argv, parse_args, run, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
