"""Soak test: a long embedded federation on a tiny model, watching for leaks round by round.

A benchmark, not CI: it runs ``--rounds`` rounds (default 50) of a 3-client ``fedmoa`` federation
on ``tiny-random-qwen2`` in this process, through the library API the CLI uses
(``EmbeddedFederation`` + ``RunDirectory`` with an ``on_round`` callback), and after every round
samples, after a ``gc.collect()``:

- RSS of this process (psutil) and of its children;
- open file descriptors (``/proc/self/fd``) and threads;
- entries in the temporary directory: the script points ``TMPDIR`` and ``tempfile`` at a fresh
  private folder, so everything there (``fedmoa-*`` folders included) was made by this run, while
  the system one is shared with whatever else runs on the machine;
- live child processes (psutil, recursive).

The clients exercise what keeps resources: math-verify on the main thread (client a) and, with a
reward ``timeout``, in a worker thread talking to math-verify's checker child process (client b);
generated code run in the sandbox, a process and a temporary folder per program (client c); the
hypergradient hooks, task- and accuracy-aware aggregation, an evaluation every round and a
checkpoint per round.

It prints a table (every 5th round), then the verdict: the slope of a least-squares line through
RSS over rounds 10..N (MB/round; from round N/2 for short runs) and the change in fds, temp
entries, children and threads from the end of round 1 to the end. The exit status is 0 whatever
it finds: it is a report.

    python benchmarks/soak.py              # 50 rounds
    python benchmarks/soak.py --smoke      # 5 rounds
    python benchmarks/soak.py --rounds 200 --json soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from _common import finish, start

SMOKE_ROUNDS = 5
TABLE_EVERY = 5
FLAT_MB_PER_ROUND = 0.5  # below this RSS slope the run counts as flat

EXPERIMENT = """
seed = 0

[model]
name = "tiny-random-qwen2"
dtype = "fp32"
device = "cpu"

[lora]
r = 4

[server]
method = "fedmoa"
rounds = {rounds}
validation_prompts = 2
test_prompts = 2
eval_every = 1

[client_defaults]
local_steps = 1
grpo = {{ batch_size = 2, group_size = 2, max_new_tokens = {max_new_tokens}, lr = 0.01 }}
data = {{ source = "reasoning_gym", name = "basic_arithmetic", size = 24, params = {{ min_terms = 2, max_terms = 2, min_digits = 1, max_digits = 1 }} }}

[[clients]]
id = "a"
task = "arithmetic"
rewards = [
  {{ name = "accuracy", function = "math_accuracy", role = "primary", params = {{ timeout = 2 }} }},
  {{ name = "format", function = "format", weight = 0.5 }},
]

[[clients]]
id = "b"
task = "arithmetic"
rewards = [
  {{ name = "accuracy", function = "math_accuracy", role = "primary", timeout = 60 }},
  {{ name = "brevity", function = "length", weight = 0.5, params = {{ target = 4 }} }},
]

