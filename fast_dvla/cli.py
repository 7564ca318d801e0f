"""The ``fast-dvla`` command. Each subcommand lives in its own module and is
imported only when used, so ``fast-dvla --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and main(args), one-line help)
SUBCOMMANDS = {
    "train-teacher": ("fast_dvla.commands.train:TeacherCommand", "masked-diffusion training of the teacher"),
    "distill": ("fast_dvla.commands.train:DistillCommand", "distil the teacher into a block-causal student"),
    "export": ("fast_dvla.commands.export", "copy a policy directory, weights in half precision, decoding settings"),
    "record": ("fast_dvla.commands.record", "record scripted-expert demonstrations (record libero|calvin)"),
    "bench": ("fast_dvla_eval.bench", "closed-loop benchmark of every decoder (bench libero|calvin)"),
    "micro-bench": ("fast_dvla_eval.micro_bench", "time every decoder on the same model and inputs"),
    "profile-chunk": ("fast_dvla_eval.profile_chunk", "CPU profile of one chunk: time per model part, Python overhead"),
    "compile-bench": ("fast_dvla_eval.compile_bench", "dynamic vs static-shape vs torch.compile decoding, per decoder"),
    "fidelity": ("fast_dvla_eval.fidelity", "open-loop fidelity of a policy on recorded demonstrations"),
    "tune": ("fast_dvla_eval.tune", "sweep a decoder's thresholds: Pareto front of speed vs fidelity, a recommendation"),
    "bench-kernels": ("fast_dvla_eval.bench_kernels", "time the attention backends on one GPU"),
    "decode-order": ("fast_dvla_eval.decode_order", "closed loop: the teacher decoded all at once vs left to right"),
    "convergence": ("fast_dvla_eval.convergence", "student convergence: distillation vs block diffusion vs scratch"),
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
