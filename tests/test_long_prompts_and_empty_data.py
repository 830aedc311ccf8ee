"""Prompts longer than the model's context (left truncation) and empty client data (one line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmoa.data import DataConfig
from fedmoa.data.partition import PartitionConfig
from fedmoa.errors import ConfigError, DataError
from fedmoa.eval import evaluate_rows
from fedmoa.eval.evaluate import greedy_generate
from fedmoa.federation.client import load_client_data
from fedmoa.federation.config import ClientConfig, SplitConfig
from fedmoa.grpo.rollout import SamplingSettings, encode_prompts, generate_rollouts, prompt_budget

CPU = torch.device("cpu")
CONTEXT = 96


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": text}]


SHORT = chat("1 + 1 = ?")
LONG = chat("x" * 300 + " so 2 + 2 = ?")  # byte-level tokenizer: ~330 tokens


@pytest.fixture
def small_context(tiny_model_and_tokenizer: Any) -> tuple[Any, Any]:
    """The tiny model with a 96-token context (RoPE does not enforce it, so nothing else changes)."""
    model, tokenizer = tiny_model_and_tokenizer
    model.config.max_position_embeddings = CONTEXT
    return model, tokenizer


def test_prompt_budget_is_context_minus_new_tokens(small_context: tuple[Any, Any]) -> None:
    model, _ = small_context
    assert prompt_budget(model, 16) == CONTEXT - 16
    with pytest.raises(ConfigError, match=r"max_new_tokens = 96 leaves no room .* 96-token"):
        prompt_budget(model, CONTEXT)
    assert prompt_budget(object(), 16) is None  # a model that does not state its context


def test_short_prompts_are_encoded_as_before(small_context: tuple[Any, Any]) -> None:
    _, tokenizer = small_context
    plain = encode_prompts(tokenizer, [SHORT, chat("2 + 2 = ?")], CPU)
    budgeted = encode_prompts(tokenizer, [SHORT, chat("2 + 2 = ?")], CPU, max_length=80)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(plain[key], budgeted[key])


def test_long_prompts_keep_their_last_tokens(
    small_context: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, tokenizer = small_context
    full = encode_prompts(tokenizer, [LONG], CPU)["input_ids"][0]
    with caplog.at_level(logging.WARNING, logger="fedmoa.grpo.rollout"):
        encoded = encode_prompts(tokenizer, [SHORT, LONG], CPU, max_length=80)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids.shape == (2, 80)
    assert torch.equal(ids[1], full[-80:]) and mask[1].all()  # the end: question + header
    short = encode_prompts(tokenizer, [SHORT], CPU)["input_ids"][0]
    assert torch.equal(ids[0, -len(short) :], short) and mask[0].sum() == len(short)
    assert mask[0, : 80 - len(short)].sum() == 0  # left padding
    assert tokenizer.decode(ids[1]).endswith("so 2 + 2 = ?<|im_end|>\n<|im_start|>assistant\n")
    (record,) = caplog.records
    assert "1 of 2 prompts exceed the 80-token prompt budget" in record.getMessage()


def test_rollouts_fit_the_context(small_context: tuple[Any, Any]) -> None:
    model, tokenizer = small_context
    settings = SamplingSettings(group_size=2, max_new_tokens=8)
    rollout = generate_rollouts(model, tokenizer, [SHORT, LONG], settings)
    assert rollout.prompt_ids.shape[1] == CONTEXT - 8
    assert rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1] <= CONTEXT
    assert len(rollout.completions) == 4


def test_eval_generation_fits_the_context(
    small_context: tuple[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = small_context
    with caplog.at_level(logging.WARNING, logger="fedmoa.grpo.rollout"):
        gen = greedy_generate(model, tokenizer, [LONG, SHORT], max_new_tokens=6, batch_size=2)
    assert len(gen.texts) == 2 and all(n <= 6 for n in gen.num_tokens)
    assert any("prompt budget" in r.getMessage() for r in caplog.records)
    rows = [{"prompt": LONG, "answer": "4"}]
    funcs = [("len", lambda completions, **kw: [1.0] * len(completions))]
    assert evaluate_rows(model, tokenizer, rows, funcs, "len", 6).accuracy == 1.0


# ---------------------------------------------------------------------------- empty data


def client(data: DataConfig, split: SplitConfig | None = None) -> ClientConfig:
    return ClientConfig(
        id="lonely",
        task="math",
        rewards=[{"name": "acc", "function": "math_accuracy", "role": "primary"}],  # type: ignore[list-item]
        data=data,
        split=split or SplitConfig(),
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_error(cfg: ClientConfig, field: str = "clients[3].data") -> str:
    with pytest.raises(DataError) as info:
        load_client_data(cfg, field)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"client 'lonely' ({field}): "), message
    return message


def test_a_file_with_no_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    message = data_error(client(DataConfig(source="jsonl", path=path)))
    assert "no rows from jsonl" in message and path in message


def test_an_empty_partition(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": "1", "subject": "algebra"} for i in range(6)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    by_label = PartitionConfig(scheme="by_label", label="subject", value="geometry")
    message = data_error(client(DataConfig(source="jsonl", path=path, partition=by_label)))
    assert "no row has partition.label 'subject' equal to partition.value 'geometry'" in message
    too_many = PartitionConfig(scheme="iid", num_partitions=10, partition_id=9)
    message = data_error(client(DataConfig(source="jsonl", path=path, partition=too_many)))
    assert "cannot split 6 rows into partition.num_partitions = 10" in message


def test_an_empty_dirichlet_partition(tmp_path: Path) -> None:
    """Label skew can leave a client without rows: an error for that client, with a hint."""
    rows = [{"question": f"q{i}", "answer": "1", "subject": "algebra"} for i in range(4)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    messages = []
    for pid in range(4):
        part = PartitionConfig(
            scheme="dirichlet", num_partitions=4, partition_id=pid, label="subject", alpha=0.05
        )
        try:
            load_client_data(client(DataConfig(source="jsonl", path=path, partition=part)))
        except DataError as err:
            messages.append(str(err))
    assert messages, "alpha = 0.05 over 4 rows should leave some partition empty"
    assert all(m.startswith("client 'lonely' (data): ") and "is empty" in m for m in messages)


def test_an_empty_train_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "two.jsonl", [{"question": "q", "answer": "1"}] * 2)
    split = SplitConfig(train=0.2, validation=0.4, test=0.4)
    message = data_error(client(DataConfig(source="jsonl", path=path), split))
    assert "empty train split: split.train = 0.2 of 2 rows" in message


def test_a_small_but_usable_client_loads(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "1"}])
    data = load_client_data(client(DataConfig(source="jsonl", path=path)))
    assert len(data.train) == 1 and data.validation == [] and data.test == []
