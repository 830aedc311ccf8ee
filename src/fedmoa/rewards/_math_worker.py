"""math-verify checks, run on a main thread so that math-verify's ``signal.alarm`` timeouts work.

``math_accuracy`` imports ``check`` on the main thread. From other threads it runs this file as a
script (``python -I``) in a long-lived child process, whose main thread can use those timeouts. The
script imports math-verify only, so the child starts in a fraction of a second.
Protocol: the child prints ``ready``, then answers each stdin line
``[timeout, [[gold, [candidate, ...]], ...]]`` with one stdout line ``[score, ...]``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from math_verify import parse, verify


def check(gold: str, candidates: Sequence[str], timeout: int) -> float:
    """1.0 if the first candidate that parses equals ``gold`` (math-verify wants gold first)."""
    gold_parsed = parse(gold, parsing_timeout=timeout)
    for candidate in candidates:
        predicted = parse(candidate, parsing_timeout=timeout)
        if predicted:
            return float(verify(gold_parsed, predicted, timeout_seconds=timeout))
    return 0.0


def main() -> None:
    """Serves batches until stdin closes; stray prints go to stderr to keep the protocol intact."""
    protocol, sys.stdout = sys.stdout, sys.stderr
    print("ready", file=protocol, flush=True)
    for line in sys.stdin:
        timeout, items = json.loads(line)
        scores = [check(gold, candidates, timeout) for gold, candidates in items]
        print(json.dumps(scores), file=protocol, flush=True)


if __name__ == "__main__":
    main()
