"""One prepared GPU check: the fused attention kernels against SDPA, the engine
on them, the attention benchmark and every decoder's latency, in one summary.

    python scripts/gpu_check.py --out outputs/gpu_check/2026-12-05     # on a CUDA machine
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check_dry      # same steps, CPU, tiny sizes

``scripts/gpu_check.sh`` sets up Python and runs this. Steps, in order:

1. ``environment``: versions, the device, whether flash-attn imports.
2. ``kernel_check``: Triton (and flash-attn's two modes, when importable) against
   SDPA in fp32 at the engine's shapes: grouped-query heads, ragged cache lengths
   per batch row, fp16/bf16 (and fp32 for Triton), a NaN-poisoned unused buffer
   tail (any read past a row's keys shows as NaN).
3. ``engine_check``: the shipped student decoded with the Triton backend against
   SDPA (fp32): same tokens, logits within tolerance.
4. ``bench_kernels``: ``fast-dvla bench-kernels`` at the shipped and a 7B-shaped
   attention (FlexAttention left out: it compiles per shape, minutes for a grid).
5. ``micro_bench``: ``fast-dvla micro-bench``, every decoder, for the shipped pair
   (fp32) and for a 7B-shaped backbone slice (hidden 4096, 32 heads, 8 KV heads,
   2 layers, bf16), on each attention backend that runs.
6. ``static_graphs``: ``fast-dvla compile-bench`` on the shipped pair: every decoder
   dynamic, static-shape and compiled with ``reduce-overhead`` (CUDA graphs), equal
   actions and no recompiles required.

A failing step is recorded with its error and the next step runs; the summary
(``summary.json``, ``summary.md``) is rewritten after every step, so a run cut
off by a time limit still leaves what it finished. Exit status 1 if any step
failed, 2 without CUDA (unless ``--dry-run``).

``--dry-run`` runs every step on the CPU at tiny sizes (Triton under its
interpreter, ``TRITON_INTERPRET=1``), to check the steps and paths without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

NO_CUDA_EXIT = 2
# fp32 up to summation order; half precision up to its rounding (as tests/test_triton_kernel.py)
TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
SEVEN_B = "hidden_size=4096,num_heads=32,num_kv_heads=8,num_layers=2,intermediate_size=14336"
TINY = "hidden_size=64,num_heads=4,num_kv_heads=2,num_layers=2,intermediate_size=128,image_size=16,image_grid=2"

# (name, batch, q heads, kv heads, head dim, block size, queries, (min, max) cache length, dtypes)
GPU_CASES = [
    ("shipped", 4, 4, 2, 64, 7, 7, (49, 98), ("fp32", "fp16", "bf16")),
    ("shipped-4-blocks", 4, 4, 2, 64, 7, 28, (49, 77), ("fp32", "fp16", "bf16")),
    ("7B", 2, 32, 8, 128, 7, 7, (300, 700), ("fp16", "bf16")),
    ("7B-4-blocks", 2, 32, 8, 128, 7, 28, (300, 700), ("fp16", "bf16")),
    ("7B-k32", 2, 32, 8, 128, 32, 64, (300, 700), ("bf16",)),
]
DRY_CASES = [("tiny", 2, 4, 2, 32, 7, 14, (20, 60), ("fp32", "fp16", "bf16"))]


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def flash_available() -> str | None:
    """None if flash-attn can run here, else why not."""
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        import flash_attn  # noqa: F401
    except ImportError as err:
        return f"flash-attn does not import: {err}"
    return None


# -- steps ---------------------------------------------------------------------------------------

def step_environment(ctx: dict) -> dict:
    import torch
    import transformers
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if ctx["device"] == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "flash_attn": flash_available() or "available"}
    return info


def random_case(batch, hq, hkv, n_q, d, lens, dtype, device, seed):
    """Inputs in a preallocated buffer whose unused tail is NaN (as the kernel tests)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    cache_lens = torch.randint(lens[0], lens[1] + 1, (batch,), generator=g)
    slots = int(cache_lens.max()) + n_q + 5
    q = torch.randn(batch, hq, n_q, d, generator=g).to(device, dtype)
    k = torch.randn(batch, hkv, slots, d, generator=g).to(device, dtype)
    v = torch.randn(batch, hkv, slots, d, generator=g).to(device, dtype)
    for b, c in enumerate(cache_lens.tolist()):
        k[b, :, c + n_q:] = float("nan")
        v[b, :, c + n_q:] = float("nan")
    return q, k, v, cache_lens.to(device)


