"""GPU benchmark of cached block-causal attention: the Triton kernel against
SDPA (dense mask), FlexAttention (block mask, compiled) and flash-attn, at
dVLA shapes. Writes JSON + Markdown with the device and date.

    python -m fast_dvla.eval.bench_kernels [--out eval/results/kernels_<gpu>]
    python -m fast_dvla.eval.bench_kernels --allow-cpu   # tiny smoke run, sdpa and flex only
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
import sys

import torch
import torch.nn.functional as F

from fast_dvla.masks import dense_mask, flex_block_mask

from .report import markdown_table, write_json

GPU_SHAPES = {"prefix": [300, 700], "blocks": [1, 4], "block_size": [7, 32], "heads": [(8, 8), (32, 8)],
              "head_dim": [64, 128], "dtype": ["bf16"]}
CPU_SHAPES = {"prefix": [40], "blocks": [2], "block_size": [7], "heads": [(4, 2)], "head_dim": [32], "dtype": ["fp32"]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def median_ms(fn, device, iters):
    for _ in range(3):
        fn()
    if device == "cuda":
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def implementations(device):
    impls = {}
    groups_cache = {}

    def sdpa(q, k, v, c, bs, P):
        n = q.shape[2]
        mask = groups_cache.setdefault(("m", c, n), dense_mask(P, bs, c, n, c + n, device=device))
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k[:, :, :c + n], v[:, :, :c + n], attn_mask=mask, enable_gqa=g > 1)
    impls["sdpa"] = sdpa

    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention

    def flex_fn(q, k, v, c, bs, P):
        n = q.shape[2]
        bm = groups_cache.setdefault(("f", c, n), flex_block_mask(P, bs, c, n, c + n, device=device))
        return flex(q, k[:, :, :c + n], v[:, :, :c + n], block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])
    impls["flex"] = flex_fn

    if device == "cuda":
        from fast_dvla.kernels import triton_block_causal_attention

        def triton_fn(q, k, v, c, bs, P):
            lens = groups_cache.setdefault(("l", c, q.shape[0]), torch.full((q.shape[0],), c, device=device))
            return triton_block_causal_attention(q, k, v, lens, bs)
        impls["triton"] = triton_fn
        if importlib.util.find_spec("flash_attn") is not None:
            from fast_dvla.kernels import flash_block_causal_attention

            def flash_fn(q, k, v, c, bs, P):
                lens = torch.full((q.shape[0],), c, device=device)
                return flash_block_causal_attention(q, k, v, lens, bs)
            impls["flash"] = flash_fn
    return impls


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        print("no CUDA GPU: this benchmark measures GPU kernels (use --allow-cpu for a smoke run)", file=sys.stderr)
        raise SystemExit(2)
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    impls = implementations(device)
    rows = []
    for P, nb, bs, (hq, hkv), d, dt in itertools.product(*shapes.values()):
        dtype = DTYPES[dt]
        c = P + bs  # one block already cached
        n = nb * bs
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(args.batch, hq, n, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(args.batch, hkv, c + n, d, device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        ref = impls["sdpa"](q, k, v, c, bs, P).float()
        bytes_moved = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()
        for name, fn in impls.items():
            err = (fn(q, k, v, c, bs, P).float() - ref).abs().max().item()
            ms = median_ms(lambda: fn(q, k, v, c, bs, P), device, args.iters)
            rows.append({"impl": name, "prefix": P, "blocks": nb, "block_size": bs, "q_heads": hq, "kv_heads": hkv,
                         "head_dim": d, "dtype": dt, "latency_us": ms * 1e3, "gb_per_s": bytes_moved / ms / 1e6,
                         "max_err_vs_sdpa": err})
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": importlib.import_module("triton").__version__, "batch": args.batch, "rows": rows}


COLUMNS = [("impl", "impl", "s"), ("prefix", "prefix", "d"), ("blocks", "blocks", "d"), ("block_size", "k", "d"),
           ("q_heads", "Hq", "d"), ("kv_heads", "Hkv", "d"), ("head_dim", "D", "d"), ("dtype", "dtype", "s"),
           ("latency_us", "latency us", ".1f"), ("gb_per_s", "GB/s", ".1f"), ("max_err_vs_sdpa", "max err", ".1e")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="path stem for .json and .md (default eval/results/kernels_<device>)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--allow-cpu", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    table = markdown_table(result["rows"], COLUMNS)
    header = f"# Cached block-causal attention on {result['device']} ({result['date']}, torch {result['torch']})"
    print(header + "\n\n" + table)
    stem = args.out or os.path.join("eval", "results", "kernels_" + result["device"].replace(" ", "_").lower())
    write_json(stem + ".json", result)
    with open(stem + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
