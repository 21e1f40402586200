#!/usr/bin/env bash
# Create .venv (if needed) and install tokensieve with the RTX builder and test tools, pinned by constraints.txt.
# Idempotent: a second run only re-checks. Override the interpreter with PYTHON=python3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.tokensieve-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
echo "setting up $VENV (torch CPU, onnx, onnxruntime, transformers, tensorrt-rtx) ..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first and alone, so the CPU build is chosen before anything else can pull a CUDA build.
"$VENV/bin/python" -m pip install -q -c constraints.txt "torch==2.13.*"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[rtx,test]"
touch "$stamp"
echo "setup done: $("$VENV/bin/tokensieve" --version 2>/dev/null || echo tokensieve installed)" >&2
