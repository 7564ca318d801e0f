"""Dynamic, static-shape and compiled decoding side by side: every decoder in
three modes on the same frames, in one process.

    fast-dvla compile-bench                                   # the shipped LIBERO pair, random observations
    fast-dvla compile-bench --episode data/libero_object_heldout_35_37 --out eval/results/compile_cpu

Modes: ``dynamic`` (the default engine: windows sized to the blocks in flight),
``static`` (``static_shapes=True``: two fixed forward shapes) and ``compiled``
(static, each forward through ``torch.compile``). Per decoder and mode: NFE,
query tokens and host reads (syncs; the compiled mode's counted on its eager
twin, the same loop) per chunk, latency, action tokens/s; for
``compiled`` the compile time (its first chunks, less an eager chunk's time)
and the graphs compiled while timing, which must be none: with ``--episode``
the frames are one recorded episode's, in order, chunk after chunk as a
policy sees them. Tokens of the three modes (as actions) are compared on every frame.
"""
from __future__ import annotations

import argparse
import os
import datetime
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from fast_dvla import FastDVLAPolicy
from fast_dvla.benchmark.observations import random_observation
from fast_dvla.benchmark.report import markdown_table, write_json
from fast_dvla.benchmark.syncs import HostSyncCounter
from fast_dvla.benchmark.throughput import parse_decoders, policy_configs, policy_for
from fast_dvla.benchmark.timing import summarize, timed
from fast_dvla.config import COMPILE_MODES, METHODS
from fast_dvla.data.episodes import list_episodes, read_dataset_info, read_episode
from fast_dvla.policy import reference_policy_dir

MODES = ("dynamic", "static", "compiled")
COLUMNS = [("method", "decoder", "s"), ("mode", "mode", "s"), ("nfe", "NFE/chunk", ".1f"),
           ("query_tokens", "query tokens/chunk", ".0f"), ("host_syncs", "host syncs/chunk", ".1f"),
           ("latency_ms", "latency ms (median)", ".2f"), ("tokens_per_s", "action tokens/s", ".0f"),
           ("vs_dynamic", "x dynamic", ".2f"), ("compile_s", "compile s", ".1f"),
           ("recompiles", "graphs compiled while timing", "d")]


def mode_config(config, mode: str, compile_mode: str = "default"):
    compiled = mode == "compiled"
    return config.replace(static_shapes=mode != "dynamic", compile=compiled,
                          compile_mode=compile_mode if compiled else "default")