def sdpa_rows(q, k, v, cache_lens, block_size, dtype=None):
    """SDPA per batch row (each its own cache length) with the engine's dense mask, in ``dtype``
    (default: fp32, the reference)."""
    import torch
    import torch.nn.functional as F
    from fast_dvla.masks import dense_mask
    dtype = dtype or torch.float32
    n_q = q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, c in enumerate(cache_lens.tolist()):
        mask = dense_mask(c, block_size, c, n_q, c + n_q, device=q.device)
        out[b:b + 1] = F.scaled_dot_product_attention(
            q[b:b + 1].to(dtype), k[b:b + 1, :, :c + n_q].to(dtype), v[b:b + 1, :, :c + n_q].to(dtype),
            attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]).float()
    return out


def step_kernel_check(ctx: dict) -> dict:
    import torch
    from fast_dvla_kernels import flash_block_causal_attention, triton_block_causal_attention

    impls = {"triton": lambda q, k, v, lens, bs: triton_block_causal_attention(q, k, v, lens, bs)}
    flash_reason = flash_available()
    if flash_reason is None:
        for mode in ("per_block", "split"):
            impls[f"flash_{mode}"] = (lambda m: lambda q, k, v, lens, bs: flash_block_causal_attention(
                q, k, v, lens, bs, mode=m))(mode)
    rows, failures = [], []
    for seed, (name, batch, hq, hkv, d, bs, n_q, lens, dtypes) in enumerate(ctx["cases"]):
        for dt in dtypes:
            q, k, v, cache_lens = random_case(batch, hq, hkv, n_q, d, lens, _dtype(dt), ctx["device"], seed)
            ref = sdpa_rows(q, k, v, cache_lens, bs)
            # SDPA in the same precision: how far rounding alone takes a correct result
            sdpa_err = (sdpa_rows(q, k, v, cache_lens, bs, _dtype(dt)) - ref).abs().max().item()
            tol = max(TOL[dt], 2 * sdpa_err)
            for impl, fn in impls.items():
                if impl.startswith("flash") and dt == "fp32":
                    continue  # flash-attn takes fp16/bf16 only
                row = {"case": name, "impl": impl, "dtype": dt, "batch": batch, "q_heads": hq, "kv_heads": hkv,
                       "head_dim": d, "block_size": bs, "q_len": n_q, "cache_lens": cache_lens.tolist(),
                       "sdpa_same_dtype_err": sdpa_err, "tol": tol}
                try:
                    out = fn(q, k, v, cache_lens, bs)
                    row["finite"] = bool(torch.isfinite(out).all())
                    row["max_err"] = (out.float() - ref).abs().max().item()
                    row["ok"] = row["finite"] and row["max_err"] <= tol
                except Exception as err:  # one failing implementation must not hide the others
                    row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
                rows.append(row)
                if not row["ok"]:
                    failures.append(f"{impl} {name} {dt}: " + row.get("error", f"max err {row.get('max_err')} > {tol}"
                                                                      f" (finite: {row.get('finite')})"))
    result = {"rows": rows, "impls": list(impls), "flash": flash_reason or "checked"}
    if failures:
        raise CheckFailed("; ".join(failures[:5]), result)
    return result


def _prefix(model, batch, seed):
    import torch
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    images = torch.rand(batch, len(cfg.cameras), 3, cfg.image_size, cfg.image_size, generator=g)
    instr = torch.randint(1, cfg.instr_vocab, (batch, cfg.instr_len), generator=g)
    state = torch.randn(batch, cfg.state_dim, generator=g)
    with torch.no_grad():
        return model.embed_prefix(images.to(p.device), instr.to(p.device), state.to(p.device))


