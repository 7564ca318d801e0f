"""``fast-dvla export``: copy a trained policy directory, optionally storing
its weights in half precision (how the shipped reference models are made),
and the decoding settings chosen for it (saved in its config.json, where
``from_pretrained`` and the benchmarks read them)."""
from __future__ import annotations

import argparse

import torch

from .config import METHODS, TUNABLE_SETTINGS, add_setting_arguments
from .policy import FastDVLAPolicy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS = ("method",) + tuple(name for name, _, _ in TUNABLE_SETTINGS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="trained policy directory (e.g. runs/<run>/policy)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--method", choices=METHODS, help="the decoder from_pretrained uses (default: keep the policy's)")
    add_setting_arguments(p, "saved with the policy (default: keep the policy's)")


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
