"""Flower's Ray simulation of an experiment: one virtual SuperNode per client, in this process."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from fedmoa.errors import ConfigError, FedMOAError
from fedmoa.federation.config import ExperimentConfig, load_experiment
from fedmoa.federation.flower.client_app import build_client_app
from fedmoa.federation.flower.server_app import build_server_app
from fedmoa.federation.flower.settings import (
    EXPERIMENT_KEY,
    RESUME_KEY,
    RUN_DIR_KEY,
    flower_environment,
)
from fedmoa.federation.flower.strategy import RoundCallback
from fedmoa.models import resolve_device


def client_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Ray resources per SuperNode: one CPU, and a whole GPU when the model runs on CUDA (one
    client per GPU at a time, so two actors never hold two model copies on one device)."""
    on_gpu = resolve_device(cfg.model.device).type == "cuda"
    return {"num_cpus": 1, "num_gpus": 1.0 if on_gpu else 0.0}


def run_simulation(
    experiment: str | Path,
    run_dir: str | Path,
    *,
    on_round: RoundCallback | None = None,
    flwr_home: str | Path | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``experiment`` on Flower's Ray simulation, one virtual SuperNode per client.

    Writes the same run directory as the embedded engine and returns its summary;
    ``resume`` continues the run in ``run_dir`` after its last completed round.
    ``FLWR_HOME`` is a temporary folder unless ``flwr_home`` is given.
    """
    from flwr.simulation import run_simulation as flower_run_simulation

    experiment, run_dir = Path(experiment).resolve(), Path(run_dir).resolve()
    cfg = load_experiment(experiment)
    if not cfg.clients:
        raise ConfigError(
            f"{experiment}: clients: the simulation runs the clients the experiment lists, and "
            "it lists none (server.num_clients is for a deployment's own client files)"
        )
    run_config = {EXPERIMENT_KEY: str(experiment), RUN_DIR_KEY: str(run_dir), RESUME_KEY: resume}
    summaries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        home = (
            Path(flwr_home)
            if flwr_home
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        stack.enter_context(flower_environment(home))
        flower_run_simulation(
            server_app=build_server_app(run_config, on_round, summaries.append),
            client_app=build_client_app(run_config),
            num_supernodes=len(cfg.clients),
            backend_config={"client_resources": client_resources(cfg)},
            verbose_logging=verbose,
        )
    if not summaries:
        raise FedMOAError("the Flower simulation ended before the ServerApp finished; see its log")
    return summaries[0]
