"""``fast-dvla bench libero``: closed-loop LIBERO episodes and throughput for
every decoder, side by side, in one run.

    fast-dvla bench libero                      # short: 2 tasks x 1 initial state per decoder
    fast-dvla bench libero --tasks all --init-states 0-49 --shard 0/4   # the full suite, one shard of 4
    fast-dvla bench libero --merge outputs/bench_libero.shard*.json     # merge the shards

Per decoder: closed-loop success on the suite's official initial states;
throughput measured on the same observations in one process (action
tokens/s, chunk latency median/p90, chunk Hz, action Hz, NFE and query
tokens per chunk, speedup over vanilla); agreement of its action tokens with
the teacher's vanilla decoding on those observations. Teacher decoders
(vanilla, fast_dllm) run the teacher; student decoders the student.

Resumable: each finished episode is appended to a journal beside the output
(``<out>.episodes.jsonl``, or ``<out>.shard<i>.episodes.jsonl``; the observations
kept for timing go to ``.episodes.obs/`` beside it), so a run that is killed, re-run with the same
arguments, skips the episodes already there (the progress bar counts them as
done) and ends with the same episodes as a run that never stopped; the speed
phase runs again. A journal written with other arguments is refused, naming
them; ``--fresh`` starts over.
"""
from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from fast_dvla.benchmark.closed_loop import (add_run_arguments, add_speed_phase, load_pair, merge_shards,
                                             open_journal, run_main, run_record, write_report)
from fast_dvla.benchmark.report import markdown_table, settings_text
from fast_dvla.benchmark.throughput import COLUMNS as SPEED_COLUMNS
from fast_dvla.benchmark.throughput import overrides_from, parse_decoders, policy_for
from fast_dvla.envs.journal import EpisodeJournal, policy_location
from fast_dvla.envs.rollout import libero_jobs, libero_task_envs, run_episode
from fast_dvla.envs.sharding import parse_shard
from fast_dvla.plotting import headless_pyplot


def journal_arguments(args, configs: dict) -> dict:
    """What a resumed run must share with the run that wrote its journal: every argument that
    shapes the episodes or the observations kept, and the settings each decoder resolved to
    (a policy's saved settings may have changed between the runs)."""
    given = {"--suite": args.suite, "--tasks": args.tasks, "--init-states": args.init_states,
             "--decoders": args.decoders, "--teacher": policy_location(args.teacher),
             "--student": policy_location(args.student), "--max-steps": args.max_steps,
             "--timing-obs": args.timing_obs, "--shard": args.shard}
    given.update({f"--{name.replace('_', '-')}": value for name, value in overrides_from(args).items()})
    given["decoding settings"] = {m: c.to_dict() for m, c in configs.items()}
    return given


def run_episodes(args, jobs, methods, configs, teacher, student, journal: EpisodeJournal,
                 keep_timing: bool) -> tuple[dict, list]:
    """Every (task, initial state, decoder) episode of ``jobs`` that ``journal`` lacks, each recorded
    there as it finishes. Returns the episodes per decoder in job order (those of earlier runs
    included) and the observations kept for timing: the first decoder's, up to ``--timing-obs``."""
    first = methods[0]
    observations: list = []
    if keep_timing:  # earlier runs' kept observations, in the order they were kept
        for task, init in jobs:
            if journal.done(first, task, init):
                observations.extend(journal.observations(first, task, init))
    pending = [(t, i) for t, i in jobs if not all(journal.done(m, t, i) for m in methods)]
    bar = tqdm(total=len(jobs) * len(methods), initial=len(journal), desc=f"LIBERO episodes (shard {args.shard})")
    for task, env, inits in libero_task_envs(args.suite, pending, teacher.model.config):
        for init in inits:
            for m in methods:
                if journal.done(m, task, init):
                    continue
                keep = [] if (keep_timing and m == first and len(observations) < args.timing_obs) else None
                result = run_episode(env, policy_for(m, teacher, student), configs[m], init,
                                     args.max_steps or env.max_steps, keep_obs=keep)
                result.update(task=task, init=init)
                journal.record(m, task, init, result, keep)
                observations.extend(keep or [])
                bar.update(1)
                bar.set_postfix({k: f"{np.mean(v):.2f}" for k, v in successes(journal, jobs, methods).items() if v})
    bar.close()
    episodes = {m: [journal.result(m, t, i) for t, i in jobs] for m in methods}
    return episodes, observations


