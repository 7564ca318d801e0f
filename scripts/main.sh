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
# no OMP_WAIT_POLICY=PASSIVE here: nothing in the benchmark is torch.compile'd, and sleeping
# OpenMP threads add a wake-up to every small cached forward, which slows the cached decoders
export MUJOCO_GL="${MUJOCO_GL:-egl}"
fast-dvla bench libero --out outputs/bench_libero "$@"
