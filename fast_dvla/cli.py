"""The ``fast-dvla`` command. Each subcommand lives in its own module and is
imported only when used, so ``fast-dvla --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and main(args), one-line help)
SUBCOMMANDS = {
    "micro-bench": ("fast_dvla.eval.micro_bench", "time every decoder on the same model and inputs"),
    "train-teacher": ("fast_dvla.training.commands:TeacherCommand", "masked-diffusion training of the teacher"),
    "distill": ("fast_dvla.training.commands:DistillCommand", "distil the teacher into a block-causal student"),
    "bench": ("fast_dvla.eval.bench_libero", "closed-loop benchmark of every decoder (bench libero)"),
    "fidelity": ("fast_dvla.eval.fidelity", "open-loop fidelity of a policy on recorded demonstrations"),
    "export": ("fast_dvla.export", "copy a policy directory, weights in half precision"),
    "convergence": ("fast_dvla.eval.convergence", "student convergence: distillation vs block diffusion vs scratch"),
}


def load(target: str):
    """``module`` or ``module:attribute`` -> the object with add_arguments/main."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fast-dvla", description="Fast-dVLA: real-time discrete-diffusion VLAs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            load(module).add_arguments(p)
    args = parser.parse_args(argv)
    load(args._module).main(args)


if __name__ == "__main__":
    main()
