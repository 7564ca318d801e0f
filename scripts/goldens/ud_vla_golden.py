"""Golden outputs of UD-VLA's own sampler on the tiny checkpoint, for tests/test_adapter_ud_vla.py.

Runs the ORIGINAL code of github.com/OpenHelix-Team/Unified-Diffusion-VLA (not part of this
repository, not run in CI) on the checkpoint ``scripts/goldens/ud_vla_tiny.py`` writes, and stores
what it generated in ``tests/golden/ud_vla_tiny.json``. Set-up, outside the repository::

    python3.11 -m venv /work/scratch/venv_udvla
    /work/scratch/venv_udvla/bin/pip install torch==2.13.0 transformers==4.44.0 tiktoken safetensors numpy scipy
    # 1. copy the original files (git show, at one commit) into a scratch folder
    /work/scratch/venv_udvla/bin/python scripts/goldens/ud_vla_golden.py setup \\
        --git-dir /path/to/Unified-Diffusion-VLA/.git --commit 97756cc... --orig /work/scratch/udvla_orig
    # 2. run them
    OMP_NUM_THREADS=1 /work/scratch/venv_udvla/bin/python scripts/goldens/ud_vla_golden.py run \\
        --orig /work/scratch/udvla_orig

(torch 2.13.0 is the CPU wheel on these machines; the repository's own venv has the same torch, so
both draw the same random numbers.) ``setup`` copies, unchanged: the Emu3 model, configuration,
tokenizer and processor (``reference/Emu3/emu3/mllm``), ``emu3/sampling.py``,
``models/policy_head/noise_schedulers.py`` (``modeling_emu3`` imports it), the FAST processor
(``pretrain/fast_calvin_abcd_a10_s50/processing_action_tokenizer.py``), and, from the CALVIN
evaluation wrapper ``reference/RoboVLMs/eval/calvin/model_wrapper_emu_dis.py`` (which imports
Lightning and CALVIN at module level, so it is not imported whole), the source of the sampler
functions (``denoise``, ``mask_by_random_topk``, ``log``, ``gumbel_noise``, ``make_mask``,
``forward``; the last module-level definition of each, the one Python calls) and of the methods
``EmuVLAModel_i_ia_dis.step`` and ``EmuVLAModel.{add_image, get_history, add_action,
get_action_history, unnormalize_action}`` into ``wrapper_functions.py``.

What runs: ``EmuVLAModel_i_ia_dis.step(obs, goal)`` itself, executed from that source on an object
holding what its ``__init__`` would (``Emu3MoE.from_pretrained``, ``Emu3Tokenizer``,
``Emu3Processor``, the FAST ``AutoProcessor``, ``window_size=1``, ``steps``, ``predict_action_frames
= 10``, its hard-coded token ids). Two things are not the original's: ``preprocess`` (the Emu3 VQ
image tokenizer, a separate model) is replaced by one returning fixed code grids, the caller's side
of the prompt; and ``step``'s one line ``seq_len=747+70`` (the generated region's length for
CALVIN's 25 x 25 and 10 x 10 code grids) reads the length of the tiny grids' region instead
(``denoise`` and ``make_mask`` take it as they are; the JSON records the substitution). So the prompt
(text, third-person and gripper frames, ``<boa>``), ``make_mask``, the 72-step (or other) loop of
``denoise`` with its ``torch.Generator(...).manual_seed(42)``, the token truncation, FAST decoding,
un-normalisation and gripper sign are the original's. ``denoise`` and ``forward`` are wrapped to
record each step's output and the first forward's logits.

Differences from the evaluation, all outside the sampler: CPU, float32 (it loads bfloat16 on a
GPU), ``sdpa`` attention (its ``attn_implementation=None`` default), a fresh wrapper per call (its
queues hold one frame at ``window_size=1``, so a second call sees the same prompt layout).
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden" / "ud_vla_tiny.json"
WRAPPER = "reference/RoboVLMs/eval/calvin/model_wrapper_emu_dis.py"
COPIED = ("reference/Emu3/emu3/mllm/__init__.py", "reference/Emu3/emu3/mllm/configuration_emu3.py",
          "reference/Emu3/emu3/mllm/modeling_emu3.py", "reference/Emu3/emu3/mllm/processing_emu3.py",
          "reference/Emu3/emu3/mllm/tokenization_emu3.py", "reference/Emu3/emu3/mllm/utils_emu3.py",
          "reference/Emu3/emu3/sampling.py", "models/policy_head/noise_schedulers.py",
          "pretrain/fast_calvin_abcd_a10_s50/processing_action_tokenizer.py")
SAMPLER_FUNCTIONS = ("denoise", "mask_by_random_topk", "log", "gumbel_noise", "make_mask", "forward")
METHODS = {"EmuVLAModel_i_ia_dis": ("step",),
           "EmuVLAModel": ("add_image", "get_history", "add_action", "get_action_history", "unnormalize_action")}
# step() hard-codes the generated region's length for CALVIN's frames (25 x 25 and 10 x 10 codes: 747
# image-region tokens + 70); the tiny frames are smaller, so this one line reads it from the wrapper
SEQ_LEN_LITERAL = "        seq_len=747+70\n"
SEQ_LEN_PATCH = "        seq_len=self.seq_len\n"
STEPS = (2, 4, 8)
EVAL_STEPS = 72          # the CALVIN evaluation's --steps; run for the first case only (about 30 s on one thread)
CASE_SEED = 11
STATIC_GRID, GRIPPER_GRID = (2, 3), (1, 2)   # VQ code grids (CALVIN: 25 x 25 and 10 x 10)
# the first three tokenize to equal lengths (checked), so that they batch in fast-dvla (no left padding)
INSTRUCTIONS = ("push the sliding door to the left", "push the pink block to the left", "stack the blocks on top",
                "lift the red block from the table")


def cases():
    """The fixed inputs: an instruction and VQ code grids (third-person, gripper) per case."""
    import torch

    gen = torch.Generator().manual_seed(CASE_SEED)
    out = []
    for i, text in enumerate(INSTRUCTIONS):
        static = torch.randint(0, 32768, STATIC_GRID, generator=gen)
        gripper = torch.randint(0, 32768, GRIPPER_GRID, generator=gen)
        out.append({"name": f"case{i}", "instruction": text, "static_codes": static.tolist(),
                    "gripper_codes": gripper.tolist()})
    return out


# -- setup: copy the original -----------------------------------------------------------------------
def git_show(git_dir: Path, commit: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def definitions(source: str) -> str:
    """The sampler functions and the wrapper methods, as source (methods dedented to functions)."""
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in SAMPLER_FUNCTIONS:
            found[node.name] = ast.get_source_segment(source, node)  # a later definition replaces it, as in Python
        if isinstance(node, ast.ClassDef) and node.name in METHODS:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in METHODS[node.name]:
                    segment = ast.get_source_segment(source, item, padded=True)
                    found[item.name] = "\n".join(line[4:] for line in segment.splitlines())
    missing = set(SAMPLER_FUNCTIONS) | {m for ms in METHODS.values() for m in ms}
    missing -= set(found)
    if missing:
        raise SystemExit(f"not found in {WRAPPER}: {sorted(missing)}")
    return "\n\n\n".join(found[name] for name in sorted(found)) + "\n"


def setup(args) -> None:
    commit = subprocess.run(["git", f"--git-dir={args.git_dir}", "rev-parse", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    for path in COPIED:
        dest = args.orig / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(git_show(args.git_dir, commit, path))
    header = (f"# Copied from github.com/OpenHelix-Team/Unified-Diffusion-VLA@{commit}:{WRAPPER}\n"
              "# (module-level sampler functions and wrapper methods, unchanged)\n")
    (args.orig / "wrapper_functions.py").write_text(header + definitions(git_show(args.git_dir, commit, WRAPPER)))
    (args.orig / "COMMIT").write_text(commit + "\n")
    print("copied the original at", commit, "into", args.orig)


# -- run: the original on the tiny checkpoint -------------------------------------------------------
def load_original(orig: Path) -> SimpleNamespace:
    """The copied modules, and the wrapper functions executed in a namespace holding what the
    wrapper module imports."""
    import time
    from queue import Queue

    import numpy as np
    import torch
    from PIL import Image
    from transformers.feature_extraction_utils import BatchFeature

    sys.path.insert(0, str(orig / "reference/Emu3"))
    from emu3.mllm import Emu3MoE, Emu3Processor, Emu3Tokenizer
    from emu3.sampling import get_mask_chedule

    namespace = {"torch": torch, "np": np, "time": time, "Image": Image, "Queue": Queue, "BatchFeature": BatchFeature,
                 "get_mask_chedule": get_mask_chedule}
    source = (orig / "wrapper_functions.py").read_text()
    if source.count(SEQ_LEN_LITERAL) != 1:
        raise SystemExit(f"expected {SEQ_LEN_LITERAL!r} once in step(), the one line this script replaces")
    source = source.replace(SEQ_LEN_LITERAL, SEQ_LEN_PATCH)
    exec(compile(source, str(orig / "wrapper_functions.py"), "exec"), namespace)
    return SimpleNamespace(Emu3MoE=Emu3MoE, Emu3Processor=Emu3Processor, Emu3Tokenizer=Emu3Tokenizer, ns=namespace)


def wrapper(orig: SimpleNamespace, model, tokenizer, processor, action_tokenizer, steps: int, codes) -> SimpleNamespace:
    """An ``EmuVLAModel_i_ia_dis`` as its ``__init__`` leaves it (``window_size=1``), its methods the
    copied ones, ``preprocess`` returning ``codes`` (the VQ encoder's output, ``[1, h, w]`` each)."""
    from queue import Queue

    import torch

    self = SimpleNamespace(
        model=model, tokenizer=tokenizer, processor=processor, action_tokenizer=action_tokenizer, device="cpu",
        window_size=1, predict_action_frames=10, normalize_action=True, video_mode=True, action_space="continuous",
        predict_frames=1, context_frames=1, action_dim=7, use_gripper=True, use_fast=True, use_one_step=False,
        boa_token_id=151844, eoa_token_id=151845, boi_token_id=151852, bos_token_id=151849, bov_token_id=151854,
        eof_token_id=151847, eoi_token_id=151853, eol_token_id=151846, eos_token_id=151850, eov_token_id=184621,
        img_token_id=151851, use_jacobi_generate=False, inference_time=[], rollout_step_counter=0,
        kwargs=dict(mode="VLA", padding="longest"), vision_queue=Queue(maxsize=1),
        vision_gripper_queue=Queue(maxsize=1),
        action_queue=Queue(maxsize=0), use_mutil_maxnewtokens=False, max_new_tokens=747 + 70, steps=steps,
        debug_image=False, count=0)
    for name in ("add_image", "get_history", "add_action", "get_action_history", "unnormalize_action"):
        setattr(self, name, orig.ns[name].__get__(self))
    static, gripper = (torch.tensor(c)[None] for c in codes)
    # per frame: <boi> "1*h*w" (5 tokens) <img> codes <eof> <eoi>; then <boa> and 69 masks (747 + 70 for CALVIN)
    self.seq_len = sum(9 + c.numel() for c in (static, gripper)) + 70
    self.preprocess = lambda obs, lang, mode: (static, gripper)
    return self


def run_case(orig, self, instruction: str) -> dict:
    """``step`` once, recording each ``denoise`` call's output and the first forward's logits."""
    import numpy as np
    import torch

    ns, record = orig.ns, {"steps": [], "logits": None}
    denoise, forward = ns["denoise"], ns["forward"]

    def recording_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        if record["logits"] is None:
            record["logits"] = logits.detach().clone()
            record["input_ids"] = args[1].detach().clone()
        return logits

    def recording_denoise(*args, **kwargs):
        out = denoise(*args, **kwargs)
        record["steps"].append({"gen": out[1].clone(), "sampled": out[3].clone()})
        return out

    ns["denoise"], ns["forward"] = recording_denoise, recording_forward
    try:
        actions = ns["step"](self, {"rgb_obs": {}}, instruction)
    finally:
        ns["denoise"], ns["forward"] = denoise, forward
    gen_len = record["steps"][0]["gen"].shape[1]
    logits = record["logits"][0, -(gen_len + 1):-1].double()   # the shifted logits of the generated region
    mask_id = 151848
    return {
        "input_ids": record["input_ids"][0].tolist(), "gen_len": gen_len,
        "generated_ids": record["steps"][-1]["sampled"][0].tolist(),
        "final_gen": record["steps"][-1]["gen"][0].tolist(),
        "masked_after_step": [int((s["gen"] == mask_id).sum()) for s in record["steps"]],
        "gen_checksums": [int((s["gen"][0] * torch.arange(1, gen_len + 1)).sum()) for s in record["steps"]],
        "first_logits": {"sum": float(logits.sum()), "abs_sum": float(logits.abs().sum()),
                         "action_rows_sum": float(logits[-69:].sum())},
        "eoa_positions": torch.where(record["steps"][-1]["sampled"][0] == 151845)[0].tolist(),
        "actions": np.asarray(actions, dtype=np.float64).tolist(),
        "queued_action_tokens": self.action_queue.queue[0][0].tolist() if self.action_queue.queue else None,
    }


def run(args) -> None:
    import torch
    import transformers
    from transformers import AutoProcessor
    from transformers.image_processing_utils import BaseImageProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ud_vla_tiny

    torch.set_num_threads(1)
    commit = (args.orig / "COMMIT").read_text().strip()
    orig = load_original(args.orig)
    ckpt = ud_vla_tiny.write(Path(tempfile.mkdtemp()) / "ud_vla_tiny")
    fast_dir = ckpt / ud_vla_tiny.ACTION_TOKENIZER_DIR
    fast_dir.joinpath("processing_action_tokenizer.py").write_text(
        (args.orig / "pretrain/fast_calvin_abcd_a10_s50/processing_action_tokenizer.py").read_text())

    model = orig.Emu3MoE.from_pretrained(str(ckpt), torch_dtype=torch.float32, attn_implementation=None).eval()
    tokenizer = orig.Emu3Tokenizer.from_pretrained(str(ckpt), model_max_length=model.config.max_position_embeddings,
                                                   padding_side="right", use_fast=False)
    processor = orig.Emu3Processor(BaseImageProcessor(), object(), tokenizer)
    action_tokenizer = AutoProcessor.from_pretrained(str(fast_dir), trust_remote_code=True)

    results = []
    for case in cases():
        entry = {k: case[k] for k in ("name", "instruction", "static_codes", "gripper_codes")}
        entry["text_ids"] = tokenizer([tokenizer.bos_token + case["instruction"]])["input_ids"][0]
        entry["runs"] = []
        for steps in STEPS + ((EVAL_STEPS,) if case["name"] == "case0" else ()):
            self = wrapper(orig, model, tokenizer, processor, action_tokenizer, steps,
                           (case["static_codes"], case["gripper_codes"]))
            with torch.no_grad():
                entry["runs"].append({"steps": steps, **run_case(orig, self, case["instruction"])})
        results.append(entry)
    if len({len(r["text_ids"]) for r in results[:3]}) != 1:
        raise SystemExit("the first three instructions must tokenize to equal lengths")
        print(entry["name"], len(entry["text_ids"]), [(r["steps"], r["eoa_positions"]) for r in entry["runs"]])

    golden = {
        "source": "github.com/OpenHelix-Team/Unified-Diffusion-VLA", "commit": commit,
        "produced_by": "scripts/goldens/ud_vla_golden.py on scripts/goldens/ud_vla_tiny.py's checkpoint",
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu",
                        "dtype": "float32", "attn_implementation": model.config._attn_implementation},
        "sampler": {"schedule": "cosine", "temperature": 1, "mask_token_id": 151848, "generator_seed": 42,
                    "new_action_len": 70, "action_vocab": action_tokenizer.vocab_size},
        "patched": {"line": SEQ_LEN_LITERAL.strip(), "as": SEQ_LEN_PATCH.strip(),
                    "why": "step() hard-codes the CALVIN frames' generated length; the tiny frames are smaller"},
        "case_seed": CASE_SEED, "cases": results,
    }
    args.out.write_text(json.dumps(golden, indent=1) + "\n")
    print("wrote", args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="copy the original files into a scratch folder")
    p.add_argument("--git-dir", required=True, type=Path)
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--orig", required=True, type=Path)
    p = sub.add_parser("run", help="run the copied original on the tiny checkpoint")
    p.add_argument("--orig", required=True, type=Path)
    p.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    setup(args) if args.command == "setup" else run(args)


if __name__ == "__main__":
    main()
