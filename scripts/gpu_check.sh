#!/usr/bin/env bash
# The GPU check of issue 17 in one run (about 7 minutes on an H200; no network needed):
#
#   scripts/gpu_check.sh OUTDIR [--dry-run] [--tiny] [more options of `python -m tokensieve.scripts.gpu_check`]
#
# Installs tokensieve from this working tree with `pip install --no-deps -e .` when the Python at $PYTHON (default
# python3) cannot import it (no dependencies are fetched: torch, transformers, onnx, ... must be there already); if
# that install fails offline, it runs from the tree through a small path shim instead. Then it runs
# tokensieve.scripts.gpu_check, which writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md.
# GPU_CHECK_INSTALL=shim forces the shim, GPU_CHECK_INSTALL=none uses whatever `import tokensieve` finds.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 OUTDIR [--dry-run] [--tiny] [options of python -m tokensieve.scripts.gpu_check]" >&2
  exit 2
fi
OUT="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MODE="${GPU_CHECK_INSTALL:-auto}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

use_shim() {
  # tokensieve's folders map onto the package by pyproject's package-dir (core/ -> tokensieve, exporter/ ->
  # tokensieve.exporter, ...): a package whose __path__ is [core/, the tree] resolves every one of them.
  local shim="$OUT/.shim"
  mkdir -p "$shim/tokensieve"
  cat > "$shim/tokensieve/__init__.py" <<PYEOF
# Path shim written by scripts/gpu_check.sh: tokensieve from the working tree $ROOT without installing it.
import os as _os
_root = "$ROOT"
__path__ = [_os.path.join(_root, "core"), _root]
__file__ = _os.path.join(_root, "core", "__init__.py")
with open(__file__) as _f:
    exec(compile(_f.read(), __file__, "exec"))
PYEOF
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "[gpu_check.sh] using the path shim $shim/tokensieve -> $ROOT"
}

is_ours() {  # the importable tokensieve is this tree's
  "$PY" - "$ROOT" <<'PYEOF' 2>/dev/null
import sys, pathlib, tokensieve.api
root = pathlib.Path(sys.argv[1]).resolve()
sys.exit(0 if root in pathlib.Path(tokensieve.api.__file__).resolve().parents else 1)
PYEOF
}

case "$MODE" in
  shim) use_shim ;;
  none) ;;
  auto)
    if ! is_ours; then
      echo "[gpu_check.sh] pip install --no-deps --no-build-isolation -e $ROOT (log: $OUT/pip_install.log)"
      if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT" >"$OUT/pip_install.log" 2>&1 \
          || ! is_ours; then
        echo "[gpu_check.sh] the editable install did not work (see $OUT/pip_install.log)"
        use_shim
      fi
    fi ;;
  *) echo "GPU_CHECK_INSTALL=$MODE: use auto, shim or none" >&2; exit 2 ;;
esac
is_ours || { echo "[gpu_check.sh] cannot import tokensieve from $ROOT with $PY" >&2; exit 2; }

if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true; fi
# A hard stop a little after the script's own budget (default 420 s), so the run always ends inside 8 minutes.
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" -m tokensieve.scripts.gpu_check "$OUT" "$@"