def successes(journal: EpisodeJournal, jobs, methods) -> dict:
    """Per decoder, the success of each episode the journal holds."""
    return {m: [journal.result(m, t, i)["success"] for t, i in jobs if journal.done(m, t, i)] for m in methods}


def run(args) -> dict:
    jobs = libero_jobs(args.suite, args.tasks, args.init_states, args.shard)  # bad ids fail before any loading
    shard = parse_shard(args.shard)[0]
    methods = parse_decoders(args.decoders)
    teacher, student, configs, reference = load_pair(args, methods)
    with open_journal(args, journal_arguments(args, configs), "episodes") as journal:
        # speed is measured in one process (shard 0), on observations from its episodes
        episodes, observations = run_episodes(args, jobs, methods, configs, teacher, student, journal,
                                              keep_timing=shard == 0)
    result = {"suite": args.suite, **run_record(args, configs, episodes)}
    return add_speed_phase(result, args, teacher, student, observations, configs, methods, reference)


def merge(results: list[dict]) -> dict:
    return merge_shards(results)


def table_rows(result: dict) -> list[dict]:
    speed = {r["method"]: r for r in result.get("throughput", [])}
    rows = []
    for m, eps in result["episodes"].items():
        row = {"method": m, "episodes": len(eps), "success": float(np.mean([e["success"] for e in eps])) if eps else None,
               "agreement": result.get("agreement", {}).get(m)}
        row.update({k: v for k, v in speed.get(m, {}).items() if k != "method"})
        rows.append(row)
    return rows


def per_task_rows(result: dict) -> list[dict]:
    """Success per task, one column per decoder (over that task's episodes)."""
    tasks = sorted({e["task"] for eps in result["episodes"].values() for e in eps})
    rows = []
    for task in tasks:
        row = {"task": task}
        for m, eps in result["episodes"].items():
            mine = [e["success"] for e in eps if e["task"] == task]
            row[m] = f"{sum(mine)}/{len(mine)}" if mine else None
        rows.append(row)
    return rows


COLUMNS = [("method", "decoder", "s"), ("episodes", "episodes", "d"), ("success", "success", ".0%"),
           ("agreement", "tokens = teacher", ".0%")] + SPEED_COLUMNS[1:]


def plot(rows: list[dict], path: str) -> None:
    plt = headless_pyplot()
    if plt is None:
        return
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [r.get("tokens_per_s") or 0 for r in rows], color="tab:blue")
    axes[0].set_ylabel("action tokens/s")
    axes[1].bar(names, [100 * (r.get("success") or 0) for r in rows], color="tab:green")
    axes[1].set_ylabel("success %")
    axes[1].set_ylim(0, 100)  # a flat 0% should read as 0, not as an empty axis
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict, out: str) -> None:
    rows = table_rows(result)
    header = (f"# LIBERO ({result['suite']}) decoders side by side ({result['date']}, {result['machine']}, "
              f"{result['torch_threads']} torch threads)\n\nspeed measured on {result.get('timing_observations', 0)} "
              f"observations from the run; success over each decoder's closed-loop episodes")
    if result.get("decode"):
        header += f"\n\ndecoding settings: {settings_text(result['decode'])}"
    table = markdown_table(rows, COLUMNS)
    per_task = per_task_rows(result)
    if len(per_task) > 1:
        columns = [("task", "task", "d")] + [(m, m, "s") for m in result["episodes"]]
        table += "\n\nsuccess per task:\n\n" + markdown_table(per_task, columns)
    write_report(result, out, header + "\n\n" + table, lambda path: plot(rows, path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher policy directory (default: the shipped reference)")
    p.add_argument("--student", help="student policy directory (default: the shipped reference)")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="0,5", help="'all' or ids like 0-9")
    p.add_argument("--init-states", default="15", help="official initial-state ids, e.g. 15-49 (the shipped "
                   "reference was trained on demonstrations from 0-14: 15 on are held out)")
    p.add_argument("--max-steps", type=int, default=None, help="default: the suite's usual limit")
    add_run_arguments(p, "episode", "outputs/bench_libero")


def main(args) -> None:
    run_main(args, run, merge, report)
