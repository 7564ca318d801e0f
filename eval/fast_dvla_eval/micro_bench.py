"""Micro-benchmark: every decoder on the same model, observations and
machine, in one process. Prints NFE and query tokens per chunk (machine-
independent), latency, action tokens/s and the speedup over vanilla.

    fast-dvla micro-bench [--teacher DIR --student DIR] [--batch 1] [--repeats 10]
    fast-dvla micro-bench --data data/libero_object_demos_v3 --decoders vanilla,fast_dvla --repeats 48
    fast-dvla micro-bench --random --model hidden_size=4096,num_heads=32,num_kv_heads=8,num_layers=2,\
        intermediate_size=14336 --device cuda --dtype bf16 --attn-backend triton   # a 7B-shaped backbone slice
    fast-dvla micro-bench --ud-vla CKPT --vanilla-steps 72      # a UD-VLA checkpoint folder, random VQ codes

Without checkpoints it uses the shipped LIBERO-Object reference teacher and
student; with ``--random`` a randomly initialised model, whose near-uniform
confidences make the thresholded decoders fall back to the 1/n rule (the
engine's cost, not a trained policy's). Observations are random images, or
with ``--data`` frames drawn from recorded demonstrations (what a trained
policy's confidences, hence its NFE, look like in use).

``--ud-vla CKPT`` times a UD-VLA checkpoint (``fast_dvla.adapters.UDVLA``), which is a model, not
a policy: its observations are VQ codes of Emu3's separate image tokenizer, so each prompt is a
CALVIN instruction with random codes (third-person 25 x 25, gripper 10 x 10, as UD-VLA's CALVIN
evaluation), and every decoder runs on the checkpoint's own weights, the student's decoders under
the block-causal mask (the weights before any distillation: the engine's cost, not a distilled
student's confidences).
"""
from __future__ import annotations

import argparse
import datetime
import platform

import numpy as np
import torch

from fast_dvla import DecodeConfig, FastDVLAPolicy
from fast_dvla.attention import BACKEND_NAMES, use_backend
from fast_dvla.benchmark.observations import random_observation
from fast_dvla.benchmark.report import markdown_table, write_json
from fast_dvla.benchmark.throughput import (COLUMNS, add_override_arguments, measure, measure_decode, overrides_from,
                                            parse_decoders, policy_configs, process_peak_rss_mb)
from fast_dvla.config import METHODS
from fast_dvla.data.frames import sample_frames
from fast_dvla.model import ModelConfig, ReferenceDVLA
from fast_dvla.policy import reference_policy_dir
from fast_dvla.policy_model import PolicyModel
from fast_dvla.registry import entry_for_model
from fast_dvla.tokenizer import ActionTokenizer


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_model_overrides(text: str | None) -> dict:
    """``"hidden_size=4096,num_layers=2"`` -> ``{"hidden_size": 4096, "num_layers": 2}`` (ModelConfig
    fields, integers where they parse; ModelConfig checks names, types and ranges)."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model takes KEY=VALUE pairs separated by commas, got {item!r}")
        overrides[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return overrides


def random_policy(seed: int, **model_overrides) -> FastDVLAPolicy:
    torch.manual_seed(seed)
    model = ReferenceDVLA(ModelConfig.from_dict(model_overrides))
    tok = ActionTokenizer(-np.ones(7), np.ones(7), gripper_dims=(6,))
    return FastDVLAPolicy(model, tok)


def place(policy: FastDVLAPolicy, device: str, dtype: str, backend: str | None) -> None:
    """Move a policy's model to ``device`` in ``dtype`` on attention ``backend`` (None: its own), in place. The
    processor hands the model float32 inputs, so in half precision the prefix inputs are cast
    where they enter the model (an instance attribute on this model only: the library is unchanged)."""
    torch_dtype = DTYPES[dtype]
    model = policy.model.to(device=device, dtype=torch_dtype)
    # a model that owns its processing (PolicyModel: Dream-VLA) casts its own prefix inputs
    if torch_dtype != torch.float32 and not isinstance(policy.io, PolicyModel) and "embed_prefix" not in vars(model):
        embed = model.embed_prefix

        def embed_prefix(images, instr_ids, state):
            cast = (lambda t: None if t is None else t.to(torch_dtype))
            return embed(cast(images), instr_ids, cast(state))

        model.embed_prefix = embed_prefix
    if backend:
        use_backend(model, backend)


def model_settings(model) -> dict:
    """What the student's ``config.json`` records as its model (the reference: its ``ModelConfig``;
    Dream-VLA: its checkpoint's config and processing settings), without dataset statistics."""
    settings = entry_for_model(model).settings(model)
    return {k: v for k, v in settings.items() if k != "norm_stats"}


def attention_backend(model) -> str:
    """The reference model's configured backend; a model that runs its own attention (Dream-VLA: SDPA
    in its own layer loop) says so."""
    name = getattr(getattr(model, "config", None), "attn_backend", None)
    return name or f"{type(model).__name__}'s own"


