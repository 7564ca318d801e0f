"""The project's demonstration dataset format: one directory, one file per episode.

    root/
      dataset.json          {"format": "fast-dvla-episodes", "version": 1,
                             "cameras": ["agentview", "wrist"], "image_size": [H, W],
                             "state_dim": 8, "action_dim": 7, "fps": 20,
                             "source": "...", "episodes": <count>}
      episode_000000.npz    np.savez_compressed arrays, T steps each:
      episode_001003.npz      image_<camera>  uint8   [T, H, W, 3]  (one per camera, upright)
      ...                     state           float32 [T, state_dim]
                              action          float32 [T, action_dim]  (action t is taken at state t)
                              instruction     0-d unicode array
                              optional metadata: task_id, init_state_id (0-d int), suite (0-d str)
                              optional perturbed bool [T]: the command executed at step t was not
                                the label (a recovery push), so the states after t follow a
                                command that no observation shows

Episode indices need not be contiguous (the LIBERO recorder uses
``task * 1000 + init_state``). Write a dataset from your own data with
:func:`write_dataset_info` and :func:`write_episode` (atomic: a crash never
leaves a partial file under an episode name); :func:`read_episode` validates
a file and raises :class:`EpisodeError` naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

FORMAT, VERSION = "fast-dvla-episodes", 1
INFO_FILE = "dataset.json"
EPISODE_RE = re.compile(r"^episode_(\d{6,})\.npz$")
REQUIRED_INFO = {"cameras": list, "image_size": list, "state_dim": int, "action_dim": int}
METADATA = ("task_id", "init_state_id", "suite")


class EpisodeError(ValueError):
    """A corrupt or inconsistent episode file (the message names the file)."""


def episode_path(root: str, index: int) -> str:
    if index < 0:
        raise ValueError(f"episode index must be >= 0, got {index}")
    return os.path.join(root, f"episode_{index:06d}.npz")


def write_dataset_info(root: str, cameras, image_size, state_dim: int, action_dim: int, fps: int = 20,
                       episodes: int | None = None, **extra) -> dict:
    """Write ``root/dataset.json`` (atomically); ``extra`` keys (e.g. ``source``) are kept as given."""
    os.makedirs(root, exist_ok=True)
    info = {"format": FORMAT, "version": VERSION, "cameras": list(cameras),
            "image_size": [int(s) for s in image_size], "state_dim": int(state_dim),
            "action_dim": int(action_dim), "fps": fps, **extra}
    if episodes is not None:
        info["episodes"] = int(episodes)
    tmp = os.path.join(root, INFO_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(root, INFO_FILE))
    return info


def read_dataset_info(root: str) -> dict:
    path = os.path.join(root, INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root!r} is not a fast-dvla episodes directory")
    try:
        with open(path) as f:
            info = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("version") != VERSION:
        raise ValueError(f"{path}: version {info.get('version')!r}; this code reads version {VERSION}")
    for key, kind in REQUIRED_INFO.items():
        if not isinstance(info.get(key), kind):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}, got {info.get(key)!r}")
    if len(info["image_size"]) != 2:
        raise ValueError(f"{path}: image_size must be [H, W], got {info['image_size']}")
    return info


def list_episodes(root: str) -> list[str]:
    """Episode files in index order (temporary files of an interrupted write are ignored)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no dataset directory {root!r}")
    names = [n for n in os.listdir(root) if EPISODE_RE.match(n)]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(EPISODE_RE.match(n).group(1)))]


