"""Record scripted-expert demonstrations on LIBERO into the episodes format.

    python -m fast_dvla.eval.record_libero_demos --suite libero_object --tasks all \\
        --init-states 0-9 --out data/libero_object_demos --workers 2

Resumable: every (task, initial state) pair is attempted once; its outcome is
kept in ``attempts/`` and successful episodes as ``episode_<task*1000+init>.npz``,
so a rerun skips what is done. Only successful episodes become
demonstrations; failures are counted in ``report.json``, never dropped
silently. ``--no-render`` runs the expert without cameras (fast validation).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

from fast_dvla.data import write_dataset_info, write_episode

from .report import markdown_table

CAMERAS = ("agentview", "wrist")


def parse_range(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def attempt_path(out: str, task: int, init: int) -> str:
    return os.path.join(out, "attempts", f"task{task:02d}_init{init:03d}.json")


def run_task(args: tuple) -> list[dict]:
    """One worker: all pending initial states of one task (the env is built once)."""
    suite, task, inits, out, image_size, render = args
    os.environ.setdefault("MUJOCO_GL", "egl")
    import torch
    torch.set_num_threads(1)
    from fast_dvla.envs.libero_env import LiberoTaskEnv
    from fast_dvla.envs.libero_expert import LiberoObjectExpert

    env = LiberoTaskEnv(suite, task, image_size=image_size, cameras=CAMERAS, render=render)
    results = []
    for init in inits:
        t0 = time.time()
        obs = env.reset(init)
        expert = LiberoObjectExpert()
        expert.reset(env)
        frames = {c: [] for c in CAMERAS}
        states, actions = [], []
        for _ in range(env.max_steps):
            action = expert.act(env.raw_obs)
            for c in CAMERAS if render else ():
                frames[c].append(obs["images"][c])
            states.append(obs["state"])
            actions.append(action.astype(np.float32))
            obs, _, _, _ = env.step(action)
            if expert.done:
                break
        success = env.success()  # checked after the release, not at the first `done`
        result = {"task": task, "init": init, "success": success, "steps": len(actions),
                  "retries": expert.retries, "seconds": time.time() - t0}
        if success and render:
            episode = {f"image_{c}": np.stack(frames[c]) for c in CAMERAS}
            episode.update(state=np.stack(states), action=np.stack(actions), instruction=env.instruction,
                           task_id=task, init_state_id=init, suite=suite)
            write_episode(out, task * 1000 + init, episode)
        os.makedirs(os.path.join(out, "attempts"), exist_ok=True)
        with open(attempt_path(out, task, init), "w") as f:
            json.dump(result, f)
        results.append(result)
    env.close()
    return results


def summarize(out: str) -> dict:
    attempts = []
    folder = os.path.join(out, "attempts")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            attempts.append(json.load(f))
    per_task = {}
    for a in attempts:
        t = per_task.setdefault(a["task"], {"task": a["task"], "attempts": 0, "successes": 0, "steps": []})
        t["attempts"] += 1
        t["successes"] += int(a["success"])
        t["steps"].append(a["steps"])
    rows = []
    for t in sorted(per_task.values(), key=lambda r: r["task"]):
        rows.append({"task": t["task"], "attempts": t["attempts"], "successes": t["successes"],
                     "success_rate": t["successes"] / t["attempts"], "mean_steps": float(np.mean(t["steps"]))})
    total = sum(r["attempts"] for r in rows)
    ok = sum(r["successes"] for r in rows)
    return {"tasks": rows, "attempts": total, "successes": ok, "success_rate": ok / total if total else None,
            "seconds_per_episode": float(np.mean([a["seconds"] for a in attempts])) if attempts else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="all", help="'all' or a list/range such as 0,3-5")
    p.add_argument("--init-states", default="0-9", help="initial-state ids per task, e.g. 0-49")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-render", action="store_true", help="expert only, no cameras, no episodes written")
    args = p.parse_args(argv)
    if args.suite != "libero_object":
        raise SystemExit("the scripted expert covers libero_object (pick an object, place it in the basket)")
    from fast_dvla.envs.libero_env import num_tasks

    tasks = list(range(num_tasks(args.suite))) if args.tasks == "all" else parse_range(args.tasks)
    inits = parse_range(args.init_states)
    os.makedirs(args.out, exist_ok=True)
    if not args.no_render:
        write_dataset_info(args.out, CAMERAS, [args.image_size] * 2, 8, 7, fps=20,
                           source=f"scripted expert, {args.suite}")
    jobs = []
    for t in tasks:
        pending = [i for i in inits if not os.path.exists(attempt_path(args.out, t, i))]
        if pending:
            jobs.append((args.suite, t, pending, args.out, args.image_size, not args.no_render))
    todo = sum(len(j[2]) for j in jobs)
    t0 = time.time()
    with tqdm(total=todo, desc="expert episodes") as bar:
        if args.workers > 1 and len(jobs) > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                for results in pool.imap_unordered(run_task, jobs):
                    bar.update(len(results))
        else:
            for job in jobs:
                bar.update(len(run_task(job)))
    report = summarize(args.out)
    report.update(suite=args.suite, image_size=args.image_size, rendered=not args.no_render,
                  wall_s_this_run=time.time() - t0,
                  demonstrations=len([n for n in os.listdir(args.out) if n.startswith("episode_")]))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(markdown_table(report["tasks"], [("task", "task", "d"), ("attempts", "attempts", "d"),
                                            ("successes", "successes", "d"), ("success_rate", "success", ".0%"),
                                            ("mean_steps", "mean steps", ".0f")]))
    print(f"expert success {report['successes']}/{report['attempts']}; {report['demonstrations']} demonstrations "
          f"in {args.out}")
    return report


if __name__ == "__main__":
    main()
