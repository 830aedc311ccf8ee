"""``write_report``: run directories in, ``report.md``, ``report.html`` and PNGs out."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from fedmoa.errors import FedMOAError
from fedmoa.report import figures
from fedmoa.report.aggregate import (
    BASELINE,
    PRIMARY_REFERENCE,
    MethodSummary,
    Recovery,
    Stat,
    client_breakdown,
    recoveries,
    summarize,
    task_breakdown,
)
from fedmoa.report.document import FigureBlock, Section, TableBlock, to_html, to_markdown
from fedmoa.report.load import RunRecord, load_runs

TITLE = "FedMOA run report"

NOTES = (
    "Accuracy is greedy pass@1 of each client's primary objective on its test rows, at the "
    "last evaluated round. Global: the global adapter, averaged per task, then over tasks. "
    "Personalized: each client's personalized adapter (its task adapter; its own for 'local'), "
    "averaged over clients. Local model: what each client trained in the last round (start "
    "adapter plus its own update), on its own test rows. Hypervolume: the volume the "
    "personalized adapter's per-objective test reward means dominate against the origin, "
    "prod(max(r_i, 0)), averaged over clients; 0 when any objective is at 0. mean ± std is over seeds (sample std); with one seed there is no "
    "spread and only the mean is shown."
)
DELTA_NOTES = (
    "Δ vs fedavg is the difference of seed means; ± is its standard error, "
    "sqrt(s²/n + s_fedavg²/n_fedavg). '(within noise)' marks |Δ| < 2 SE; with a handful "
    "of seeds even a larger Δ is weak evidence."
)
NO_BASELINE = "No fedavg run among the inputs, so there is no Δ vs fedavg column."
PAIRED_NOTES = (
    "Paired differences: each method minus fedavg on the same seed (same data, splits and "
    "initial adapter), then the mean over seeds and its 95% paired t interval, "
    "mean ± t(0.975, n−1)·s/√n. An interval that excludes 0 is a difference the seeds "
    "support; 'one pair' has no interval."
)
RECOVERY_NOTES = (
    f"Recovery: {PRIMARY_REFERENCE} is FedAvg with every auxiliary dropped, so "
    f"{PRIMARY_REFERENCE} − fedavg is what the heterogeneous auxiliaries cost FedAvg (global "
    "accuracy, paired by seed). Recovered: the method's paired gain over fedavg divided by "
    f"that gap (from the means). Over half: (method − fedavg) − ½·({PRIMARY_REFERENCE} − "
    "fedavg) seed by seed, with its 95% paired t interval; above 0 means the method recovers "
    "more than half of the gap."
)
CHECK_NOTES = (
    "Checks (in parentheses): the same greedy test completions scored by an evaluation-only "
    "check of the clients' configs (``checks``), never trained on; a check written "
    "independently of the verifier shows whether an accuracy is the verifier's artefact."
)
BASE_NOTES = (
    "Base: the starting (untrained) adapter, evaluated before round 1 with the same rows, "
    "rewards and decoding (round 0); gain is final − base, run by run."
)
BREAKDOWN_NOTES = (
    "Per task: the global adapter's accuracy on each task's test rows (base: round 0), and "
    "the paired difference to fedavg on that task with its 95% interval. Per client: the "
    "weight of its primary objective after round 1 and after the last round (the weighting "
    "half), its mean share of the global update over rounds (the aggregation half), and its "
    "personalized accuracy, base → final; every figure is the mean ± std over seeds."
)
BYTES_NOTES = (
    "KiB per round: LoRA tensors exchanged, summed over the round's clients (down: the start "
    "adapter; up: the delta), averaged over rounds and then over seeds."
)


@dataclass
class Report:
    """What was written, and the comparison table (the CLI prints it)."""

    output: Path
    markdown: Path
    html: Path
    figures: list[Path]
    comparison: TableBlock
    runs: list[RunRecord]
    summaries: list[MethodSummary]


def default_output(run_dirs: list[Path]) -> Path:
    """``report/`` next to the first run: ``runs/a runs/b`` report into ``runs/report``."""
    return Path(run_dirs[0]).parent / "report"


def write_report(run_dirs: list[Path] | list[str], output: Path | str | None = None) -> Report:
    """Load, aggregate over seeds and render; errors are one-line ``FedMOAError``s."""
    paths = [Path(p) for p in run_dirs]
    runs = load_runs(paths)
    out = Path(output) if output is not None else default_output(paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedMOAError(f"cannot create report directory {out}: {err.strerror}") from None
    summaries = summarize(runs)
    comparison = comparison_table(summaries)
    sections = [Section("Runs", [runs_table(runs), *warnings(runs, summaries)])]
    pngs = _figures(runs, summaries, out, sections)
    has_baseline = any(s.method == BASELINE for s in summaries)
    notes = [NOTES, BASE_NOTES, DELTA_NOTES if has_baseline else NO_BASELINE, BYTES_NOTES]
    if any(s.global_checks for s in summaries):
        notes.append(CHECK_NOTES)
    blocks = [comparison, *notes]
    if has_baseline and len(summaries) > 1:
        blocks += [paired_table(summaries), PAIRED_NOTES]
    if recovered := recoveries(summaries):
        blocks += [recovery_table(recovered), RECOVERY_NOTES]
    sections.append(Section("Comparison", blocks))
    sections.append(
        Section(
            "Per task and per client",
            [task_table(summaries), client_table(summaries), BREAKDOWN_NOTES],
        )
    )
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(to_markdown(TITLE, sections), encoding="utf-8")
    page.write_text(to_html(TITLE, sections), encoding="utf-8")
    return Report(out, markdown, page, pngs, comparison, runs, summaries)


def comparison_table(summaries: list[MethodSummary]) -> TableBlock:
    """One row per method: final accuracies (mean ± std over seeds), seeds, Δ, bytes."""
    with_delta = any(s.method == BASELINE for s in summaries)
    headers = ["method", "seeds", "base global acc", "final global acc", "gain global"]
    headers += ["final personalized acc", "final local-model acc", "final hypervolume"]
    if with_delta:
        headers += ["Δ global vs fedavg", "Δ personalized vs fedavg"]
    checks = sorted({name for s in summaries for name in s.global_checks})
    for name in checks:
        headers += [f"base global acc ({name})", f"final global acc ({name})"]
    private = any(s.epsilon.n for s in summaries)
    if private:
        headers.append("ε (DP)")
    headers += ["KiB up/round", "KiB down/round"]
    rows = []
    for s in summaries:
        row = [
            s.method,
            f"{len(s.runs)} ({', '.join(str(seed) for seed in s.seeds)})",
            s.base_global.fmt(),
            s.final_global.fmt(),
            s.gain_global.fmt(),
            s.final_personal.fmt(),
            s.final_local_model.fmt(),
            s.final_hypervolume.fmt(),
        ]
        if with_delta:
            for d in (s.delta_global, s.delta_personal):
                row.append("reference" if s.method == BASELINE else d.fmt() if d else "-")
        for name in checks:
            base, final = s.global_checks.get(name, (Stat.of([]), Stat.of([])))
            row += [base.fmt(), final.fmt()]
        if private:
            row.append(s.epsilon.fmt(2) if s.epsilon.n else "∞ (not private)")
        row += [s.bytes_up_per_round.fmt(1, 1 / 1024), s.bytes_down_per_round.fmt(1, 1 / 1024)]
        rows.append(row)
    return TableBlock(headers, rows, right=set(range(2, len(headers))))


def paired_table(summaries: list[MethodSummary]) -> TableBlock:
    """One row per method but fedavg: seed-by-seed differences to fedavg with 95% intervals."""
    names = list(dict.fromkeys(name for s in summaries for name in s.paired))
    headers = ["method", "pairs", *(f"Δ {name} vs fedavg [95% CI]" for name in names)]
    rows = [
        [s.method, str(max(d.n for d in s.paired.values()))]
        + [s.paired[name].fmt() if name in s.paired else "-" for name in names]
        for s in summaries
        if s.paired
    ]
    return TableBlock(headers, rows, right=set(range(1, len(headers))))


def recovery_table(recovered: list[Recovery]) -> TableBlock:
    """One row per method: the share of the fedavg-primary − fedavg gap it wins back."""
    headers = ["method", f"{PRIMARY_REFERENCE} − fedavg [95% CI]", "method − fedavg [95% CI]"]
    headers += ["recovered", "over half [95% CI]"]
    rows = [
        [
            r.method,
            r.gap.fmt(),
            r.gained.fmt(),
            "-" if r.fraction != r.fraction else f"{r.fraction:.0%}",
            r.over_half.fmt(),
        ]
        for r in recovered
    ]
    return TableBlock(headers, rows, right={1, 2, 3, 4})


def task_table(summaries: list[MethodSummary]) -> TableBlock:
    """One row per method and task: base → final global accuracy, paired Δ vs fedavg."""
    rows = [
        [
            f"{row.method} / {row.task}",
            row.base.fmt(),
            row.final.fmt(),
            "reference" if row.method == BASELINE else row.paired.fmt() if row.paired else "-",
        ]
        for row in task_breakdown(summaries)
    ]
    headers = ["method / task", "base global acc", "final global acc", "Δ vs fedavg [95% CI]"]
    return TableBlock(headers, rows, right={1, 2, 3})


def client_table(summaries: list[MethodSummary]) -> TableBlock:
    """One row per method and client: primary weight, share, personalized accuracy."""
    headers = ["method / client", "task", "primary weight, round 1", "primary weight, last"]
    headers += ["share of global update", "base personalized acc", "final personalized acc"]
    rows = [
        [
            f"{row.method} / {row.client}",
            row.task,
            row.primary_weight_first.fmt(),
            row.primary_weight_last.fmt(),
            row.share.fmt(),
            row.base.fmt(),
            row.final.fmt(),
        ]
        for row in client_breakdown(summaries)
    ]
    return TableBlock(headers, rows, right={2, 3, 4, 5, 6})


def runs_table(runs: list[RunRecord]) -> TableBlock:
    headers = ["run", "method", "seed", "rounds", "final global", "final personalized", "failed"]
    rows = [
        [
            str(r.path) + ("" if r.finished else " (unfinished)"),
            r.method,
            str(r.seed),
            str(r.rounds),
            Stat.of([r.final_global_accuracy]).fmt(),
            Stat.of([r.final_personal_accuracy]).fmt(),
            str(len(r.failures)),
        ]
        for r in runs
    ]
    return TableBlock(headers, rows, right={2, 3, 4, 5, 6})


def warnings(runs: list[RunRecord], summaries: list[MethodSummary]) -> list[str]:
    """What could make the comparison unfair or the spread misleading."""
    out = []
    for s in summaries:
        repeated = [seed for seed, n in collections.Counter(s.seeds).items() if n > 1]
        if repeated:
            out.append(f"Warning: {s.method} has repeated seeds {repeated}: not independent runs.")
    if len({r.rounds for r in runs}) > 1:
        out.append("Warning: the runs have different numbers of rounds; final values differ in it.")
    unfinished = [str(r.path) for r in runs if not r.finished]
    if unfinished:
        out.append(
            "Warning: no summary.json (unfinished?) in "
            + ", ".join(unfinished)
            + "; their final values are from the last eval record."
        )
    failed = sum(len(r.failures) for r in runs)
    if failed:
        out.append(f"Warning: {failed} client-rounds failed and were left out of aggregation.")
    return out


def _figures(
    runs: list[RunRecord], summaries: list[MethodSummary], out: Path, sections: list[Section]
) -> list[Path]:
    pngs: list[Path] = []

    def add(section: Section, path: Path | None, caption: str) -> None:
        if path is not None:
            pngs.append(path)
            section.blocks.append(FigureBlock(path, caption))

    accuracy = Section("Accuracy per round")
    add(
        accuracy,
        figures.accuracy_figure(runs, out / "accuracy.png"),
        "Test accuracy per round: mean over seeds, band ±1 std",
    )
    add(
        accuracy,
        figures.task_accuracy_figure(runs, out / "accuracy-tasks.png"),
        "Global test accuracy per task",
    )
    weights = Section(
        "Reward weights",
        ["Each client's objective weights at the end of each round (mean over seeds)."],
    )
    rewards = Section(
        "Rewards", ["Training reward means per objective, at each round's last step."]
    )
    shares = Section(
        "Server shares",
        [
            "Each client's weight in the global update per round (π_τ·α_k; mean over seeds): "
            "where the aggregation sent it."
        ],
    )
    used: set[str] = set()
    for s in summaries:
        name = figures.slug(s.method)
        while name in used:
            name += "_"
        used.add(name)
        add(
            weights,
            figures.trajectory_figure(
                s.runs, lambda r: r.weights, "weight", s.method, out / f"weights-{name}.png"
            ),
            f"{s.method}: reward weights per client",
        )
        add(
            rewards,
            figures.trajectory_figure(
                s.runs, lambda r: r.rewards, "mean reward", s.method, out / f"rewards-{name}.png"
            ),
            f"{s.method}: per-objective training rewards per client",
        )
        add(
            shares,
            figures.shares_figure(s.runs, s.method, out / f"shares-{name}.png"),
            f"{s.method}: each client's share of the global update",
        )
    communication = Section("Communication")
    add(
        communication,
        figures.communication_figure(runs, out / "communication.png"),
        "KiB exchanged per round, summed over clients",
    )
    sections += [accuracy, weights, rewards, shares, communication]
    return pngs