def validate_episode(data: dict, info: dict | None = None, where: str = "episode") -> int:
    """Check one episode's arrays (as stored); returns T. Raises EpisodeError naming ``where``."""
    def fail(problem):
        raise EpisodeError(f"{where}: {problem}")

    for key in ("state", "action", "instruction"):
        if key not in data:
            fail(f"missing {key!r} (has {sorted(data)})")
    state, action, instruction = (np.asarray(data[k]) for k in ("state", "action", "instruction"))
    if action.ndim != 2 or state.ndim != 2:
        fail(f"state and action must be [T, dim], got shapes {state.shape} and {action.shape}")
    T = action.shape[0]
    if T == 0:
        fail("empty episode (T = 0)")
    if state.shape[0] != T:
        fail(f"{state.shape[0]} states for {T} actions")
    for key, arr in (("state", state), ("action", action)):
        if arr.dtype != np.float32:
            fail(f"{key} must be float32, got {arr.dtype}")
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            fail(f"{key} contains NaN or inf (first at step {bad[0]}, dim {bad[1]})")
    if instruction.dtype.kind != "U" or instruction.ndim != 0:
        fail(f"instruction must be a 0-d string array, got {instruction.dtype} {instruction.shape}")
    if "perturbed" in data:
        perturbed = np.asarray(data["perturbed"])
        if perturbed.dtype != np.bool_ or perturbed.shape != (T,):
            fail(f"perturbed must be bool [T={T}], got {perturbed.dtype} {perturbed.shape}")
    images = {k: np.asarray(v) for k, v in data.items() if k.startswith("image_")}
    for key, img in images.items():
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[0] != T or img.shape[-1] != 3:
            fail(f"{key} must be uint8 [T={T}, H, W, 3], got {img.dtype} {img.shape}")
    if info is not None:
        if state.shape[1] != info["state_dim"] or action.shape[1] != info["action_dim"]:
            fail(f"state/action dims {state.shape[1]}/{action.shape[1]} != dataset's "
                 f"{info['state_dim']}/{info['action_dim']}")
        want = (T, *info["image_size"], 3)
        for cam in info["cameras"]:
            key = f"image_{cam}"
            if key not in images:
                fail(f"missing camera {key!r} (dataset.json lists {info['cameras']})")
            if images[key].shape != want:
                fail(f"{key} must be uint8 {want} as dataset.json says, "
                     f"got {images[key].dtype} {images[key].shape}")
    return T


def write_episode(root: str, index: int, episode: dict, info: dict | None = None) -> str:
    """Validate and atomically write one episode as ``root/episode_<index>.npz``.

    ``episode``: the arrays of the module docstring (``instruction`` and
    ``suite`` may be plain str; floating state/action are stored as float32),
    checked against ``info`` (dataset.json) when given. Written under a
    temporary name and renamed, so an interrupted writer never leaves a
    partial file under an episode name; a failed write removes its temporary
    file.
    """
    path = episode_path(root, index)
    arrays = {k: np.asarray(v) for k, v in episode.items()}
    for key in ("state", "action"):  # float64 from a simulator is fine to hand in; stored as float32
        if key in arrays and arrays[key].dtype.kind == "f":
            arrays[key] = arrays[key].astype(np.float32)
    if "instruction" in arrays:
        arrays["instruction"] = np.array(str(episode["instruction"]))
    for key in ("suite",):
        if key in arrays:
            arrays[key] = np.array(str(episode[key]))
    validate_episode(arrays, info, where=f"{path} (not written)")
    tmp = path[:-len(".npz")] + ".tmp.npz"  # no episode name: list_episodes never sees it
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_episode(path: str, info: dict | None = None) -> dict:
    """Load and validate one episode (against ``info``, its dataset.json, when given).

    Returns ``{"images": {camera: uint8 [T, H, W, 3]}, "state": float32 [T, S],
    "action": float32 [T, A], "instruction": str, "name": file name}`` plus any
    metadata (``task_id``, ``init_state_id``, ``suite``) as Python scalars and
    ``perturbed`` (bool [T]) when stored.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zip/npy corruption surfaces as many exception types
        raise EpisodeError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    validate_episode(data, info, where=path)
    cameras = info["cameras"] if info is not None else [k[len("image_"):] for k in data if k.startswith("image_")]
    episode = {"images": {c: data[f"image_{c}"] for c in cameras}, "state": data["state"],
               "action": data["action"], "instruction": str(data["instruction"]), "name": os.path.basename(path)}
    for key in METADATA:
        if key in data:
            episode[key] = data[key].item()
    if "perturbed" in data:
        episode["perturbed"] = data["perturbed"]
    return episode
