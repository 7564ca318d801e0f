"""Open-loop fidelity: how closely a policy's first chunk matches the
demonstrations' own action chunks, frame by frame, per action dimension.

    fast-dvla fidelity --policy fast_dvla/assets/reference/libero_object/teacher --data data/libero_object_demos
    fast-dvla fidelity --policy runs/libero_object_teacher --data data/libero_object_demos   # a run in progress

A closed-loop episode costs about a minute here; this check costs a fraction
of a second per frame, so it is the first thing to look at while a model
trains: a policy that does not reproduce its own training frames will not
succeed in closed loop (the converse does not hold: small errors compound).
Per dimension: exact-token accuracy, mean absolute error in action units
([-1, 1]) and, for the tokenizer's gripper dimensions, the share of steps whose sign is wrong.
``--policy`` is a policy directory or a training run directory (its latest
checkpoint, exported in memory as the run would export it).

``--tau-conf 0.5,0.3,0.2`` repeats the measurement at each confidence
threshold, with NFE and query tokens per chunk beside the accuracy: the
open-loop side of choosing a threshold (a closed-loop check with ``fast-dvla
bench libero --tau-conf T`` decides).
"""
from __future__ import annotations

import argparse

from fast_dvla.benchmark.fidelity import decode_config, measure
from fast_dvla.benchmark.report import markdown_table, write_json
from fast_dvla.benchmark.throughput import parse_decoders
from fast_dvla.config import METHODS
from fast_dvla.data.frames import sample_frames
from fast_dvla.training.trainer import load_policy


COLUMNS = [("method", "decoder", "s"), ("tau_conf", "tau_conf", "g"), ("frames", "frames", "d"),
           ("nfe", "NFE/chunk", ".2f"), ("query_tokens", "query tokens/chunk", ".0f"),
           ("token_accuracy", "token acc", ".3f"),
           ("acc_xyz", "token acc x/y/z", "s"), ("mae_xyz", "MAE x/y/z", "s"),
           ("gripper_wrong", "gripper wrong", ".3f")]


def to_markdown(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        rows.append(dict(r, acc_xyz="/".join(f"{v:.2f}" for v in r["token_accuracy_per_dim"][:3]),
                         mae_xyz="/".join(f"{v:.3f}" for v in r["mae_per_dim"][:3])))
    return (f"# Open-loop fidelity of {result['policy']}\n\non {result['frames']} frames of "
            f"{result['data']} (seed {result['seed']}); MAE in action units ([-1, 1])\n\n"
            + markdown_table(rows, COLUMNS) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="policy directory, or a training run directory")
    p.add_argument("--data", required=True, help="episodes directory (e.g. data/libero_object_demos)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--decoders", default=None,
                   help=f"comma-separated, of {', '.join(METHODS)} (default: the policy's own)")
    p.add_argument("--tau-conf", default=None, help="comma-separated confidence thresholds to compare "
                   "(default: the policy's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")


def main(args) -> None:
    if args.frames < 1:
        raise SystemExit("--frames must be >= 1")
    policy = load_policy(args.policy)
    methods = parse_decoders(args.decoders) if args.decoders else [policy.decode_config.method]
    try:
        taus = [None] if args.tau_conf is None else [float(t) for t in args.tau_conf.split(",")]
        for t in taus:  # out-of-range thresholds fail here, before any frame is decoded
            decode_config(policy, methods[0], t)
    except ValueError as e:
        raise SystemExit(f"bad --tau-conf {args.tau_conf!r}: {e}")
    frames = sample_frames(args.data, args.frames, policy.model.config.horizon, args.seed)
    result = {"policy": args.policy, "data": args.data, "frames": len(frames), "seed": args.seed,
              "rows": [measure(policy, frames, m, tau_conf=t) for m in methods for t in taus]}
    text = to_markdown(result)
    print(text)
    if args.out:
        write_json(args.out + ".json", result)
        with open(args.out + ".md", "w") as f:
            f.write(text)

