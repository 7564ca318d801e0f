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
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import time

import numpy as np
import torch
from tqdm import tqdm

from fast_dvla import DecodeConfig, FastDVLAPolicy
from fast_dvla.config import METHODS

from .micro_bench import reference_checkpoint as default_checkpoint
from .record_libero_demos import parse_range
from .report import markdown_table, write_json
from .throughput import COLUMNS as SPEED_COLUMNS
from .throughput import (add_override_arguments, measure, overrides_from, parse_decoders, policy_configs,
                         policy_for, process_peak_rss_mb)


def run_episode(env, policy: FastDVLAPolicy, config: DecodeConfig, init: int, keep_obs: list | None,
                max_steps: int) -> dict:
    obs = env.reset(init)
    policy.reset()
    latencies, nfe, query = [], [], []
    original = policy.predict_action_chunk

    def timed_predict(o, cfg=None):
        t0 = time.perf_counter()
        out = original(o, config)
        latencies.append(time.perf_counter() - t0)
        nfe.append(policy.last_stats.nfe)
        query.append(policy.last_stats.query_tokens)
        if keep_obs is not None:
            keep_obs.append(o)
        return out

    policy.predict_action_chunk = timed_predict
    success, steps = False, 0
    try:
        for steps in range(1, max_steps + 1):
            obs, _, done, info = env.step(policy.select_action(obs))
            if done or info["success"]:
                success = True
                break
    finally:
        policy.predict_action_chunk = original
    return {"success": success, "steps": steps, "chunk_latency_s": latencies, "nfe": nfe, "query_tokens": query}


def token_agreement(teacher, student, observations, configs: dict, methods, reference) -> dict:
    """Fraction of action tokens each decoder shares with the teacher's vanilla decoding (``reference``)."""
    out = {}
    ref = [teacher_tokens(teacher, o, reference) for o in observations]
    for m in methods:
        policy = policy_for(m, teacher, student)
        same = [np.mean(teacher_tokens(policy, o, configs[m]) == r) for o, r in zip(observations, ref)]
        out[m] = float(np.mean(same))
    return out


