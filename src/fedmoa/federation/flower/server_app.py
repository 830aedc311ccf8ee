"""The ServerApp: discover the nodes, then run the rounds through :class:`FedMOAStrategy`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, UserConfigValue
from flwr.serverapp import Grid, ServerApp

from fedmoa.errors import FedMOAError
from fedmoa.federation.config import load_experiment
from fedmoa.federation.flower.records import adapter_to_record
from fedmoa.federation.flower.roster import discover_clients
from fedmoa.federation.flower.settings import RunSettings, with_run_config
from fedmoa.federation.flower.strategy import FedMOAStrategy, RoundCallback
from fedmoa.federation.runtime import ServerRuntime
from fedmoa.runs import RunDirectory

logger = logging.getLogger(__name__)


def serve(grid: Grid, context: Context, on_round: RoundCallback | None = None) -> dict[str, Any]:
    """The ServerApp's body: run every round (after the last completed one, with ``resume``),
    then write the final adapters and summary."""
    settings = RunSettings.from_run_config(context.run_config)
    cfg = load_experiment(settings.experiment)
    if cfg.server.method == "centralized":
        raise FedMOAError("the centralized baseline runs on the embedded engine only")
    run = RunDirectory(settings.run_dir)
    if settings.resume:
        check_same_experiment(settings.experiment, run)
    else:
        run.save_config(settings.experiment, dataclasses.asdict(cfg))
    runtime = ServerRuntime(cfg, run)  # the server never opens a client's data
    roster = discover_clients(grid, cfg, settings.node_timeout)
    runtime.admit_clients({cid: entry.task for cid, entry in roster.items()})
    run.update_resolved({"node_torch_threads": {c: e.torch_threads for c, e in roster.items()}})
    done = runtime.resume() if settings.resume else 0
    if done:
        logger.info("resuming after round %d of %d", done, cfg.server.rounds)
    # server.round_timeout, when the experiment sets it, else the run config's reply-timeout:
    # replies that have not come by then (hung, slow or disconnected nodes) are dropped.
    timeout = cfg.server.round_timeout or settings.reply_timeout
    strategy = FedMOAStrategy(runtime, roster, reply_timeout=timeout, on_round=on_round)
    strategy.evaluate_round0(grid)
    planned = runtime.rounds_to_run  # server.rounds, or fewer within [privacy] max_epsilon
    if done < planned:
        strategy.start(
            grid,
            adapter_to_record(runtime.server.state.global_adapter),
            num_rounds=planned - done,  # Flower counts them from 1 (see the strategy)
            timeout=timeout,
        )
    return runtime.finish()


def check_same_experiment(experiment: Path, run: RunDirectory) -> None:
    """A resumed run goes on with the experiment it started with, or not at all."""
    if not run.config_path.is_file():
        raise FedMOAError(f"resume: {run.path} holds no run (no config.toml)")
    if experiment.read_bytes() != run.config_path.read_bytes():
        raise FedMOAError(
            f"resume: {experiment} differs from the run's {run.config_path}; resume with the "
            "experiment the run started with"
        )


def build_server_app(
    run_config: Mapping[str, UserConfigValue] | None = None,
    on_round: RoundCallback | None = None,
    on_finish: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve`, optionally with run-config overrides and callbacks."""

    def main(grid: Grid, context: Context) -> None:
        summary = serve(grid, context, on_round)
        if on_finish is not None:
            on_finish(summary)

    app = ServerApp()
    app.main()(with_run_config(main, run_config))
    return app


app = build_server_app()
"""The ServerApp for ``flwr run`` (``fedmoa.federation.flower.server_app:app``)."""
