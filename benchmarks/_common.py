"""Helpers shared by the scripts under ``benchmarks/``: the run's start and end, the report header.

Every script is run as ``python benchmarks/NAME.py [options] [--json PATH]``, prints a report whose
first lines say the command, the machine and the software, and with ``--json`` also writes its
figures. The scripts import this module as ``_common`` (their own folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def parser_on_top(description: str) -> argparse.ArgumentParser:
    """A parser for a script's own options; ``parse_on_top`` hands the rest to ``local_step.py``'s."""
    return argparse.ArgumentParser(
        description=description,
        epilog="Also takes local_step.py's --model, --batch-size, --group-size, "
        "--max-new-tokens, --repeats, --dtype, --threads, --smoke and --json.",
    )


def parse_on_top(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    parse_rest: Callable[[Sequence[str]], argparse.Namespace],
) -> argparse.Namespace:
    """The options ``parser`` knows, merged over ``parse_rest`` (``local_step.parse_args``)."""
    own, rest = parser.parse_known_args(argv)
    return argparse.Namespace(**(vars(parse_rest(rest)) | vars(own)))


def start(
    argv: Sequence[str] | None, parse_args: Callable[[Sequence[str]], argparse.Namespace]
) -> tuple[list[str], argparse.Namespace]:
    """(the command-line arguments, parsed); warnings silenced and ``--threads`` applied."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return argv, args


def finish(
    args: argparse.Namespace,
    argv: Sequence[str],
    results: dict[str, Any],
    format_report: Callable[[argparse.Namespace, Sequence[str], dict[str, Any]], str],
) -> int:
    """Print the report and, with ``--json PATH``, write ``results`` (and the options) there.

    Returns the exit status.
    """
    results = {"args": vars(args) | {"json": str(args.json)}, **results}
    print(format_report(args, [str(Path(sys.argv[0])), *argv], results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def main_of(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str]], argparse.Namespace],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    format_report: Callable[[argparse.Namespace, Sequence[str], dict[str, Any]], str],
) -> int:
    """A script's ``main`` when it computes its figures in one ``run(args)`` call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return finish(args, argv, run(args), format_report)


def report_header(title: str, argv: Sequence[str], machine: dict[str, Any]) -> list[str]:
    """The title, command, machine and software lines (``machine``: ``local_step.machine_info``)."""
    m = machine
    return [
        f"== {title} ==",
        f"command: {shlex.join([Path(sys.executable).name, *argv])}",
        f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"native bf16: {m['cpu_native_bf16']}",
        f"software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}, peft {m['peft']}",
    ]
