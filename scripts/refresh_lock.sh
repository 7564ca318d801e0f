#!/usr/bin/env bash
# Re-resolves scripts/constraints.txt: installs the newest versions that setup.py's
# ranges allow into a fresh virtual environment, runs the test suite there, and
# writes the lock only if every test passes. Review the diff, then commit it.
#     bash scripts/refresh_lock.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export FAST_DVLA_VENV="$WORK/venv" FAST_DVLA_LOCK=""
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m pytest -q tests "$@"
{
  echo "# The tested set of versions: scripts/setup_env.sh installs exactly these."
  echo "# Made by scripts/refresh_lock.sh on $(date -u +%Y-%m-%d) (python $(python -c 'import platform; print(platform.python_version())')); do not edit by hand."
  python -m pip freeze --exclude-editable --all | grep -v -E "^(fast-dvla|fast_dvla)( |==|@)"
} > "$WORK/constraints.txt"
mv "$WORK/constraints.txt" "$ROOT/scripts/constraints.txt"
echo "[refresh] wrote scripts/constraints.txt:"
git -C "$ROOT" diff --stat -- scripts/constraints.txt || true
