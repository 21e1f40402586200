#!/usr/bin/env bash
# Set up and run the test suite (GPU / full-TensorRT tests skip themselves without the hardware).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
