"""Where the time of one action chunk goes, on the CPU: torch.profiler over
several decodes, every operator's self time attributed to a part of the model,
the rest of the wall time to Python (the decoders' loops and commit logic,
module calls, the profiler's own per-operator cost).

    fast-dvla profile-chunk                                   # vanilla on the shipped teacher, fast_dvla on the student
    fast-dvla profile-chunk --data data/heldout_35_37 --repeats 20 --out eval/results/profile_chunk_cpu

Attribution needs no hook in the library: while profiling, this command wraps
the model's parts in ``record_function`` labels from the outside (instance
attributes on the loaded model, restored afterwards; the attention function
through transformers' attention registry, the cache writes by patching
``BlockKVCache.update``), and an operator counts for the innermost label it ran
under. Labels and wrappers cost a few microseconds per call, so the profiled
wall time is above the unprofiled one, which is reported beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import shlex
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fast_dvla import FastDVLAPolicy
from fast_dvla.benchmark.observations import random_observation
from fast_dvla.benchmark.report import write_json
from fast_dvla.benchmark.throughput import TEACHER_METHODS, parse_decoders, policy_configs, policy_for
from fast_dvla.cache import BlockKVCache
from fast_dvla.data.frames import sample_frames
from fast_dvla.policy import reference_policy_dir


LABEL = "fdvla."  # prefix of this command's record_function labels
# label -> category shown; operators under no label are "other operators"
CATEGORIES = {
    "attention": "attention (kernel, mask)",
    "attn_proj": "q/k/v/o projections",
    "mlp": "MLP (gate/up/down, activation)",
    "norm": "RMSNorms",
    "head": "head (logits)",
    "prefix": "prefix (processor, image encoder, embeddings)",
    "cache": "KV cache (allocation, writes)",
    "other": "other operators (action embeddings, RoPE, confidences, commits)",
    "python": "Python and commit logic (wall - operator self time)",
}


def _labelled(fn, name: str):
    def wrapper(*args, **kwargs):
        with record_function(LABEL + name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def instrumented(policies):
    """Labels the parts of each policy's model while the block runs; everything is put back after."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    undo = []

    def wrap_attr(obj, attr: str, name: str):
        had_own = attr in vars(obj)  # an instance attribute already (e.g. micro-bench's dtype cast)
        own = vars(obj).get(attr)
        setattr(obj, attr, _labelled(getattr(obj, attr), name))
        undo.append(lambda: setattr(obj, attr, own) if had_own else delattr(obj, attr))

    for policy in {id(p): p for p in policies}.values():
        model = policy.model
        wrap_attr(policy.io, "processor", "prefix")  # what the policy calls for a reference model's observation
        wrap_attr(model, "embed_prefix", "prefix")
        wrap_attr(model, "new_cache", "cache")
        wrap_attr(model.head, "forward", "head")
        decoder = model.backbone.decoder
        wrap_attr(decoder.norm, "forward", "norm")
        for layer in decoder.layers:
            wrap_attr(layer.mlp, "forward", "mlp")
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                wrap_attr(norm, "forward", "norm")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                wrap_attr(getattr(layer.self_attn, proj), "forward", "attn_proj")
        # the backend's function is looked up by name on every forward: a local override labels it
        name = decoder.config._attn_implementation
        if name not in ALL_ATTENTION_FUNCTIONS._local_mapping:
            ALL_ATTENTION_FUNCTIONS[name] = _labelled(ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward),
                                                      "attention")
            undo.append(lambda n=name: ALL_ATTENTION_FUNCTIONS.__delitem__(n))
    update = BlockKVCache.update
    BlockKVCache.update = _labelled(update, "cache")
    undo.append(lambda: setattr(BlockKVCache, "update", update))
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


def category_of(event) -> str:
    """The category of an operator event: its innermost label, else "other"."""
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith(LABEL):
            return node.name[len(LABEL):]
        node = node.cpu_parent
    return "other"


def attribute(events, wall_us: float, n_chunks: int) -> tuple[dict, list]:
    """``({category: {"ms", "pct"}}, top operators)`` per chunk from a profile's events: operators'
    self times summed per category, Python = wall - all operators' self time."""
    totals = {key: 0.0 for key in CATEGORIES}
    per_op: dict[str, float] = {}
    for event in events:
        if event.is_user_annotation or event.name.startswith(LABEL):
            continue
        totals[category_of(event)] += event.self_cpu_time_total
        per_op[event.name] = per_op.get(event.name, 0.0) + event.self_cpu_time_total
    totals["python"] = wall_us - sum(totals.values())
    categories = {key: {"ms": us / n_chunks / 1e3, "pct": 100.0 * us / wall_us} for key, us in totals.items()}
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return categories, [{"op": op, "ms": us / n_chunks / 1e3, "pct": 100.0 * us / wall_us} for op, us in top]


