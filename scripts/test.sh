#!/usr/bin/env bash
# Set up and run the test suite (GPU / full-TensorRT tests skip themselves without the hardware).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, whole test files each (module-scoped exports are not repeated); TOKENSIEVE_TEST_WORKERS=0: serial.
exec .venv/bin/python -m pytest -q -n "${TOKENSIEVE_TEST_WORKERS:-2}" --dist loadfile "$@"
