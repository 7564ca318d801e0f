"""Measure the scripted CALVIN expert: success per subtask, and chains of covered subtasks.

    python scripts/calvin_expert_check.py --attempts 30 --out expert.json
    python scripts/calvin_expert_check.py --subtasks open_drawer close_drawer --attempts 20
    python scripts/calvin_expert_check.py --chains 100 --out chains.json

Per subtask: runs it from the first ``--attempts`` of CALVIN's initial conditions where its
preconditions hold (``next_states`` non-empty), spread evenly over them. Subtasks that start with a
block in the hand (``place_in_*``, ``stack_block``) run one of the lift subtasks first with the
expert (a condition where some block is liftable from the table; a failed lift is reported as a
failed setup, not counted). ``--chains N`` runs N chains from ``restricted_chains(N, COVERED)``,
resetting the env only at the start of each chain; as the evaluation and the recorder do, each
subtask ends at the oracle's first success (``info["success"]``, at most 360 steps) and the next one
starts from that state. It reports success per subtask within the chains and the average chain
length (``chain_summary``). Single subtasks also stop at the oracle's first success (a preceding
lift hands over its block held ~5 cm up, as in a chain).
Rendering is off (image_size=None): the expert reads privileged state only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fast_dvla.envs import calvin_protocol as cp  # noqa: E402
from fast_dvla.envs.calvin_env import CalvinEnv  # noqa: E402
from fast_dvla.envs.calvin_expert import COVERED, CalvinExpert  # noqa: E402

HELD_FIRST = ("place_in_slider", "place_in_drawer", "stack_block")


def run_subtask(env, expert, subtask, limit=cp.STEPS_PER_SUBTASK, stop_at_success=True):
    """Run one subtask with the expert for at most ``limit`` steps. As CALVIN's evaluation (and the
    recorder) does, it ends at the oracle's first success (``env.step``'s ``info["success"]``): the
    next subtask starts from that state. Without ``stop_at_success`` it runs until the expert is done.
    Returns (success, steps run, step of the first success or None)."""
    env.start_subtask(subtask, cp.INSTRUCTIONS[subtask])
    expert.reset(subtask)
    success, steps, first = False, 0, None
    while not expert.done and steps < limit:
        _, info = env.step(expert.act())
        steps += 1
        if info["success"] and first is None:
            first = steps
        success = success or info["success"]
        if success and stop_at_success:
            break
    return success, steps, first


def attempts_for(subtask, n):
    """Initial conditions (and a preceding lift, for held-block subtasks) where ``subtask`` can run."""
    out = []
    for cond in cp.initial_conditions():
        if subtask in HELD_FIRST:
            for c in cp.BLOCKS:
                lift = f"lift_{c}_block_table"
                states = cp.next_states(cond, lift)
                if states and cp.next_states(states[0], subtask):
                    out.append((cond, lift))
                    break
        elif cp.next_states(cond, subtask):
            out.append((cond, None))
    if len(out) > n:
        out = [out[i] for i in np.linspace(0, len(out) - 1, n).round().astype(int)]
    return out


def measure(env, expert, subtasks, n, verbose=False):
    rows = {}
    for subtask in subtasks:
        ok = tried = setup_failed = 0
        steps, firsts = [], []
        failures = []
        for cond, pre in attempts_for(subtask, n):
            env.reset(*cp.initial_scene(cond))
            if pre is not None:
                pre_ok, _, _ = run_subtask(env, expert, pre)
                if not pre_ok:
                    setup_failed += 1
                    continue
            success, k, first = run_subtask(env, expert, subtask)
            tried += 1
            ok += success
            steps.append(k)
            if first is not None:
                firsts.append(first)
            if not success:
                failures.append({"condition": cond, "pre": pre, "phase": expert.phase})
        rows[subtask] = {"successes": ok, "attempts": tried, "rate": ok / tried if tried else 0.0,
                         "mean_steps": float(np.mean(steps)) if steps else float("nan"),
                         "max_steps": int(max(steps)) if steps else 0,
                         "mean_steps_to_success": float(np.mean(firsts)) if firsts else float("nan"),
                         "setup_failed": setup_failed, "failures": failures[:5]}
        r = rows[subtask]
        print(f"{subtask:28s} {ok:3d}/{tried:<3d} {r['rate']:6.1%}  steps {r['mean_steps']:6.1f} "
              f"(max {r['max_steps']:3d}, to success {r['mean_steps_to_success']:6.1f})"
              + (f"  setup failed {setup_failed}" if setup_failed else ""), flush=True)
        if verbose:
            for f in failures[:3]:
                print("    failed:", f, flush=True)
    return rows


def short_chains(n, seed):
    """Where COVERED cannot fill 5 distinct categories: per initial condition (cycled), a random order of
    the covered subtasks keeping each one whose preconditions hold and whose category is new."""
    rng = np.random.RandomState(seed)
    conds = cp.initial_conditions()
    out = []
    for i in range(n):
        cond = conds[rng.randint(len(conds))]
        chain = []
        for name in rng.permutation(list(COVERED)):
            if cp.is_valid_chain(cond, chain + [str(name)]):
                chain.append(str(name))
        out.append((cond, tuple(chain)))
    return out


def chains(env, expert, n, seed):
    lengths, per_subtask, failures = [], {}, []
    try:
        pairs = cp.restricted_chains(n, COVERED, seed)
        kind = "restricted_chains"
    except ValueError as err:
        print(f"{err}: running shorter chains of the covered categories instead", flush=True)
        pairs = short_chains(n, seed)
        kind = "short_chains"
    for cond, chain in pairs:
        env.reset(*cp.initial_scene(cond))
        done = 0
        for subtask in chain:
            success, _, _ = run_subtask(env, expert, subtask)
            stats = per_subtask.setdefault(subtask, [0, 0])
            stats[1] += 1
            stats[0] += success
            if not success:
                failures.append({"condition": cond, "chain": chain, "failed": subtask, "phase": expert.phase})
                break
            done += 1
        lengths.append(done)
    summary = cp.chain_summary(lengths)
    summary["kind"] = kind
    summary["chain_lengths_planned"] = [len(c) for _, c in pairs]
    summary["failures"] = failures
    summary["per_subtask_in_chains"] = {k: {"successes": v[0], "attempts": v[1]} for k, v in sorted(per_subtask.items())}
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subtasks", nargs="*", default=None, help="subtasks to measure (default: COVERED)")
    ap.add_argument("--attempts", type=int, default=30, help="initial conditions per subtask (at most)")
    ap.add_argument("--chains", type=int, default=0, help="also run this many chains of COVERED subtasks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    env = CalvinEnv(image_size=None)
    expert = CalvinExpert(env)
    result = {"covered": list(COVERED)}
    t0 = time.time()
    subtasks = args.subtasks if args.subtasks is not None else (list(COVERED) if not args.chains else [])
    if subtasks:
        result["subtasks"] = measure(env, expert, subtasks, args.attempts, args.verbose)
    if args.chains:
        s = chains(env, expert, args.chains, args.seed)
        result["chains"] = s
        print(f"chains: {s['chains']}  average length {s['avg_len']:.2f}  "
              f"(95% {s['avg_len_ci95'][0]:.2f}-{s['avg_len_ci95'][1]:.2f})  "
              + "  ".join(f"{p['position']}/5: {p['rate']:.0%}" for p in s["positions"]), flush=True)
        for name, v in s["per_subtask_in_chains"].items():
            print(f"  in chains: {name:26s} {v['successes']:3d}/{v['attempts']:<3d}", flush=True)
        for f in s["failures"][:10 if args.verbose else 0]:
            print("    failed:", f, flush=True)
    result["seconds"] = time.time() - t0
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    env.close()


if __name__ == "__main__":
    main()
