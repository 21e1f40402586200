#!/usr/bin/env bash
# The main job on the bundled default model: export -> verify -> build (TensorRT-RTX, sm86) -> benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tokensieve export --model default --prune cls-topk@3,6,9:0.7 -o out "$@"
