"""GPU benchmark of cached block-causal attention at dVLA shapes: the project's
Triton kernel against SDPA (dense boolean mask), FlexAttention (block mask,
compiled) and flash-attn (when importable).

    fast-dvla bench-kernels            # default grid -> outputs/kernels_<gpu>.{json,md}
    fast-dvla bench-kernels --prefix 500 --dtype bf16 --out /tmp/k
    fast-dvla bench-kernels --allow-cpu   # tiny smoke run of the script (sdpa, flex)

Every row of the batch has the same cache length here (cache = the prefix):
SDPA and FlexAttention take one mask for the batch. Per implementation and
shape it reports the median latency of eager calls (CUDA events, warm-up
excluded; launch overhead included, as an engine without CUDA graphs sees
it), the median latency of a CUDA-graph replay (GPU time only) where the call
can be captured, the achieved bandwidth (bytes of Q, O and the visible K/V
read or written, over the graph time when there is one), and the max error
against SDPA.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from fast_dvla.masks import dense_mask, flex_block_mask

from fast_dvla.benchmark.report import markdown_table, write_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_GRID = dict(prefix="300,700", blocks="1,4", block_size="7,32", heads="8:8,32:8", head_dim="64,128",
                dtype="bf16,fp16")
CPU_GRID = dict(prefix="24", blocks="2", block_size="7", heads="4:2", head_dim="32", dtype="fp32")
SLACK = 64  # unused slots after the in-flight tokens: the buffer is preallocated, as in the engine
NO_CUDA_EXIT = 2


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _heads(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        hq, _, hkv = item.partition(":")
        pairs.append((int(hq), int(hkv or hq)))
    return pairs


def _median_ms_eager(fn, device: str, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:  # back to back, no sync between calls: launch overhead counts when it dominates
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _median_ms_graph(fn, iters: int) -> float:
    """GPU time of one call, replayed from a CUDA graph (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs warmed-up allocations on a side stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _median_ms_eager(graph.replay, "cuda", iters, warmup=5)


def implementations(device: str, wanted: set[str]) -> dict:
    """name -> fn(q, k, v, lens, cache_len, block_size, prefix_len) for those
    that can run here. Masks are built once per shape, outside the timing."""
    impls: dict = {}
    masks: dict = {}

    def sdpa(q, k, v, lens, c, bs, P):
        n = q.shape[2]
        mask = masks.get(("dense", c, n, bs, P))
        if mask is None:
            mask = masks[("dense", c, n, bs, P)] = dense_mask(P, bs, c, n, c + n, device=device)
        return F.scaled_dot_product_attention(q, k[:, :, :c + n], v[:, :, :c + n], attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])

    impls["sdpa"] = sdpa

    if "flex" in wanted:
        from torch.nn.attention.flex_attention import flex_attention

        if device == "cuda":
            import torch._dynamo

            # one compiled graph per shape: the default recompile limit (8) would fall back to eager mid-grid
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 1024)
            flex = torch.compile(flex_attention, dynamic=False)
        else:
            flex = flex_attention  # eager flex on the CPU: correct, only slow (smoke mode)

        def flex_fn(q, k, v, lens, c, bs, P):
            n = q.shape[2]
            bm = masks.get(("flex", c, n, bs, P))
            if bm is None:
                bm = masks[("flex", c, n, bs, P)] = flex_block_mask(P, bs, c, n, c + n, device=device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex(q, k[:, :, :c + n], v[:, :, :c + n], block_mask=bm,
                            enable_gqa=q.shape[1] != k.shape[1])

        impls["flex"] = flex_fn

    if device == "cuda" and "triton" in wanted:
        from fast_dvla_kernels import triton_block_causal_attention

        def triton_fn(q, k, v, lens, c, bs, P):  # lengths are checked once, below, not per call
            return triton_block_causal_attention(q, k, v, lens, bs, check_lengths=False)

        impls["triton"] = triton_fn

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from fast_dvla_kernels import flash_block_causal_attention

        for mode in ("per_block", "split"):
            name = "flash" if mode == "per_block" else "flash_split"
            if name in wanted:
                impls[name] = (lambda m: lambda q, k, v, lens, c, bs, P: flash_block_causal_attention(
                    q, k, v, lens, bs, mode=m, check_lengths=False))(mode)
    return impls


def bench_shape(impls: dict, device: str, shape: dict, args) -> list[dict]:
    P, nb, bs, (hq, hkv), d, dt = (shape[key] for key in ("prefix", "blocks", "block_size", "heads", "head_dim",
                                                          "dtype"))
    dtype = DTYPES[dt]
    c, n, B = P, nb * bs, args.batch  # cache = the prefix; nb blocks in flight
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, hq, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, hkv, c + n + SLACK, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, hkv, c + n + SLACK, d, device=device, dtype=dtype, generator=g)
    lens = torch.full((B,), c, dtype=torch.int32, device=device)
    es = q.element_size()
    bytes_moved = 2 * q.numel() * es + 2 * B * hkv * (c + n) * d * es  # Q in, O out, visible K and V in
    ref = impls["sdpa"](q, k, v, lens, c, bs, P).float()
    rows = []
    for name, impl in impls.items():
        fn = (lambda f: lambda: f(q, k, v, lens, c, bs, P))(impl)
        row = {"impl": name, "prefix": P, "cache_len": c, "blocks": nb, "block_size": bs, "q_len": n,
               "q_heads": hq, "kv_heads": hkv, "head_dim": d, "dtype": dt, "batch": B}
        try:
            row["max_err_vs_sdpa"] = (fn().float() - ref).abs().max().item()
            row["latency_us"] = _median_ms_eager(fn, device, args.iters, args.warmup) * 1e3
        except Exception as err:  # one failing implementation must not lose the rest of the grid
            row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            continue
        row["graph_us"] = None
        if device == "cuda" and not args.no_graphs:
            try:
                row["graph_us"] = _median_ms_graph(fn, args.iters) * 1e3
            except Exception as err:  # not every path can be captured; eager latency still stands
                row["graph_error"] = f"{type(err).__name__}: {err}"[:300]
                torch.cuda.synchronize()
        best_us = row["graph_us"] or row["latency_us"]
        row["gb_per_s"] = bytes_moved / (best_us * 1e-6) / 1e9
        rows.append(row)
    return rows