def episode_observations(root: str, n: int, stride: int) -> list[dict]:
    """The first recorded episode under ``root``: every ``stride``-th frame, ``n`` at most, in order."""
    info = read_dataset_info(root)
    ep = read_episode(list_episodes(root)[0], info)
    frames = range(0, len(ep["action"]), stride)
    return [{"images": {c: ep["images"][c][t] for c in ep["images"]}, "state": ep["state"][t],
             "instruction": str(ep["instruction"])} for t in list(frames)[:n]]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cudagraph_skips() -> int:
    """Graphs inductor did not record as CUDA graphs (``reduce-overhead`` on a GPU), with its reasons logged."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def run(args) -> dict:
    methods = parse_decoders(args.decoders)
    torch.set_num_threads(args.threads)
    if not args.warm_compile_cache:  # cold compile times: inductor's on-disk cache would hide them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fast_dvla_inductor_")
    args.teacher = args.teacher or reference_policy_dir("teacher")
    args.student = args.student or reference_policy_dir("student")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch here")
    teacher = FastDVLAPolicy.from_pretrained(args.teacher, device=args.device)
    student = FastDVLAPolicy.from_pretrained(args.student, device=args.device)
    if args.episode:
        obs = episode_observations(args.episode, args.repeats, args.stride)
    else:
        obs = [random_observation(teacher, 1, args.seed + i) for i in range(args.repeats)]
    base = policy_configs(methods, teacher, student)
    configs = {(m, mode): mode_config(base[m], mode, args.compile_mode) for m in methods for mode in MODES}
    device = teacher.device

    compile_s, graphs = {}, {}
    for (m, mode), config in configs.items():  # warm-up; compiled: time its first chunks, less an eager one
        policy = policy_for(m, teacher, student)
        before = compiled_graphs()
        start = time.perf_counter()
        for _ in range(args.warmup):
            policy.predict_action_chunk(obs[0], config)
        if mode == "compiled":
            _, eager = timed(lambda: policy.predict_action_chunk(obs[0], configs[m, "static"]), device)
            compile_s[m] = time.perf_counter() - start - eager * (args.warmup + 1)
            graphs[m] = compiled_graphs() - before

    times = {key: [] for key in configs}
    stats = {key: [] for key in configs}
    mismatches = {m: 0 for m in methods}
    recompiles = {m: 0 for m in methods}
    for o in tqdm(obs, desc="timing modes"):
        for m in methods:
            policy = policy_for(m, teacher, student)
            actions = {}
            for mode in MODES:
                before = compiled_graphs()
                chunk, dt = timed(lambda: policy.predict_action_chunk(o, configs[m, mode]), device)
                recompiles[m] += compiled_graphs() - before
                times[m, mode].append(dt)
                actions[mode] = chunk
                # counted on an untimed repeat (the counter costs time), eagerly: a compiled forward run under
                # the counter's dispatch mode is not the compiled graph, and its frames would be recompiled
                with HostSyncCounter() as syncs:
                    policy.predict_action_chunk(o, configs[m, "static" if mode == "compiled" else mode])
                stats[m, mode].append((policy.last_stats.nfe, policy.last_stats.query_tokens, syncs.total))
            mismatches[m] += any(not np.array_equal(actions[mode], actions["dynamic"]) for mode in MODES)

    rows = []
    for m in methods:
        chunk_tokens = policy_for(m, teacher, student).model.chunk_len
        dynamic_s = summarize(times[m, "dynamic"])["median_s"]
        for mode in MODES:
            lat = summarize(times[m, mode])["median_s"]
            n = len(stats[m, mode])
            rows.append({"method": m, "mode": mode,
                         "nfe": sum(s[0] for s in stats[m, mode]) / n,
                         "query_tokens": sum(s[1] for s in stats[m, mode]) / n,
                         "host_syncs": sum(s[2] for s in stats[m, mode]) / n,
                         "latency_ms": lat * 1e3, "tokens_per_s": chunk_tokens / lat, "vs_dynamic": dynamic_s / lat,
                         # no new graph: the decoder runs the graphs an earlier decoder of the same model compiled
                         "compile_s": compile_s.get(m) if mode == "compiled" and graphs.get(m) else None,
                         "graphs_at_warmup": graphs.get(m) if mode == "compiled" else None,
                         "recompiles": recompiles[m] if mode == "compiled" else None,
                         "frames_with_token_mismatch": mismatches[m]})
    return {"command": "fast-dvla compile-bench " + shlex.join(args.argv), "teacher": os.path.relpath(args.teacher),
            "student": os.path.relpath(args.student), "observations": args.episode or "random", "frames": len(obs),
            "device": str(device), "compile_mode": args.compile_mode,
            "cudagraph_skips": cudagraph_skips(), "torch": torch.__version__, "cold_compile_cache": not args.warm_compile_cache, "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "date": datetime.date.today().isoformat(),
            "results": rows}


def markdown(result: dict) -> str:
    lines = [f"# Dynamic vs static-shape vs compiled decoding ({result['date']})", "",
             f"`{result['command']}`", "",
             f"{result['frames']} frames ({result['observations']}), {result.get('device', 'cpu')}, compile mode "
             f"{result.get('compile_mode', 'default')} (graphs not recorded as CUDA graphs: "
             f"{result.get('cudagraph_skips', 0)}), torch {result['torch']}, "
             f"{result['torch_threads']} threads, {result['machine']}. Teacher `{result['teacher']}`, "
             f"student `{result['student']}`. Compile time: the compiled mode's warm-up less eager time "
             f"({'cold' if result.get('cold_compile_cache') else 'warm'} inductor cache); a decoder with none "
             f"runs the graphs an earlier decoder of the same model compiled (the student's decoders share its two "
             f"window shapes). \"graphs compiled while timing\": new graphs after the warm-up (0: no recompiles). "
             f"Host syncs of the compiled mode are counted on its eager twin (the same loop).", "",
             markdown_table(result["results"], COLUMNS), ""]
    bad = {r["method"]: r["frames_with_token_mismatch"] for r in result["results"] if r["frames_with_token_mismatch"]}
    lines.append(f"Token mismatches between modes: {bad or 'none'}.")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher policy directory (default: the shipped LIBERO-Object teacher)")
    p.add_argument("--student", help="student policy directory (default: the shipped LIBERO-Object student)")
    p.add_argument("--decoders", default=",".join(METHODS))
    p.add_argument("--episode", help="an episodes directory: time on its first episode's frames, in order "
                   "(default: random observations)")
    p.add_argument("--stride", type=int, default=8, help="with --episode: every STRIDE-th frame (a chunk's steps)")
    p.add_argument("--repeats", type=int, default=20, help="frames timed")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled mode (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings)")
    p.add_argument("--warm-compile-cache", action="store_true", help="use inductor's on-disk cache as found "
                   "(default: a fresh one, so the compile time is a cold start's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write OUT.json and OUT.md")


def main(args, argv=None) -> None:
    args.argv = sys.argv[2:] if argv is None else argv
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        write_json(args.out + ".json", result)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        print(f"wrote {args.out}.json and {args.out}.md")
