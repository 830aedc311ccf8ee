"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedmoa.models import tiny_random_model

# Tiny random models generate ~20x slower on CPU when denormals are not flushed.
torch.set_flush_denormal(True)


@pytest.fixture
def tiny_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh tiny random Qwen2 (fp32, seed 0) and its byte-level ChatML tokenizer."""
    return tiny_random_model("qwen2", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tmp_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fedmoa cache root shared by the session, so a model converted once is reused."""
    return tmp_path_factory.mktemp("fedmoa-cache")
