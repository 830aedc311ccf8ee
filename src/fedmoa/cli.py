"""The ``fedmoa`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoa.errors import FedMOAError

app = typer.Typer(
    help="Federated GRPO for reasoning LLMs under heterogeneous rewards.", no_args_is_help=True
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated GRPO for reasoning LLMs under heterogeneous rewards."""


def fail(err: FedMOAError) -> None:
    """User errors: one red line, no traceback, exit status 2."""
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
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
) -> None:
    """Single-client GRPO with LoRA: writes config, metrics.jsonl and a PEFT adapter."""
    import dataclasses

    from fedmoa.config import TrainLocalConfig, load_config, parse_config
    from fedmoa.train_local import build_local_trainer, start_run, train_into

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
