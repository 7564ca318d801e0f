"""The reduced Dream-VLA run's results (docs/dream_vla.md): loss curves, token agreement of the
distilled student with its teacher, and the micro-benchmark table.

    python scripts/dream_vla_reduced_report.py --run runs/dream_vla_reduced --data runs/dream_vla_reduced/data/eval \\
        --micro-bench eval/results/dream_vla_reduced/micro_bench.json --out eval/results/dream_vla_reduced

Writes into ``--out``: ``teacher_log.json`` and ``distill_log.json`` (the runs' ``log.json``: config
and loss history, the distillation's with its KL part), ``loss.png`` (the teacher's loss, the
distillation's KL and loss), ``agreement.json``/``.md`` and ``micro_bench.md`` (the table of
``fast-dvla micro-bench``'s JSON).

Agreement: on ``--frames`` frames of ``--data`` (episodes the models never trained on), the share of
the 56 action tokens each block-causal decoder writes equal to the teacher's own decoding (its
policy's default: ``vanilla``, 12 steps), for the distilled student and, as the baseline the
distillation has to beat, for the teacher's weights decoded block-causally without any adapter.
Token accuracy against the demonstrated chunk (its bins by the model's ``actions_to_bins``) is
given for both models too, and the distillation loss and its KL part on batches of the same
episodes with the training noise (``StageLoss`` with the teacher frozen).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch

from fast_dvla import FastDVLAPolicy
from fast_dvla.benchmark.agreement import token_agreement
from fast_dvla.benchmark.report import markdown_table, settings_text, write_json
from fast_dvla.benchmark.throughput import COLUMNS
from fast_dvla.data.frames import sample_frames
from fast_dvla.training.config import TrainConfig
from fast_dvla.training.dataset import ObservationChunkDataset
from fast_dvla.training.noise import student_noise
from fast_dvla.training.trainer import StageLoss

STUDENT_METHODS = ("block_diffusion", "fast_dvla", "vanilla_cached")


def demo_accuracy(policy: FastDVLAPolicy, frames, config) -> float:
    """Share of decoded tokens equal to the demonstrated chunk's bins."""
    hits = []
    for obs, chunk in frames:
        prefix, _ = policy.io.observation_prefix(obs)
        with torch.no_grad():
            tokens = policy.decode_prefix(prefix, config).tokens[0].numpy()
        hits.append(np.mean(tokens == policy.io.actions_to_bins(chunk[None])[0]))
    return float(np.mean(hits))


def heldout_kl(teacher, model, data: str, batches: int, seed: int) -> dict:
    """The distillation loss and its KL part (``StageLoss`` with a frozen teacher) of ``model`` on
    ``batches`` batches of 8 from ``data``, with the training noise drawn from ``seed``: the same
    batches and masks for every model."""
    cfg = TrainConfig(stage="distill", data=data, out="unused", teacher="unused", student="full",
                      loss="asymmetric")
    loss_module = StageLoss(cfg, model.eval(), teacher.eval())
    dataset = ObservationChunkDataset(data, model, progress=False)
    data_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    losses, kls = [], []
    with torch.no_grad():
        for _ in range(batches):
            batch = dataset.batch(torch.randint(len(dataset), (8,), generator=data_gen))
            mask, weight = student_noise(8, model.num_blocks, model.block_size, noise_gen)
            losses.append(loss_module(batch, mask, weight).item())
            kls.append(loss_module.metrics["kl"])
    return {"loss": float(np.mean(losses)), "kl": float(np.mean(kls)), "batches": batches}


