"""The ``fedmoa`` command line."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoa.errors import FedMOAError, one_line

app = typer.Typer(
    help="Federated GRPO for reasoning LLMs under heterogeneous rewards.", no_args_is_help=True
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated GRPO for reasoning LLMs under heterogeneous rewards."""
    # Library chatter (weight-loading bars, deprecation notices) would bury our own output.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def fail(err: FedMOAError) -> None:
    """User errors: one red line, no traceback, exit status 2."""
    from rich.markup import escape  # "[[clients]]" in a message is text, not markup

    message = one_line(err)  # one line, even when it quotes a value with newlines
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command("train-local")
def train_local(
    config: Annotated[Path, typer.Argument(help="TOML config (see examples/local.toml)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory")] = None,
    steps: Annotated[int | None, typer.Option(help="override the config's steps")] = None,
    model: Annotated[str | None, typer.Option(help="override model.name")] = None,
    device: Annotated[
        str | None, typer.Option(help="override model.device (cpu, cuda, ...)")
    ] = None,
    profile: Annotated[bool, typer.Option(help="print the time per phase at the end")] = False,
) -> None:
    """Single-client GRPO with LoRA: writes config, metrics.jsonl and a PEFT adapter."""
    from fedmoa.config import TrainLocalConfig, load_config, parse_config
    from fedmoa.train_local import build_local_trainer, start_run, train_into

    started = time.perf_counter()
    try:
        cfg = load_config(config, TrainLocalConfig)
        overrides: dict = {}
        if steps is not None:
            overrides["steps"] = steps
        if model is not None or device is not None:
            model_section = dataclasses.asdict(cfg.model)
            model_section.update({k: v for k, v in (("name", model), ("device", device)) if v})
            overrides["model"] = model_section
        if overrides:
            cfg = parse_config(
                {**dataclasses.asdict(cfg), **overrides}, TrainLocalConfig, "command line"
            )
        trainer = build_local_trainer(cfg)
        run = start_run(cfg, config, output or Path(cfg.output_dir))
        with Progress(
            TextColumn("[bold]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TextColumn("{task.fields[step_time]}s/step"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("train", total=cfg.steps, reward="-", step_time="-")

            def on_step(m: dict[str, float]) -> None:
                progress.update(
                    task, advance=1, reward=f"{m['reward']:.3f}", step_time=f"{m['step_time']:.1f}"
                )

            train_into(trainer, run, cfg.steps, on_step)
    except FedMOAError as err:
        fail(err)
    print_summary(run.read_metrics(), [r.name for r in cfg.rewards])
    console.print(f"run directory: [bold]{run.path}[/] (adapter in {run.path / 'adapter'})")
    if profile:
        print_profile(run.read_metrics(), time.perf_counter() - started)


@app.command("run")
def run(
    config: Annotated[
        Path | None, typer.Argument(help="experiment TOML (see examples/quickstart.toml)")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")] = None,
    engine: Annotated[str, typer.Option(help="embedded (default) or flower")] = "embedded",
    device: Annotated[
        str | None, typer.Option(help="override model.device (auto: CUDA when present, else CPU)")
    ] = None,
    profile: Annotated[bool, typer.Option(help="print the time per phase at the end")] = False,
) -> None:
    """A federation: every client trains locally with GRPO, the server aggregates, per round."""
    from fedmoa.federation.config import load_experiment
    from fedmoa.federation.embedded import EmbeddedFederation
    from fedmoa.runs import RunDirectory

    try:
        origin = None
        if resume is not None:
            if config is not None:
                raise FedMOAError("--resume continues the run's own config.toml: give no file")
            config, output = resume / "config.toml", resume
            if not config.is_file():
                raise FedMOAError(
                    f"--resume {resume}: no config.toml there; is it a run directory?"
                )
            origin = RunDirectory(resume).config_origin  # its relative paths start there
        if config is None:
            raise FedMOAError("give an experiment file, or --resume RUN_DIR")
        started = time.perf_counter()
        cfg = load_experiment(config, origin)
        if device is not None:
            from fedmoa.config import ModelConfig, parse_config

            model = {**dataclasses.asdict(cfg.model), "device": device}
            checked = parse_config(model, ModelConfig, "command line", locate=lambda _: "--device")
            cfg = dataclasses.replace(cfg, model=checked)
        if engine == "flower":
            if device is not None:
                raise FedMOAError(
                    "--device is for the embedded engine; with --engine flower set "
                    "[model] device in the experiment file (each SuperNode reads it)"
                )
            flower_dir = output or Path(cfg.output_dir)
            run_flower(config, flower_dir, cfg, resume is not None)
            if profile:
                print_profile(
                    RunDirectory(flower_dir).read_metrics(), time.perf_counter() - started
                )
            return None
        if engine != "embedded":
            raise FedMOAError(f"unknown --engine {engine!r}: use 'embedded' or 'flower'")
        run_dir = RunDirectory(output or Path(cfg.output_dir))
        if resume is None:
            run_dir.save_config(config, dataclasses.asdict(cfg))
        federation = EmbeddedFederation(cfg, run_dir)
        done = federation.resume() if resume is not None else 0
        if done:
            console.print(f"resuming after round {done} of {cfg.server.rounds}")

        per_round = cfg.server.clients_per_round or len(cfg.clients)
        with Progress(
            TextColumn("[bold]round {task.fields[round]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("client-rounds  last: {task.fields[last]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task(
                "federation",
                total=cfg.server.rounds * per_round,
                completed=done * per_round,
                round=done + 1,
                last="-",
            )

            def on_client(record: dict) -> None:
                last = record["client"] + (
                    " failed" if "failed" in record else f" {record['seconds']:.0f}s"
                )
                progress.update(bar, advance=1, last=last, round=record["round"])

            def on_round(server_round: int, records: list[dict]) -> None:
                print_round(server_round, records, cfg, progress.console)

            summary = federation.run_rounds(on_round, on_client)
    except FedMOAError as err:
        fail(err)
    print_final(cfg, summary, run_dir.path)
    if profile:
        this_run = [r for r in run_dir.read_metrics() if r.get("round", 0) > done]
        print_profile(this_run, time.perf_counter() - started)


def print_profile(records: list[dict], wall_seconds: float) -> None:
    """The ``--profile`` table: per-phase seconds from the records this invocation wrote."""
    from fedmoa.profiling import phase_totals, profile_table

    console.print(profile_table(phase_totals(records), wall_seconds))


@app.command("eval")
def evaluate(
    config: Annotated[
        Path | None, typer.Argument(help="eval TOML (see examples/eval_gsm8k.toml)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="override model.name (built-in name, hub id or path)")
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="PEFT adapter directory, e.g. RUN/adapter or RUN/adapters/global"),
    ] = None,
    data_source: Annotated[str | None, typer.Option(help="override data.source")] = None,
    data_name: Annotated[str | None, typer.Option(help="override data.name")] = None,
    data_path: Annotated[str | None, typer.Option(help="override data.path (a file)")] = None,
    data_split: Annotated[
        str | None, typer.Option(help="override data.split (the dataset's own split)")
    ] = None,
    data_size: Annotated[int | None, typer.Option(help="override data.size")] = None,
    use: Annotated[
        str | None,
        typer.Option(help="score this part of a run's split: train, validation or test"),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="score the first N rows")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="override max_new_tokens")] = None,
    batch_size: Annotated[int | None, typer.Option(help="prompts per generate call")] = None,
    device: Annotated[
        str | None, typer.Option(help="override model.device (cpu, cuda, ...)")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
) -> None:
    """Greedy pass@1 and reward means of a model (plus adapter): results.json, samples.csv."""
    from fedmoa.eval.harness import load_eval_config, run_eval

    sections = {
        "model": {"name": model, "device": device},
        "data": {
            "source": data_source,
            "name": data_name,
            "path": data_path,
            "split": data_split,
            "size": data_size,
        },
        "split": {"use": use},
    }
    overrides: dict = {
        k: {n: v for n, v in s.items() if v is not None} for k, s in sections.items()
    }
    overrides = {k: v for k, v in overrides.items() if v}
    scalars = {
        "adapter": None if adapter is None else str(adapter),
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "output_dir": None if output is None else str(output),
    }
    overrides.update({k: v for k, v in scalars.items() if v is not None})
    try:
        cfg = load_eval_config(config, overrides)
        progress = Progress(
            TextColumn("[bold]eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TimeElapsedColumn(),
            console=console,
        )
        bar = progress.add_task("eval", total=None)

        def on_progress(done: int, total: int) -> None:
            # Shown once decoding starts: an error while loading stays a single line.
            if not progress.live.is_started:
                progress.start()
            progress.update(bar, completed=done, total=total)

        try:
            report = run_eval(cfg, on_progress)
        finally:
            if progress.live.is_started:
                progress.stop()
    except FedMOAError as err:
        fail(err)
    table = Table(title=f"eval: {cfg.model.name}" + (f" + {cfg.adapter}" if cfg.adapter else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"pass@1 ({report.primary})", _fmt(report.pass_at_1), end_section=True)
    for name, mean in report.reward_means.items():
        table.add_row(f"reward {name}", _fmt(mean))
    table.add_row("rows", str(report.num_rows), end_section=True)
    table.add_row("truncated", str(report.truncated))
    table.add_row("completion tokens", str(report.completion_tokens))
    table.add_row("tokens/s", _fmt(report.tokens_per_s, 1))
    table.add_row("wall s", _fmt(report.wall_s, 1))
    out = Console()
    out.print(table, width=None if out.is_terminal else 100)
    console.print(
        f"results: [bold]{report.results_path}[/]  samples: [bold]{report.samples_path}[/]"
    )


def run_flower(config: Path, output: Path, cfg, resume: bool) -> None:
    """``--engine flower``: the same experiment on Flower's Ray simulation, one SuperNode per
    client; the ServerApp writes the run directory (config included) as the embedded run does.
    On resume the simulation reads the experiment from where the run started (its clients
    load their data relative to it) and the ServerApp checks it is unchanged."""
    from fedmoa.federation.flower.simulation import run_simulation
    from fedmoa.runs import RunDirectory

    if resume:
        source = RunDirectory(output).identity().get("config_source")
        if not source or not Path(source).is_file():
            raise FedMOAError(
                f"--resume {output} --engine flower: the experiment the run started from "
                f"({source or 'not recorded'}) is gone; the simulation's clients read it"
            )
        config = Path(source)

    def on_round(server_round: int, records: list[dict]) -> None:
        print_round(server_round, records, cfg, console)

    summary = run_simulation(config, output, on_round=on_round, resume=resume)
    print_final(cfg, summary, output)


@app.command("clientapp")
def clientapp(
    runtime_api_address: Annotated[
        str,
        typer.Option(help="the SuperNode's Runtime API (its --port), e.g. 127.0.0.1:9094"),
    ] = "127.0.0.1:9094",
    object_wait: Annotated[
        float,
        typer.Option(
            help="seconds a task's message may stay unavailable (its run has ended) before "
            "the task is given up"
        ),
    ] = 120.0,
) -> None:
    """Run a SuperNode's ClientApp in this one process, so the model stays loaded across
    messages; for a SuperNode started with --isolation process (docs/flower.md)."""
    import faulthandler
    import logging
    import signal

    from fedmoa.federation.flower.resident import serve_clientapp
    from fedmoa.federation.flower.settings import FLOWER_ENV

    for name, value in FLOWER_ENV.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack, to stderr
    console.print(f"fedmoa clientapp: serving the SuperNode at {runtime_api_address}")
    serve_clientapp(runtime_api_address, object_wait=object_wait)


@app.command("report")
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="run directories to compare (methods × seeds)")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="report directory (default: report/ next to the first run)"
        ),
    ] = None,
) -> None:
    """Compare runs: report.md, a standalone report.html and PNGs; mean ± std over seeds."""
    from rich.markup import escape

    from fedmoa.report import write_report

    try:
        result = write_report(run_dirs, output)
    except FedMOAError as err:
        fail(err)
    comparison = result.comparison
    runs = f"{len(result.runs)} run" + ("s" if len(result.runs) != 1 else "")
    table = Table(title=f"{runs}, final round", title_justify="left")
    for i, header in enumerate(comparison.headers):
        table.add_column(header, justify="right" if i in comparison.right else "left")
    for row in comparison.rows:
        table.add_row(*(escape(cell) for cell in row))
    # Off a terminal rich assumes 80 columns, which would wrap every cell of this wide table.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out.print(table)
    out.print(f"markdown: [bold]{escape(str(result.markdown))}[/]")
    out.print(f"html:     [bold]{escape(str(result.html))}[/] (figures inlined)")
    names = ", ".join(p.name for p in result.figures)
    out.print(f"figures:  {escape(names)} in {escape(str(result.output))}")


def print_final(cfg, summary: dict, run_path: Path) -> None:
    final = summary["final_eval"] or {}
    base = summary.get("base_eval") or {}
    start = f"{_fmt(base.get('global/accuracy'))} at round 0 → " if base else ""
    console.print(
        f"[bold]{cfg.server.method}[/]: global accuracy {start}"
        f"{_fmt(final.get('global/accuracy'))}, personalized "
        f"{_fmt(final.get('personal/accuracy'))}; run directory: [bold]{run_path}[/]"
    )


def print_round(server_round: int, records: list[dict], cfg, out: Console) -> None:
    """Per-round table: each client's accuracy, and per objective its reward and weight."""
    table = Table(title=f"round {server_round}/{cfg.server.rounds}", title_justify="left")
    for column in (
        "client",
        "task",
        "val acc",
        "test acc",
        "objective",
        "reward",
        "weight",
        "KiB up",
    ):
        table.add_column(
            column, justify="left" if column in ("client", "task", "objective") else "right"
        )
    evals = next((r for r in records if r["type"] == "eval"), {})
    for r in records:
        if r["type"] != "client":
            continue
        if "failed" in r:
            table.add_row(r["client"], "-", "failed", "-", r["failed"][:40], "-", "-", "-")
            continue
        names = [k.removeprefix("weights/") for k in r if k.startswith("weights/")]
        for i, name in enumerate(names):
            first = i == 0
            table.add_row(
                r["client"] if first else "",
                r["task"] if first else "",
                _fmt(r["accuracy"], 2) if first else "",
                _fmt(evals.get(f"personal/{r['client']}/accuracy"), 2) if first else "",
                name,
                _fmt(r.get(f"rewards/{name}/mean"), 2),
                _fmt(r.get(f"weights/{name}"), 2),
                f"{r['bytes_up'] / 1024:.0f}" if first else "",
                end_section=i == len(names) - 1,
            )
    # Off a terminal rich assumes 80 columns, which would truncate the objective names.
    out.print(table, width=None if out.is_terminal else 120)
    if evals:
        out.print(
            f"  global test accuracy {_fmt(evals.get('global/accuracy'))}, "
            f"personalized {_fmt(evals.get('personal/accuracy'))}"
        )
    round_record = next((r for r in records if r["type"] == "round"), {})
    if "privacy/epsilon" in round_record and cfg.privacy is not None:
        out.print(
            f"  privacy: ε = {round_record['privacy/epsilon']:.3f} at δ = {cfg.privacy.delta:g}"
        )


def print_summary(history: list[dict], reward_names: list[str]) -> None:
    table = Table(title="train-local", show_lines=False)
    for column in ["step", "reward", *(f"{n}" for n in reward_names), "len", "step s"]:
        table.add_column(column, justify="right")
    for m in history:
        table.add_row(
            str(int(m["step"])),
            _fmt(m.get("reward")),
            *(_fmt(m.get(f"rewards/{n}/mean")) for n in reward_names),
            _fmt(m.get("completions/mean_length"), 1),
            _fmt(m.get("step_time"), 1),
        )
    Console().print(table)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover - python -m fedmoa.cli
    main()