def environment(device: str) -> dict:
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": None, "flash_attn": None, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn
            info["flash_attn"] = getattr(flash_attn, "__version__", "unknown")
        except ImportError as err:
            info["flash_attn"] = f"import failed: {err}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.allow_cpu:
            print("bench_kernels: no CUDA GPU found. This benchmark times GPU kernels; run it on a CUDA machine "
                  "(or pass --allow-cpu for a tiny smoke run of sdpa and flex).", file=sys.stderr)
            raise SystemExit(NO_CUDA_EXIT)
        grid = CPU_GRID  # tiny and fixed: this mode only proves that the script works
        wanted = {"sdpa", "flex"}
    else:
        grid = {key: getattr(args, key) or default for key, default in GPU_GRID.items()}
        wanted = set(args.impls.split(","))
    axes = dict(prefix=_ints(grid["prefix"]), blocks=_ints(grid["blocks"]), block_size=_ints(grid["block_size"]),
                heads=_heads(grid["heads"]), head_dim=_ints(grid["head_dim"]), dtype=grid["dtype"].split(","))
    unknown = [dt for dt in axes["dtype"] if dt not in DTYPES]
    if unknown:
        raise SystemExit(f"bench_kernels: unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    impls = implementations(device, wanted)
    rows = []
    for values in itertools.product(*axes.values()):
        shape = dict(zip(axes, values))
        rows += bench_shape(impls, device, shape, args)
        if not args.quiet:
            print(f"  done {shape}", file=sys.stderr)
    return {**environment(device), "iters": args.iters, "warmup": args.warmup, "batch": args.batch,
            "impls": list(impls), "rows": rows}


COLUMNS = [("impl", "impl", "s"), ("prefix", "cache", "d"), ("blocks", "blocks", "d"), ("block_size", "k", "d"),
           ("q_heads", "Hq", "d"), ("kv_heads", "Hkv", "d"), ("head_dim", "D", "d"), ("dtype", "dtype", "s"),
           ("latency_us", "eager us", ".1f"), ("graph_us", "graph us", ".1f"), ("gb_per_s", "GB/s", ".1f"),
           ("max_err_vs_sdpa", "max err", ".1e")]


def render(result: dict) -> str:
    head = (f"# Cached block-causal attention on {result['device']}\n\n"
            f"{result['date']}; torch {result['torch']}, triton {result['triton']}, "
            f"flash-attn {result['flash_attn'] or 'not installed'}; batch {result['batch']}, "
            f"median of {result['iters']} calls after {result['warmup']} warm-up calls. "
            "`eager us`: back-to-back calls (launch overhead included); `graph us`: CUDA-graph replay; "
            "GB/s: Q + O + visible K/V bytes over the graph time (eager where no graph).\n")
    failed = [r for r in result["rows"] if "error" in r]
    table = markdown_table([r for r in result["rows"] if "error" not in r], COLUMNS)
    notes = "".join(f"\n- {r['impl']} failed at prefix {r['prefix']}, {r['blocks']}x{r['block_size']}, "
                    f"{r['q_heads']}/{r['kv_heads']} heads, D {r['head_dim']}, {r['dtype']}: {r['error']}"
                    for r in failed)
    return head + "\n" + table + ("\n\nFailures:" + notes if notes else "") + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="path stem for .json and .md (default outputs/kernels_<device>)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--prefix", help=f"comma list of cache lengths (default {GPU_GRID['prefix']})")
    p.add_argument("--blocks", help=f"comma list of blocks in flight (default {GPU_GRID['blocks']})")
    p.add_argument("--block-size", dest="block_size", help=f"comma list (default {GPU_GRID['block_size']})")
    p.add_argument("--heads", help=f"comma list of Hq:Hkv (default {GPU_GRID['heads']})")
    p.add_argument("--head-dim", dest="head_dim", help=f"comma list (default {GPU_GRID['head_dim']})")
    p.add_argument("--dtype", help=f"comma list of fp32/fp16/bf16 (default {GPU_GRID['dtype']})")
    p.add_argument("--impls", default="sdpa,flex,triton,flash,flash_split",
                   help="which to time (sdpa always runs: it is the reference)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timing")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, run a tiny smoke test (sdpa, flex)")
    p.add_argument("--quiet", action="store_true")


def main(args) -> dict:
    result = run(args)
    text = render(result)
    print(text)
    slug = "".join(ch if ch.isalnum() else "_" for ch in result["device"].lower()).strip("_")
    stem = args.out or os.path.join("outputs", f"kernels_{slug}")
    write_json(stem + ".json", result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(f"wrote {stem}.json and {stem}.md")
    return result