def run_context() -> dict:
    """Where and when a run was timed (called after timing: the peak memory includes it)."""
    return {"torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "peak_rss_mb": process_peak_rss_mb(), "date": datetime.date.today().isoformat()}


UD_VLA_GRIDS = {"static": (25, 25), "gripper": (10, 10)}  # VQ code grids of UD-VLA's CALVIN evaluation
EMU3_CODEBOOK = 32768  # Emu3's VQ codes


def ud_vla_prefixes(model, repeats: int, seed: int) -> list[torch.Tensor]:
    """One prefix per repeat: a CALVIN instruction and random VQ codes of both cameras."""
    from fast_dvla.envs.calvin_protocol import INSTRUCTIONS

    rng = np.random.default_rng(seed)
    instructions = sorted(INSTRUCTIONS.values())
    prefixes = []
    for i in range(repeats):
        codes = {cam: rng.integers(0, EMU3_CODEBOOK, size=hw) for cam, hw in UD_VLA_GRIDS.items()}
        ids = model.prompt(instructions[i % len(instructions)], codes["static"], codes["gripper"])
        prefixes.append(model.engine_prefix(*type(model).batch_ids([ids])))
    return prefixes


def run_ud_vla(args, methods) -> dict:
    from fast_dvla.adapters import UDVLA

    if args.teacher or args.student or args.random or args.model or args.data or args.attn_backend or args.batch != 1:
        raise SystemExit("--ud-vla times one checkpoint on random VQ codes with its own attention: no --teacher/"
                         "--student/--random/--model/--data/--attn-backend, batch 1")
    model = UDVLA.from_pretrained(args.ud_vla, dtype=DTYPES[args.dtype]).to(args.device)
    given = {k: v for k, v in overrides_from(args).items() if v is not None}
    configs = {m: DecodeConfig(method=m).replace(**given) for m in methods}
    prefixes = ud_vla_prefixes(model, args.repeats, args.seed)
    rows = measure_decode({m: model for m in methods}, prefixes, configs, methods, warmup=args.warmup)
    cfg = model.config
    return {"model": f"UD-VLA checkpoint {args.ud_vla} (the student's decoders on its weights, not distilled)",
            "model_config": {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "intermediate_size", "vocab_size")},
            "prefix_tokens": int(prefixes[0].shape[1]), "chunk_tokens": model.chunk_len,
            "block_size": model.block_size, "device": args.device, "dtype": args.dtype,
            "attn_backend": attention_backend(model), "observations": "random VQ codes", "batch": 1,
            "repeats": len(prefixes), "decode": {m: c.to_dict() for m, c in configs.items()},
            **run_context(), "results": rows}


def run(args) -> dict:
    methods = parse_decoders(args.decoders)  # before any loading
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch here")
    if args.ud_vla:
        return run_ud_vla(args, methods)
    if bool(args.teacher) != bool(args.student):
        raise SystemExit("give both --teacher and --student, or neither")
    model_overrides = parse_model_overrides(args.model)
    if model_overrides and not args.random:
        raise SystemExit("--model shapes a random-init model: give --random with it")
    if not args.teacher and not args.random:
        args.teacher, args.student = reference_policy_dir("teacher"), reference_policy_dir("student")
    if args.teacher:
        teacher = FastDVLAPolicy.from_pretrained(args.teacher)
        student = FastDVLAPolicy.from_pretrained(args.student)
        model_desc = f"teacher={args.teacher} student={args.student}"
    else:
        teacher = student = random_policy(args.seed, **model_overrides)
        model_desc = "random-init reference model" + (f" ({args.model})" if model_overrides else "")
    for policy in {id(teacher): teacher, id(student): student}.values():
        place(policy, args.device, args.dtype, args.attn_backend)
    # each decoder with the settings saved in the policy that runs it, as bench libero does
    configs = policy_configs(methods, teacher, student, **overrides_from(args))
    if args.data:
        if args.batch != 1:
            raise SystemExit("--data times one demonstration frame per chunk: use --batch 1")
        obs = [o for o, _ in sample_frames(args.data, args.repeats, teacher.io.horizon, args.seed)]
    else:
        obs = [random_observation(teacher, args.batch, args.seed + i) for i in range(args.repeats)]
    rows = measure(teacher, student, obs, configs, methods, warmup=args.warmup)
    return {"model": model_desc, "model_config": model_settings(student.model), "device": args.device,
            "dtype": args.dtype, "attn_backend": attention_backend(student.model),
            "observations": args.data or "random", "batch": args.batch, "repeats": len(obs),
            "decode": {m: c.to_dict() for m, c in configs.items()}, **run_context(), "results": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (vanilla, fast_dllm)")
    p.add_argument("--student", help="student checkpoint directory (block_diffusion, fast_dvla, vanilla_cached)")
    p.add_argument("--ud-vla", metavar="CKPT", help="a UD-VLA checkpoint folder (UD-VLA's format), timed on random "
                   "VQ codes")
    p.add_argument("--random", action="store_true", help="a random-init model even if the reference is shipped")
    p.add_argument("--model", help="with --random: ModelConfig fields as KEY=VALUE,... (e.g. hidden_size=4096,"
                   "num_heads=32,num_kv_heads=8,num_layers=2,intermediate_size=14336)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="model weights and activations")
    p.add_argument("--attn-backend", choices=BACKEND_NAMES, help="attention backend of both models (default: each "
                   "policy's own)")
    p.add_argument("--data", help="time on frames of these demonstrations (an episodes directory) "
                   "instead of random images")
    p.add_argument("--decoders", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="observations timed (each once per decoder)")
    p.add_argument("--warmup", type=int, default=2)
    add_override_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")


def main(args) -> None:
    result = run(args)
    print(f"# micro-benchmark: {result['model']}, batch {result['batch']}, {result['repeats']} repeats, "
          f"{result['device']} {result['dtype']} {result['attn_backend']}, {result['torch_threads']} threads")
    print(markdown_table(result["results"], COLUMNS))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
