"""``fast-dvla bench calvin``: closed-loop CALVIN chains and throughput for every decoder, side by side.

    fast-dvla bench calvin --chains 100                    # 100 chains per decoder, the shipped CALVIN reference
    fast-dvla bench calvin --chains 1000 --chain-set official --shard 0/4   # CALVIN's 1000 chains, one shard
    fast-dvla bench calvin --merge outputs/bench_calvin.shard*.json

CALVIN's protocol: chains of 5 subtasks from one initial scene, each given its
language instruction and at most 360 steps, success from calvin_env's task
oracle; a chain stops at its first failure. Reported per decoder: success at
each chain position and the average chain length (with 95% intervals); and,
measured on the same observations in one process, action tokens/s, chunk
latency, Hz, NFE and query tokens per chunk, speedup over vanilla, agreement
of action tokens with the teacher's vanilla decoding.

``--chain-set covered`` (default) draws chains only from the subtasks the
policy was trained on (``--subtasks``; default: those the scripted expert
covers, which the shipped reference learnt): a deviation from CALVIN's
protocol, stated in the table. ``--chain-set official`` is CALVIN's own
generator over all 34 subtasks, for policies that cover them.

Needs calvin_env (see ``fast_dvla.envs.calvin_env``). Sharded and resumable
as ``bench libero``: each finished chain goes to a journal beside the output
(task 0, init = the chain's index); a rerun with the same arguments skips
the chains it holds.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
import torch
from tqdm import tqdm

from fast_dvla import FastDVLAPolicy
from fast_dvla.benchmark.agreement import token_agreement
from fast_dvla.benchmark.report import markdown_table, settings_text, write_json
from fast_dvla.benchmark.throughput import COLUMNS as SPEED_COLUMNS
from fast_dvla.benchmark.throughput import (add_override_arguments, measure, overrides_from, parse_decoders,
                                            policy_configs, policy_for, process_peak_rss_mb)
from fast_dvla.config import METHODS
from fast_dvla.envs import calvin_protocol as protocol
from fast_dvla.envs.calvin_rollout import CHAIN_SETS, calvin_chains, calvin_jobs, run_chain
from fast_dvla.envs.journal import EpisodeJournal, journal_path, policy_location
from fast_dvla.envs.sharding import parse_shard, read_shards, shard_stem
from fast_dvla.policy import reference_policy_dir

SUITE = "calvin_D"


def covered_subtasks(args) -> list[str]:
    if args.subtasks:
        names = [s for s in args.subtasks.split(",") if s]
        unknown = sorted(set(names) - set(protocol.SUBTASKS))
        if unknown:
            raise SystemExit(f"--subtasks: unknown CALVIN subtasks {unknown}")
        return names
    from fast_dvla.envs.calvin_expert import COVERED
    return list(COVERED)


def journal_arguments(args, configs: dict, subtasks) -> dict:
    given = {"--chains": args.chains, "--chain-set": args.chain_set, "--seed": args.seed,
             "--subtasks": sorted(subtasks) if args.chain_set == "covered" else None,
             "--decoders": args.decoders, "--teacher": policy_location(args.teacher),
             "--student": policy_location(args.student), "--steps-per-subtask": args.steps_per_subtask,
             "--timing-obs": args.timing_obs, "--shard": args.shard}
    given.update({f"--{name.replace('_', '-')}": value for name, value in overrides_from(args).items()})
    given["decoding settings"] = {m: c.to_dict() for m, c in configs.items()}
    return given


def run(args) -> dict:
    subtasks = covered_subtasks(args) if args.chain_set == "covered" else list(protocol.SUBTASKS)
    try:
        chains = calvin_chains(args.chains, args.chain_set, subtasks, seed=args.seed)
    except ValueError as e:
        raise SystemExit(str(e))
    jobs = calvin_jobs(chains, args.shard)
    shard = parse_shard(args.shard)[0]
    methods = parse_decoders(args.decoders)
    teacher = FastDVLAPolicy.from_pretrained(args.teacher or reference_policy_dir("teacher", SUITE))
    student = FastDVLAPolicy.from_pretrained(args.student or reference_policy_dir("student", SUITE))
    try:
        configs = policy_configs(methods, teacher, student, **overrides_from(args))
        reference = policy_configs(["vanilla"], teacher, student, **overrides_from(args))["vanilla"]
    except ValueError as e:
        raise SystemExit(f"bad decoding settings: {e}")
    from fast_dvla.envs.calvin_env import CalvinEnv  # after the cheap checks: building the scene takes a while

    path = journal_path(shard_stem(args.out, args.shard))
    try:
        journal = EpisodeJournal(path, journal_arguments(args, configs, subtasks), fresh=args.fresh)
    except ValueError as e:
        raise SystemExit(str(e))
    first = methods[0]
    observations: list = []
    with journal, CalvinEnv(image_size=teacher.model.config.image_size, calvin_path=args.calvin_env) as env:
        if len(journal):
            print(f"resuming from {path}: {len(journal)} chains done")
        if shard == 0:
            for i in jobs:
                if journal.done(first, 0, i):
                    observations.extend(journal.observations(first, 0, i))
        bar = tqdm(total=len(jobs) * len(methods), initial=len(journal), desc=f"CALVIN chains (shard {args.shard})")
        for i in jobs:
            condition, chain = chains[i]
            for m in methods:
                if journal.done(m, 0, i):
                    continue
                keep = [] if (shard == 0 and m == first and len(observations) < args.timing_obs) else None
                result = run_chain(env, policy_for(m, teacher, student), configs[m], condition, chain,
                                   args.steps_per_subtask, keep_obs=keep)
                result["chain_index"] = i
                journal.record(m, 0, i, result, keep)
                observations.extend(keep or [])
                bar.update(1)
                bar.set_postfix({m: f"{np.mean([journal.result(m, 0, j)['completed'] for j in jobs if journal.done(m, 0, j)]):.2f}"
                                 for m in methods if any(journal.done(m, 0, j) for j in jobs)})
        bar.close()
        episodes = {m: [journal.result(m, 0, i) for i in jobs] for m in methods}
    result = {"suite": SUITE, "chain_set": args.chain_set, "subtasks": subtasks, "seed": args.seed,
              "steps_per_subtask": args.steps_per_subtask, "decode": {m: c.to_dict() for m, c in configs.items()},
              "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "torch_threads": torch.get_num_threads(),
              "teacher": args.teacher or "shipped reference", "student": args.student or "shipped reference",
              "shard": args.shard, "episodes": episodes}
    if observations:
        result["throughput"] = measure(teacher, student, observations, configs, methods, warmup=2)
        result["agreement"] = token_agreement(teacher, student, observations[: args.agreement_obs], configs,
                                              methods, reference)
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
    for eps in merged["episodes"].values():
        eps.sort(key=lambda e: e["chain_index"])
    return merged


def table_rows(result: dict) -> list[dict]:
    speed = {r["method"]: r for r in result.get("throughput", [])}
    rows = []
    for m, eps in result["episodes"].items():
        summary = protocol.chain_summary([e["completed"] for e in eps])
        lo, hi = summary["avg_len_ci95"]
        row = {"method": m, "chains": summary["chains"], "avg_len": summary["avg_len"],
               "avg_len_ci": f"[{lo:.2f}, {hi:.2f}]", "agreement": result.get("agreement", {}).get(m)}
        row.update({f"pos{p['position']}": p["rate"] for p in summary["positions"]})
        row.update({k: v for k, v in speed.get(m, {}).items() if k != "method"})
        rows.append(row)
    return rows


def per_subtask_rows(result: dict) -> list[dict]:
    """Per subtask and decoder: successes / attempts (a subtask is attempted when the chain reaches it)."""
    names = sorted({s["subtask"] for eps in result["episodes"].values() for e in eps for s in e["subtasks"]})
    rows = []
    for name in names:
        row = {"subtask": name}
        for m, eps in result["episodes"].items():
            tries = [s["success"] for e in eps for s in e["subtasks"] if s["subtask"] == name]
            row[m] = f"{sum(tries)}/{len(tries)}" if tries else None
        rows.append(row)
    return rows


COLUMNS = ([("method", "decoder", "s"), ("chains", "chains", "d"), ("avg_len", "avg len", ".2f"),
            ("avg_len_ci", "95% CI", "s")] + [(f"pos{i}", f"{i}/5", ".0%") for i in range(1, 6)]
           + [("agreement", "tokens = teacher", ".0%")] + SPEED_COLUMNS[1:])


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(names, [r.get("tokens_per_s") or 0 for r in rows], color="tab:blue")
    axes[0].set_ylabel("action tokens/s")
    for r in rows:
        axes[1].plot(range(1, 6), [100 * r[f"pos{i}"] for i in range(1, 6)], marker="o", label=r["method"])
    axes[1].set_xlabel("chain position")
    axes[1].set_ylabel("chains reaching it, %")
    axes[1].set_ylim(0, 100)
    axes[1].set_xticks(range(1, 6))
    axes[1].legend(fontsize=7)
    axes[0].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict, out: str) -> None:
    rows = table_rows(result)
    if result["chain_set"] == "covered":
        protocol_note = (f"chains drawn only from the {len(result['subtasks'])} subtasks the policy covers "
                         f"(seed {result['seed']}): NOT CALVIN's official 34-subtask chains, not comparable "
                         "with published average lengths")
    else:
        protocol_note = "CALVIN's official evaluation chains (its sequence generator, all 34 subtasks)"
    header = (f"# CALVIN (scene D) decoders side by side ({result['date']}, {result['machine']}, "
              f"{result['torch_threads']} torch threads)\n\n{protocol_note}; {result['steps_per_subtask']} steps "
              f"per subtask. Speed measured on {result.get('timing_observations', 0)} observations from the run.")
    if result.get("decode"):
        header += f"\n\ndecoding settings: {settings_text(result['decode'])}"
    table = markdown_table(rows, COLUMNS)
    columns = [("subtask", "subtask", "s")] + [(m, m, "s") for m in result["episodes"]]
    table += "\n\nsuccess per subtask (attempts: the chains that reached it):\n\n" + markdown_table(
        per_subtask_rows(result), columns)
    print(header + "\n\n" + table)
    write_json(out + ".json", result)
    with open(out + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot(rows, out + ".png")
    print(f"wrote {out}.json, .md and .png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher policy directory (default: the shipped CALVIN reference)")
    p.add_argument("--student", help="student policy directory (default: the shipped CALVIN reference)")
    p.add_argument("--chains", type=int, default=20, help="number of chains (CALVIN's benchmark: 1000)")
    p.add_argument("--chain-set", choices=CHAIN_SETS, default="covered")
    p.add_argument("--subtasks", default=None, help="with --chain-set covered: comma-separated subtasks "
                   "(default: those the scripted expert covers)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the covered chains (the shipped reference's "
                   "demonstrations used seed 0)")
    p.add_argument("--steps-per-subtask", type=int, default=protocol.STEPS_PER_SUBTASK)
    p.add_argument("--calvin-env", default=None, help="path of a calvin_env checkout, if it is not installed")
    p.add_argument("--decoders", default=",".join(METHODS))
    p.add_argument("--timing-obs", type=int, default=24, help="observations kept for the throughput phase")
    p.add_argument("--agreement-obs", type=int, default=12)
    add_override_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--shard", default=None, help="i/n: run every n-th chain from the i-th (default: torchrun rank)")
    p.add_argument("--merge", nargs="+", help="merge shard JSON files instead of running")
    p.add_argument("--out", default="outputs/bench_calvin", help="path stem for .json, .md and .png (and the "
                   "journal <stem>.episodes.jsonl)")
    p.add_argument("--fresh", action="store_true", help="discard the journal of an earlier run and start over")


def main(args) -> None:
    if args.merge:
        report(merge(read_shards(args.merge)), args.out)
        return
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.steps_per_subtask < 1:
        raise SystemExit("--steps-per-subtask must be >= 1")
    if args.shard is None:
        args.shard = f"{os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')}"
    result = run(args)
    report(result, shard_stem(args.out, args.shard))
