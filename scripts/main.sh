#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then runs the LIBERO
# throughput-and-success benchmark of the shipped reference policy for every
# decoder and prints the comparison table. Extra flags go to `fast-dvla bench
# libero` (e.g. --tasks all --init-states 15-49: every held-out episode of the suite).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
fast-dvla bench libero --out outputs/bench_libero "$@"
