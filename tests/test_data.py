"""Tests for the data layer: sources, prompt building, errors and splits."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedmoa.data import DEFAULT_SYSTEM_PROMPT, DataConfig, load_rows, split_rows
from fedmoa.errors import ConfigError, DataError

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def data_error(cfg: DataConfig) -> str:
    """Load, expect a DataError, and return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        load_rows(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- reasoning-gym -------------------------------------------------------------------------


def test_reasoning_gym_rows_are_conversational_with_string_answers() -> None:
    rows = load_rows(DataConfig(size=8))
    assert len(rows) == 8
    for row in rows:
        assert row["prompt"] == [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": row["question"]},
        ]
        assert re.fullmatch(r"-?\d+", row["answer"])
        assert json.loads(row["metadata"])["source_dataset"] == "basic_arithmetic"


def test_reasoning_gym_is_deterministic_per_seed() -> None:
    cfg = DataConfig(size=32, seed=3)
    assert load_rows(cfg) == load_rows(DataConfig(size=32, seed=3))
    questions = {r["question"] for r in load_rows(cfg)}
    # Neighbouring seeds must not share rows (reasoning-gym alone seeds item i with seed + i).
    neighbour = {r["question"] for r in load_rows(DataConfig(size=32, seed=4))}
    assert not questions & neighbour


def test_easy_params_give_one_digit_two_term_problems_with_correct_answers() -> None:
    rows = load_rows(DataConfig(params=EASY, size=64))
    for row in rows:
        expression = re.fullmatch(r"Calculate (.+)\.", row["question"]).group(1)
        assert re.fullmatch(r"[\d\s()+\-*/]+", expression)
        assert len(re.findall(r"\d+", expression)) == 2
        assert all(len(n) == 1 for n in re.findall(r"\d+", expression))
        assert int(row["answer"]) == eval(expression)  # divisions are exact, operands are digits


def test_empty_system_prompt_gives_a_single_user_turn() -> None:
    row = load_rows(DataConfig(size=1, system_prompt=""))[0]
    assert row["prompt"] == [{"role": "user", "content": row["question"]}]


def test_reasoning_gym_rows_fit_an_arrow_table() -> None:
    datasets = pytest.importorskip("datasets")
    rows = load_rows(DataConfig(name="gsm_symbolic", size=12))  # rows 7, 11 hold Fractions
    assert datasets.Dataset.from_list(rows).num_rows == 12


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("basic_arithmetc", {}, "did you mean basic_arithmetic"),
        ("basic_arithmetic", {"bogus": 1}, "bogus"),
        ("basic_arithmetic", {"min_terms": 3, "max_terms": 2}, "max_terms must be >= min_terms"),
        ("basic_arithmetic", {"seed": 1}, "set seed in the data config"),
    ],
)
def test_reasoning_gym_bad_name_or_params(name: str, params: dict, expected: str) -> None:
    message = data_error(DataConfig(name=name, params=params, size=2))
    assert name in message
    assert expected in message


# --- config ----------------------------------------------------------------------------------


def test_config_rejects_unknown_source_and_fields() -> None:
    with pytest.raises(ValidationError, match="source"):
        DataConfig(source="csv")
    with pytest.raises(ValidationError, match="sise"):
        DataConfig(sise=3)  # type: ignore[call-arg]


# --- jsonl -----------------------------------------------------------------------------------


def test_jsonl_maps_columns_and_passes_others_through(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [{"problem": "1+1?", "solution": 2, "level": 1}, {"problem": "2+2?", "solution": "4"}],
    )
    cfg = DataConfig(
        source="jsonl", path=str(path), columns={"question": "problem", "answer": "solution"}
    )
    rows = load_rows(cfg)
    assert rows[0] == {
        "question": "1+1?",
        "answer": "2",
        "level": 1,
        "prompt": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "1+1?"},
        ],
    }
    assert rows[1]["answer"] == "4"
    assert rows == load_rows(cfg)


def test_jsonl_prompt_column_as_string_or_messages(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Hi", "test_list": ["assert f()"]},
            {"prompt": [user]},
            {"prompt": [system, user]},
        ],
    )
    rows = load_rows(DataConfig(source="jsonl", path=str(path), system_prompt="S"))
    default_system = {"role": "system", "content": "S"}
    assert rows[0] == {"prompt": [default_system, user], "test_list": ["assert f()"]}
    assert rows[1]["prompt"] == [default_system, user]
    assert rows[2]["prompt"] == [system, user]


