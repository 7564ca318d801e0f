"""``fast-dvla train-teacher`` and ``fast-dvla distill``.

    fast-dvla train-teacher --config configs/reference/teacher_libero_object.yaml [--set steps=2000 ...]
    fast-dvla distill --config configs/reference/distill_libero_object.yaml
    torchrun --nproc_per_node 2 -m fast_dvla.cli train-teacher --config ...   # DDP (gloo on CPU)

A run directory that already holds a checkpoint is resumed (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from fast_dvla.training.config import TrainConfig
from fast_dvla.training.distributed import init_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config entries, e.g. steps=500 model.num_layers=2")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run directory")


def run(args, stage: str) -> str:
    from fast_dvla.training.trainer import Trainer

    config = TrainConfig.load(args.config, args.overrides)
    if config.stage != stage:
        raise SystemExit(f"{args.config} is a {config.stage!r} config; this command trains the {stage!r} stage")
    dist = init_distributed()
    if args.fresh and dist.is_main and os.path.isdir(config.out):
        shutil.rmtree(config.out)
    trainer = Trainer(config, dist)
    if trainer.resume() and dist.is_main:
        print(f"resumed {config.out} at step {trainer.step}")
    t0 = time.time()
    trainer.train()
    path = trainer.export()
    if dist.is_main:
        last = trainer.history[-1] if trainer.history else {}
        print(f"{stage}: {trainer.step} steps, final loss {last.get('loss', float('nan')):.4f}, "
              f"{time.time() - t0:.0f} s this run; policy written to {path}")
    return path


class TeacherCommand:
    add_arguments = staticmethod(add_arguments)

    @staticmethod
    def main(args):
        run(args, "teacher")


class DistillCommand:
    add_arguments = staticmethod(add_arguments)

    @staticmethod
    def main(args):
        run(args, "distill")