[[clients]]
id = "c"
task = "code"
data = {{ source = "jsonl", path = "{code_data}" }}
rewards = [
  {{ name = "tests", function = "code_execution", role = "primary", on_error = "none", params = {{ timeout = 2, max_workers = 2 }} }},
  {{ name = "format", function = "format", weight = 0.25, params = {{ style = "marker" }} }},
]
"""
CODE_TASKS = [
    ("add", "a + b", "assert add(1, 2) == 3"),
    ("mul", "a * b", "assert mul(2, 3) == 6"),
    ("sub", "a - b", "assert sub(5, 3) == 2"),
    ("maxi", "max(a, b)", "assert maxi(2, 7) == 7"),
]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="federation rounds (default 50)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_ROUNDS} rounds")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = SMOKE_ROUNDS
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    return args


class Sampler:
    """Resource figures of this process, taken after a full garbage collection."""

    def __init__(self, private_tmp: Path) -> None:
        self.process = psutil.Process()
        self.private_tmp = private_tmp

    def sample(self, server_round: int, seconds: float) -> dict[str, Any]:
        gc.collect()
        children = [c for c in self.process.children(recursive=True) if _alive(c)]
        entries = os.listdir(self.private_tmp)
        return {
            "round": server_round,
            "seconds": seconds,
            "rss_mb": self.process.memory_info().rss / 2**20,
            "children_rss_mb": sum(_rss(c) for c in children) / 2**20,
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "os_threads": self.process.num_threads(),
            "tmp_entries": len(entries),
            "tmp_fedmoa": sum(name.startswith("fedmoa") for name in entries),
            "children": len(children),
        }


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    denom = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / denom if denom else 0.0


def verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS slope over the warm rounds, and the other counts' change from round 1 to the end."""
    rounds = [s for s in samples if s["round"] >= 1]
    n = rounds[-1]["round"]
    fit_from = 10 if n >= 20 else max(1, n // 2)
    window = [s for s in rounds if s["round"] >= fit_from]
    rss_slope = slope([s["round"] for s in window], [s["rss_mb"] for s in window])
    first, last = rounds[0], rounds[-1]
    deltas = {
        f"{key}_delta": last[key] - first[key]
        for key in ("fds", "tmp_entries", "tmp_fedmoa", "children", "threads", "os_threads")
    }
    flat = rss_slope < FLAT_MB_PER_ROUND and all(
        deltas[f"{k}_delta"] <= 0 for k in ("fds", "tmp_entries", "children", "threads")
    )
    return {
        "rounds": n,
        "fit_rounds": [fit_from, n],
        "rss_slope_mb_per_round": rss_slope,
        "rss_first_mb": first["rss_mb"],
        "rss_last_mb": last["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in rounds),
        **deltas,
        "flat": flat,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedmoa.federation.config import load_experiment
    from fedmoa.federation.embedded import EmbeddedFederation
    from fedmoa.runs import RunDirectory

    private_tmp = Path(tempfile.mkdtemp(prefix="fedmoa-soak-tmp-"))
    workdir = Path(tempfile.mkdtemp(prefix="fedmoa-soak-run-"))
    os.environ["TMPDIR"] = str(private_tmp)  # children (math-verify's checker) inherit it
    tempfile.tempdir = str(private_tmp)
    try:
        code_data = workdir / "code.jsonl"
        code_data.write_text(
            "".join(
                json.dumps(
                    {
                        "question": f"Write a Python function {name}(a, b) that returns {expr}.",
                        "test_list": [test],
                    }
                )
                + "\n"
                for name, expr, test in CODE_TASKS * 6
            )
        )
        config = workdir / "soak.toml"
        config.write_text(
            EXPERIMENT.format(
                rounds=args.rounds, max_new_tokens=args.max_new_tokens, code_data=code_data
            )
        )
        sampler = Sampler(private_tmp)
        began = time.perf_counter()
        cfg = load_experiment(config)
        run_dir = RunDirectory(workdir / "run")
        federation = EmbeddedFederation(cfg, run_dir)
        samples = [sampler.sample(0, time.perf_counter() - began)]
        last = time.perf_counter()

        def on_round(server_round: int, records: list[dict[str, Any]]) -> None:
            nonlocal last
            now = time.perf_counter()
            samples.append(sampler.sample(server_round, now - last))
            last = now
            if server_round % TABLE_EVERY == 0 or server_round in (1, args.rounds):
                print(format_row(samples[-1]), flush=True)

        print(HEADER, flush=True)
        print(format_row(samples[0]), flush=True)
        federation.run_rounds(on_round)
        del federation
        after = sampler.sample(args.rounds, 0.0)
        run_bytes = sum(p.stat().st_size for p in (workdir / "run").rglob("*") if p.is_file())
        return {
            "samples": samples,
            "after_finish": after,
            "verdict": verdict(samples),
            "wall_s": time.perf_counter() - began,
            "run_dir_mb": run_bytes / 2**20,
            "checkpoints": len(list((workdir / "run" / "checkpoints").iterdir())),
        }
    finally:
        tempfile.tempdir = None
        os.environ.pop("TMPDIR", None)
        shutil.rmtree(private_tmp, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


HEADER = (
    f"{'round':>5} {'s/round':>8} {'RSS MB':>8} {'child MB':>8} {'fds':>4} {'threads':>7} "
    f"{'tmp':>4} {'fedmoa tmp':>10} {'children':>8}"
)


def format_row(s: dict[str, Any]) -> str:
    return (
        f"{s['round']:>5} {s['seconds']:>8.1f} {s['rss_mb']:>8.1f} {s['children_rss_mb']:>8.1f} "
        f"{s['fds']:>4} {s['threads']:>3}/{s['os_threads']:<3} {s['tmp_entries']:>4} "
        f"{s['tmp_fedmoa']:>10} {s['children']:>8}"
    )


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    v = results["verdict"]
    lines = [
        "",
        "== soak verdict ==",
        f"command: {' '.join([Path(sys.executable).name, *argv])}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        f"rounds: {v['rounds']}  wall: {results['wall_s']:.0f} s  "
        f"run directory: {results['run_dir_mb']:.1f} MB ({results['checkpoints']} checkpoints, "
        "one per round by design)",
        f"rss_slope_mb_per_round: {v['rss_slope_mb_per_round']:+.3f} "
        f"(rounds {v['fit_rounds'][0]}..{v['fit_rounds'][1]}; RSS {v['rss_first_mb']:.1f} MB "
        f"after round 1, {v['rss_last_mb']:.1f} MB at the end, max {v['rss_max_mb']:.1f} MB)",
        f"fds_delta: {v['fds_delta']:+d}",
        f"tmp_entries_delta: {v['tmp_entries_delta']:+d} (fedmoa-*: {v['tmp_fedmoa_delta']:+d}; "
        "in the run's private TMPDIR)",
        f"children_delta: {v['children_delta']:+d}",
        f"threads_delta: {v['threads_delta']:+d} (OS threads {v['os_threads_delta']:+d})",
        f"after finish: fds {results['after_finish']['fds']}, "
        f"tmp entries {results['after_finish']['tmp_entries']}, "
        f"children {results['after_finish']['children']}",
        "verdict: "
        + (
            "flat (no growth in RSS, fds, temp entries, children or threads)"
            if v["flat"]
            else "GROWTH: see the deltas above"
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv, args = start(argv, parse_args)
    results = run(args)
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
