"""Memory and speed on paper for the published dVLAs at their real sizes (docs/sizing.md).

    python scripts/sizing_table.py           # eval/results/sizing_real_models.{json,md}, docs/sizing.md's tables
    python scripts/sizing_table.py --batch 4 --out /tmp/sizing --no-docs

For Dream-VLA, UD-VLA and MMaDA-VLA (``fast_dvla.benchmark.sizing.PUBLISHED``, each number with
its source): parameters, KV-cache bytes per chunk, forwards and query tokens per chunk for each
decoder (exact, best case, worst-case bound, and at the shipped reference student's measured rate,
read from a benchmark result file), and the GPU memory of a LoRA distillation step. It also runs
one real distillation step of the reference model's widths on the CPU and compares what autograd
saves, and the adapter's optimizer state, with the formulas (a few seconds).

Every number in the outputs is computed here; docs/sizing.md's block between the ``sizing:begin``
and ``sizing:end`` markers is rewritten from them (``--no-docs`` leaves it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fast_dvla.benchmark import sizing as sz  # noqa: E402
from fast_dvla.benchmark.report import markdown_table  # noqa: E402

STUDENT = "fast_dvla/assets/reference/libero_object/student/config.json"
RESULTS = "eval/results/bench_libero_short_cpu.json"
BEGIN, END = "<!-- sizing:begin (written by scripts/sizing_table.py) -->", "<!-- sizing:end -->"
PRECISIONS = (("fp32", "fp32", "this project's CPU training"),
              ("bf16", "fp32", "the recipe assumed at real size"),
              ("bf16", "bf16", "adapter in bf16 too"))


def reference_rates(student_path: str, results_path: str) -> dict:
    """The shipped student's shape and decode settings, and its measured NFE and query tokens per
    chunk from a ``bench libero`` result, turned into forwards per block and blocks per forward."""
    from fast_dvla.model import ModelConfig

    with open(os.path.join(ROOT, student_path)) as f:
        student = json.load(f)
    with open(os.path.join(ROOT, results_path)) as f:
        results = json.load(f)
    cfg = ModelConfig.from_dict(student["model"])
    P, L, k = cfg.prefix_len, cfg.chunk_len, cfg.block_size
    measured = {row["method"]: row for row in results["throughput"]}
    out = {"student": student_path, "results": results_path, "prefix_len": P, "chunk_len": L, "block_size": k,
           "fallback_n": student["decode"]["fallback_n"], "vanilla_cached_steps": student["decode"]["vanilla_steps"],
           "timing_observations": results.get("timing_observations"), "model_config": student["model"]}
    for method in ("block_diffusion", "fast_dvla", "vanilla_cached"):
        row = measured[method]
        out[method] = {"nfe": row["nfe"], "query_tokens": row["query_tokens"],
                       **sz.measured_rates(P, L, k, row["nfe"], row["query_tokens"])}
    # the formulas on the reference itself, beside what it measured
    bd_q = sz.block_diffusion_query_tokens(P, L, k, measured["block_diffusion"]["nfe"])
    vc = sz.vanilla_cached_counts(P, L, k, out["vanilla_cached_steps"])
    fd = sz.fast_dvla_counts(P, L, k, out["fallback_n"])
    out["consistency"] = {
        "block_diffusion_query_from_nfe": bd_q,
        "vanilla_cached_best_worst": [vc["best"].query_tokens, vc["worst"].query_tokens],
        "fast_dvla_best_bound_nfe": [fd["best"].nfe, fd["bound"].nfe],
        "fast_dvla_best_bound_query": [fd["best"].query_tokens, fd["bound"].query_tokens]}
    return out


def measured_check(model_config: dict, rank: int, batch: int) -> list[dict]:
    from fast_dvla.model import ModelConfig

    cfg = ModelConfig.from_dict(model_config)
    rows = []
    for act, lora, why in PRECISIONS:
        measured = sz.measure_distillation_step(cfg, rank, batch, act, lora)
        predicted = sz.predicted_distillation_step(cfg, rank, batch, act, lora)
        for key in ("saved_bytes", "lora_params", "grad_bytes", "adamw_bytes"):
            rows.append({"precision": f"activations {act}, LoRA {lora} ({why})", "quantity": key,
                         "formula": predicted[key], "measured": measured[key],
                         "relative_difference": abs(predicted[key] - measured[key]) / measured[key]})
    return rows


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "machine": platform.machine()}


# -- Markdown ----------------------------------------------------------------------------------------------
def fmt_num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def headline(tables: list[dict]) -> str:
    rows = []
    for t in tables:
        arch, mem = t["architecture"], t["memory"]
        van = next(r for r in t["decoders"] if r["decoder"] == "vanilla")
        fd = {r["case"]: r for r in t["decoders"] if r["decoder"] == "fast_dvla"}
        fd_best = next(v for k, v in fd.items() if k.startswith("best"))
        fd_at = next(v for k, v in fd.items() if k.startswith("at the"))
        fd_bound = next(v for k, v in fd.items() if k.startswith("worst"))
        rows.append({
            "arch": arch["name"].split(" (")[0],
            "params": sz.human_count(t["params"]["total"]),
            "pl": f"{arch['prefix_len']} + {arch['chunk_len']}",
            "cache": sz.human_bytes(t["kv_cache"]["bytes"]),
            "vanilla": f"{fmt_num(van['nfe'])} / {fmt_num(van['query_tokens'])}",
            "fd": (f"{fmt_num(fd_best['nfe'])} / {fmt_num(fd_best['query_tokens'])}; "
                   f"{fmt_num(fd_at['nfe'])} / {fmt_num(fd_at['query_tokens'])}; "
                   f"{fmt_num(fd_bound['nfe'])} / {fmt_num(fd_bound['query_tokens'])}"),
            "mem": f"{sz.human_bytes(mem['total_no_checkpointing'])} / {sz.human_bytes(mem['total_checkpointing'])}",
        })
    batch = tables[0]["memory"]["batch"]
    cols = [("arch", "architecture", ""), ("params", "parameters", ""), ("pl", "prefix + chunk tokens", ""),
            ("cache", "KV cache per chunk (bf16)", ""), ("vanilla", "vanilla, published S: NFE / query tokens", ""),
            ("fd", "fast_dvla NFE / query tokens: best; at reference rate; bound", ""),
            ("mem", f"estimated peak memory, LoRA-32 distillation, batch {batch}: no / with checkpointing", "")]
    return markdown_table(rows, cols)


def reading(tables: list[dict], gpu_gib: float = 80.0) -> str:
    """One line per architecture: fast_dvla against the published vanilla decode, and whether the
    distillation's estimated peak fits a GPU of ``gpu_gib``."""
    lines = []
    for t in tables:
        name = t["architecture"]["name"].split(" (")[0]
        van = t["decoders"][0]  # vanilla at the published S
        fd = {r["case"].split(" ")[0]: r for r in t["decoders"] if r["decoder"] == "fast_dvla"}
        best, at = fd["best"], fd["at"]
        mem, cap = t["memory"], gpu_gib * 2 ** 30
        fits = lambda b: "fits" if b <= cap else "does not fit"  # noqa: E731
        lines.append(
            f"- {name}: vanilla at its published S = {t['architecture']['published_steps']} takes "
            f"{van['nfe'] / best['nfe']:.2f}x the forwards of fast_dvla's best case and "
            f"{van['nfe'] / at['nfe']:.2f}x those at the reference rate; query tokens "
            f"{van['query_tokens'] / best['query_tokens']:.2f}x and {van['query_tokens'] / at['query_tokens']:.2f}x. "
            f"Distillation at batch {mem['batch']} {fits(mem['total_no_checkpointing'])} in {gpu_gib:.0f} GiB without "
            f"checkpointing and {fits(mem['total_checkpointing'])} with it.")
    return "\n".join(lines)