def step_engine_check(ctx: dict) -> dict:
    """The engine on the Triton backend against SDPA: the same model, prefix and decoder."""
    from fast_dvla import DecodeConfig, decode
    from fast_dvla.attention import use_backend

    model = ctx["student"]().model
    prefix = _prefix(model, 2, 0)
    rows, failures = [], []
    for method in ("fast_dvla", "vanilla_cached", "block_diffusion"):
        config = DecodeConfig(method=method)
        outs = {}
        for backend in ("sdpa", "triton"):
            use_backend(model, backend)
            trace = []
            outs[backend] = (decode(model, prefix, config, trace=trace).tokens, trace)
        use_backend(model, "sdpa")
        (ref_tokens, ref_trace), (tokens, trace) = outs["sdpa"], outs["triton"]
        same_steps = len(trace) == len(ref_trace)
        gap = max((a["logits"] - b["logits"]).abs().max().item() for a, b in zip(trace, ref_trace))
        row = {"method": method, "tokens_equal": bool((tokens == ref_tokens).all()), "same_forwards": same_steps,
               "max_logit_gap": gap, "nfe": len(trace), "tol": 1e-3}
        row["ok"] = row["tokens_equal"] and same_steps and gap < row["tol"]
        rows.append(row)
        if not row["ok"]:
            failures.append(f"{method}: tokens equal {row['tokens_equal']}, logit gap {gap:.2e}")
    result = {"model": ctx["student_desc"], "rows": rows}
    if failures:
        raise CheckFailed("; ".join(failures), result)
    return result


def step_bench_kernels(ctx: dict) -> dict:
    from fast_dvla_eval import bench_kernels

    argv = ["--out", os.path.join(ctx["out"], "kernels"), "--quiet"]
    if ctx["dry_run"]:
        argv += ["--allow-cpu", "--iters", "2", "--warmup", "1"]
    else:  # the shipped model's attention (4:2 heads, D 64) and a 7B's (32:8, D 128), cache = prefix
        argv += ["--prefix", "49,700", "--blocks", "1,4", "--block-size", "7", "--heads", "4:2,32:8",
                 "--head-dim", "64,128", "--dtype", "bf16,fp16", "--impls", "sdpa,triton,flash,flash_split",
                 "--iters", "50", "--warmup", "10"]
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    result = bench_kernels.main(parser.parse_args(argv))
    failed = [r for r in result["rows"] if "error" in r]
    summary = {"argv": argv, "files": [os.path.join(ctx["out"], "kernels.json"), os.path.join(ctx["out"], "kernels.md")],
               "impls": result["impls"], "rows": len(result["rows"]), "markdown": bench_kernels.render(result)}
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(result['rows'])} kernel timings failed: {failed[0]['error']}", summary)
    return summary


def micro_bench_runs(ctx: dict) -> list[tuple[str, list[str]]]:
    """(name, micro-bench arguments) for each run of the step."""
    if ctx["dry_run"]:
        common = ["--repeats", "1", "--warmup", "0"]
        return [("shipped pair, fp32, sdpa", common),
                ("tiny random, fp32, triton (interpreter)", ["--random", "--model", TINY, "--attn-backend", "triton",
                                                             "--decoders", "vanilla,fast_dvla,vanilla_cached",
                                                             *common]),
                ("tiny random, bf16, sdpa", ["--random", "--model", TINY, "--dtype", "bf16", *common])]
    common = ["--device", "cuda", "--repeats", "20", "--warmup", "3"]
    backends = ["sdpa", "triton"] + (["flash"] if flash_available() is None else [])
    runs = [(f"shipped pair, fp32, {b}", [*common, "--attn-backend", b]) for b in backends if b != "flash"]
    if "flash" in backends:  # flash-attn takes half precision only
        runs.append(("shipped pair, bf16, flash", [*common, "--dtype", "bf16", "--attn-backend", "flash"]))
    runs += [(f"7B-shaped (2 layers), bf16, {b}", ["--random", "--model", SEVEN_B, "--dtype", "bf16",
                                                   "--attn-backend", b, *common]) for b in backends]
    return runs


