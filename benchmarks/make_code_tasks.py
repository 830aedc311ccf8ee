"""Generate the study's code task: one-line Python functions, each checked by running its tests.

MBPP is beyond SmolLM2-135M (about 0-4% pass@1, docs/offline-assets), so GRPO would see no
signal there. These are the same kind of task at the size of the study's one-digit sums: write
``f(x)`` for a one-step arithmetic rule, scored by ``code_execution`` (the completion's code and
MBPP-style asserts, run in the sandbox). Deterministic: the same seed writes the same file.

    .venv/bin/python benchmarks/make_code_tasks.py            # benchmarks/data/code_tasks.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUTS = (0, 1, 2, 5, 7, -3)

# (description, rule) per kind of function, for k = 2..99
RULES: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "add": ("returns x plus {k}", lambda x, k: x + k),
    "sub": ("returns x minus {k}", lambda x, k: x - k),
    "mul": ("returns x times {k}", lambda x, k: x * k),
    "sq_add": ("returns the square of x plus {k}", lambda x, k: x * x + k),
    "max": ("returns the larger of x and {k}", lambda x, k: max(x, k)),
    "min": ("returns the smaller of x and {k}", lambda x, k: min(x, k)),
    "rsub": ("returns {k} minus x", lambda x, k: k - x),
    "twice_add": ("returns twice x plus {k}", lambda x, k: 2 * x + k),
}
CONSTANTS = range(2, 100)


def rows(seed: int) -> list[dict[str, object]]:
    """Every (kind, k) once, shuffled: 784 distinct tasks, so no split holds a copy of another's."""
    out = []
    for kind, (text, rule) in sorted(RULES.items()):
        for k in CONSTANTS:
            out.append(
                {
                    "question": f"Write a Python function f(x) that {text.format(k=k)}.",
                    "test_list": [f"assert f({x}) == {rule(x, k)}" for x in INPUTS],
                    "kind": kind,
                }
            )
    random.Random(seed).shuffle(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "data" / "code_tasks.jsonl")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        written = rows(args.seed)
        for row in written:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(written)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
