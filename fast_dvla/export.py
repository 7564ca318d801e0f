"""``fast-dvla export``: copy a trained policy directory, optionally storing
its weights in half precision (how the shipped reference models are made)."""
from __future__ import annotations

import argparse

import torch

from .policy import FastDVLAPolicy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="trained policy directory (e.g. runs/<run>/policy)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")


def main(args) -> None:
    policy = FastDVLAPolicy.from_pretrained(args.policy)
    policy.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    print(f"wrote {args.out} ({args.dtype} weights)")
