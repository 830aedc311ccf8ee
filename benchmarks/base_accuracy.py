"""Score the untrained base model on every client's test rows of an experiment, as a run would.

Why: a study's methods should be read against where they started. This builds the federation
exactly as ``fedmoa run`` does (same data, splits, rewards, seed, LoRA with B = 0, so the
policy is the base model) and calls its own evaluation once, before any training, so the
figures are comparable to a run's ``eval`` records to the row.

    .venv/bin/python benchmarks/base_accuracy.py benchmarks/qwen_gsm8k_mbpp.toml \
        --json benchmarks/records/qwen/base.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedmoa.federation.config import load_experiment
from fedmoa.federation.embedded import EmbeddedFederation
from fedmoa.runs import RunDirectory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cfg = load_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        federation = EmbeddedFederation(cfg, RunDirectory(Path(tmp) / "run"))
        began = time.perf_counter()
        figures = federation.evaluate()
        figures["seconds"] = round(time.perf_counter() - began, 1)
    text = json.dumps(figures, indent=2, sort_keys=True)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