def profile_decoder(policy: FastDVLAPolicy, config, observations: list, warmup: int) -> dict:
    """Warm up, time the chunks unprofiled, then profile the same chunks with labels."""
    for _ in range(warmup):
        policy.predict_action_chunk(observations[0], config)
    plain = []
    for obs in observations:
        t0 = time.perf_counter()
        policy.predict_action_chunk(obs, config)
        plain.append(time.perf_counter() - t0)
    nfe, query, wall = [], [], 0.0
    with instrumented([policy]):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
            for obs in observations:
                t0 = time.perf_counter()
                policy.predict_action_chunk(obs, config)
                wall += time.perf_counter() - t0
                nfe.append(policy.last_stats.nfe)
                query.append(policy.last_stats.query_tokens)
    n = len(observations)
    categories, top = attribute(prof.events(), wall * 1e6, n)
    # the profiler's own cost (per operator and per label) is spread over the categories, most of it over
    # Python and the many small operators: the unprofiled wall says how much there is in all
    return {"nfe": sum(nfe) / n, "query_tokens": sum(query) / n, "wall_ms": wall / n * 1e3,
            "unprofiled_ms": statistics.median(plain) * 1e3, "categories": categories, "top_ops": top,
            "decode": config.to_dict()}


def run(args, argv: list[str] | None = None) -> dict:
    methods = parse_decoders(args.decoders)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    teacher_dir = args.teacher or reference_policy_dir("teacher")
    student_dir = args.student or reference_policy_dir("student")
    teacher, student = FastDVLAPolicy.from_pretrained(teacher_dir), FastDVLAPolicy.from_pretrained(student_dir)
    configs = policy_configs(methods, teacher, student)
    if args.data:
        observations = [o for o, _ in sample_frames(args.data, args.repeats, teacher.model.config.horizon, args.seed)]
    else:
        observations = [random_observation(teacher, 1, args.seed + i) for i in range(args.repeats)]
    decoders = {}
    for method in methods:
        policy = policy_for(method, teacher, student)
        decoders[method] = {"model": "teacher" if method in TEACHER_METHODS else "student",
                            **profile_decoder(policy, configs[method], observations, args.warmup)}
    command = "fast-dvla profile-chunk " + shlex.join(sys.argv[2:] if argv is None else argv)
    return {"command": command, "teacher": teacher_dir, "student": student_dir,
            "observations": args.data or "random", "repeats": len(observations), "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "date": datetime.date.today().isoformat(),
            "categories": CATEGORIES, "decoders": decoders}


def render(result: dict) -> str:
    methods = list(result["decoders"])
    rows = result["decoders"]
    lines = [f"# Where a chunk's time goes (CPU, {result['torch_threads']} torch thread(s))", "",
             f"{result['date']}, {result['machine']}, torch {result['torch']}; {result['repeats']} chunks per "
             f"decoder ({result['observations']} observations) after {result['warmup']} warm-up; "
             "ms per chunk under the profiler, share of its wall time. The profiler and the labels cost time "
             "themselves (profiled minus unprofiled wall), most of it in Python and the many small operators, "
             "so those shares are upper bounds.", "",
             "```bash", result["command"], "```", "",
             "| category | " + " | ".join(f"{m} ({rows[m]['model']})" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for key, title in result["categories"].items():
        cells = [f"{rows[m]['categories'][key]['ms']:.2f} ms ({rows[m]['categories'][key]['pct']:.0f}%)"
                 for m in methods]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for label, key, fmt in (("wall, profiled", "wall_ms", "{:.2f} ms"), ("wall, unprofiled (median)",
                            "unprofiled_ms", "{:.2f} ms"), ("NFE per chunk", "nfe", "{:.1f}"),
                            ("query tokens per chunk", "query_tokens", "{:.0f}")):
        lines.append(f"| **{label}** | " + " | ".join(fmt.format(rows[m][key]) for m in methods) + " |")
    lines += ["", "Top operators by self time (ms per chunk):", ""]
    for m in methods:
        ops = ", ".join(f"`{op['op']}` {op['ms']:.2f}" for op in rows[m]["top_ops"][:6])
        lines.append(f"- {m}: {ops}")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher policy directory (default: the shipped reference teacher)")
    p.add_argument("--student", help="student policy directory (default: the shipped reference student)")
    p.add_argument("--decoders", default="vanilla,fast_dvla",
                   help="decoders to profile; teacher decoders run on the teacher, the others on the student")
    p.add_argument("--data", help="profile on frames of these demonstrations (an episodes directory) "
                   "instead of random images")
    p.add_argument("--repeats", type=int, default=10, help="chunks profiled per decoder")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="path stem: writes STEM.json and STEM.md")


def main(args, argv: list[str] | None = None) -> dict:
    result = run(args, argv)
    text = render(result)
    print(text)
    if args.out:
        write_json(args.out + ".json", result)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        print(f"wrote {args.out}.json and {args.out}.md")
    return result
