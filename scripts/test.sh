#!/usr/bin/env bash
# Set up and run the test suite (GPU / full-TensorRT tests skip themselves without the hardware).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Downloads happen here, never at test time: TensorRT headers, transformers 4.57 pins (tests/assets.py). A failed
# fetch is reported; the tests that need the asset then skip naming this command (and fail under CI=true).
.venv/bin/python tests/assets.py fetch || echo "warning: test assets not fetched (see above); tests needing them skip" >&2
# Two workers, whole test files each (module-scoped exports are not repeated); TOKENSIEVE_TEST_WORKERS=0: serial.
exec .venv/bin/python -m pytest -q -n "${TOKENSIEVE_TEST_WORKERS:-2}" --dist loadfile "$@"
