"""``fast-dvla export``: copy a trained policy directory, optionally storing
its weights in half precision (how the shipped reference models are made),
and the decoding settings chosen for it (saved in its config.json, where
``from_pretrained`` and the benchmarks read them)."""
from __future__ import annotations

import argparse

import torch

from .config import METHODS, TOKEN_RULES
from .policy import FastDVLAPolicy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
THRESHOLDS = ("tau_conf", "tau_add", "tau_act")
SETTINGS = ("method",) + THRESHOLDS + ("vanilla_steps", "token_rule", "near_bins")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="trained policy directory (e.g. runs/<run>/policy)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    keep = "(default: keep the policy's)"
    p.add_argument("--method", choices=METHODS, help=f"the decoder from_pretrained uses {keep}")
    for name in THRESHOLDS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"decoding {name} to save with the policy {keep}")
    p.add_argument("--vanilla-steps", type=int, help=f"forwards of the vanilla schedules {keep}")
    p.add_argument("--token-rule", choices=TOKEN_RULES, help=f"which token a greedy commit writes {keep}")
    p.add_argument("--near-bins", type=int, help=f"with --token-rule mean: confidence = mass within this many bins {keep}")


def main(args) -> None:
    policy = FastDVLAPolicy.from_pretrained(args.policy)
    changes = {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}
    try:
        policy.decode_config = policy.decode_config.replace(**changes)
    except ValueError as e:
        raise SystemExit(f"bad decoding settings: {e}")
    policy.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    settings = ", ".join(f"{k}={getattr(policy.decode_config, k)}" for k in SETTINGS[1:])
    print(f"wrote {args.out} ({args.dtype} weights; {policy.decode_config.method} decoding, {settings})")
