"""Intervals for success rates counted over a few closed-loop episodes."""
from __future__ import annotations

import math


def wilson_interval(successes: int, episodes: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for ``z=1.96``) of a binomial rate: unlike the normal
    approximation it stays inside [0, 1] and is honest at 0/n and n/n."""
    if episodes <= 0:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not 0 <= successes <= episodes:
        raise ValueError(f"successes must be in [0, {episodes}], got {successes}")
    p = successes / episodes
    denom = 1 + z * z / episodes
    centre = (p + z * z / (2 * episodes)) / denom
    half = z * math.sqrt(p * (1 - p) / episodes + z * z / (4 * episodes ** 2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a point: a difference between their rates is within the noise."""
    return a[0] <= b[1] and b[0] <= a[1]