def step_micro_bench(ctx: dict) -> dict:
    from fast_dvla.benchmark.report import markdown_table
    from fast_dvla.benchmark.throughput import COLUMNS

    from fast_dvla_eval import micro_bench

    parser = argparse.ArgumentParser()
    micro_bench.add_arguments(parser)
    runs, failures = [], []
    for name, argv in micro_bench_runs(ctx):
        entry = {"name": name, "argv": argv}
        try:
            result = micro_bench.run(parser.parse_args(argv))
            entry.update(rows=result["results"], model=result["model"], markdown=markdown_table(result["results"],
                                                                                                COLUMNS))
        except Exception as err:  # the next configuration still runs
            entry["error"] = f"{type(err).__name__}: {err}"[:500]
            failures.append(f"{name}: {entry['error']}")
        runs.append(entry)
    result = {"runs": runs}
    if failures:
        raise CheckFailed("; ".join(failures), result)
    return result


def step_static_graphs(ctx: dict) -> dict:
    """Every decoder of the shipped pair dynamic, static-shape and compiled; on the GPU compiled with
    ``reduce-overhead``, i.e. replayed as CUDA graphs (graphs inductor declined to record are counted)."""
    from fast_dvla_eval import compile_bench

    parser = argparse.ArgumentParser()
    compile_bench.add_arguments(parser)
    if ctx["dry_run"]:  # the tiny random model as both policies: compiling the shipped pair takes a minute here
        tiny = os.path.join(ctx["out"], "tiny_policy")
        ctx["student"]().save_pretrained(tiny)
        argv = ["--teacher", tiny, "--student", tiny, "--decoders", "vanilla,fast_dvla", "--repeats", "1",
                "--warmup", "1", "--warm-compile-cache"]
    else:
        argv = ["--device", "cuda", "--compile-mode", "reduce-overhead", "--repeats", "20", "--warmup", "3"]
    args = parser.parse_args(argv)
    args.argv = argv
    result = compile_bench.run(args)
    result["markdown"] = compile_bench.markdown(result)
    mismatched = {r["method"] for r in result["results"] if r["frames_with_token_mismatch"]}
    recompiled = {r["method"] for r in result["results"] if r["recompiles"]}
    if mismatched or recompiled:
        raise CheckFailed(f"modes disagree for {sorted(mismatched)}; recompiled while timing: {sorted(recompiled)}",
                          result)
    return result


STEPS = [("environment", step_environment), ("kernel_check", step_kernel_check), ("engine_check", step_engine_check),
         ("bench_kernels", step_bench_kernels), ("micro_bench", step_micro_bench), ("static_graphs", step_static_graphs)]


class CheckFailed(Exception):
    """A step ran but found a problem; ``detail`` keeps what it measured."""

    def __init__(self, message: str, detail: dict):
        super().__init__(message)
        self.detail = detail


# -- summary -------------------------------------------------------------------------------------

