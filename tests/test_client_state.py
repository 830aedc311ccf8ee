"""A node's client state in files of its own: per run key, per round, bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fedmoa.errors import FedMOAError
from fedmoa.federation.flower.client_state import load_state, save_state, state_folder


def weighting_state(seed: int) -> dict:
    rng = random.Random(seed)
    rng.random()
    return {
        "weighting": {
            "z": torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64) * seed,
            "cached_grads": torch.randn(3, 5, generator=torch.Generator().manual_seed(seed)),
            "steps": seed,
            "flag": True,
        },
        "sampler": {"order": [3, 0, 2, 1], "rng": rng.getstate(), "position": None},
    }


def test_folders_beside_the_client_file_or_in_the_run_directory(tmp_path: Path) -> None:
    own = state_folder("a", "k1", str(tmp_path / "owner" / "client.toml"), tmp_path / "run")
    assert own == tmp_path / "owner" / "client.toml.state" / "k1"
    shared = state_folder("a", "k1", None, tmp_path / "run")
    assert shared == tmp_path / "run" / "client-state" / "k1" / "a"
    with pytest.raises(FedMOAError, match="malformed run key"):
        state_folder("a", "../escape", None, tmp_path)


def test_a_round_starts_from_the_newest_state_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    assert load_state(folder, 1) == (0, None)
    save_state(folder, 1, weighting_state(1), started_from=0)
    save_state(folder, 3, weighting_state(3), started_from=1)  # not sampled in round 2
    started, state = load_state(folder, 4)
    assert started == 3
    want = weighting_state(3)
    for key in ("z", "cached_grads"):
        got = state["weighting"][key]
        assert got.dtype == want["weighting"][key].dtype
        assert torch.equal(got, want["weighting"][key])
    assert state["sampler"] == want["sampler"]  # the RNG state as it was, tuples and all
    restored, original = random.Random(), random.Random()
    restored.setstate(state["sampler"]["rng"])
    original.setstate(want["sampler"]["rng"])
    assert restored.random() == original.random()
    # A resumed round 3 (the server died before checkpointing it) starts where it first did.
    assert load_state(folder, 3)[0] == 1
    # Writing round 4 from round 3 drops round 1: no round can start from it any more.
    save_state(folder, 4, weighting_state(4), started_from=3)
    assert sorted(p.name for p in folder.iterdir()) == ["round-0003.pt", "round-0004.pt"]


def test_an_unreadable_state_names_its_file(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "round-0002.pt").write_bytes(b"not a torch file")
    with pytest.raises(FedMOAError, match=r"round-0002\.pt: the client state does not load"):
        load_state(folder, 5)
