#!/usr/bin/env bash
# Creates .venv (once) and installs fast-dvla with its test, training and LIBERO
# extras at the exact versions of scripts/constraints.txt, the set the tests last
# passed with (scripts/refresh_lock.sh re-resolves it). Sourced by the README's two
# commands; a re-run skips the install unless setup.py or the lock changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FAST_DVLA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
LOCK="${FAST_DVLA_LOCK-$ROOT/scripts/constraints.txt}"  # empty: resolve the newest versions setup.py allows
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_quiet() {  # pip without its progress noise; its errors still fail the set-up
  python -m pip install -q --disable-pip-version-check ${LOCK:+-c "$LOCK"} "$@" 2>&1 | { grep -v "is ignored" || true; }
  return "${PIPESTATUS[0]}"
}
stamp="$VENV/.fast-dvla-installed"
want="$(cat "$ROOT/setup.py" ${LOCK:+"$LOCK"} | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  started=$SECONDS
  echo "[setup] installing into $VENV (${LOCK:-newest allowed versions})"
  # torch 2.13.0 (CPU) first: left to the resolver, it would pull a multi-GB CUDA build
  pip_quiet torch==2.13.0
  pip_quiet -e "$ROOT[test,train,libero,calvin]"
  # fail loudly if the install did not take; from the root, as a user runs it
  (cd "$ROOT" && python -c "import torch, transformers, triton, fast_dvla, fast_dvla_kernels, fast_dvla_eval
from transformers import LlamaModel, Qwen2Model")
  echo "$want" > "$stamp"
  echo "[setup] done in $((SECONDS - started)) s: torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')"
fi
