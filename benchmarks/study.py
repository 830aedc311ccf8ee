"""Run the FedMOA vs FedAvg study: one experiment file, every method × seed, then the report.

Why a script: the study is 15+ runs that take hours on a CPU, so it must survive being stopped.
Each run lives in ``OUT/<method>-seed<N>``; a finished run (``summary.json``) is skipped and an
interrupted one continues with ``fedmoa run --resume``, so rerunning the same command picks up
where the last one stopped, across sessions. The default ``OUT`` is ``benchmarks/records/study``,
committed without its checkpoints and adapters (``.gitignore``): finished runs travel with the
repository, and a run interrupted on another machine starts again from round 1.

    .venv/bin/python benchmarks/study.py
    .venv/bin/python benchmarks/study.py --methods fedavg fedmoa --seeds 0
    .venv/bin/python benchmarks/study.py --report-only
    .venv/bin/python benchmarks/study.py --set privacy.clip=3 --set privacy.target_epsilon=8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedmoa.config import anchor_paths

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "fedmoa_vs_fedavg.toml"
DEFAULT_METHODS = ("fedavg", "fedmoa", "fedmoa-hg", "fedmoa-taa", "local")
# Report order; "METHOD+WEIGHTING" is server.method with [weighting] method = WEIGHTING.
KNOWN_METHODS = (
    "fedavg-primary",
    "fedavg",
    "fedmoa",
    "fedprox",
    "fedmoa-hg",
    "fedmoa-taa",
    "local",
    "fedavg+saw",
)
FEDMOA = [sys.executable, "-m", "fedmoa.cli"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=HERE / "records" / "study")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--model", help="override [model] name, e.g. a local path")
    parser.add_argument("--rounds", type=int, help="override server.rounds")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="override one key of the study file (dotted path, TOML value), e.g. "
        "server.validation_prompts=32; repeatable",
    )
    return parser.parse_args(argv)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` as a key path and a TOML value; a bare word is a string."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. seed=3")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_override(cfg: dict[str, Any], path: Sequence[str], value: Any) -> None:
    table = cfg
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise SystemExit(f"--set {'.'.join(path)}: {part} is not a table in the study file")
    table[path[-1]] = value


def run_config(base: dict[str, Any], args: argparse.Namespace, method: str, seed: int) -> dict:
    """The study file with this run's method, seed and overrides; everything else unchanged.

    ``--set`` overrides come last, so they win over everything, and land in the run's copy of
    the config: a run records what it ran, however it was asked for.

    ``METHOD+WEIGHTING`` (e.g. ``fedavg+saw``) is ``server.method = METHOD`` with
    ``[weighting] method = WEIGHTING``. Paths relative to the study file (data files, reward
    and check files) are made absolute: the run's copy of the config lives elsewhere.
    """
    cfg = json.loads(json.dumps(base))  # deep copy of plain TOML data
    cfg["seed"] = seed
    # absolute: a config's paths are relative to its file, and the run's copy lives elsewhere
    cfg["output_dir"] = str((args.out / f"{method}-seed{seed}").resolve())
    server_method, _, weighting = method.partition("+")
    cfg.setdefault("server", {})["method"] = server_method
    if weighting:
        cfg.setdefault("weighting", {})["method"] = weighting
    if args.rounds is not None:
        cfg["server"]["rounds"] = args.rounds
    if args.model is not None:
        cfg.setdefault("model", {})["name"] = args.model
    for path, value in args.overrides:
        apply_override(cfg, path, value)
    # fedmoa's own anchoring: data files, reward and check files, in clients and defaults
    # (a path given with --set is relative to the study file too)
    cfg = anchor_paths(cfg, args.config.resolve().parent)
    if "client_defaults" in cfg:
        cfg["client_defaults"] = anchor_paths(cfg["client_defaults"], args.config.resolve().parent)
    return cfg


def run_one(cfg: dict[str, Any], log: Path) -> tuple[str, float]:
    """Start, resume or skip one run; returns what was done and its wall time."""
    out = Path(cfg["output_dir"])
    if (out / "summary.json").is_file():
        return "done before", 0.0
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        command, action = [*FEDMOA, "run", "--resume", str(out)], "resumed"
    else:
        shutil.rmtree(out, ignore_errors=True)  # a start without checkpoints: nothing to keep
        out.mkdir(parents=True, exist_ok=True)
        config_path = out.parent / f"{out.name}.toml"
        config_path.write_text(tomli_w.dumps(cfg))
        command, action = [*FEDMOA, "run", str(config_path), "--output", str(out)], "ran"
    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(command)}\n")
        sink.flush()
        proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{out}: fedmoa run exited with {proc.returncode}; see {log}")
    return action, time.perf_counter() - start


def finished_runs(out: Path, methods: Sequence[str]) -> list[str]:
    """Every finished run in OUT, whatever its method and seed; ``methods`` first, in order.

    Why not just this call's methods and seeds: they are added a few at a time across
    sessions, and the report must cover all of them. Paths are relative to the working
    directory, so a committed report names no machine's paths.
    """
    order = list(dict.fromkeys([*methods, *KNOWN_METHODS]))
    found = []
    for run in out.glob("*-seed*"):
        method, _, seed = run.name.rpartition("-seed")
        if seed.isdigit() and (run / "summary.json").is_file():
            rank = order.index(method) if method in order else len(order)
            found.append((rank, method, int(seed), os.path.relpath(run)))
    return [path for *_, path in sorted(found)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = tomllib.loads(args.config.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "study.log"
    runs = [(m, s) for s in args.seeds for m in args.methods]
    if not args.report_only:
        for i, (method, seed) in enumerate(runs, start=1):
            action, seconds = run_one(run_config(base, args, method, seed), log)
            print(f"[{i}/{len(runs)}] {method} seed {seed}: {action} ({seconds:.0f} s)", flush=True)
            with (args.out / "timings.jsonl").open("a") as fh:
                fh.write(json.dumps({"method": method, "seed": seed, "action": action,
                                     "seconds": round(seconds, 1)}) + "\n")  # fmt: skip
    finished = finished_runs(args.out, args.methods)
    command = [*FEDMOA, "report", *finished, "--output", str(args.out / "report")]
    code = subprocess.run(command, check=False).returncode
    runs, seconds = machine_time(args.out)
    print(f"machine time of the {runs} runs timed in {args.out}: {seconds / 3600:.2f} h")
    return code


def machine_time(out: Path) -> tuple[int, float]:
    """(runs, seconds) that ``timings.jsonl`` records: every start and resume, across sessions."""
    path = out / "timings.jsonl"
    if not path.is_file():
        return 0, 0.0
    timings = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    spent = [t for t in timings if t["action"] != "done before"]
    return len({(t["method"], t["seed"]) for t in spent}), sum(t["seconds"] for t in spent)


if __name__ == "__main__":
    sys.exit(main())
