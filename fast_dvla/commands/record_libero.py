"""``fast-dvla record libero``: scripted-expert demonstrations on LIBERO-Object, in the episodes format.

    fast-dvla record libero --tasks all --init-states 0-49 \\
        --out data/libero_object_demos --workers 2
    fast-dvla record libero --tasks all --per-task 10 --no-render \\
        --out outputs/expert_check            # validate the expert: success only, no images

Every (task, initial state) pair is attempted once. Its outcome is written to
``attempts/task<TT>_init<III>.json`` and, when the expert succeeded (checked
after the release), its episode to ``episode_<task * 1000 + init>.npz``; a
rerun skips every pair with an outcome, so an interrupted run resumes where
it stopped (the simulator is deterministic: a failure would fail again; only
an attempt cut short by a simulator error is tried again). Failures stay in
``report.json`` (per task: attempts, successes, mean/min/max steps, retries;
the failed pairs listed), never dropped silently; ``report.md`` has the same
table. ``--workers N`` runs N processes (spawn), each with its own simulator
(a rendering process holds ~2.4 GB). A directory holds one kind of run:
rendered (a dataset) or ``--no-render`` (success statistics only).

``--action-noise SIGMA`` (DART-style noise injection): the simulator executes
the expert's position command plus Gaussian noise of that standard deviation
(action units; 0.1 is ~1.2 mm per step), while the episode stores the
expert's clean action. The demonstrations then visit states slightly off the
expert's path, labelled with how the expert recovers from them: a cloned
policy whose own small errors compound over an open-loop chunk meets such
states. The noise is seeded by the (task, init) pair, so a resumed run draws
the same noise.

``--push-prob P --push-size S`` (recovery pushes): while the expert approaches
the object (hover and descend), each step starts with probability P a push:
for up to PUSH_STEPS steps the simulator executes the expert's command plus a
constant horizontal offset of S action units in a random direction (8 steps
at 0.4 and 0.6 moved the hand 2.6 and 3.9 cm further than no push, the
expert steering against it meanwhile). The labels stay the expert's clean commands, so
the episode shows the way back from centimetres off the approach, which the
small per-step noise never does: a cloned policy that arrives 3 cm off a tall
bottle otherwise has no example of correcting it. Seeded by the pair too.
Each episode stores which steps were pushed (``perturbed``): a chunk's later
labels answer states that a push the observation does not show has moved, so
training skips the chunks that overlap one and keeps those after it.

``--policy P --expert-prob BETA`` (DAgger-style relabelling): a trained
policy (a policy directory or a training run) drives the robot, the expert
only labels. Each chunk of the policy's ``n_action_steps`` is executed by the
expert instead with probability BETA (seeded per pair), which keeps episodes
moving towards later phases; every step stores the expert's action for the
state the robot is actually in, so the data covers the states a cloned
policy drifts into and says how to recover from them. Every episode is kept,
successful or not (its labels are valid either way); it ends at success, when
the expert gives up, or at the step limit. Train on it together with the
demonstrations (``data: [demos, relabelled]`` in the training config).
"""
from __future__ import annotations

import argparse
import os

from fast_dvla.envs.libero_recorder import CAMERAS, PUSH_STEPS, record_demos
from fast_dvla.envs.sharding import parse_range


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="all", help="'all' or ids such as 0,3-5")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--init-states", default=None, help="initial-state ids per task, e.g. 0-49 (default 0-9)")
    which.add_argument("--per-task", type=int, default=None, help="the first N initial states of every task")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cameras", default=",".join(CAMERAS), help="comma-separated, some of agentview,wrist")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the suite's "
                   "evaluation horizon, 280 on libero_object)")
    p.add_argument("--no-render", action="store_true", help="expert only: no cameras, no episodes, success stats")
    p.add_argument("--action-noise", type=float, default=0.0, help="std of Gaussian noise added to the executed "
                   "position command (DART-style; the stored label stays the expert's clean action)")
    p.add_argument("--policy", default=None, help="DAgger-style relabelling: this policy (a policy directory or a "
                   "training run) drives, the expert labels every step; every episode is kept")
    p.add_argument("--expert-prob", type=float, default=0.0, help="with --policy: probability that the expert "
                   "executes a chunk instead of the policy")
    p.add_argument("--push-prob", type=float, default=0.0, help="per approach step, probability of starting a "
                   f"recovery push ({PUSH_STEPS} steps of a constant horizontal offset; labels stay clean)")
    p.add_argument("--push-size", type=float, default=0.5, help="a push's offset in action units (with --push-prob)")


def main(args) -> dict:
    if not (0.0 <= args.expert_prob <= 1.0):
        raise SystemExit(f"--expert-prob must lie in [0, 1], got {args.expert_prob}")
    if args.policy and args.no_render:
        raise SystemExit("--policy needs rendering: the policy sees the cameras")
    if args.expert_prob and not args.policy:
        raise SystemExit("--expert-prob applies with --policy (the expert drives alone otherwise)")
    if not (0.0 <= args.action_noise <= 1.0):
        raise SystemExit(f"--action-noise must lie in [0, 1] (action units), got {args.action_noise}")
    if not (0.0 <= args.push_prob <= 1.0) or not (0.0 < args.push_size <= 1.0):
        raise SystemExit(f"--push-prob must lie in [0, 1] and --push-size in (0, 1] (action units), got "
                         f"{args.push_prob} and {args.push_size}")
    if args.push_prob and args.policy:
        raise SystemExit("--push-prob perturbs the expert's execution; with --policy the policy drives")
    push = (args.push_prob, args.push_size if args.push_prob else 0.0)
    if args.suite != "libero_object":
        raise SystemExit("the scripted expert covers libero_object (pick an object, place it in the basket)")
    from fast_dvla.envs.libero_env import get_suite

    suite = get_suite(args.suite)
    tasks = list(range(suite.n_tasks)) if args.tasks == "all" else parse_range(args.tasks)
    n_init = len(suite.get_task_init_states(0))
    inits = list(range(args.per_task)) if args.per_task is not None else parse_range(args.init_states or "0-9")
    bad = [t for t in tasks if not 0 <= t < suite.n_tasks] + [i for i in inits if not 0 <= i < n_init]
    if bad or not tasks or not inits:
        raise SystemExit(f"tasks must lie in [0, {suite.n_tasks}) and initial states in [0, {n_init}); "
                         f"got tasks {tasks}, initial states {inits}")
    render = not args.no_render
    cameras = tuple(c for c in args.cameras.split(",") if c) if render else ()
    unknown = [c for c in cameras if c not in CAMERAS]
    if unknown or (render and not cameras):
        raise SystemExit(f"--cameras must be some of {','.join(CAMERAS)}, got {args.cameras!r}")
    report = record_demos(args.suite, tasks, inits, args.out, args.image_size, cameras, args.workers,
                          args.max_steps, args.action_noise, args.policy, args.expert_prob, push)
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read().rstrip())
    print(f"{'policy' if args.policy else 'expert'} success {report['successes']}/{report['attempts']}"
          + (f"; {report['demonstrations']} demonstrations in {args.out}" if render else " (no rendering)"))
    return report
