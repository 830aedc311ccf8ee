"""What the apps read from Flower: run config keys, node config keys, and the environment.

The experiment file and the run directory reach both apps through the run config
(:data:`EXPERIMENT_KEY`, :data:`RUN_DIR_KEY`); a node names its client in its node config
(:data:`CLIENT_CONFIG_KEY` or :data:`PARTITION_ID`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, UserConfigValue

from fedmoa.errors import FedMOAError
from fedmoa.federation.config import load_experiment

# Run config keys (``[tool.flwr.app.config]`` in examples/flower_app/pyproject.toml).
EXPERIMENT_KEY = "experiment"  # absolute path of the experiment TOML
RUN_DIR_KEY = "run-dir"  # absolute path of the run directory; "" = the experiment's output_dir
REPLY_TIMEOUT_KEY = "reply-timeout"  # seconds the server waits for a round's replies
NODE_TIMEOUT_KEY = "node-timeout"  # seconds the server waits for enough SuperNodes
RESUME_KEY = "resume"  # true: continue the run in run-dir after its last completed round

# Node config keys (``flower-supernode --node-config``).
CLIENT_CONFIG_KEY = "client-config"  # path of the node's own client file
PARTITION_ID = "partition-id"  # or: client i of the experiment file (the one-file form)

FLOWER_ENV = {
    # Without it Flower builds a fresh environment per run with uv (and downloads CUDA torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

RoundCallback = Callable[[int, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class RunSettings:
    """What the apps read from Flower's run config."""

    experiment: Path
    run_dir: Path
    reply_timeout: float = 3600.0
    node_timeout: float = 300.0
    resume: bool = False

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, UserConfigValue]) -> RunSettings:
        """Absolute paths only: the ServerApp and ClientApps do not run in the user's cwd."""
        raw = str(run_config.get(EXPERIMENT_KEY) or "")
        experiment = Path(raw).expanduser()
        if not raw or not experiment.is_absolute():
            raise FedMOAError(
                f"the run config needs {EXPERIMENT_KEY!r}, the absolute path of the experiment "
                f"TOML (got {raw!r}): --run-config \"{EXPERIMENT_KEY}='/abs/experiment.toml'\""
            )
        raw_run_dir = str(run_config.get(RUN_DIR_KEY) or "")
        if raw_run_dir:
            run_dir = Path(raw_run_dir).expanduser()
            if not run_dir.is_absolute():
                raise FedMOAError(
                    f"the run config's {RUN_DIR_KEY!r} must be an absolute path (got "
                    f"{raw_run_dir!r}): the ServerApp does not run in the user's cwd"
                )
        else:  # the experiment's output_dir, relative to the experiment file
            run_dir = experiment.parent / load_experiment(experiment).output_dir
        resume = run_config.get(RESUME_KEY, False)
        if not isinstance(resume, bool):
            raise FedMOAError(
                f"the run config's {RESUME_KEY!r} must be true or false (got {resume!r})"
            )
        return cls(
            experiment,
            run_dir,
            float(run_config.get(REPLY_TIMEOUT_KEY, cls.reply_timeout)),
            float(run_config.get(NODE_TIMEOUT_KEY, cls.node_timeout)),
            resume,
        )


def with_run_config(
    handler: Callable[..., Any], run_config: Mapping[str, UserConfigValue] | None
) -> Callable[..., Any]:
    """``handler`` with ``run_config`` merged into ``context.run_config`` first.

    ``flwr.simulation.run_simulation`` has no run-config argument; this is how the
    in-process simulation passes the same keys that ``flwr run --run-config`` would.
    Flower forbids changing ``context.run_config``, so the handler gets a copy of the
    context that shares its ``state`` (what the handler writes there persists).
    """
    if not run_config:
        return handler
    overrides = dict(run_config)

    def wrapped(first: Any, context: Context, *args: Any) -> Any:
        merged = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**context.run_config, **overrides},
            series_id=context.series_id,
        )
        return handler(first, merged, *args)

    return wrapped


@contextlib.contextmanager
def flower_environment(flwr_home: Path) -> Iterator[None]:
    """Flower's offline settings and ``FLWR_HOME`` for the duration of a run, then restored."""
    values = {**FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