def architecture_md(t: dict) -> str:
    arch, mem, params = t["architecture"], t["memory"], t["params"]
    d = arch["decoder"]
    lines = [f"### {arch['name']}", "",
             f"Decoder: hidden {d['hidden_size']}, {d['num_layers']} layers, {d['num_heads']} query / "
             f"{d['num_kv_heads']} key-value heads (head dim {d['head_dim'] or d['hidden_size'] // d['num_heads']}), "
             f"MLP {d['intermediate_size']}, vocabulary {d['vocab_size']:,}"
             f"{', q/k/v biases' if d['qkv_bias'] else ''}"
             f"{', tied head' if d['tied_embeddings'] else ', untied head'}.",
             "",
             "Prefix, " + f"{arch['prefix_len']} tokens: " + "; ".join(f"{w} ({n})" for w, n in arch["prefix"]) + ".",
             "",
             "Generated region (the chunk), " + f"{arch['chunk_len']} tokens: "
             + "; ".join(f"{w} ({n})" for w, n in arch["chunk"]) + ".",
             "",
             f"Student blocks: k = {t['blocks']['block_size']}, N = {t['blocks']['num_blocks']} "
             f"({arch['block_note']}); S(k, n) = {t['blocks']['fallback_steps_per_block']}. "
             f"Published steps: {arch['published_steps']} ({arch['steps_note']}).", ""]
    lines.append(markdown_table(
        [{"decoder": r["decoder"], "case": r["case"], "nfe": fmt_num(r["nfe"]), "q": fmt_num(r["query_tokens"])}
         for r in t["decoders"]],
        [("decoder", "decoder", ""), ("case", "case", ""), ("nfe", "forwards (NFE) per chunk", ""),
         ("q", "query tokens per chunk", "")]))
    lines.append("")
    per_tok = mem["per_token_per_layer"]
    cache = t["kv_cache"]
    mrows = [
        ("parameters", " + ".join(f"{k} {sz.human_count(v)}" for k, v in params.items() if k != "total")
         + f" = {params['total']:,}"),
        ("KV cache per chunk", f"{sz.human_bytes(cache['bytes'])} ({cache['tokens']} tokens x "
                               f"{cache['bytes_per_token']:,} B, bf16)"
         + (f"; the adapter's hidden-state cache adds {sz.human_bytes(cache['adapter_hidden_bytes'])}"
            if cache["adapter_hidden_bytes"] else "")),
        ("frozen weights (bf16)", sz.human_bytes(mem["weights"])),
        (f"LoRA rank {t['lora_rank']}: parameters", f"{mem['lora_params']:,}"),
        ("LoRA params + grads + AdamW m, v (fp32)", sz.human_bytes(mem["lora_state_total"])),
        ("saved per token per layer", f"{sum(per_tok.values()):,} B ("
         + ", ".join(f"{k} {v:,}" for k, v in per_tok.items()) + ")"),
        (f"saved for backward per sample ({mem['seq_len']} tokens)", sz.human_bytes(mem["saved_per_sample_total"])
         + " (" + ", ".join(f"{k} {sz.human_bytes(v)}" for k, v in mem["saved_per_sample"].items()) + ")"),
        ("the same with the adapter in bf16 (no fp32 input copies)",
         sz.human_bytes(mem["saved_per_sample_bf16_adapter"])),
        ("kept per sample with gradient checkpointing", sz.human_bytes(mem["checkpointed_kept_per_sample"])
         + f" (+ {sz.human_bytes(mem['checkpointed_per_sample']['recompute'])} while one layer is recomputed)"),
        (f"teacher forward, batch {mem['batch']} (no_grad, estimate)",
         f"saves nothing; logits {sz.human_bytes(mem['teacher_batch']['logits'])}, one layer's working set "
         f"<= {sz.human_bytes(mem['teacher_batch']['one_layer'])}"),
        (f"saved for backward, batch {mem['batch']}", sz.human_bytes(mem["saved_batch_total"])),
        (f"estimated peak, batch {mem['batch']}, no checkpointing",
         sz.human_bytes(mem["total_no_checkpointing"]) + " (weights + LoRA state + saved + one layer's set as "
                                                         "backward working memory)"),
        (f"estimated peak, batch {mem['batch']}, checkpointing",
         sz.human_bytes(mem["total_checkpointing"]) + " (weights + LoRA state + kept + two layers' sets)"),
    ]
    lines.append(markdown_table([{"q": a, "v": b} for a, b in mrows],
                                [("q", "memory and size", ""), ("v", "value", "")]))
    lines.append("")
    lines.append(f"Loss vocabulary: {arch['loss_note']}.")
    lines += ["", "Notes: " + "; ".join(arch["notes"]) + ".", "", "Sources:", ""]
    lines += [f"- {s}" for s in arch["sources"]]
    return "\n".join(lines)


