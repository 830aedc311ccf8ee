"""Greedy evaluation of a policy (base model plus optional adapter) on a split, and the
standalone ``fedmoa eval`` harness built on it."""

from fedmoa.eval.evaluate import (
    EvalResult,
    Generations,
    evaluate_rows,
    greedy_completions,
    greedy_generate,
    hypervolume,
)
from fedmoa.eval.harness import (
    EvalConfig,
    EvalReport,
    EvalSplitConfig,
    SampleRecord,
    load_eval_config,
    load_policy,
    run_eval,
    select_rows,
    write_report,
)

__all__ = [
    "EvalConfig",
    "EvalReport",
    "EvalResult",
    "EvalSplitConfig",
    "Generations",
    "SampleRecord",
    "evaluate_rows",
    "greedy_completions",
    "greedy_generate",
    "hypervolume",
    "load_eval_config",
    "load_policy",
    "run_eval",
    "select_rows",
    "write_report",
]
