"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedmoa.models import tiny_random_model

# Tiny random models generate ~20x slower on CPU when denormals are not flushed.
torch.set_flush_denormal(True)

# Inductor compiles C++ on the CPU; without a compiler ``decode = "compiled"`` falls back to eager
# (tested apart), so the tests that need a real compile say why they are skipped.
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)


@pytest.fixture
def tiny_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh tiny random Qwen2 (fp32, seed 0) and its byte-level ChatML tokenizer."""
    return tiny_random_model("qwen2", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tmp_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fedmoa cache root shared by the session, so a model converted once is reused."""
    return tmp_path_factory.mktemp("fedmoa-cache")
