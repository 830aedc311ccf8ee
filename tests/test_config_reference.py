"""``docs/configuration.md`` is generated from the config models and must match them."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date() -> None:
    reference = generator()
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == reference.render(), "run: python scripts/config_reference.py"


def test_every_key_has_a_one_line_meaning_and_a_row() -> None:
    reference = generator()
    assert reference.missing_meanings() == []
    text = reference.render()
    for _, root, tables in reference.FILES:
        for cls in [root, *(c for _, c in tables)]:
            for field in dataclasses.fields(cls):
                assert f"| `{field.name}` |" in text, f"{cls.__name__}.{field.name}"


def test_a_new_key_without_a_comment_is_caught() -> None:
    from pydantic.dataclasses import dataclass

    reference = generator()

    @dataclass
    class Probe:
        documented: int = 1  # a meaning
        # a block above
        above: int = 2
        bare: int = 3

    assert reference.field_comments(Probe) == {"documented": "a meaning", "above": "a block above"}


def test_readme_jsonl_client_loads(tmp_path: Path) -> None:
    """The README's JSONL client, as written, with its file and reward beside the experiment."""
    import json
    import re

    from fedmoa.federation.client import client_reward_funcs, load_client_data
    from fedmoa.federation.config import load_experiment

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "clinic-a" in b)
    rows = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(20)]
    (tmp_path / "clinic_a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_rewards.py").write_text(
        "def polite(prompts, completions, **kwargs):\n"
        "    return [float('please' in c[0]['content']) for c in completions]\n"
    )
    (tmp_path / "experiment.toml").write_text('[model]\nname = "tiny-random-qwen2"\n\n' + block)
    (client,) = load_experiment(tmp_path / "experiment.toml").clients
    data = load_client_data(client, "clients[0].data")
    assert len(data.train) == 16 and data.train[0]["answer"] in {r["solution"] for r in rows}
    assert [name for name, _ in client_reward_funcs(client, 0)] == ["correct", "polite"]