def plot_losses(teacher_hist, student_hist, path, heldout_kl: dict | None = None):
    """Teacher loss; the distillation's KL part (what the student can reduce) with the held-out KL of
    the undistilled and distilled models; the distillation loss itself (floored by the teacher's entropy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
    panels = ((axes[0], teacher_hist, "loss", "teacher fine-tune (masked diffusion, bidirectional)",
               "cross-entropy (weighted 1/t)"),
              (axes[1], student_hist, "kl", "LoRA distillation: KL(teacher || student) part of the loss",
               "KL (weighted 1/p_b)"),
              (axes[2], student_hist, "loss", "LoRA distillation loss (= KL + teacher's entropy)",
               "soft cross-entropy to teacher (weighted 1/p_b)"))
    for ax, hist, key, title, ylabel in panels:
        ax.plot([h["step"] for h in hist if key in h], [h[key] for h in hist if key in h], marker=".",
                label="training batches (mean of 10 steps)")
        ax.set_xlabel("step (batch 8)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    if heldout_kl:
        for (name, v), style in zip(heldout_kl.items(), ("-", "--")):
            axes[1].axhline(v["kl"], color="gray", linestyle=style, label=f"held out: {name} ({v['kl']:.3f})")
        axes[1].set_ylim(bottom=0)
        axes[1].legend(fontsize=7)
    fig.suptitle("reduced Dream-VLA (2 Qwen2 layers, hidden 448, GQA 7:1) on LIBERO-Object demos, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/dream_vla_reduced")
    p.add_argument("--data", default="runs/dream_vla_reduced/data/eval")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--micro-bench", help="fast-dvla micro-bench --out JSON to render as Markdown")
    p.add_argument("--out", default="eval/results/dream_vla_reduced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-batches", type=int, default=20, help="batches of 8 for the held-out distillation loss")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    logs = {}
    for stage, name in (("teacher", "teacher_log.json"), ("student", "distill_log.json")):
        src = os.path.join(args.run, stage, "log.json")
        shutil.copyfile(src, os.path.join(args.out, name))
        logs[stage] = json.load(open(src))["history"]

    teacher = FastDVLAPolicy.from_pretrained(os.path.join(args.run, "teacher", "policy"))
    student = FastDVLAPolicy.from_pretrained(os.path.join(args.run, "student", "policy"))
    baseline = FastDVLAPolicy.from_pretrained(os.path.join(args.run, "teacher", "policy"))  # no adapter at all
    frames = sample_frames(args.data, args.frames, teacher.io.horizon, args.seed)
    observations = [o for o, _ in frames]
    reference = teacher.decode_config
    configs = {m: student.decode_config_for(m) for m in STUDENT_METHODS}
    rows = []
    for name, policy in (("distilled student", student), ("teacher weights, block-causal (no distillation)", baseline)):
        agree = token_agreement(teacher, policy, observations, configs, STUDENT_METHODS, reference)
        for m in STUDENT_METHODS:
            rows.append({"model": name, "method": m, "agreement": agree[m],
                         "demo_accuracy": demo_accuracy(policy, frames, configs[m])})
    teacher_demo = demo_accuracy(teacher, frames, reference)
    kl = {name: heldout_kl(teacher.model, policy.model, args.data, args.kl_batches, args.seed)
          for name, policy in (("distilled student", student), ("teacher weights, block-causal", baseline))}
    result = {"data": args.data, "frames": len(frames), "seed": args.seed, "reference": reference.to_dict(),
              "teacher_demo_accuracy": teacher_demo, "decode": {m: c.to_dict() for m, c in configs.items()},
              "rows": rows, "heldout_distillation_loss": kl, "torch_threads": torch.get_num_threads()}
    plot_losses(logs["teacher"], logs["student"], os.path.join(args.out, "loss.png"), kl)
    write_json(os.path.join(args.out, "agreement.json"), result)
    table = markdown_table(rows, [("model", "model", "s"), ("method", "decoder", "s"),
                                  ("agreement", "tokens = teacher's", ".3f"),
                                  ("demo_accuracy", "tokens = demonstration's", ".3f")])
    md = (f"# Token agreement with the teacher, reduced Dream-VLA\n\n{len(frames)} frames of `{args.data}` "
          f"(seed {args.seed}); the teacher decodes with `{reference.method}` ({reference.vanilla_steps} steps), "
          f"its tokens equal the demonstration's in {teacher_demo:.3f} of slots.\n\n{table}\n\n"
          f"Decoders: {settings_text(result['decode'])}.\n\n"
          f"Distillation loss on {args.kl_batches} batches of 8 of the same frames' episodes (training noise, "
          f"seed {args.seed}), and its part KL(teacher || model):\n\n"
          + markdown_table([{"model": k, **v} for k, v in kl.items()],
                           [("model", "model", "s"), ("loss", "soft cross-entropy", ".4f"), ("kl", "KL", ".4f")])
          + "\n")
    open(os.path.join(args.out, "agreement.md"), "w").write(md)
    print(md)

    if args.micro_bench:
        mb = json.load(open(args.micro_bench))
        md = (f"# micro-bench, reduced Dream-VLA (distilled)\n\n{mb['model']}; observations: {mb['observations']}, "
              f"batch {mb['batch']}, {mb['repeats']} repeats, {mb['device']} {mb['dtype']}, attention "
              f"{mb['attn_backend']}, {mb['torch_threads']} torch threads, {mb['machine']}, {mb['date']}.\n\n"
              f"{markdown_table(mb['results'], COLUMNS)}\n\nDecoders: {settings_text(mb['decode'])}.\n")
        open(os.path.join(os.path.splitext(args.micro_bench)[0] + ".md"), "w").write(md)
        print(md)


if __name__ == "__main__":
    main()
