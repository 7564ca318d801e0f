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

import numpy as np
from tqdm import tqdm

from fast_dvla.benchmark.closed_loop import (add_run_arguments, add_speed_phase, load_pair, merge_shards,
                                             open_journal, run_main, run_record, write_report)
from fast_dvla.benchmark.report import markdown_table, settings_text
from fast_dvla.benchmark.throughput import COLUMNS as SPEED_COLUMNS
from fast_dvla.benchmark.throughput import overrides_from, parse_decoders, policy_for
from fast_dvla.envs import calvin_protocol as protocol
from fast_dvla.envs.calvin_rollout import CHAIN_SETS, calvin_chains, calvin_jobs, run_chain
from fast_dvla.envs.journal import policy_location
from fast_dvla.envs.sharding import parse_shard
from fast_dvla.plotting import headless_pyplot

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
    teacher, student, configs, reference = load_pair(args, methods, SUITE)
    from fast_dvla.envs.calvin_env import CalvinEnv  # after the cheap checks: building the scene takes a while

    journal = open_journal(args, journal_arguments(args, configs, subtasks), "chains")
    first = methods[0]
    observations: list = []
    with journal, CalvinEnv(image_size=teacher.model.config.image_size, calvin_path=args.calvin_env) as env:
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
              "steps_per_subtask": args.steps_per_subtask, **run_record(args, configs, episodes)}
    return add_speed_phase(result, args, teacher, student, observations, configs, methods, reference)


def merge(results: list[dict]) -> dict:
    return merge_shards(results, order=lambda chain: chain["chain_index"])


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
    plt = headless_pyplot()
    if plt is None:
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
    write_report(result, out, header + "\n\n" + table, lambda path: plot(rows, path))


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
    add_run_arguments(p, "chain", "outputs/bench_calvin")


def main(args) -> None:
    if not args.merge and args.steps_per_subtask < 1:
        raise SystemExit("--steps-per-subtask must be >= 1")
    run_main(args, run, merge, report)
