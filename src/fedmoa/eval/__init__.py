"""Greedy evaluation of a policy (base model plus optional adapter) on a split."""

from fedmoa.eval.evaluate import EvalResult, evaluate_rows, greedy_completions

__all__ = ["EvalResult", "evaluate_rows", "greedy_completions"]