def teacher_tokens(policy, obs, config):
    actions = policy.predict_action_chunk(obs, config)
    return policy.action_tokenizer.encode(actions)


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must look like i/n (e.g. 0/2), got {shard!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard {shard}: need 0 <= i < n")
    return i, n


def sharded_jobs(suite: str, tasks: str, init_states: str, shard: str) -> list[tuple[int, int]]:
    """The (task, initial state) pairs of ``shard`` (``i/n``: every n-th from the i-th); ``tasks`` is
    ``all`` or ids like ``0-9``, ``init_states`` ids like ``15-16``."""
    from fast_dvla.envs.libero_env import num_tasks

    task_ids = list(range(num_tasks(suite))) if tasks == "all" else parse_range(tasks)
    i, n = parse_shard(shard)
    return [(t, s) for t in task_ids for s in parse_range(init_states)][i::n]


def task_envs(suite: str, jobs: list[tuple[int, int]], config):
    """Per task of ``jobs``, in order: ``(task, env, its initial states)``; one LIBERO
    environment per task, rendering what the model ``config`` reads, closed when done."""
    from fast_dvla.envs.libero_env import LiberoTaskEnv

    for task in sorted({t for t, _ in jobs}):
        env = LiberoTaskEnv(suite, task, image_size=config.image_size, cameras=config.cameras)
        try:
            yield task, env, [i for t, i in jobs if t == task]
        finally:
            env.close()


def run(args) -> dict:
    jobs = sharded_jobs(args.suite, args.tasks, args.init_states, args.shard)  # bad ids fail before any loading
    shard = parse_shard(args.shard)[0]
    methods = parse_decoders(args.decoders)
    teacher = FastDVLAPolicy.from_pretrained(args.teacher or default_checkpoint("teacher"))
    student = FastDVLAPolicy.from_pretrained(args.student or default_checkpoint("student"))
    overrides = overrides_from(args)
    try:
        configs = policy_configs(methods, teacher, student, **overrides)
        reference = policy_configs(["vanilla"], teacher, student, **overrides)["vanilla"]
    except ValueError as e:
        raise SystemExit(f"bad decoding settings: {e}")
    episodes = {m: [] for m in methods}
    observations: list = []
    bar = tqdm(total=len(jobs) * len(methods), desc=f"LIBERO episodes (shard {args.shard})")
    for task, env, inits in task_envs(args.suite, jobs, teacher.model.config):
        for init in inits:
            for m in methods:
                keep = observations if (m == methods[0] and len(observations) < args.timing_obs) else None
                result = run_episode(env, policy_for(m, teacher, student), configs[m], init, keep,
                                     args.max_steps or env.max_steps)
                result.update(task=task, init=init)
                episodes[m].append(result)
                bar.update(1)
                bar.set_postfix({k: f"{np.mean([e['success'] for e in v]):.2f}" for k, v in episodes.items() if v})
    bar.close()
    result = {"suite": args.suite, "decode": {m: c.to_dict() for m, c in configs.items()},
              "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(),
              "teacher": args.teacher or "shipped reference", "student": args.student or "shipped reference",
              "shard": args.shard, "episodes": episodes}
    if shard == 0 and observations:  # speed is measured in one process, on the same observations
        result["throughput"] = measure(teacher, student, observations, configs, methods, warmup=2)
        result["agreement"] = token_agreement(teacher, student, observations[: args.agreement_obs], configs, methods,
                                              reference)
        result["timing_observations"] = len(observations)
    result["peak_rss_mb"] = process_peak_rss_mb()
    return result


def merge(results: list[dict]) -> dict:
    results = sorted(results, key=lambda r: int(str(r.get("shard", "0/1")).split("/")[0]))
    first = next((r for r in results if "throughput" in r), results[0])
    merged = {k: v for k, v in first.items() if k != "episodes"}
    merged["episodes"] = {}
    for r in results:
        for m, eps in r["episodes"].items():
            merged["episodes"].setdefault(m, []).extend(eps)
    return merged


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
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


def settings_text(decode: dict) -> str:
    """The thresholds each decoder ran with (older results hold one setting for all)."""
    keys = ("tau_conf", "tau_add", "tau_act", "fallback_n", "vanilla_steps", "token_rule", "near_bins")
    per_method = decode if all(isinstance(v, dict) for v in decode.values()) else {"every decoder": decode}
    return "; ".join(f"{m}: " + ", ".join(f"{k}={c[k]}" for k in keys if k in c) for m, c in per_method.items())


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
    print(header + "\n\n" + table)
    write_json(out + ".json", result)
    with open(out + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot(rows, out + ".png")
    print(f"wrote {out}.json, .md and .png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=["libero"], help="the benchmark to run")
    p.add_argument("--teacher", help="teacher policy directory (default: the shipped reference)")
    p.add_argument("--student", help="student policy directory (default: the shipped reference)")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="0,5", help="'all' or ids like 0-9")
    p.add_argument("--init-states", default="15", help="official initial-state ids, e.g. 15-49 (the shipped "
                   "reference was trained on demonstrations from 0-14: 15 on are held out)")
    p.add_argument("--decoders", default=",".join(METHODS))
    p.add_argument("--max-steps", type=int, default=None, help="default: the suite's usual limit")
    p.add_argument("--timing-obs", type=int, default=24, help="observations kept for the throughput phase")
    p.add_argument("--agreement-obs", type=int, default=12)
    add_override_arguments(p)  # unset: each decoder runs with the settings saved in its policy's config.json
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--shard", default=None, help="i/n: run every n-th episode from the i-th (default: torchrun rank)")
    p.add_argument("--merge", nargs="+", help="merge shard JSON files instead of running")
    p.add_argument("--out", default="outputs/bench_libero", help="path stem for .json, .md and .png")


def read_shards(patterns: list[str]) -> list[dict]:
    """The shard JSON files matching any of ``patterns`` (globs), each read once, in name order."""
    files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
    if not files:
        raise SystemExit(f"no shard files match {patterns}")
    results = []
    for f in files:
        with open(f) as fh:
            results.append(json.load(fh))
    return results


def shard_stem(out: str, shard: str) -> str:
    """Where shard ``i/n`` writes: ``out`` itself when there is one shard, else ``out.shard<i>``."""
    return out if shard == "0/1" else f"{out}.shard{shard.split('/')[0]}"


def main(args) -> None:
    if args.merge:
        report(merge(read_shards(args.merge)), args.out)
        return
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.shard is None:
        args.shard = f"{os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')}"
    result = run(args)
    report(result, shard_stem(args.out, args.shard))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    main(parser.parse_args())
