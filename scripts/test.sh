#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
python -m pytest -q tests "$@"
