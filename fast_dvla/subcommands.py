"""Commands with one sub-command per environment (``bench libero``, ``record calvin``): the argparse plumbing.

Each target is a module with ``add_arguments(parser)`` and ``main(args)``; its
docstring is the target's help.
"""
from __future__ import annotations

import argparse
import importlib


def add_target_parsers(p: argparse.ArgumentParser, targets: dict[str, str]) -> None:
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, module in targets.items():
        mod = importlib.import_module(module)
        doc = (mod.__doc__ or "").strip()
        sp = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_target_module=module)


def run_target(args):
    return importlib.import_module(args._target_module).main(args)
