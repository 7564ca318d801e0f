#!/usr/bin/env bash
# Creates .venv (once) and installs fast-dvla with its test, training and LIBERO
# extras. Sourced by the README's two commands; re-runs skip work already done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FAST_DVLA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.fast-dvla-installed"
want="$(cat "$ROOT/setup.py" | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing (torch 2.13.0 CPU first: an open range would pull a multi-GB CUDA build)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -e "$ROOT[test,train,libero]" 2>&1 | grep -v "is ignored" || true
  python -c "import torch, transformers, triton, fast_dvla" # fail loudly if the install did not take
  echo "$want" > "$stamp"
fi
