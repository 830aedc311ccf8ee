"""Read a federation's run directory into a ``RunRecord``: pure, no plotting.

The run directory is the one ``fedmoa run`` writes (``fedmoa.runs.RunDirectory``):
``metrics.jsonl`` holds, per round, one ``client`` record per client, one ``round``
record and, on evaluation rounds, one ``eval`` record; ``summary.json`` is written
when the run finishes; ``resolved_config.json`` (else ``config.toml``) gives the
method and the seed. Clients log the last local step of each round only, so weight
and reward trajectories are per round.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoa.errors import DataError
from fedmoa.eval.evaluate import hypervolume
from fedmoa.jsonl import iter_jsonl
from fedmoa.weighting.config import resolve_method

# client id -> objective -> round -> value
Trajectories = dict[str, dict[str, dict[int, float]]]


@dataclass
class RunRecord:
    """What a report needs from one run; every per-round mapping is keyed by server round."""

    path: Path
    method: str
    seed: int
    rounds: int  # the last round with a record
    clients: dict[str, str] = field(default_factory=dict)  # client id -> task
    primary: dict[str, str] = field(default_factory=dict)  # client id -> primary objective
    global_accuracy: dict[int, float] = field(default_factory=dict)
    task_accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # global, per task
    personal_accuracy: dict[int, float] = field(default_factory=dict)  # mean over clients
    client_accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # personalized
    weights: Trajectories = field(default_factory=dict)
    rewards: Trajectories = field(default_factory=dict)  # training reward means
    alignment: Trajectories = field(default_factory=dict)
    shares: dict[str, dict[int, float]] = field(default_factory=dict)  # client's weight per round
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # round, client, reason
    final_global_accuracy: float = math.nan
    final_personal_accuracy: float = math.nan
    final_local_model_accuracy: float = math.nan  # NaN: the run did not score local models
    final_hypervolume: float = math.nan  # of the personalized per-objective test reward means
    # round 0: the starting adapter (NaN: the run did not evaluate it, server.eval_round0)
    base_global_accuracy: float = math.nan
    base_personal_accuracy: float = math.nan
    base_hypervolume: float = math.nan
    # evaluation-only checks, final and round 0: "global/checks/<name>" and
    # "personal/checks/<name>" -> value (``[[clients]] checks``)
    final_checks: dict[str, float] = field(default_factory=dict)
    epsilon: float = math.nan  # ε after the last round (central DP); NaN: not a private run
    base_checks: dict[str, float] = field(default_factory=dict)
    finished: bool = False  # summary.json is present

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(self.clients.values()))


def load_runs(paths: list[Path] | list[str]) -> list[RunRecord]:
    if not paths:
        raise DataError("no run directories given")
    return [load_run(p) for p in paths]


def load_run(path: str | Path) -> RunRecord:
    """Load one run directory; a missing or malformed file is a ``DataError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"run directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"not a run directory: {path} is a file")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        hint = (
            " (it holds a report.md: a report, not a run)" if (path / "report.md").exists() else ""
        )
        raise DataError(f"{metrics_path}: not found, so {path} is not a run directory{hint}")
    records = read_records(metrics_path)
    summary = _read_json(path / "summary.json")
    method, seed, clients, primary = _read_config(path, summary)
    run = RunRecord(path=path, method=method, seed=seed, rounds=0, primary=primary)
    run.clients.update(clients)
    for lineno, record in records:
        where = f"{metrics_path} line {lineno}"
        kind = record.get("type")
        if kind not in ("client", "round", "eval"):
            continue  # a record type this report does not use
        server_round = record.get("round")
        if not isinstance(server_round, int) or isinstance(server_round, bool):
            raise DataError(f"{where}: {kind} record without an integer 'round'")
        run.rounds = max(run.rounds, server_round)
        if kind == "client":
            _add_client(run, record, server_round, where)
        elif kind == "round":
            if "privacy/epsilon" in record:
                run.epsilon = _number(record, "privacy/epsilon", where)
            run.bytes_up[server_round] = int(_number(record, "bytes_up", where, 0))
            run.bytes_down[server_round] = int(_number(record, "bytes_down", where, 0))
            weights = record.get("client_weights")
            for client in weights if isinstance(weights, dict) else ():
                share = _number(weights, client, f"{where}: client_weights")
                run.shares.setdefault(client, {})[server_round] = share
        else:
            _add_eval(run, record, server_round, where)
    final = (summary or {}).get("final_eval")
    if not isinstance(final, dict):
        evals = [r for _, r in records if r.get("type") == "eval"]
        final = evals[-1] if evals else {}
    where = f"{path / 'summary.json'}: final_eval" if summary else str(metrics_path)
    run.final_global_accuracy = _number(final, "global/accuracy", where)
    run.final_personal_accuracy = _number(final, "personal/accuracy", where)
    run.final_local_model_accuracy = _number(final, "local_model/accuracy", where)
    run.final_hypervolume = _number(final, "personal/hypervolume", where)
    if math.isnan(run.final_hypervolume):  # runs from before it was logged
        run.final_hypervolume = _mean_hypervolume(final, list(run.clients))
    run.final_checks = _checks(final, where)
    base = next((r for _, r in records if r.get("type") == "eval" and r.get("round") == 0), None)
    if base is not None:
        where = f"{metrics_path}: round 0"
        run.base_global_accuracy = _number(base, "global/accuracy", where)
        run.base_personal_accuracy = _number(base, "personal/accuracy", where)
        run.base_hypervolume = _number(base, "personal/hypervolume", where)
        run.base_checks = _checks(base, where)
    run.finished = summary is not None
    return run


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line; a bad line names file and line."""
    try:
        return list(iter_jsonl(path))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None


def _add_client(run: RunRecord, record: dict[str, Any], server_round: int, where: str) -> None:
    client = record.get("client")
    if not isinstance(client, str):
        raise DataError(f"{where}: client record without a 'client' id")
    if "failed" in record:
        run.failures.append((server_round, client, str(record["failed"])))
        return
    if isinstance(record.get("task"), str):
        run.clients.setdefault(client, record["task"])
    for key in record:
        if key.startswith("weights/"):
            target, name = run.weights, key.removeprefix("weights/")
        elif key.startswith("alignment/"):
            target, name = run.alignment, key.removeprefix("alignment/")
        elif key.startswith("rewards/") and key.endswith("/mean"):
            target, name = run.rewards, key.removeprefix("rewards/").removesuffix("/mean")
        else:
            continue
        target.setdefault(client, {}).setdefault(name, {})[server_round] = _number(
            record, key, where
        )


def _add_eval(run: RunRecord, record: dict[str, Any], server_round: int, where: str) -> None:
    run.global_accuracy[server_round] = _number(record, "global/accuracy", where)
    run.personal_accuracy[server_round] = _number(record, "personal/accuracy", where)
    for task in run.tasks:
        key = f"global/{task}/accuracy"
        if key in record:
            run.task_accuracy.setdefault(task, {})[server_round] = _number(record, key, where)
    for client in run.clients:
        key = f"personal/{client}/accuracy"
        if key in record:
            run.client_accuracy.setdefault(client, {})[server_round] = _number(record, key, where)


def _checks(record: dict[str, Any], where: str) -> dict[str, float]:
    """The global and personalized aggregates of every check in an eval record."""
    return {
        key: _number(record, key, where)
        for key in record
        if key.startswith(("global/checks/", "personal/checks/"))
    }


def _mean_hypervolume(record: dict[str, Any], clients: list[str]) -> float:
    """Mean over clients of the hypervolume of each one's logged personalized reward means."""
    volumes = []
    for client in clients:
        prefix = f"personal/{client}/rewards/"
        means = [
            v for k, v in record.items() if k.startswith(prefix) and isinstance(v, float | int)
        ]
        if means:
            volumes.append(hypervolume(float(v) for v in means))
    kept = [v for v in volumes if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _number(record: dict[str, Any], key: str, where: str, default: float = math.nan) -> float:
    """A numeric field; JSON null (how the run stores NaN) and a missing key read as ``default``."""
    value = record.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {key!r} should be a number, got {value!r}")
    return float(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _read_config(
    path: Path, summary: dict[str, Any] | None
) -> tuple[str, int, dict[str, str], dict[str, str]]:
    """Method, seed, client tasks and primary objectives: from the fully defaulted config,
    else the user's TOML (with the experiment defaults), else ``summary.json``'s method."""
    config = _read_json(path / "resolved_config.json")
    source = path / "resolved_config.json"
    if config is None and (path / "config.toml").is_file():
        source = path / "config.toml"
        try:
            config = tomllib.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise DataError(f"{source}: cannot read: {err}") from None
    if config is None:
        if summary is None or not isinstance(summary.get("method"), str):
            raise DataError(
                f"{path}: no resolved_config.json, config.toml or summary.json names the method"
            )
        return summary["method"], 0, {}, {}
    server = config.get("server") or {}
    method = server.get("method", "fedmoa") if isinstance(server, dict) else None
    seed = config.get("seed", 0)
    if not isinstance(method, str) or not isinstance(seed, int):
        raise DataError(f"{source}: server.method must be a string and seed an integer")
    weighting = config.get("weighting") or config.get("hypergradient") or {}
    chosen = weighting.get("method", "auto") if isinstance(weighting, dict) else "auto"
    if isinstance(chosen, str) and chosen not in ("auto", resolve_method("auto", method)):
        method = f"{method}+{chosen}"  # e.g. fedavg+saw: its own row, not fedavg's
    method += _variant_label(config, resolved=source.suffix == ".json")
    clients, primary = {}, {}
    for client in config.get("clients") or []:
        if isinstance(client, dict) and isinstance(client.get("id"), str):
            clients[client["id"]] = str(client.get("task", client["id"]))
            for reward in client.get("rewards") or []:
                if isinstance(reward, dict) and reward.get("role") == "primary":
                    primary[client["id"]] = str(reward.get("name"))
    return method, seed, clients, primary


def _variant_label(config: dict[str, Any], resolved: bool) -> str:
    """``+gate``, ``+harm(z=2.33)`` and ``+dp(ε=8)``: settings that change what a method computes get their own
    row, so runs with and without them can share one report and be paired seed by seed.

    ``+harm(z=2.33, record)``: the harm test read the client's record (``either``: both). A fully defaulted
    (``resolved``) config without ``accuracy_harm_evidence`` was written before the key
    existed, when the test always read the record; a user's TOML without it has the default.
    """
    label = ""
    defaults = config.get("client_defaults") or {}
    default_gate = (defaults.get("grpo") or {}).get("auxiliary_gate", "none")
    gates = [
        (client.get("grpo") or {}).get("auxiliary_gate", default_gate)
        for client in config.get("clients") or []
        if isinstance(client, dict)
    ]
    if any(gate not in (None, "none") for gate in gates):
        label += "+gate"
    server = config.get("server") or {}
    harm_z = server.get("accuracy_harm_z")
    if harm_z is not None:
        evidence = server.get("accuracy_harm_evidence", "record" if resolved else "round")
        label += f"+harm(z={harm_z:g}{'' if evidence == 'round' else f', {evidence}'})"
    privacy = config.get("privacy")
    if isinstance(privacy, dict):
        where = "" if privacy.get("where", "server") == "server" else ", local"
        if privacy.get("target_epsilon") is not None:
            label += f"+dp(ε={privacy['target_epsilon']:g}{where})"
        else:
            label += f"+dp(z={privacy.get('noise_multiplier')}{where})"
    return label
