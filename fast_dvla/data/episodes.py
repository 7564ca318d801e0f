"""The demonstration dataset format: one directory, one file per episode.

    root/
      dataset.json              {"format": "fast-dvla-episodes", "version": 1, "cameras": [...],
                                 "image_size": [H, W], "state_dim": S, "action_dim": A, "fps": 20, ...}
      episode_000000.npz        image_<camera> uint8 [T, H, W, 3], state float32 [T, S],
      episode_000001.npz        action float32 [T, A], instruction (0-d str); optional metadata
                                (task_id, init_state_id, suite)

Write it from your own data with :func:`write_dataset_info` and
:func:`write_episode`; :func:`read_episode` validates every file and names
the file and the problem when something is wrong.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

FORMAT, VERSION = "fast-dvla-episodes", 1
INFO_FILE = "dataset.json"
EPISODE_RE = re.compile(r"^episode_(\d{6,})\.npz$")
REQUIRED_INFO = ("cameras", "image_size", "state_dim", "action_dim")


class EpisodeError(ValueError):
    """A corrupt or inconsistent episode file."""


def episode_path(root: str, index: int) -> str:
    return os.path.join(root, f"episode_{index:06d}.npz")


def write_dataset_info(root: str, cameras, image_size, state_dim: int, action_dim: int, fps: int = 20,
                       **extra) -> dict:
    os.makedirs(root, exist_ok=True)
    info = {"format": FORMAT, "version": VERSION, "cameras": list(cameras), "image_size": list(image_size),
            "state_dim": int(state_dim), "action_dim": int(action_dim), "fps": fps, **extra}
    tmp = os.path.join(root, INFO_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(root, INFO_FILE))
    return info


def read_dataset_info(root: str) -> dict:
    path = os.path.join(root, INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root!r} is not a fast-dvla episodes directory")
    with open(path) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return info


def list_episodes(root: str) -> list[str]:
    """Episode files in index order (temporary files of an interrupted write are ignored)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no dataset directory {root!r}")
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if EPISODE_RE.match(n)]


def write_episode(root: str, index: int, episode: dict) -> str:
    """Atomically write one episode: a crash never leaves a half-written file under the final name."""
    path = episode_path(root, index)
    tmp = path[:-len(".npz")] + ".tmp.npz"
    arrays = {k: np.asarray(v) for k, v in episode.items()}
    arrays["instruction"] = np.array(str(episode["instruction"]))
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_episode(path: str, info: dict | None = None) -> dict:
    """Load and validate one episode against ``info`` (its dataset.json)."""
    name = os.path.basename(path)

    def fail(problem):
        raise EpisodeError(f"{path}: {problem}")

    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zip/npy corruption surfaces as many exception types
        raise EpisodeError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    for key in ("state", "action", "instruction"):
        if key not in data:
            fail(f"missing {key!r}")
    state, action = data["state"], data["action"]
    if action.ndim != 2 or state.ndim != 2:
        fail(f"state and action must be [T, dim], got {state.shape} and {action.shape}")
    T = action.shape[0]
    if T == 0:
        fail("empty episode (T = 0)")
    if state.shape[0] != T:
        fail(f"{state.shape[0]} states for {T} actions")
    if not (np.issubdtype(state.dtype, np.floating) and np.issubdtype(action.dtype, np.floating)):
        fail(f"state/action must be floating point, got {state.dtype}/{action.dtype}")
    if not (np.isfinite(state).all() and np.isfinite(action).all()):
        fail("state or action contains NaN or inf")
    if data["instruction"].dtype.kind != "U" or data["instruction"].ndim != 0:
        fail("instruction must be a 0-d string array")
    episode = {"state": state.astype(np.float32), "action": action.astype(np.float32),
               "instruction": str(data["instruction"]), "images": {}}
    if info is not None:
        if state.shape[1] != info["state_dim"] or action.shape[1] != info["action_dim"]:
            fail(f"state/action dims {state.shape[1]}/{action.shape[1]} != dataset's "
                 f"{info['state_dim']}/{info['action_dim']}")
        want = (T, *info["image_size"], 3)
        for cam in info["cameras"]:
            key = f"image_{cam}"
            if key not in data:
                fail(f"missing camera {key!r}")
            img = data[key]
            if img.dtype != np.uint8 or img.shape != want:
                fail(f"{key} must be uint8 {want}, got {img.dtype} {img.shape}")
            episode["images"][cam] = img
    for key in ("task_id", "init_state_id", "suite"):
        if key in data:
            episode[key] = data[key].item()
    episode["name"] = name
    return episode