def test_jsonl_gz_and_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5))
    rows = load_rows(DataConfig(source="jsonl", path=str(path), size=3))
    assert [r["question"] for r in rows] == ["q0", "q1", "q2"]


def test_jsonl_missing_file(tmp_path: Path) -> None:
    message = data_error(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")))
    assert "not found" in message
    assert "nope.jsonl" in message


def test_jsonl_needs_a_path() -> None:
    assert "needs a path" in data_error(DataConfig(source="jsonl"))


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a"}\n\n{"question": oops}\n', encoding="utf-8")
    message = data_error(DataConfig(source="jsonl", path=str(path)))
    assert "bad.jsonl line 3" in message
    assert "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [{"question": "a"}, ["question"]])
    assert "list.jsonl line 2: expected a JSON object" in data_error(
        DataConfig(source="jsonl", path=str(path))
    )


def test_jsonl_missing_mapped_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cols.jsonl", [{"text": "a"}])
    message = data_error(
        DataConfig(source="jsonl", path=str(path), columns={"question": "problem"})
    )
    assert "cols.jsonl line 1" in message
    assert "'problem'" in message
    assert "text" in message  # lists the columns that are there


def test_jsonl_without_question_or_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "none.jsonl", [{"text": "a"}])
    assert "'question'" in data_error(DataConfig(source="jsonl", path=str(path)))


def test_jsonl_bad_prompt_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad_prompt.jsonl", [{"prompt": [{"role": "bot", "content": 1}]}])
    assert "'prompt' must be" in data_error(DataConfig(source="jsonl", path=str(path)))


def test_jsonl_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    message = data_error(DataConfig(source="jsonl", path=str(path)))
    assert message.startswith("no rows from jsonl")
    assert "empty.jsonl" in message


# --- parquet ---------------------------------------------------------------------------------


def test_parquet_roundtrip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    messages = [{"role": "user", "content": "Write f."}]
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": messages, "test_list": ["assert f() == 1"], "task_id": 7}]
        ),
        tmp_path / "code.parquet",
    )
    rows = load_rows(DataConfig(source="parquet", path=str(tmp_path / "code.parquet")))
    assert rows == [
        {
            "prompt": messages,  # messages are used as written: no default system message
            "test_list": ["assert f() == 1"],
            "task_id": 7,
        }
    ]


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet", encoding="utf-8")
    assert "fake.parquet" in data_error(DataConfig(source="parquet", path=str(path)))


# --- hub -------------------------------------------------------------------------------------


def test_hub_offline_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables at import time, so patch the parsed values as well.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    message = data_error(DataConfig(source="hub", name="fedmoa-test/no-such-dataset"))
    assert "could not fetch hub dataset 'fedmoa-test/no-such-dataset'" in message
    assert "source='jsonl'" in message


# --- splits ----------------------------------------------------------------------------------

fractions = (
    st.lists(st.integers(0, 10), min_size=3, max_size=3)
    .filter(lambda w: sum(w) > 0)
    .map(lambda w: (w[0] / sum(w), w[1] / sum(w), 1 - (w[0] + w[1]) / sum(w)))
)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), fractions=fractions, seed=st.integers(0, 2**31))
def test_split_rows_disjoint_covering_deterministic(
    n: int, fractions: tuple[float, float, float], seed: int
) -> None:
    rows = list(range(n))
    train, val, test = split_rows(rows, fractions, seed)
    assert sorted(train + val + test) == rows
    assert (train, val, test) == split_rows(rows, fractions, seed)
    for part, fraction in zip((train, val, test), fractions, strict=True):
        assert abs(len(part) - fraction * n) <= 1


def test_split_rows_depends_on_seed() -> None:
    rows = list(range(100))
    assert split_rows(rows, seed=0) != split_rows(rows, seed=1)


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.8, 0.3, -0.1), (0.5, 0.2, 0.2)])
def test_split_rows_rejects_bad_fractions(bad: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        split_rows([1, 2, 3], bad)  # type: ignore[arg-type]
