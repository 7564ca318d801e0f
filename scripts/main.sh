#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then benchmarks every
# decoder side by side and prints the comparison table.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Until the LIBERO reference policy ships (issue: LIBERO end to end), the main
# job is the decoder micro-benchmark on the reference architecture.
fast-dvla micro-bench --out outputs/micro_bench.json "$@"
