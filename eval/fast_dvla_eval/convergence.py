"""Convergence of the block-causal student: asymmetric distillation from the
teacher vs the block-diffusion loss from the same teacher weights vs the
block-diffusion loss from scratch, on the synthetic task.

    fast-dvla convergence [--steps 400] [--eval-every 25] [--out outputs/convergence]

Metric: action-token accuracy of the student's ``fast_dvla`` decoding on
held-out episodes; "steps to target" is the first evaluation at or above
``--target`` times the teacher's own (vanilla) accuracy. The paper reports
~5x (vs block diffusion from the teacher) and ~10x (vs scratch) on 7B models.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from fast_dvla import DecodeConfig, decode
from fast_dvla.training.config import TrainConfig
from fast_dvla.training.dataset import ChunkDataset
from fast_dvla.training.plots import plot_curves
from fast_dvla.training.synthetic import write_synthetic_dataset
from fast_dvla.training.trainer import Trainer

from fast_dvla.benchmark.report import markdown_table, write_json

TINY = dict(image_size=16, image_grid=2, instr_len=4, hidden_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, intermediate_size=128, horizon=4, action_dim=7, block_size=7)
RUNS = {  # name -> (loss, init)
    "asymmetric distillation (from teacher)": ("asymmetric", "teacher"),
    "block diffusion (from teacher)": ("block_diffusion", "teacher"),
    "block diffusion (from scratch)": ("block_diffusion", "scratch"),
}


def token_accuracy(model, dataset: ChunkDataset, method: str) -> float:
    batch = dataset.batch(range(len(dataset)))
    with torch.no_grad():
        prefix = model.embed_prefix(batch["images"], batch["instr_ids"], batch["state"])
        tokens = decode(model, prefix, DecodeConfig(method=method)).tokens
    return (tokens == batch["tokens"]).float().mean().item()


def run(args) -> dict:
    work = args.workdir or tempfile.mkdtemp(prefix="fast_dvla_convergence_")
    train_dir = write_synthetic_dataset(os.path.join(work, "train"), args.episodes, seed=0)
    held_dir = write_synthetic_dataset(os.path.join(work, "heldout"), 12, seed=1)
    teacher_cfg = TrainConfig(stage="teacher", data=train_dir, out=os.path.join(work, "teacher"), model=dict(TINY),
                              steps=args.teacher_steps, batch_size=32, lr=2e-3, warmup_steps=20, log_every=50,
                              save_every=10**9, seed=args.seed)
    teacher = Trainer(teacher_cfg)
    teacher.train()
    teacher_path = teacher.export()
    heldout = ChunkDataset(held_dir, teacher.model.config, teacher.dataset.action_tokenizer,
                           teacher.dataset.state_norm, progress=False)
    teacher_acc = token_accuracy(teacher.model.eval(), heldout, "vanilla")
    target = args.target * teacher_acc

    def evaluate(model, step):
        return {"accuracy": token_accuracy(model, heldout, "fast_dvla")}

    rows, curves = [], {}
    for name, (loss, init) in RUNS.items():
        cfg = TrainConfig(stage="distill", data=train_dir, out=os.path.join(work, loss + "_" + init),
                          teacher=teacher_path, student="full", loss=loss, init=init, steps=args.steps,
                          batch_size=32, lr=1e-3, warmup_steps=20, log_every=args.eval_every,
                          save_every=10**9, seed=args.seed)
        trainer = Trainer(cfg)
        history = trainer.train(eval_fn=evaluate, eval_every=args.eval_every)
        history = [{"step": 0, **evaluate(trainer.model.eval(), 0)}] + history
        curves[name] = history
        reached = next((h["step"] for h in history if h.get("accuracy", -1) >= target), None)
        rows.append({"run": name, "steps_to_target": reached, "final_accuracy": history[-1]["accuracy"],
                     "wall_s": trainer.wall})
    base = rows[0]["steps_to_target"]
    for r in rows:
        r["x_slower"] = (r["steps_to_target"] / base) if (r["steps_to_target"] and base) else None
    return {"teacher_accuracy": teacher_acc, "target_accuracy": target, "target_fraction": args.target,
            "steps": args.steps, "eval_every": args.eval_every, "rows": rows, "curves": curves}


COLUMNS = [("run", "student", "s"), ("steps_to_target", "steps to target", "d"),
           ("x_slower", "x asymmetric", ".1f"), ("final_accuracy", "final accuracy", ".3f"), ("wall_s", "train s", ".0f")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=400, help="training steps of each student run")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--target", type=float, default=1.0, help="fraction of the teacher's accuracy to reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where datasets and runs go (default: a temporary directory)")
    p.add_argument("--out", default="outputs/convergence", help="path stem for .json, .md and .png")


def main(args) -> None:
    result = run(args)
    table = markdown_table(result["rows"], COLUMNS)
    header = (f"# Student convergence on the synthetic task\n\nteacher (vanilla) token accuracy "
              f"{result['teacher_accuracy']:.3f}; target {result['target_fraction']:.0%} of it = "
              f"{result['target_accuracy']:.3f}; '-' = not reached in {result['steps']} steps")
    print(header + "\n\n" + table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot_curves(result["curves"], "accuracy", args.out + ".png", title="student fast_dvla token accuracy",
                logy=False)
    print(f"wrote {args.out}.json, .md and .png")