def render(summary: dict) -> str:
    from fast_dvla.benchmark.report import markdown_table

    env = summary["steps"][0].get("detail", {}) if summary["steps"] else {}
    lines = [f"# GPU check ({'dry run, CPU, tiny sizes' if summary['dry_run'] else env.get('device', '?')})", "",
             f"{summary['started']}; torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, flash-attn: {env.get('flash_attn')}; "
             f"{env.get('torch_threads')} torch thread(s).", "", "```bash", summary["command"], "```", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for step in summary["steps"]:
        note = step.get("error", "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {note} |")
    details = {s["name"]: s.get("detail") or {} for s in summary["steps"]}
    if details.get("kernel_check", {}).get("rows"):
        lines += ["", "## Kernels against fp32 SDPA", "",
                  markdown_table(details["kernel_check"]["rows"],
                                 [("case", "case", "s"), ("impl", "impl", "s"), ("dtype", "dtype", "s"),
                                  ("q_heads", "Hq", "d"), ("kv_heads", "Hkv", "d"), ("head_dim", "D", "d"),
                                  ("q_len", "Q", "d"), ("block_size", "k", "d"), ("max_err", "max err", ".1e"),
                                  ("sdpa_same_dtype_err", "SDPA same dtype err", ".1e"), ("tol", "tol", ".0e"),
                                  ("ok", "ok", "")])]
    if details.get("engine_check", {}).get("rows"):
        lines += ["", f"## Engine: Triton backend against SDPA ({details['engine_check']['model']})", "",
                  markdown_table(details["engine_check"]["rows"],
                                 [("method", "decoder", "s"), ("nfe", "NFE", "d"), ("tokens_equal", "same tokens", ""),
                                  ("max_logit_gap", "max logit gap", ".1e"), ("ok", "ok", "")])]
    if details.get("bench_kernels", {}).get("markdown"):
        lines += ["", "## Attention backends (bench-kernels)", "",
                  details["bench_kernels"]["markdown"].split("\n", 2)[-1].strip()]
    for run in details.get("micro_bench", {}).get("runs", []):
        lines += ["", f"## Decoders: {run['name']}", "", f"`fast-dvla micro-bench {' '.join(run['argv'])}`", ""]
        lines.append(run.get("markdown") or f"failed: {run.get('error')}")
    if details.get("static_graphs", {}).get("markdown"):
        lines += ["", "## Static shapes and CUDA graphs (compile-bench)", "",
                  details["static_graphs"]["markdown"].split("\n", 2)[-1].strip()]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict) -> None:
    """Both files, each written beside and renamed into place (a reader never sees half of one)."""
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str)),
                       ("summary.md", render(summary))):
        path = os.path.join(summary["out"], name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


# -- main ----------------------------------------------------------------------------------------

def prepare(args) -> dict:
    """The run's context: device, shapes, how to load the shipped student. Sets up the Triton
    interpreter for a dry run, which must happen before the kernel module is imported."""
    if args.dry_run:
        if "fast_dvla_kernels.triton_block_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_check --dry-run: the Triton kernel module was imported without TRITON_INTERPRET=1; "
                             "set it in the environment before Python starts")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.set_num_threads(args.threads)  # the host side of every timing on one thread: stable, comparable
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch. Run on a CUDA machine, or pass --dry-run for the same "
              "steps on the CPU at tiny sizes.", file=sys.stderr)
        raise SystemExit(NO_CUDA_EXIT)
    device = "cpu" if args.dry_run else "cuda"

    def student():
        from fast_dvla import FastDVLAPolicy
        from fast_dvla.policy import reference_policy_dir

        from fast_dvla_eval.micro_bench import parse_model_overrides, random_policy
        if args.dry_run:  # the interpreter takes ~0.1 s a kernel call: a tiny random model
            policy = random_policy(0, **parse_model_overrides(TINY))
            with torch.no_grad():  # confidences spread over [0, 1], not tied near 1/256 (a tie may flip a token)
                policy.model.head.weight.mul_(8.0)
            return policy
        return FastDVLAPolicy.from_pretrained(reference_policy_dir("student"), device=device)

    return {"dry_run": args.dry_run, "device": device, "out": args.out, "student": student,
            "student_desc": "tiny random model" if args.dry_run else "shipped student, fp32",
            "cases": DRY_CASES if args.dry_run else GPU_CASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for summary.json, summary.md and kernels.{json,md}")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", default=",".join(name for name, _ in STEPS), help="comma list of steps to run")
    args = parser.parse_args(argv)
    wanted = args.steps.split(",")
    unknown = sorted(set(wanted) - {name for name, _ in STEPS})
    if unknown:
        raise SystemExit(f"gpu_check: unknown steps {unknown}; expected some of {[n for n, _ in STEPS]}")
    os.makedirs(args.out, exist_ok=True)
    ctx = prepare(args)
    summary = {"command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "dry_run": args.dry_run, "out": args.out, "steps": [],
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for name, fn in STEPS:
        if name not in wanted and name != "environment":  # the environment heads every summary
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        step = {"name": name}
        try:
            step.update(status="ok", detail=fn(ctx))
        except CheckFailed as err:
            step.update(status="failed", error=str(err), detail=err.detail)
        except Exception as err:  # a broken step is reported; the others still run
            step.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
        step["seconds"] = time.perf_counter() - t0
        summary["steps"].append(step)
        print(f"[gpu_check] {name}: {step['status']} in {step['seconds']:.1f} s"
              + (f": {step['error']}" if "error" in step else ""), file=sys.stderr, flush=True)
        write_summary(summary)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    print(f"[gpu_check] summary: {os.path.join(args.out, 'summary.md')} and summary.json"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
