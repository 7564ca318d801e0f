"""Closed-loop episodes of a policy, timed around its own calls."""
from __future__ import annotations

from ..benchmark.timing import timed
from ..config import DecodeConfig
from ..policy import FastDVLAPolicy
from .sharding import parse_range, shard_of


class ChunkLog:
    """A closed loop's decoded chunks: each ``act`` that decodes one is timed around the policy's own
    call (latency, NFE, query tokens), its observation appended to ``keep_obs`` when given."""

    def __init__(self, keep_obs: list | None = None):
        self.keep_obs = keep_obs
        self.latencies: list[float] = []
        self.nfe: list[int] = []
        self.query: list[int] = []

    def act(self, policy: FastDVLAPolicy, obs: dict, config: DecodeConfig):
        """``policy.select_action(obs, config)``, logged when it decodes a chunk."""
        decodes = policy.needs_chunk
        if decodes and self.keep_obs is not None:
            self.keep_obs.append(obs)
        action, seconds = timed(lambda: policy.select_action(obs, config), policy.device)
        if decodes:
            self.latencies.append(seconds)
            self.nfe.append(policy.last_stats.nfe)
            self.query.append(policy.last_stats.query_tokens)
        return action

    def fields(self) -> dict:
        return {"chunk_latency_s": self.latencies, "nfe": self.nfe, "query_tokens": self.query}


def run_episode(env, policy: FastDVLAPolicy, config: DecodeConfig, init: int, max_steps: int,
                keep_obs: list | None = None) -> dict:
    """One episode from initial state ``init``: ``env.reset(init)``, then ``policy.select_action``
    decoding with ``config`` until ``env.step`` reports success or ``max_steps`` pass.

    Each call that decodes a chunk is timed (latency, NFE, query tokens); ``keep_obs`` collects
    the observations those chunks were decoded from (for timing decoders on them later)."""
    obs = env.reset(init)
    policy.reset()
    log = ChunkLog(keep_obs)
    success, steps = False, 0
    for steps in range(1, max_steps + 1):
        obs, _, done, info = env.step(log.act(policy, obs, config))
        if done or info["success"]:
            success = True
            break
    return {"success": success, "steps": steps, **log.fields()}


def libero_jobs(suite: str, tasks: str, init_states: str, shard: str) -> list[tuple[int, int]]:
    """The (task, initial state) pairs of ``shard`` (``i/n``: every n-th from the i-th); ``tasks`` is
    ``all`` or ids like ``0-9``, ``init_states`` ids like ``15-16``."""
    from .libero_env import num_tasks

    task_ids = list(range(num_tasks(suite))) if tasks == "all" else parse_range(tasks)
    return shard_of([(t, s) for t in task_ids for s in parse_range(init_states)], shard)


def libero_task_envs(suite: str, jobs: list[tuple[int, int]], config):
    """Per task of ``jobs``, in order: ``(task, env, its initial states)``; one LIBERO
    environment per task, rendering what the model ``config`` reads, closed when done."""
    from .libero_env import LiberoTaskEnv

    for task in sorted({t for t, _ in jobs}):
        env = LiberoTaskEnv(suite, task, image_size=config.image_size, cameras=config.cameras)
        try:
            yield task, env, [i for t, i in jobs if t == task]
        finally:
            env.close()
