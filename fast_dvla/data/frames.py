"""Observations and their demonstrated action chunks, drawn from recorded episodes."""
from __future__ import annotations

import numpy as np

from .episodes import list_episodes, read_dataset_info, read_episode


def sample_frames(root: str, n: int, horizon: int, seed: int) -> list[tuple[dict, np.ndarray]]:
    """``n`` (observation, demonstrated chunk) pairs drawn uniformly over every step of every
    episode under ``root``; chunks past an episode's end repeat its last action, as in training."""
    info = read_dataset_info(root)
    episodes = [read_episode(p, info) for p in list_episodes(root)]
    if not episodes:
        raise ValueError(f"{root}: no episodes")
    index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["action"]))]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(index), size=min(n, len(index)), replace=False)
    frames = []
    for i in sorted(picks):
        e, t = index[i]
        ep = episodes[e]
        T = len(ep["action"])
        obs = {"images": {c: ep["images"][c][t] for c in ep["images"]}, "state": ep["state"][t],
               "instruction": str(ep["instruction"])}
        frames.append((obs, ep["action"][np.minimum(np.arange(t, t + horizon), T - 1)]))
    return frames
