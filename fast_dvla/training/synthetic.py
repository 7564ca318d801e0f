"""A synthetic manipulation-like task with a known answer, written in the
episodes format so the real loader is exercised.

A red square sits in one cell of a 4 x 4 grid in the ``agentview`` image;
the instruction picks a behaviour (reach, avoid, circle). The action at step
``t`` is a fixed function of (cell, behaviour, t/T); ``state[0] = t/T`` and
the ``wrist`` image shows a progress bar. Everything needed to predict a
chunk is in the observation, so a good model reaches near-perfect accuracy.
"""
from __future__ import annotations

import numpy as np

from ..data import write_dataset_info, write_episode

BEHAVIOURS = ("reach the red square", "avoid the red square", "circle around the red square")


def synthetic_actions(cell: tuple[int, int], behaviour: int, T: int) -> np.ndarray:
    t = np.arange(T) / T
    i, j = cell
    sign = -1.0 if behaviour == 1 else 1.0
    a = np.zeros((T, 7), np.float32)
    a[:, 0] = sign * (i - 1.5) / 1.5 * (1 - t)
    a[:, 1] = sign * (j - 1.5) / 1.5 * (1 - t)
    a[:, 2] = 0.5 * np.sin(2 * np.pi * t) if behaviour == 2 else 0.0
    a[:, 3] = 0.3 * (behaviour - 1)
    a[:, 4] = 0.2 * np.cos(np.pi * t) * (i / 3)
    a[:, 6] = np.where(t >= 0.5, 1.0, -1.0)
    return a


def synthetic_episode(rng: np.random.Generator, image_size: int = 16, T: int = 20) -> dict:
    cell = (int(rng.integers(4)), int(rng.integers(4)))
    behaviour = int(rng.integers(len(BEHAVIOURS)))
    cs = image_size // 4
    agent = np.full((T, image_size, image_size, 3), 40, np.uint8)
    agent[:, cell[0] * cs:(cell[0] + 1) * cs, cell[1] * cs:(cell[1] + 1) * cs] = (220, 30, 30)
    wrist = np.full((T, image_size, image_size, 3), 20, np.uint8)
    for t in range(T):
        wrist[t, :, : max(1, (t * image_size) // T)] = (30, 200, 60)
    state = np.zeros((T, 8), np.float32)
    state[:, 0] = np.arange(T) / T
    return {"image_agentview": agent, "image_wrist": wrist, "state": state,
            "action": synthetic_actions(cell, behaviour, T), "instruction": BEHAVIOURS[behaviour]}


def write_synthetic_dataset(root: str, episodes: int, image_size: int = 16, T: int = 20, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    write_dataset_info(root, ["agentview", "wrist"], [image_size, image_size], 8, 7, source="synthetic")
    for i in range(episodes):
        write_episode(root, i, synthetic_episode(rng, image_size, T))
    return root
