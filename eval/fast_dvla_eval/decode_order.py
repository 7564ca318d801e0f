"""Does your data suit a block-causal student? Decode the *teacher* left to right.

    python -m fast_dvla_eval.decode_order --tasks all --init-states 15-16 --shard 0/2 --out outputs/order
    python -m fast_dvla_eval.decode_order --merge "outputs/order.shard*.json" --out outputs/order

A block-causal student must decode a chunk in time order: each step's tokens
are committed before it may see a later step's. A bidirectional teacher
decoding the whole chunk at once commits its most confident tokens first,
often later steps. This runs the same teacher both ways in closed loop
(``all_at_once``: its vanilla decoding; ``left_to_right``: block by block,
still bidirectional and uncached, the pipelined engine with ``tau_add =
tau_act = 1``). A gap between the two points at the data, e.g. a phase
change whose timing the observation does not show (decoded in time order,
it is postponed for ever under greedy decoding). It is not a bound on a
student: the teacher never trained on "earlier steps known, all later ones
masked", the student does, so a distilled student can do better left to
right than its teacher.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from fast_dvla import DecodeConfig, FastDVLAPolicy
from fast_dvla.benchmark.report import markdown_table, write_json
from fast_dvla.decoding.pipelined import decode_pipelined
from fast_dvla.envs.rollout import libero_jobs, libero_task_envs, run_episode
from fast_dvla.envs.sharding import read_shards, shard_stem
from fast_dvla.masks import BIDIRECTIONAL
from fast_dvla.policy import reference_policy_dir

ORDERS = ("all_at_once", "left_to_right")


def decode_left_to_right(model, prefix: torch.Tensor, config: DecodeConfig, trace: list | None = None,
                         categorical=None):
    """Block diffusion's order (one block at a time, ``config``'s commit rule) under the
    model's bidirectional attention, every forward uncached over the whole sequence."""
    # the teacher's own attention: only the order changes
    return decode_pipelined(model, prefix, config.replace(method="block_diffusion", use_cache=False),
                            trace=trace, categorical=categorical, attention=BIDIRECTIONAL)


class LeftToRightPolicy(FastDVLAPolicy):
    """A bidirectional policy whose chunks are decoded one block (time step) after another."""

    def decode_prefix(self, prefix: torch.Tensor, config: DecodeConfig):
        return decode_left_to_right(self.model, prefix, config,
                                    categorical=self.action_tokenizer.categorical_slots(self.model.config.horizon))


def run(args) -> dict:
    path = args.policy or reference_policy_dir("teacher")
    policies = {"all_at_once": FastDVLAPolicy.from_pretrained(path),
                "left_to_right": LeftToRightPolicy.from_pretrained(path)}
    configs = {"all_at_once": DecodeConfig(method="vanilla"), "left_to_right": DecodeConfig(tau_conf=args.tau_conf)}
    jobs = libero_jobs(args.suite, args.tasks, args.init_states, args.shard)
    episodes = {o: [] for o in ORDERS}
    bar = tqdm(total=len(jobs) * len(ORDERS), desc="teacher, both decoding orders")
    for task, env, inits in libero_task_envs(args.suite, jobs, policies["all_at_once"].model.config):
        for init in inits:
            for order in ORDERS:
                r = run_episode(env, policies[order], configs[order], init, env.max_steps)
                episodes[order].append({"task": task, "init": init, "success": r["success"], "steps": r["steps"],
                                        "nfe": float(np.mean(r["nfe"]))})
                bar.update(1)
    bar.close()
    return {"policy": path, "suite": args.suite, "shard": args.shard, "episodes": episodes}


COLUMNS = [("order", "decoding order", ""), ("successes", "successes", "d"), ("episodes", "episodes", "d"),
           ("success", "success", ".0%"), ("nfe", "NFE per chunk", ".1f")]


def summary_rows(result: dict) -> list[dict]:
    return [{"order": order, "episodes": len(eps), "successes": sum(e["success"] for e in eps),
             "success": float(np.mean([e["success"] for e in eps])), "nfe": float(np.mean([e["nfe"] for e in eps]))}
            for order, eps in result["episodes"].items() if eps]


def merge(results: list[dict]) -> dict:
    merged = dict(results[0], shard=None)
    merged["episodes"] = {o: [e for r in results for e in r["episodes"][o]] for o in ORDERS}
    return merged


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="a bidirectional teacher (default: the shipped reference teacher)")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default="all")
    p.add_argument("--init-states", default="15-16")
    p.add_argument("--tau-conf", type=float, default=0.5, help="left to right: the commit threshold")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th episode from the i-th")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--merge", nargs="+", help="merge shard JSON files instead of running")
    p.add_argument("--out", default="outputs/decode_order")


def main(args) -> dict:
    if args.merge:
        result = merge(read_shards(args.merge))
        out = args.out
    else:
        torch.set_num_threads(args.threads)
        result = run(args)
        out = shard_stem(args.out, args.shard)
    write_json(out + ".json", result)
    table = markdown_table(summary_rows(result), COLUMNS)
    with open(out + ".md", "w") as f:
        f.write(f"Teacher `{result['policy']}` decoded all at once and left to right, same episodes.\n\n{table}\n")
    print(table)
    return result
