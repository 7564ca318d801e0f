"""``fast-dvla record TARGET``: scripted-expert demonstrations (``libero``, ``calvin``)."""
from __future__ import annotations

from fast_dvla.subcommands import add_target_parsers, run_target

TARGETS = {"libero": "fast_dvla.commands.record_libero", "calvin": "fast_dvla.commands.record_calvin"}


def add_arguments(p) -> None:
    add_target_parsers(p, TARGETS)


def main(args):
    return run_target(args)
