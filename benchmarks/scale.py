"""Benchmark how a federation scales with the number of clients, on both engines.

Why: the embedded engine keeps one base model in memory and swaps each client's adapter in, so
its memory must not grow with the number of clients *configured*, and a round's time must grow
with the number of clients *sampled* per round (``server.clients_per_round``), not configured.
The Flower engine must run 100 SuperNodes on this machine.

Every configuration is a generated experiment file (tiny random model; every client a small
reasoning-gym partition with its own data seed, two tasks and two reward variants) run in a
fresh child process through the library API (``EmbeddedFederation.run_rounds``, or
``flower.simulation.run_simulation``, which is what ``fedmoa run [--engine flower]`` calls). It prints:

1. per configuration: peak RSS (``VmHWM`` of the child; for Flower also the sampled peak of the
   sum over the child's whole process session: driver, Ray's daemons and actors), its ratio to
   the 3-client run, the wall time per round (evaluation excluded, shown apart), the time per
   client-round, the start-up time and the checkpoint size;
2. least-squares fits of the steady round time against the clients sampled per round and
   against the clients configured (embedded runs only).

    .venv/bin/python benchmarks/scale.py                  # 3 / 30 / 100 clients, Flower 100 nodes
    .venv/bin/python benchmarks/scale.py --smoke          # 3 vs 12 clients, Flower 4 nodes (<3 min)
    .venv/bin/python benchmarks/scale.py --configs emb-3 emb-100x10 --rounds 4

Evaluation is kept cheap on purpose: ``eval_every = 0`` (test evaluation only after the last
round), ``test_prompts = 2``, ``validation_prompts = 2``, ``eval_max_new_tokens = 8``. The final
evaluation covers every *configured* client's test split, so it grows with the clients
configured by design; it is reported in its own column and left out of the round times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish
from local_step import LoadMeter, machine_info, memory_mb

MODEL = "tiny-random-qwen2"
TASKS = (
    ("arith", "basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    ("chain", "chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
)  # fmt: skip
# A reward that varies between the tiny random model's completions, so GRPO has advantages to
# learn from (math_accuracy, format and length are constant on its random tokens).
REWARD_SOURCE = """
def digit_share(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
"""


def reward_variants(module: str) -> tuple[list[dict[str, Any]], ...]:
    """Two objective sets (2 and 3 objectives, different primaries); ``module`` holds
    :data:`REWARD_SOURCE`."""
    digits = f"{module}:digit_share"
    return (
        [
            {"name": "accuracy", "function": "math_accuracy", "role": "primary"},
            {"name": "digits", "function": digits, "weight": 1.0},
        ],
        [
            {"name": "digits", "function": digits, "role": "primary"},
            {"name": "boxed", "function": "format", "weight": 0.2},
            {"name": "brevity", "function": "length", "weight": 0.5, "params": {"target": 6}},
        ],
    )  # fmt: skip


BASELINE = "emb-3"
RSS_TARGET = 1.10


@dataclass(frozen=True)
class Scenario:
    """One configuration: engine, clients configured, clients sampled per round, rounds."""

    name: str
    engine: str  # "embedded" or "flower"
    configured: int
    per_round: int
    rounds: int


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    r, fr = args.rounds, args.flower_rounds
    if args.smoke:
        table = [
            Scenario("emb-3", "embedded", 3, 3, r),
            Scenario("emb-12x3", "embedded", 12, 3, r),
            Scenario("emb-12x6", "embedded", 12, 6, r),
            Scenario("flower-4x2", "flower", 4, 2, fr),
        ]
    else:
        table = [
            Scenario("emb-3", "embedded", 3, 3, r),
            Scenario("emb-30x10", "embedded", 30, 10, r),
            Scenario("emb-100x5", "embedded", 100, 5, r),
            Scenario("emb-100x10", "embedded", 100, 10, r),
            Scenario("emb-100x20", "embedded", 100, 20, r),
            Scenario("flower-100x10", "flower", 100, 10, fr),
        ]
    if args.configs:
        known = {s.name: s for s in table}
        unknown = [c for c in args.configs if c not in known]
        if unknown:
            raise SystemExit(f"unknown --configs {unknown}; known: {sorted(known)}")
        table = [known[c] for c in args.configs]
    if args.skip_flower:
        table = [s for s in table if s.engine != "flower"]
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the embedded runs")
    parser.add_argument("--flower-rounds", type=int, default=2, help="rounds of the Flower runs")
    parser.add_argument("--configs", nargs="+", help="run only these configurations (by name)")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the embedded child (Flower's Ray actors use 1); 0: torch default",
    )
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: temp)")
    parser.add_argument("--smoke", action="store_true", help="3 vs 12 clients, Flower 4 nodes")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = min(args.rounds, 2)
        args.flower_rounds = min(args.flower_rounds, 2)
    return args


# ---------------------------------------------------------------------------------------------
# experiment files
# ---------------------------------------------------------------------------------------------


def experiment(
    configured: int,
    per_round: int,
    rounds: int,
    reward_module: Path,
    *,
    seed: int = 0,
    transport_dtype: str | None = None,
    model: str = MODEL,
) -> dict[str, Any]:
    """A fedmoa experiment with ``configured`` heterogeneous clients, ``per_round`` sampled.

    Client ``i`` trains on its own reasoning-gym partition (data seed ``1000 + i``), alternates
    between two tasks, and between two reward variants independently of its task.
    ``reward_module``: a file written by :func:`write_rewards`.
    """
    variants = reward_variants(str(reward_module))
    clients = []
    for i in range(configured):
        task, dataset, params = TASKS[i % len(TASKS)]
        rewards = variants[(i // len(TASKS)) % len(variants)]
        clients.append(
            {
                "id": f"c{i:03d}",
                "task": task,
                "data": {"name": dataset, "seed": 1000 + i, "params": params},
                "rewards": rewards,
            }
        )
    server: dict[str, Any] = {
        "method": "fedmoa",
        "rounds": rounds,
        "validation_prompts": 2,
        "test_prompts": 2,
        "eval_every": 0,
        "eval_max_new_tokens": 8,
    }
    if per_round < configured:
        server["clients_per_round"] = per_round
    if transport_dtype is not None:
        server["transport_dtype"] = transport_dtype
    return {
        "seed": seed,
        "model": {"name": model, "dtype": "fp32", "device": "cpu"},
        "server": server,
        "client_defaults": {
            "local_steps": 1,
            "grpo": {"batch_size": 2, "group_size": 4, "max_new_tokens": 8, "lr": 0.05},
            "data": {"source": "reasoning_gym", "size": 24},
        },
        "clients": clients,
    }


def write_rewards(directory: Path) -> Path:
    """The user reward module the generated experiments name (absolute path)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / "scale_rewards.py").resolve()
    path.write_text(REWARD_SOURCE)
    return path


