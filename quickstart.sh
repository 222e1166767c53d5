#!/usr/bin/env bash
# One entry point for a fresh machine with only Python 3.11:
#   bash quickstart.sh demo   -> create .venv, install, run the main job on simulated data
#   bash quickstart.sh test   -> create .venv, install, run the test suite
# torch==2.13.0 is installed first on purpose: a looser requirement with nothing installed
# would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${BULKFM_VENV:-.venv}

ensure_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.bulkfm-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
ensure_env
case "$cmd" in
  demo) exec "$VENV/bin/bulkfm" run "$@" ;;
  test)
    # scGPT's real gene vocabulary ships in its PyPI package; its dependencies (torchtext)
    # do not work with this torch, and the tests only read the vocabulary file.
    if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('scgpt')" 2>/dev/null; then
      "$VENV/bin/python" -m pip install --quiet --no-deps "scgpt==0.2.4" ||
        echo "scgpt vocabulary not installed: its tests will skip" >&2
    fi
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac
