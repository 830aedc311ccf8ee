"""The run directory: config, ``metrics.jsonl`` and PEFT adapters, written so a crash loses nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from fedmoa.errors import FedMOAError

RUN_FILE = "run.json"


class RunDirectory:
    """A run's outputs under one folder; ``metrics.jsonl`` is appended and flushed per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FedMOAError(f"cannot create run directory {self.path}: {err.strerror}") from None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    def save_config(self, source: str | Path, resolved: dict[str, Any]) -> None:
        """Keep the user's file verbatim, the fully defaulted config next to it, and where the
        file came from (its relative paths start there) under a new run key."""
        shutil.copyfile(source, self.config_path)
        # the threads this process computes on: bits can differ by thread count (README)
        self.update_resolved({**resolved, "torch_threads": torch.get_num_threads()})
        identity = {"config_source": str(Path(source).absolute()), "run_key": uuid.uuid4().hex}
        write_json_atomic(self.path / RUN_FILE, identity)

    def update_resolved(self, values: dict[str, Any]) -> None:
        """Add ``values`` to ``resolved_config.json`` (e.g. what the nodes said at the start)."""
        path = self.path / "resolved_config.json"
        resolved = json.loads(path.read_text()) if path.exists() else {}
        write_json_atomic(path, {**resolved, **values})

    def identity(self) -> dict[str, str]:
        """``run.json``: the config's source and the run key; a run key is made for a run
        directory that has none (written before run keys, or never saved a config)."""
        path = self.path / RUN_FILE
        identity = json.loads(path.read_text()) if path.exists() else {}
        if "run_key" not in identity:
            identity["run_key"] = uuid.uuid4().hex
            write_json_atomic(path, identity)
        return identity

    @property
    def run_key(self) -> str:
        """Names this run to the nodes, which keep its client state under it across resumes."""
        return self.identity()["run_key"]

    @property
    def config_origin(self) -> Path | None:
        """The folder the run's ``config.toml`` was copied from, where its paths start."""
        source = self.identity().get("config_source")
        return Path(source).parent if source else None

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_finite(record), sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def drop_records_after(self, completed_round: int) -> None:
        """On resume, forget what a crashed round had logged: it will be redone."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= completed_round]
        tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def save_adapter(self, peft_model: Any, name: str = "adapter") -> Path:
        """Save in PEFT's format (loads with ``PeftModel.from_pretrained``), atomically."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(_finite(data), fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _finite(value: Any) -> Any:
    """JSON has no NaN: store non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