def write_experiment(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps(config).encode())
    return path


# ---------------------------------------------------------------------------------------------
# child: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------


def child_main(spec_path: Path) -> None:
    """Run one experiment; print its memory and round-end times as one JSON line."""
    spec = json.loads(spec_path.read_text())
    if spec["threads"] > 0:
        import torch

        torch.set_num_threads(spec["threads"])
    from fedmoa.federation.config import load_experiment
    from fedmoa.runs import RunDirectory

    experiment_path, run_dir = Path(spec["experiment"]), Path(spec["run_dir"])
    began = time.perf_counter()
    round_ends: list[float] = []
    cpu_ends: list[float] = []  # this process's CPU time: the embedded engine's whole work
    eval_cpu: dict[int, float] = {}

    def on_round(server_round: int, records: list[dict[str, Any]]) -> None:
        round_ends.append(time.perf_counter() - began)
        cpu_ends.append(time.process_time())

    figures: dict[str, Any] = {}
    if spec["engine"] == "embedded":
        from fedmoa.federation.embedded import EmbeddedFederation

        cfg = load_experiment(experiment_path)
        run = RunDirectory(run_dir)
        run.save_config(experiment_path, dataclasses.asdict(cfg))
        federation = EmbeddedFederation(cfg, run)
        figures["init_s"] = time.perf_counter() - began
        figures["init_cpu_s"] = time.process_time()
        figures["setup"] = memory_mb()
        evaluate = federation.evaluate

        def timed_evaluate(local_models: Any = None) -> dict[str, float]:
            """Evaluation's CPU time, to leave it out of the rounds'."""
            cpu = time.process_time()
            out = evaluate(local_models)
            eval_cpu[federation.server.state.completed_rounds] = time.process_time() - cpu
            return out

        federation.evaluate = timed_evaluate  # type: ignore[method-assign]
        federation.run_rounds(on_round)
    else:
        from fedmoa.federation.flower.simulation import run_simulation

        run_simulation(experiment_path, run_dir, on_round=on_round)
        figures["init_s"] = float("nan")  # inside round 1: Ray, actors, node discovery
    figures["end"] = memory_mb()
    figures["round_ends_s"] = round_ends
    figures["round_cpu_ends_s"] = cpu_ends
    figures["eval_cpu_s"] = eval_cpu
    figures["total_s"] = time.perf_counter() - began
    print(json.dumps(figures))


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def session_rss_mb(sid: int) -> tuple[float, int]:
    total, count = 0, 0
    for proc in session_processes(sid):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
            count += 1
    return total / 2**20, count


