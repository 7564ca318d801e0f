#!/usr/bin/env bash
# One prepared GPU check (issue 27), sized to finish in under 8 minutes on one H100:
#   1. Python: see setup_python below;
#   2. the Triton kernel and flash-attn (when importable) against SDPA: fp16/bf16, grouped-query
#      heads, ragged cache lengths, the engine's shapes; the engine on Triton against SDPA;
#   3. fast-dvla bench-kernels, and fast-dvla micro-bench (every decoder) for the shipped pair and
#      a 7B-shaped backbone slice (hidden 4096, 32 heads, 8 KV heads, 2 layers, bf16);
#   4. OUT/summary.json and OUT/summary.md (rewritten after each step), OUT/kernels.{json,md}.
# The steps are scripts/gpu_check.py; this script only picks the Python and the folder.
#
#   bash scripts/gpu_check.sh [--out DIR]     # on a CUDA machine; DIR defaults to outputs/gpu_check/<date>
#   bash scripts/gpu_check.sh --dry-run       # the same steps on the CPU at tiny sizes (CI runs this, ~20 s)
#
# Which Python (setup_python). The project's own set-up (scripts/setup_env.sh) installs the CPU
# wheel of torch 2.13.0, and the lock pins torch==2.13.0+cpu, so it cannot serve a GPU run as is.
#   - FAST_DVLA_PYTHON=/path/to/python: used as it is (it must import torch, transformers, triton).
#   - --dry-run: the project's .venv via scripts/setup_env.sh (CPU torch, as CI).
#   - a python3 whose torch already sees a GPU (the usual GPU image: CUDA torch, triton and
#     transformers preinstalled, often with no route to a package index): used with the repository
#     on PYTHONPATH, nothing installed. Its versions may differ from the lock; summary.json records them.
#   - otherwise install_cuda_env: a separate .venv-gpu with `pip install torch==2.13.0` from the
#     default index (on Linux x86_64 that wheel is the CUDA build), then the project with the lock
#     minus its torch/triton pins (those are the CPU build's). Needs network access.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,/^set -e/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  OUT="$ROOT/outputs/gpu_check/$(date +%Y-%m-%d)$([ "$DRY_RUN" = 1 ] && echo -dry-run)"
fi

needs_imports() {  # $1: a python; fails naming what it cannot import
  "$1" -c "import importlib.util, sys
missing = [m for m in ('torch', 'transformers', 'triton', 'numpy', 'safetensors', 'yaml', 'tqdm')
           if importlib.util.find_spec(m) is None]
sys.exit('missing Python packages: ' + ', '.join(missing) if missing else 0)"
}

install_cuda_env() {  # a CUDA torch in .venv-gpu; the project's lock without its CPU torch/triton pins
  local venv="$ROOT/.venv-gpu" lock
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  lock="$(mktemp)"
  grep -v -E '^(torch|triton)==' "$ROOT/scripts/constraints.txt" > "$lock"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$lock" -e "$ROOT"
  rm -f "$lock"
  PY="$venv/bin/python"
}

setup_python() {  # sets PY (and PYTHONPATH where the repository is used uninstalled)
  if [ -n "${FAST_DVLA_PYTHON:-}" ]; then
    PY="$FAST_DVLA_PYTHON"
  elif [ "$DRY_RUN" = 1 ]; then
    # shellcheck disable=SC1091
    . "$ROOT/scripts/setup_env.sh"
    PY="$(command -v python)"
  elif python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY="$(command -v python3)"
    echo "[gpu_check] using $PY (its torch sees a GPU); the repository runs from source, nothing installed"
  else
    echo "[gpu_check] no python3 with a CUDA torch: installing one into $ROOT/.venv-gpu"
    install_cuda_env
  fi
  # the three import packages from the source folders (setup.py's package_dir), ahead of any installed copy
  export PYTHONPATH="$ROOT:$ROOT/kernels:$ROOT/eval${PYTHONPATH:+:$PYTHONPATH}"
  needs_imports "$PY"
}

setup_python
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
args=(--out "$OUT")
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1  # before Python starts: triton.jit reads it when the kernel module loads
  args+=(--dry-run)
fi
echo "[gpu_check] $PY scripts/gpu_check.py ${args[*]}"
status=0
"$PY" "$ROOT/scripts/gpu_check.py" "${args[@]}" || status=$?
echo "[gpu_check] results in $OUT (summary.md, summary.json, kernels.md, kernels.json); exit $status"
exit "$status"
