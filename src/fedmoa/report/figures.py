"""The report's PNGs, drawn with matplotlib's object API on the Agg canvas.

No ``pyplot``: it would select a GUI backend and keep global figure state, and a
report is written from a CLI or a test, never shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedmoa.report.aggregate import Stat, group_by_method, per_round
from fedmoa.report.load import RunRecord, Trajectories

COLORS = [f"C{i}" for i in range(10)]
# Methods also differ in line style, so a method hidden under another's line still shows.
STYLES = ["-", "--", ":", "-."]


def slug(text: str) -> str:
    """A file-name-safe form of a method name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "method"


def accuracy_figure(runs: list[RunRecord], path: Path) -> Path:
    """Global and personalized test accuracy per round, one line per method, ±std band."""
    fig, axes = _grid(2, "round", "accuracy")
    for ax, title, series in (
        (axes[0], "global (global adapter)", lambda r: r.global_accuracy),
        (axes[1], "personalized (each client's adapter)", lambda r: r.personal_accuracy),
    ):
        ax.set_title(title)
        for i, (method, group) in enumerate(group_by_method(runs).items()):
            _band(
                ax, *per_round(group, series), _label(method, group), COLORS[i % 10], STYLES[i % 4]
            )
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize="small")
    return _save(fig, path)


def task_accuracy_figure(runs: list[RunRecord], path: Path) -> Path | None:
    """Global accuracy per task (only drawn when the runs have more than one task)."""
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    if len(tasks) < 2:
        return None
    fig, axes = _grid(len(tasks), "round", "global accuracy")
    for ax, task in zip(axes, tasks, strict=False):
        ax.set_title(f"task {task}")
        for i, (method, group) in enumerate(group_by_method(runs).items()):

            def series(r: RunRecord, task: str = task) -> dict[int, float]:
                return r.task_accuracy.get(task, {})

            _band(
                ax, *per_round(group, series), _label(method, group), COLORS[i % 10], STYLES[i % 4]
            )
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize="small")
    return _save(fig, path)


def trajectory_figure(
    group: list[RunRecord],
    pick: Callable[[RunRecord], Trajectories],
    ylabel: str,
    title: str,
    path: Path,
) -> Path | None:
    """One subplot per client, one line per objective (mean over seeds, ±std band)."""
    clients = list(dict.fromkeys(c for r in group for c in pick(r)))
    if not clients:
        return None
    fig, axes = _grid(len(clients), "round", ylabel)
    tasks = {c: t for r in group for c, t in r.clients.items()}
    primary = {c: p for r in group for c, p in r.primary.items()}
    for ax, client in zip(axes, clients, strict=False):
        ax.set_title(f"{client} ({tasks.get(client, '?')})")
        objectives = list(dict.fromkeys(o for r in group for o in pick(r).get(client, {})))
        for i, name in enumerate(objectives):

            def series(r: RunRecord, client: str = client, name: str = name) -> dict[int, float]:
                return pick(r).get(client, {}).get(name, {})

            label = f"{name} (primary)" if primary.get(client) == name else name
            _band(ax, *per_round(group, series), label, COLORS[i % 10])
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def shares_figure(group: list[RunRecord], title: str, path: Path) -> Path | None:
    """Each client's weight in the global update per round, one subplot per task (mean over
    seeds, ±std band): where the server's accuracy-aware rule sent the update."""
    tasks: dict[str, list[str]] = {}
    for run in group:
        for client in run.shares:
            members = tasks.setdefault(run.clients.get(client, "?"), [])
            if client not in members:
                members.append(client)
    if not tasks:
        return None
    fig, axes = _grid(len(tasks), "round", "share of the global update")
    for ax, (task, clients) in zip(axes, tasks.items(), strict=False):
        ax.set_title(f"task {task}")
        for i, client in enumerate(clients):

            def series(r: RunRecord, client: str = client) -> dict[int, float]:
                return r.shares.get(client, {})

            _band(ax, *per_round(group, series), client, COLORS[i % 10])
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def communication_figure(runs: list[RunRecord], path: Path) -> Path:
    """KiB sent to and from clients per round, one line per method."""
    fig, axes = _grid(2, "round", "KiB")
    for ax, title, pick in (
        (axes[0], "up (client → server)", lambda r: r.bytes_up),
        (axes[1], "down (server → client)", lambda r: r.bytes_down),
    ):
        ax.set_title(title)
        for i, (method, group) in enumerate(group_by_method(runs).items()):

            def series(r: RunRecord, pick: Callable = pick) -> dict[int, float]:
                return {k: v / 1024 for k, v in pick(r).items()}

            _band(
                ax, *per_round(group, series), _label(method, group), COLORS[i % 10], STYLES[i % 4]
            )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _label(method: str, group: list[RunRecord]) -> str:
    return f"{method} (n={len(group)})"


def _band(
    ax: Axes, rounds: list[int], stats: list[Stat], label: str, color: str, style: str = "-"
) -> None:
    """The mean as a line; ±std as a band where a round has two seeds or more."""
    if not rounds:
        return
    means = [s.mean for s in stats]
    ax.plot(rounds, means, style, marker="o", markersize=3, label=label, color=color)
    spread = [0.0 if math.isnan(s.std) else s.std for s in stats]
    if any(s.n > 1 for s in stats):
        lower = [m - d for m, d in zip(means, spread, strict=True)]
        upper = [m + d for m, d in zip(means, spread, strict=True)]
        ax.fill_between(rounds, lower, upper, color=color, alpha=0.2, linewidth=0)


def _grid(panels: int, xlabel: str, ylabel: str) -> tuple[Figure, list[Axes]]:
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
