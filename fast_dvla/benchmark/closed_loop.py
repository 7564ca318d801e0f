"""What ``bench libero`` and ``bench calvin`` share: the policy pair and its decoding settings, the
journal a shard resumes from, the speed phase on observations kept from the run, shard merging, the
report files, and the flags and entry point around them. Each benchmark owns its episodes, its
scores and its table."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from typing import Callable

import torch

from ..config import METHODS
from ..envs.journal import EpisodeJournal, journal_path
from ..envs.sharding import read_shards, shard_stem
from ..policy import FastDVLAPolicy, reference_policy_dir
from .agreement import token_agreement
from .report import write_json
from .throughput import add_override_arguments, measure, overrides_from, policy_configs, process_peak_rss_mb


def load_pair(args, methods: list[str], suite: str = "libero_object"):
    """(teacher, student, {method: DecodeConfig}, the teacher's vanilla config): the policies of
    ``--teacher``/``--student`` (default: the shipped reference of ``suite``), each decoder with its
    policy's saved settings and the override flags on top; exits on a bad setting."""
    teacher = FastDVLAPolicy.from_pretrained(args.teacher or reference_policy_dir("teacher", suite))
    student = FastDVLAPolicy.from_pretrained(args.student or reference_policy_dir("student", suite))
    overrides = overrides_from(args)
    try:
        configs = policy_configs(methods, teacher, student, **overrides)
        reference = policy_configs(["vanilla"], teacher, student, **overrides)["vanilla"]
    except ValueError as e:
        raise SystemExit(f"bad decoding settings: {e}")
    return teacher, student, configs, reference


def open_journal(args, arguments: dict, unit: str) -> EpisodeJournal:
    """This shard's journal, resumed if it holds ``unit``s (episodes, chains); exits naming an argument
    that differs from the run that wrote it (``arguments``: what a resumed run must share)."""
    path = journal_path(shard_stem(args.out, args.shard))
    try:
        journal = EpisodeJournal(path, arguments, fresh=args.fresh)
    except ValueError as e:
        raise SystemExit(str(e))
    if len(journal):
        print(f"resuming from {path}: {len(journal)} {unit} done")
    return journal


def run_record(args, configs: dict, episodes: dict) -> dict:
    """The fields every benchmark result has: settings, where and when, which policies, the shard."""
    return {"decode": {m: c.to_dict() for m, c in configs.items()}, "date": datetime.date.today().isoformat(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            "teacher": args.teacher or "shipped reference", "student": args.student or "shipped reference",
            "shard": args.shard, "episodes": episodes}


def add_speed_phase(result: dict, args, teacher, student, observations: list, configs: dict, methods: list[str],
                    reference) -> dict:
    """Times every decoder on the observations kept from the run (shard 0 keeps them) and measures
    their action tokens' agreement with the teacher's vanilla decoding; then the peak memory."""
    if observations:
        result["throughput"] = measure(teacher, student, observations, configs, methods, warmup=2)
        result["agreement"] = token_agreement(teacher, student, observations[: args.agreement_obs], configs,
                                              methods, reference)
        result["timing_observations"] = len(observations)
    result["peak_rss_mb"] = process_peak_rss_mb()
    return result


def merge_shards(results: list[dict], order: Callable[[dict], object] | None = None) -> dict:
    """One result from its shards: the speed phase's fields from the shard that ran it, every shard's
    episodes per decoder (sorted by ``order`` when given, else in shard order)."""
    results = sorted(results, key=lambda r: int(str(r.get("shard", "0/1")).split("/")[0]))
    first = next((r for r in results if "throughput" in r), results[0])
    merged = {k: v for k, v in first.items() if k != "episodes"}
    merged["episodes"] = {}
    for r in results:
        for m, eps in r["episodes"].items():
            merged["episodes"].setdefault(m, []).extend(eps)
    if order is not None:
        for eps in merged["episodes"].values():
            eps.sort(key=order)
    return merged


def write_report(result: dict, out: str, text: str, plot: Callable[[str], None]) -> None:
    """Prints the report and writes ``out``.json (the result), .md (``text``) and .png (``plot(path)``)."""
    print(text)
    write_json(out + ".json", result)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    plot(out + ".png")
    print(f"wrote {out}.json, .md and .png")


def add_run_arguments(p: argparse.ArgumentParser, unit: str, out: str) -> None:
    """The flags after a benchmark's own: decoders, the speed phase, settings, threads, shards, output."""
    p.add_argument("--decoders", default=",".join(METHODS))
    p.add_argument("--timing-obs", type=int, default=24, help="observations kept for the throughput phase")
    p.add_argument("--agreement-obs", type=int, default=12)
    add_override_arguments(p)  # unset: each decoder runs with the settings saved in its policy's config.json
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--shard", default=None, help=f"i/n: run every n-th {unit} from the i-th (default: torchrun rank)")
    p.add_argument("--merge", nargs="+", help="merge shard JSON files instead of running")
    p.add_argument("--out", default=out, help="path stem for .json, .md and .png; the run's journal, "
                   "<stem>.episodes.jsonl, lets a killed run resume when re-run with the same arguments")
    p.add_argument("--fresh", action="store_true", help=f"discard the journal of an earlier run with this --out "
                   f"and --shard, and run every {unit} again")


def run_main(args, run: Callable, merge: Callable, report: Callable) -> None:
    """A benchmark's entry point: merge shards (``--merge``), or set threads and the shard (default:
    torchrun's rank) and ``report(run(args), stem)``."""
    if args.merge:
        report(merge(read_shards(args.merge)), args.out)
        return
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.shard is None:
        args.shard = f"{os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')}"
    report(run(args), shard_stem(args.out, args.shard))
