"""``fast-dvla export``: copy a trained policy directory, optionally storing
its weights in half precision (how the shipped reference models are made),
and the decoding settings chosen for it (saved in its config.json, where
``from_pretrained`` and the benchmarks read them): those of its default
decoder, or with ``--for-method`` those of another decoder, used when that
one is asked for by name."""
from __future__ import annotations

import argparse

import torch

from fast_dvla.config import METHODS, TUNABLE_SETTINGS, add_setting_arguments
from fast_dvla.policy import FastDVLAPolicy

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS = tuple(name for name, _, _ in TUNABLE_SETTINGS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="trained policy directory (e.g. runs/<run>/policy)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--method", choices=METHODS, help="the decoder from_pretrained uses (default: keep the policy's)")
    p.add_argument("--for-method", choices=METHODS,
                   help="save the settings below for this decoder, used when it is asked for by name "
                        "(benchmarks, decode_config_for), instead of for the default decoder")
    add_setting_arguments(p, "saved with the policy (default: keep the policy's)")


def settings_text(policy: FastDVLAPolicy) -> str:
    default = ", ".join(f"{k}={getattr(policy.decode_config, k)}" for k in SETTINGS)
    text = f"{policy.decode_config.method} decoding by default, {default}"
    for method, own in policy.method_settings.items():
        text += f"; {method} by name: " + ", ".join(f"{k}={v}" for k, v in own.items())
    return text


def main(args) -> None:
    changes = {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}
    if args.for_method and not changes:
        raise SystemExit("--for-method saves settings for a decoder: give at least one (--tau-conf ... --near-bins)")
    policy = FastDVLAPolicy.from_pretrained(args.policy)
    try:
        policy.configure_decoding(changes, method=args.method, for_method=args.for_method)
    except ValueError as e:
        raise SystemExit(f"bad decoding settings: {e}")
    policy.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    print(f"wrote {args.out} ({args.dtype} weights; {settings_text(policy)})")
