"""Closed-loop CALVIN chains of a policy, timed around its own calls."""
from __future__ import annotations

from ..config import DecodeConfig
from ..policy import FastDVLAPolicy
from . import calvin_protocol as protocol
from .rollout import ChunkLog
from .sharding import shard_of

CHAIN_SETS = ("covered", "official")


def run_chain(env, policy: FastDVLAPolicy, config: DecodeConfig, condition: dict, chain,
              steps_per_subtask: int = protocol.STEPS_PER_SUBTASK, keep_obs: list | None = None) -> dict:
    """One chain, as CALVIN evaluates it: the scene reset to ``condition`` once; each subtask in turn
    gets its instruction and a fresh policy (``reset``), and ends as soon as the oracle sees it done
    or after ``steps_per_subtask`` steps; the chain stops at the first failure.

    Each call that decodes a chunk is timed (latency, NFE, query tokens); ``keep_obs`` collects
    the observations those chunks were decoded from."""
    env.reset(*protocol.initial_scene(condition))
    log, subtasks = ChunkLog(keep_obs), []
    for name in chain:
        obs = env.start_subtask(name, protocol.INSTRUCTIONS[name])
        policy.reset()
        success, steps = False, 0
        for steps in range(1, steps_per_subtask + 1):
            obs, info = env.step(log.act(policy, obs, config))
            if info["success"]:
                success = True
                break
        subtasks.append({"subtask": name, "success": success, "steps": steps})
        if not success:
            break
    completed = sum(s["success"] for s in subtasks)
    return {"completed": completed, "chain": list(chain), "subtasks": subtasks, **log.fields()}


def calvin_chains(num_chains: int, chain_set: str, subtasks=None, seed: int = 0) -> list[tuple[dict, tuple]]:
    """The benchmark's chains: ``official`` (CALVIN's generator, all 34 subtasks) or ``covered``
    (only ``subtasks``, e.g. those a policy was trained on: a deviation from the protocol)."""
    if num_chains < 1:
        raise ValueError(f"the number of chains must be >= 1, got {num_chains}")
    if chain_set == "official":
        return protocol.official_chains(num_chains)
    if chain_set == "covered":
        if not subtasks:
            raise ValueError("chain set 'covered' needs the list of subtasks the chains may use")
        return protocol.restricted_chains(num_chains, subtasks, seed=seed)
    raise ValueError(f"unknown chain set {chain_set!r}; expected one of {CHAIN_SETS}")


def calvin_jobs(chains: list, shard: str) -> list[int]:
    """The chain indices of ``shard`` (``i/n``: every n-th from the i-th)."""
    return shard_of(list(range(len(chains))), shard)
