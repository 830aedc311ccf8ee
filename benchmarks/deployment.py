"""Wall time of one experiment on the embedded engine, the Flower simulation and a deployment.

The experiment is ``examples/deployment``: three clients, each with its own client file in
its own folder. The sides:

* ``embedded``: ``fedmoa run experiment.toml`` (the one-file form), torch's default threads;
* ``simulation``: ``fedmoa run experiment.toml --engine flower`` (Ray, one CPU per actor);
* ``deployment``: a SuperLink and three SuperNodes on this machine, ``--isolation process``,
  each with one long-lived ``fedmoa clientapp`` (the model stays loaded), the server's
  experiment without clients (``server/experiment.toml``); one thread per node;
* ``deployment-subprocess``: the same with Flower's default isolation, one
  ``flwr-clientapp`` process (and model build) per message.

Embedded and simulation time the whole ``fedmoa run`` process; the deployments time
``flwr run`` with the SuperLink and SuperNodes already up (they are the standing
infrastructure), so the resident processes' model builds are inside the timed run.
Reports each side's seconds, its ratio to ``embedded`` (target for ``deployment``:
<= 1.15), model builds per node, and the largest difference of the global adapter from
the embedded one.

    python benchmarks/deployment.py --out benchmarks/records/deployment --json benchmarks/records/deployment/results.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common
from safetensors.torch import load_file

from fedmoa.federation.flower.deployment import BIN, LocalDeployment, NodeSpec
from fedmoa.federation.flower.node import MODEL_BUILD_LOG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "deployment"
APP_DIR = ROOT / "examples" / "flower_app"
SIDES = ("embedded", "simulation", "deployment", "deployment-subprocess")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--example", type=Path, default=EXAMPLE, help="folder like examples/deployment"
    )
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # _common
    return parser.parse_args(argv)


def run_fedmoa(experiment: Path, out: Path, *extra: str) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "fedmoa"), "run", str(experiment), "--output", str(out), *extra],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"fedmoa run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def run_deployment(example: Path, out: Path, resident: bool) -> tuple[float, list[int]]:
    """(seconds of ``flwr run``, model builds per node; empty when not resident)."""
    work = out.parent / f"{out.name}-processes"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(example, work)  # node folders as a data owner would have them
    nodes = [
        NodeSpec(folder.name, folder, "client-config='client.toml'")
        for folder in sorted(work.glob("node-*"))
    ]
    with LocalDeployment(work, nodes, resident=resident) as deployment:
        run_config = {"experiment": str(work / "server" / "experiment.toml"), "run-dir": str(out)}
        began = time.perf_counter()
        done = deployment.run(APP_DIR, run_config, cwd=work / "server")
        seconds = time.perf_counter() - began
        (work / "logs" / "flwr-run.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not (out / "summary.json").exists():
            raise SystemExit(f"flwr run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        builds = (
            [deployment.log(f"clientapp-{n.name}").count(MODEL_BUILD_LOG) for n in nodes]
            if resident
            else []
        )
    return seconds, builds


def max_difference(run: Path, reference: Path) -> float | None:
    path = Path("adapters/global/adapter_model.safetensors")
    if not (run / path).exists() or not (reference / path).exists():
        return None
    got, expected = load_file(run / path), load_file(reference / path)
    return max(float((got[k] - v).abs().max()) for k, v in expected.items())


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = _common.start(argv, parse_args)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedmoa-deployment-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = args.example / "experiment.toml"
    sides: dict[str, dict[str, Any]] = {}
    for side in args.sides:
        run = out / side
        shutil.rmtree(run, ignore_errors=True)
        builds: list[int] = []
        if side == "embedded":
            seconds = run_fedmoa(experiment, run)
        elif side == "simulation":
            seconds = run_fedmoa(experiment, run, "--engine", "flower")
        else:
            seconds, builds = run_deployment(args.example, run, resident=side == "deployment")
        sides[side] = {"seconds": seconds, "model_builds_per_node": builds}
        print(f"{side}: {seconds:.1f} s", file=sys.stderr, flush=True)
    for side, figures in sides.items():
        if "embedded" in sides:
            figures["ratio_to_embedded"] = figures["seconds"] / sides["embedded"]["seconds"]
            figures["max_abs_diff_global"] = max_difference(out / side, out / "embedded")
    return _common.finish(args, argv, {"sides": sides, "out": str(out)}, format_report)


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    lines = [
        "== One experiment on three engines (examples/deployment: 3 clients, SmolLM2) ==",
        f"command: {' '.join(argv)}",
        f"{'side':24s} {'seconds':>8s} {'x embedded':>11s} {'builds/node':>12s} {'max |Δ| global':>15s}",
    ]
    for side, f in results["sides"].items():
        ratio = f.get("ratio_to_embedded")
        diff = f.get("max_abs_diff_global")
        builds = ",".join(map(str, f["model_builds_per_node"])) or (
            "per message" if side == "deployment-subprocess" else "1 per process"
        )
        lines.append(
            f"{side:24s} {f['seconds']:8.1f} {'' if ratio is None else f'{ratio:.2f}':>11s} "
            f"{builds:>12s} {'' if diff is None else f'{diff:.2e}':>15s}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