def check_md(rows: list[dict], model_config: dict, batch: int, rank: int) -> str:
    c = model_config
    head = (f"One distillation step (`StageLoss`, asymmetric loss, LoRA rank {rank}, AdamW) of a random reference "
            f"model with the shipped student's widths (hidden {c['hidden_size']}, {c['num_layers']} layers, "
            f"{c['num_heads']}/{c['num_kv_heads']} heads, MLP {c['intermediate_size']}, "
            f"{c.get('backbone', 'llama')}), "
            f"batch {batch}, on the CPU:")
    table = markdown_table(
        [{"p": r["precision"], "q": r["quantity"], "f": f"{r['formula']:,}", "m": f"{r['measured']:,}",
          "d": f"{100 * r['relative_difference']:.3f}%"} for r in rows],
        [("p", "precision", ""), ("q", "quantity", ""), ("f", "formula", ""), ("m", "measured", ""),
         ("d", "difference", "")])
    return head + "\n\n" + table


def reference_md(ref: dict) -> str:
    c = ref["consistency"]
    bd, fd, vc = ref["block_diffusion"], ref["fast_dvla"], ref["vanilla_cached"]
    return "\n".join([
        f"Shipped student (`{ref['student']}`): P = {ref['prefix_len']}, L = {ref['chunk_len']}, "
        f"k = {ref['block_size']}, "
        f"n = {ref['fallback_n']}; measured in `{ref['results']}` ({ref['timing_observations']} observations):",
        "",
        f"- block_diffusion: {bd['nfe']:.2f} forwards, {bd['query_tokens']:.1f} query tokens per chunk, "
        f"{bd['forwards_per_block']:.3f} forwards per block; `P + k (NFE + N - 1)` gives "
        f"{c['block_diffusion_query_from_nfe']:.1f}.",
        f"- fast_dvla: {fd['nfe']:.2f} forwards ({fd['forwards_per_block']:.3f} per block), {fd['query_tokens']:.1f} "
        f"query tokens, {fd['window_blocks']:.3f} blocks per forward; best/bound "
        f"{c['fast_dvla_best_bound_nfe'][0]:.0f}/{c['fast_dvla_best_bound_nfe'][1]:.0f} forwards, "
        f"{c['fast_dvla_best_bound_query'][0]:.0f}/{c['fast_dvla_best_bound_query'][1]:.0f} query tokens.",
        f"- vanilla_cached (S = {ref['vanilla_cached_steps']}): {vc['nfe']:.0f} forwards, {vc['query_tokens']:.1f} "
        f"query tokens; best/worst commit order {c['vanilla_cached_best_worst'][0]:.0f}/"
        f"{c['vanilla_cached_best_worst'][1]:.0f}."])