def run_child(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Start the child in a session of its own, sample the session's total RSS until it ends,
    then reap what is left of the session (Ray's daemons outlive the driver by seconds)."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log = (work / "child.log").open("w")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if spec["threads"] > 0:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True, env=env
    )
    peak_total, peak_count = 0.0, 0
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec['name']}: no result after {timeout:.0f}s")
            total, count = session_rss_mb(proc.pid)
            peak_total, peak_count = max(peak_total, total), max(peak_count, count)
            time.sleep(0.25)
        stdout = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        leftovers = reap_session(proc.pid)
        log.close()
    if proc.returncode != 0:
        tail = (work / "child.log").read_text()[-3000:]
        raise RuntimeError(f"{spec['name']}: child exited {proc.returncode}:\n{tail}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["session_peak_mb"] = peak_total
    figures["session_processes"] = peak_count
    figures["leftover_processes"] = leftovers
    return figures


def reap_session(sid: int, grace: float = 60) -> int:
    """Wait up to ``grace`` s for the session's processes to exit; kill (by PID) what is left."""
    deadline = time.monotonic() + grace
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(left)


# ---------------------------------------------------------------------------------------------
# figures from a run directory
# ---------------------------------------------------------------------------------------------


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def round_figures(scenario: Scenario, child: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Per-round wall time (from the child's round-end clock), its evaluation share and the
    client-round times (``seconds`` of the client records)."""
    records = read_records(run_dir)
    ends = child["round_ends_s"]
    if len(ends) != scenario.rounds:
        raise RuntimeError(f"{scenario.name}: {len(ends)} rounds ended of {scenario.rounds}")
    # Round 1 of the embedded engine starts after EmbeddedFederation is built; Flower's round 1
    # also holds Ray's start, the actors' model builds and the node discovery.
    embedded = scenario.engine == "embedded"
    starts = [child["init_s"] if embedded else 0.0, *ends[:-1]]
    # CPU time only for the embedded engine: Flower's clients run in Ray actors.
    cpu_ends = child["round_cpu_ends_s"] if embedded else [float("nan")] * len(ends)
    cpu_starts = [child.get("init_cpu_s", float("nan")), *cpu_ends[:-1]]
    rounds = []
    for r, (start, end) in enumerate(zip(starts, ends, strict=True), start=1):
        rr = next(x for x in records if x.get("type") == "round" and x["round"] == r)
        timing = next((x for x in records if x.get("type") == "timing" and x["round"] == r), {})
        clients = [x for x in records if x.get("type") == "client" and x["round"] == r]
        failed = [x for x in clients if "failed" in x]
        wall = end - start
        evaluate = rr.get("timing/evaluate", 0.0)
        rounds.append(
            {
                "round": r,
                "wall_s": wall,
                "evaluate_s": evaluate,
                "train_wall_s": wall - evaluate,
                "train_cpu_s": cpu_ends[r - 1]
                - cpu_starts[r - 1]
                - child["eval_cpu_s"].get(str(r), 0.0),
                "aggregate_s": rr.get("timing/aggregate", 0.0),
                "checkpoint_s": timing.get("timing/checkpoint", 0.0),
                "clients": len(clients),
                "failed": len(failed),
                "client_s": [x["seconds"] for x in clients if "seconds" in x],
                "bytes_down": rr["bytes_down"],
                "bytes_up": rr["bytes_up"],
            }
        )
    steady = rounds[1:] if len(rounds) > 1 else rounds  # round 1 holds warm-up work
    client_s = [s for x in steady for s in x["client_s"]]
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    return {
        "round_details": rounds,
        "round_s": statistics.median(x["train_wall_s"] for x in steady),
        "round_cpu_s": statistics.median(x["train_cpu_s"] for x in steady),
        "first_round_s": rounds[0]["train_wall_s"],
        "eval_s": sum(x["evaluate_s"] for x in rounds),
        "client_round_s": statistics.median(client_s) if client_s else float("nan"),
        "round_s_per_sampled": statistics.median(x["train_wall_s"] for x in steady)
        / scenario.per_round,
        "failed_clients": sum(x["failed"] for x in rounds),
        "checkpoint_mb": checkpoints[-1].stat().st_size / 2**20 if checkpoints else 0.0,
        "checkpoint_s": statistics.mean(x["checkpoint_s"] for x in steady),
        "bytes_down_per_client_round": rounds[-1]["bytes_down"] / max(1, rounds[-1]["clients"]),
        "bytes_up_per_client_round": rounds[-1]["bytes_up"] / max(1, rounds[-1]["clients"]),
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope·x`` and its R²."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "n": n}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"slope": slope, "intercept": intercept, "r2": r2, "n": n}


def fits(results: list[dict[str, Any]]) -> dict[str, Any]:
    embedded = [r for r in results if r["engine"] == "embedded"]
    sampled = [r["per_round"] for r in embedded]
    configured = [r["configured"] for r in embedded]
    wall, cpu = [r["round_s"] for r in embedded], [r["round_cpu_s"] for r in embedded]
    return {
        "round_s_vs_sampled": linear_fit(sampled, wall),
        "round_s_vs_configured": linear_fit(configured, wall),
        "round_cpu_s_vs_sampled": linear_fit(sampled, cpu),
        "round_cpu_s_vs_configured": linear_fit(configured, cpu),
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _load_text(load: dict[str, float]) -> str:
    return (
        f"other jobs {load.get('other_cores', float('nan')):.2f} cores, "
        f"CPU pressure {100 * load.get('cpu_pressure', float('nan')):.0f}%"
    )


def format_report(args: argparse.Namespace, argv: Sequence[str], results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "== fedmoa scale benchmark ==",
        f"command: {shlex.join([Path(sys.executable).name, *argv])}",
        f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average']}",
        f"model: {MODEL} (fp32, CPU), method fedmoa, 1 local step (B=2, G=4, 8 new tokens); "
        f"torch threads {args.threads or 'default'} (embedded), 1 per Ray actor (Flower)",
        "eval kept cheap: eval_every=0 (test eval after the last round only, over every "
        "configured client), test_prompts=2, validation_prompts=2, eval_max_new_tokens=8",
        "s/round = wall time of a round without its test evaluation, median of rounds 2..R; "
        "cpu s/rnd = the same in CPU time of the embedded process (steadier on a busy machine); "
        "s/client = median client-round time (`seconds` of the client records, rounds 2..R); "
        "s/rnd/smp = s/round / clients sampled per round",
        "",
        f"{'config':15}{'engine':9}{'conf':>5}{'/rnd':>5}{'rnds':>5}{'peak MB':>9}"
        f"{'ratio':>7}{'sess MB':>9}{'init s':>8}{'s/round':>9}{'cpu s/rnd':>10}{'s/client':>9}"
        f"{'s/rnd/smp':>10}{'1st rnd':>9}{'eval s':>8}{'ckpt MB':>9}{'load':>6}",
    ]
    for r in results["configs"]:
        lines.append(
            f"{r['name']:15}{r['engine']:9}{r['configured']:5d}{r['per_round']:5d}"
            f"{r['rounds']:5d}{r['peak_mb']:9.1f}{r['rss_ratio']:7.3f}"
            f"{r['session_peak_mb']:9.1f}{r['init_s']:8.2f}{r['round_s']:9.2f}"
            f"{r['round_cpu_s']:10.2f}"
            f"{r['client_round_s']:9.2f}{r['round_s_per_sampled']:10.3f}"
            f"{r['first_round_s']:9.2f}{r['eval_s']:8.2f}{r['checkpoint_mb']:9.3f}"
            f"{r['machine_load']['other_cores']:6.2f}"
        )
    lines += [
        "",
        "peak MB = VmHWM of the child (for Flower: the driver, which runs the ServerApp); "
        "ratio = peak MB / peak MB of emb-3 (same engine family: embedded)",
        "sess MB = sampled peak of the summed RSS of every process of the child's session "
        "(Flower: driver + Ray daemons + actors); load = other jobs' cores during the run",
    ]
    fit = results["fits"]
    for key, label in (
        ("round_s_vs_sampled", "s/round vs clients sampled per round"),
        ("round_s_vs_configured", "s/round vs clients configured"),
        ("round_cpu_s_vs_sampled", "cpu s/round vs clients sampled per round"),
        ("round_cpu_s_vs_configured", "cpu s/round vs clients configured"),
    ):
        f = fit[key]
        lines.append(
            f"fit {label:41}: {f['intercept']:7.3f} + {f['slope']:7.4f}·x  "
            f"R² {f['r2']:.3f} (n={f['n']} embedded configs)"
        )
    checks = results["checks"]
    lines.append(
        f"peak RSS, most clients configured / 3-client run: {checks['rss_ratio_max']:.3f} "
        f"(target ≤ {RSS_TARGET}; holds: {checks['rss_ok']})"
    )
    for r in results["configs"]:
        if r["engine"] == "flower":
            lines.append(
                f"Flower {r['configured']} SuperNodes ({r['per_round']} per round, "
                f"{r['rounds']} rounds): completed, {r['failed_clients']} failed client-rounds, "
                f"{r['total_s']:.1f} s in all (round 1 with Ray start and node discovery "
                f"{r['first_round_s']:.1f} s), {r['leftover_processes']} processes reaped"
            )
    return "\n".join(lines)


def run_scenario(scenario: Scenario, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    work = root / scenario.name
    work.mkdir(parents=True, exist_ok=True)
    path = write_experiment(
        work / "experiment.toml",
        experiment(scenario.configured, scenario.per_round, scenario.rounds, write_rewards(work)),
    )
    run_dir = work / "run"
    spec = {
        "name": scenario.name,
        "engine": scenario.engine,
        "experiment": str(path),
        "run_dir": str(run_dir),
        "threads": args.threads,
    }
    print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
    with LoadMeter() as load:
        child = run_child(spec, work, timeout=3600)
    figures = round_figures(scenario, child, run_dir)
    return {
        **dataclasses.asdict(scenario),
        "peak_mb": child["end"]["peak_mb"],
        "setup_rss_mb": child.get("setup", {}).get("rss_mb", float("nan")),
        "session_peak_mb": child["session_peak_mb"],
        "session_processes": child["session_processes"],
        "leftover_processes": child["leftover_processes"],
        "init_s": child["init_s"],
        "total_s": child["total_s"],
        "machine_load": load.figures,
        "run_dir": str(run_dir),
        **figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child:
        child_main(args.child)
        return 0
    table = scenarios(args)
    with contextlib.ExitStack() as stack:
        if args.out is not None:
            root = args.out
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmoa-scale-")))
        configs = [run_scenario(s, args, root) for s in table]
    base = next((r for r in configs if r["name"] == BASELINE), None)
    for r in configs:
        r["rss_ratio"] = r["peak_mb"] / base["peak_mb"] if base else float("nan")
    embedded = [r for r in configs if r["engine"] == "embedded"]
    most = max(embedded, key=lambda r: (r["configured"], r["peak_mb"]), default=None)
    ratio_max = max((r["rss_ratio"] for r in embedded), default=float("nan"))
    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(argparse.Namespace(dtype="fp32")),
        "configs": configs,
        "fits": fits(configs),
        "checks": {
            "rss_ratio_max": ratio_max,
            "rss_ratio_most_configured": most["rss_ratio"] if most else float("nan"),
            "rss_ok": bool(ratio_max <= RSS_TARGET),
            "flower_completed": all(
                r["failed_clients"] == 0 for r in configs if r["engine"] == "flower"
            ),
        },
    }
    return finish(args, argv, results, format_report)


if __name__ == "__main__":
    sys.exit(main())
