"""A node's client state (weighting, prompt sampler) in files of its own, per run and round.

Flower's ``context.state`` lives as long as a SuperNode's process; a file outlives a
restarted ServerApp, SuperNode or machine, and nothing of a client's state has to live on
the server. After training round ``r`` the node writes ``round-{r}.pt``; a ``train``
message for round ``r`` starts from the newest file of an earlier round. A ServerApp that
died during round ``r`` and resumed after round ``r - 1`` asks for round ``r`` again, and
the node starts it from the same state as the first time.

Where the files live:

* a node with its own client file: beside it, ``<client file>.state/<run key>/``;
* the one-file form (client ``partition-id`` of the experiment, the simulation):
  ``<run dir>/client-state/<run key>/<client id>/``.

The run key (``RunDirectory.run_key``) is new for every fresh run and kept by a resumed one,
so two runs of the same client file never share a state.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fedmoa.errors import FedMOAError
from fedmoa.federation.checkpoint import save_atomic

PATTERN = "round-{:04d}.pt"
_ROUND = re.compile(r"round-(\d+)\.pt")


def state_folder(
    client_id: str, run_key: str, client_file: str | None, run_dir: Path | None
) -> Path:
    """Where this node keeps ``client_id``'s state for the run ``run_key``: beside
    ``client_file`` when it has one, else in ``run_dir``."""
    if not re.fullmatch(r"[0-9a-zA-Z_-]+", run_key):
        raise FedMOAError(f"the server sent a malformed run key {run_key!r}")
    if client_file is not None:
        file = Path(client_file)
        return file.with_name(f"{file.name}.state") / run_key
    if run_dir is None:
        raise FedMOAError(f"client {client_id!r}: no client file and no run directory")
    return run_dir / "client-state" / run_key / client_id


def _saved_rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    found = (_ROUND.fullmatch(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def load_state(folder: Path, server_round: int) -> tuple[int, dict[str, Any] | None]:
    """The newest state written before ``server_round`` and its round; ``(0, None)`` when the
    client has not trained yet in this run."""
    earlier = [r for r in _saved_rounds(folder) if r < server_round]
    if not earlier:
        return 0, None
    path = folder / PATTERN.format(earlier[-1])
    try:
        return earlier[-1], torch.load(path, weights_only=True)
    except Exception as err:
        raise FedMOAError(f"{path}: the client state does not load ({err})") from None


def save_state(folder: Path, server_round: int, state: dict[str, Any], started_from: int) -> None:
    """Write the state after ``server_round``; drop the files older than the one this round
    started from (a resumed round starts from that one again, never from an older one)."""
    save_atomic(folder / PATTERN.format(server_round), state)
    for old in _saved_rounds(folder):
        if old < started_from:
            (folder / PATTERN.format(old)).unlink(missing_ok=True)
