"""Time every decoder on the same observations, in one process.

Decoders are interleaved observation by observation, so drift (thermal,
other processes) hits all of them alike. Teacher decoders (``vanilla``,
``fast_dllm``) run on the teacher policy, student decoders on the student.
"""
from __future__ import annotations

import resource

import torch
from tqdm import tqdm

from fast_dvla import DecodeConfig, FastDVLAPolicy, decode
from fast_dvla.config import METHODS, TUNABLE_SETTINGS, add_setting_arguments

from .timing import summarize, timed

TEACHER_METHODS = ("vanilla", "fast_dllm")


def parse_decoders(text: str) -> list[str]:
    """``"vanilla,fast_dvla"`` -> ``["vanilla", "fast_dvla"]``; exits naming any unknown decoder."""
    methods = text.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown decoders {unknown}; expected some of {METHODS}")
    return methods


def policy_for(method: str, teacher: FastDVLAPolicy, student: FastDVLAPolicy) -> FastDVLAPolicy:
    return teacher if method in TEACHER_METHODS else student


def add_override_arguments(p) -> None:
    """``--tau-conf`` ... ``--near-bins``: unset, each decoder keeps its policy's own setting."""
    add_setting_arguments(p, "forced on every decoder (default: each policy's own)")


def overrides_from(args) -> dict:
    """The override flags of ``args`` as ``policy_configs`` keywords."""
    return {name: getattr(args, name) for name, _, _ in TUNABLE_SETTINGS}


def policy_configs(methods, teacher: FastDVLAPolicy, student: FastDVLAPolicy, **overrides) -> dict:
    """``{method: DecodeConfig}``: each decoder with the settings saved in the policy that runs it
    (its ``config.json``: its default decoder's, and those it keeps for others by name, so a
    student may carry thresholds tuned for it), then ``overrides`` (``tau_conf=...``; ``None``
    values are ignored) on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return {m: policy_for(m, teacher, student).decode_config_for(m).replace(**given) for m in methods}


def measure(teacher: FastDVLAPolicy, student: FastDVLAPolicy, observations: list[dict],
            base: DecodeConfig | dict, methods=METHODS, warmup: int = 2, repeats: int = 1,
            progress: bool = True) -> list[dict]:
    """One row per decoder: NFE and query tokens per chunk (means), latency
    median/p90, action tokens/s, chunk Hz, action Hz, speedup over vanilla.
    ``base``: one DecodeConfig for every decoder, or ``{method: DecodeConfig}``."""
    if not observations:
        raise ValueError("need at least one observation to time")
    device = teacher.device
    configs = dict(base) if isinstance(base, dict) else {m: base.replace(method=m) for m in methods}
    for m in methods:  # warm-up: first calls pay for allocation and lazy init
        for _ in range(warmup):
            policy_for(m, teacher, student).predict_action_chunk(observations[0], configs[m])
    times = {m: [] for m in methods}
    nfe = {m: [] for m in methods}
    query = {m: [] for m in methods}
    peak = {m: 0 for m in methods}
    total = len(observations) * repeats
    for i in tqdm(range(total), desc="timing decoders", disable=not progress):
        obs = observations[i % len(observations)]
        for m in methods:
            policy = policy_for(m, teacher, student)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _, dt = timed(lambda: policy.predict_action_chunk(obs, configs[m]), device)
            if device.type == "cuda":
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated(device))
            times[m].append(dt)
            nfe[m].append(policy.last_stats.nfe)
            query[m].append(policy.last_stats.query_tokens)
    batch = 1 if isinstance(observations[0]["instruction"], str) else len(observations[0]["instruction"])
    rows = []
    for m in methods:
        # per policy: a student may execute fewer steps of each chunk than its teacher
        policy = policy_for(m, teacher, student)
        rows.append(timing_row(m, times[m], nfe[m], query[m], policy.model.chunk_len * batch,
                               policy.n_action_steps, peak[m] if device.type == "cuda" else None))
    return with_speedup(rows)


def measure_decode(models: dict, prefixes: list[torch.Tensor], configs: dict, methods=METHODS, warmup: int = 2,
                   progress: bool = True) -> list[dict]:
    """``measure`` for a model that is not a policy (e.g. one whose observations come from another
    model's image tokenizer): ``decode(models[m], prefix, configs[m])`` on prefix embeddings
    ``[B, P, H]``, the same rows without action Hz (a chunk's actions are the model's own affair)."""
    if not prefixes:
        raise ValueError("need at least one prefix to time")
    device = prefixes[0].device
    for m in methods:
        for _ in range(warmup):
            decode(models[m], prefixes[0], configs[m])
    times, nfe, query = ({m: [] for m in methods} for _ in range(3))
    peak = {m: 0 for m in methods}
    for prefix in tqdm(prefixes, desc="timing decoders", disable=not progress):
        for m in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result, dt = timed(lambda: decode(models[m], prefix, configs[m]), device)
            if device.type == "cuda":
                peak[m] = max(peak[m], torch.cuda.max_memory_allocated(device))
            times[m].append(dt)
            nfe[m].append(result.stats.nfe)
            query[m].append(result.stats.query_tokens)
    batch = prefixes[0].shape[0]
    rows = [timing_row(m, times[m], nfe[m], query[m], models[m].chunk_len * batch, None,
                       peak[m] if device.type == "cuda" else None) for m in methods]
    return with_speedup(rows)


def timing_row(method: str, times: list[float], nfe: list, query: list, chunk_tokens: int,
               action_steps: int | None, peak_bytes: int | None) -> dict:
    """One decoder's row: NFE and query tokens per chunk (means), latency median/p90 and rates."""
    lat = summarize(times)
    return {"method": method, "nfe": sum(nfe) / len(nfe), "query_tokens": sum(query) / len(query),
            "latency_ms": lat["median_s"] * 1e3, "p90_ms": lat["p90_s"] * 1e3,
            "tokens_per_s": chunk_tokens / lat["median_s"], "chunk_hz": 1.0 / lat["median_s"],
            "action_hz": None if action_steps is None else action_steps / lat["median_s"],
            "chunks_timed": lat["n"], "peak_mem_mb": None if peak_bytes is None else peak_bytes / 2**20}


def with_speedup(rows: list[dict]) -> list[dict]:
    """Each row's action tokens/s over vanilla's (when vanilla ran)."""
    vanilla = next((r for r in rows if r["method"] == "vanilla"), None)
    if vanilla is not None:
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / vanilla["tokens_per_s"]
    return rows


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process (CPU runs: the whole process, not per decoder)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


COLUMNS = [("method", "decoder", "s"), ("nfe", "NFE/chunk", ".1f"), ("query_tokens", "query tokens/chunk", ".0f"),
           ("latency_ms", "latency ms (median)", ".1f"), ("p90_ms", "p90 ms", ".1f"),
           ("tokens_per_s", "action tokens/s", ".0f"), ("chunk_hz", "chunk Hz", ".1f"),
           ("action_hz", "action Hz", ".1f"), ("speedup", "x vanilla", ".2f")]
