"""Closed-loop success of several decoder settings on the same LIBERO episodes."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..benchmark.stats import wilson_interval
from ..config import DecodeConfig
from ..envs.rollout import libero_task_envs, run_episode
from ..policy import FastDVLAPolicy


def run_episodes(named: dict[str, tuple[FastDVLAPolicy, DecodeConfig]], jobs: list[tuple[int, int]], suite: str,
                 max_steps: int | None = None, done: dict | None = None, on_episode=None,
                 progress: bool = True) -> list[dict]:
    """Every setting of ``named`` (``{name: (policy, config)}``) on every ``(task, init)`` of ``jobs``,
    one environment per task. ``done`` (``{(name, task, init): episode}``) are kept, not rerun;
    ``on_episode(episode)`` is called as each new one finishes (to save it)."""
    done = dict(done or {})
    todo = [(t, i) for t, i in jobs if any((n, t, i) not in done for n in named)]
    bar = tqdm(total=len(jobs) * len(named), initial=len(jobs) * len(named) - sum(
        (n, t, i) not in done for t, i in jobs for n in named), desc="closed-loop episodes", disable=not progress)
    if todo:
        config = next(iter(named.values()))[0].model.config
        for task, env, inits in libero_task_envs(suite, todo, config):
            for init in inits:
                for name, (policy, decode_config) in named.items():
                    if (name, task, init) in done:
                        continue
                    episode = run_episode(env, policy, decode_config, init, max_steps or env.max_steps)
                    episode.update(setting=name, task=task, init=init)
                    done[(name, task, init)] = episode
                    if on_episode:
                        on_episode(episode)
                    bar.update(1)
    bar.close()
    return [done[(n, t, i)] for t, i in jobs for n in named]


def success_rows(episodes: list[dict], reference: str, action_steps: dict[str, int]) -> list[dict]:
    """Per setting: successes / episodes with a 95% Wilson interval, NFE, query tokens and median
    chunk latency over its episodes, action Hz (``action_steps[setting]`` executed per chunk), and
    latency speedup over ``reference`` (a setting name) in the same run."""
    by_setting: dict[str, list[dict]] = {}
    for e in episodes:
        by_setting.setdefault(e["setting"], []).append(e)
    rows = []
    for name, eps in by_setting.items():
        wins = sum(e["success"] for e in eps)
        latencies = [s for e in eps for s in e["chunk_latency_s"]]
        rows.append({"setting": name, "episodes": len(eps), "successes": wins, "success": wins / len(eps),
                     "interval": list(wilson_interval(wins, len(eps))),
                     "nfe": float(np.mean([n for e in eps for n in e["nfe"]])),
                     "query_tokens": float(np.mean([q for e in eps for q in e["query_tokens"]])),
                     "latency_ms": float(np.median(latencies)) * 1e3 if latencies else None})
        rows[-1]["action_hz"] = action_steps[name] / np.median(latencies) if latencies else None
    ref = next((r for r in rows if r["setting"] == reference), None)
    for r in rows:
        r["speedup"] = ref["latency_ms"] / r["latency_ms"] if ref and ref["latency_ms"] and r["latency_ms"] else None
    return rows
