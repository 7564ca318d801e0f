"""Scripted-expert demonstrations on CALVIN (scene D), chained as the evaluation chains subtasks.

    fast-dvla record calvin --chains 300 --out data/calvin_demos --workers 2 --action-noise 0.1
    fast-dvla record calvin --chains 50 --no-render --out outputs/calvin_expert_check   # expert success only

Chains of 5 subtasks are drawn from those the scripted expert covers (seeded
by ``--seed``; keep it apart from the evaluation's, 1000 by default). Each
completed subtask is one episode (its instruction; the next subtask starts
where the oracle saw the previous one done). A rerun with the same ``--out``
resumes with the chains it lacks; ``report.json`` / ``report.md`` give each
subtask's success and the expert's average chain length. Needs calvin_env
(see ``fast_dvla.envs.calvin_env``).
"""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chains", type=int, required=True, help="number of chains to record")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the chains and of the noise")
    p.add_argument("--subtasks", default=None, help="comma-separated subtasks to chain (default: all the expert covers)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--no-render", action="store_true", help="expert only: no cameras, no episodes, success stats")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--action-noise", type=float, default=0.0, help="std of Gaussian noise added to the executed "
                   "position command (DART-style; the stored label stays the expert's clean action)")
    p.add_argument("--steps-per-subtask", type=int, default=360)
    p.add_argument("--calvin-env", default=None, help="path of a calvin_env checkout, if it is not installed")


def main(args) -> dict:
    from fast_dvla.envs.calvin_expert import COVERED
    from fast_dvla.envs.calvin_recorder import record_chains

    if args.chains < 1:
        raise SystemExit(f"--chains must be >= 1, got {args.chains}")
    if not (0.0 <= args.action_noise <= 1.0):
        raise SystemExit(f"--action-noise must lie in [0, 1] (action units), got {args.action_noise}")
    subtasks = [s for s in args.subtasks.split(",") if s] if args.subtasks else list(COVERED)
    uncovered = sorted(set(subtasks) - set(COVERED))
    if uncovered:
        raise SystemExit(f"--subtasks: the scripted expert does not cover {uncovered} (it covers {sorted(COVERED)})")
    try:
        report = record_chains(args.out, args.chains, args.seed, subtasks,
                               None if args.no_render else args.image_size, args.workers, args.action_noise,
                               args.steps_per_subtask, args.calvin_env)
    except ValueError as e:
        raise SystemExit(str(e))
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read().rstrip())
    return report