def assumptions_md(payload: dict) -> str:
    a = payload["assumptions"]
    return "\n".join([
        f"- Batch of one for decoding; KV cache and weights in bf16; decoders' thresholds at their defaults "
        f"(`fallback_n` = {a['fallback_n']}); `vanilla` at the published S and at "
        f"S = {a['project_vanilla_steps']} (this "
        f"project's default), `vanilla_cached` at the published S and at S = {a['vanilla_cached_steps']} (the "
        f"shipped student's).",
        f"- Distillation: LoRA rank {a['lora_rank']} on {', '.join(a['lora_targets'])} of every layer "
        f"(`fast_dvla/training/lora.py`), frozen weights and activations bf16, adapter and AdamW states fp32, "
        f"batch {a['batch']} sequences of prefix + chunk, `lean_forward` with SDPA, no gradient checkpointing "
        "(the project's trainer has none; the checkpointed numbers are the formula's).",
        "- 'At the reference student's measured rate': its forwards per block (and, for fast_dvla, blocks per "
        "forward) carried over to the other shapes: an extrapolation, not a measurement of those models.",
        "- Peaks leave out the CUDA context, allocator slack and the vision tokenizers (UD-VLA's Emu3 VQ, "
        "MMaDA-VLA's MAGVIT-v2), which run once per observation outside the decoder."])


def write_outputs(payload: dict, out: str, docs: str | None) -> None:
    tables = payload["architectures"]
    md = ["# Memory and speed on paper: published dVLAs at their real sizes", "",
          "Written by `python scripts/sizing_table.py`; formulas and method in "
          "[docs/sizing.md](../../docs/sizing.md). Versions of the measured check: "
          + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".", "",
          "## Assumptions", "", assumptions_md(payload), "", "## Headline", "", headline(tables), "",
          "NFE and query tokens per chunk (batch of one); bound = `max_nfe`'s worst case.", "",
          reading(tables), "",
          "## Per architecture", ""]
    for t in tables:
        md += [architecture_md(t), ""]
    md += ["## Check against a measured distillation step", "",
           check_md(payload["check"], payload["reference"]["model_config"], payload["check_batch"],
                    payload["assumptions"]["lora_rank"]), "",
           "## The reference student's measured rates", "", reference_md(payload["reference"]), ""]
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    for path, text in ((out + ".json", json.dumps(payload, indent=2) + "\n"), (out + ".md", "\n".join(md))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    if docs:
        with open(docs) as f:
            text = f.read()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{docs}: no '{BEGIN}' ... '{END}' block to rewrite (pass --no-docs)")
        block = "\n".join([BEGIN, "", "### Headline", "", headline(tables), "", reading(tables), "",
                           "### Check against a measured distillation step", "",
                           check_md(payload["check"], payload["reference"]["model_config"], payload["check_batch"],
                                    payload["assumptions"]["lora_rank"]), "",
                           "### The reference student's measured rates", "", reference_md(payload["reference"]), "",
                           END])
        start, end = text.index(BEGIN), text.index(END) + len(END)
        tmp = docs + ".tmp"
        with open(tmp, "w") as f:
            f.write(text[:start] + block + text[end:])
        os.replace(tmp, docs)


def build(batch: int, rank: int, check_batch: int, student: str, results: str) -> dict:
    from fast_dvla.training.lora import TARGETS

    ref = reference_rates(student, results)
    project_steps = 12
    tables = [sz.architecture_table(arch, ref, lora_rank=rank, batch=batch, fallback_n=ref["fallback_n"],
                                    vanilla_cached_steps=ref["vanilla_cached_steps"],
                                    project_vanilla_steps=project_steps)
              for arch in sz.PUBLISHED]
    return {"generated_by": "python scripts/sizing_table.py", "versions": versions(),
            "assumptions": {"batch": batch, "lora_rank": rank, "lora_targets": list(TARGETS),
                            "fallback_n": ref["fallback_n"], "vanilla_cached_steps": ref["vanilla_cached_steps"],
                            "project_vanilla_steps": project_steps, "weights": "bf16", "activations": "bf16",
                            "lora_and_adamw": "fp32", "kv_cache": "bf16", "decode_batch": 1},
            "reference": ref, "check_batch": check_batch,
            "check": measured_check(ref["model_config"], rank, check_batch),
            "architectures": tables}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="distillation batch (sequences per GPU) for the memory totals")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--check-batch", type=int, default=2, help="batch of the measured distillation step")
    p.add_argument("--student", default=STUDENT, help="the reference student's config.json (its shape and settings)")
    p.add_argument("--results", default=RESULTS,
                   help="bench libero result with the student's measured NFE and query tokens")
    p.add_argument("--out", default=os.path.join(ROOT, "eval/results/sizing_real_models"), help="output stem")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs/sizing.md"),
                   help="doc whose generated block is rewritten")
    p.add_argument("--no-docs", action="store_true", help="leave the doc alone")
    args = p.parse_args(argv)
    payload = build(args.batch, args.rank, args.check_batch, args.student, args.results)
    write_outputs(payload, args.out, None if args.no_docs else args.docs)
    print(headline(payload["architectures"]))
    worst = max(r["relative_difference"] for r in payload["check"])
    print(f"\nmeasured check: largest formula/measurement difference {100 * worst:.3f}%")
    print(f"wrote {args.out}.json, {args.out}.md" + ("" if args.no_docs else f", {args.docs}"))


if __name__ == "__main__":
    main()
