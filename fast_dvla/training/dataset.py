"""Training samples from an episodes directory: the observation at step t
and the action chunk ``a[t : t + horizon]``, tokenised.

Two kinds of model, two datasets. The reference model's processing is fitted
here (:class:`ChunkDataset`: action bins and state statistics from the data,
inputs precomputed as tensors). A :class:`~fast_dvla.policy_model.PolicyModel`
(the Dream-VLA adapter, a user's registered model) owns its processing
(:class:`ObservationChunkDataset`: observations as the policy receives them,
labels from ``model.actions_to_bins``, the prefix from
``model.observation_prefix`` at every step). :func:`batch_prefixes` turns
either's batch into prefix embeddings.

Chunks running past an episode's end repeat its last action (the robot holds
its final command), so every step of every episode is a sample, except in
episodes with recovery pushes (``perturbed`` steps): there a chunk whose
later labels follow a pushed step is skipped. Those labels answer states that
a push, invisible in the observation at t, has moved, so no policy could
predict them from t; the chunks from the pushed-away states onwards, which
show the way back, are kept.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ..backbone import DVLAModel
from ..data import list_episodes, read_dataset_info, read_episode
from ..model import ModelConfig
from ..processor import StateNormalizer
from ..tokenizer import ActionTokenizer, InstructionTokenizer


def chunk_starts(episode: dict, horizon: int) -> list[int]:
    """Steps t whose chunk ``a[t : t + horizon]`` a policy could predict from step t's observation:
    all of them, minus those where a step in ``t .. t + horizon - 2`` was pushed (its label is
    clean, but the labels after it answer where the push moved the robot)."""
    T = len(episode["action"])
    perturbed = episode.get("perturbed")
    if perturbed is None or not perturbed.any():
        return list(range(T))
    pushed_before = np.concatenate([[0], np.cumsum(perturbed)])  # pushed steps in [0, t)
    last = np.minimum(np.arange(T) + horizon - 1, T)              # window t .. last - 1
    return np.flatnonzero(pushed_before[last] == pushed_before[:T]).tolist()


class ChunkDataset:
    def __init__(self, root, model_config: ModelConfig, action_tokenizer: ActionTokenizer | None = None,
                 state_norm: StateNormalizer | None = None, gripper_dims=(6,), max_episodes: int | None = None,
                 progress: bool = True, state_ignore=()):
        """``root``: an episodes directory, or a list of them (expert demos plus relabelled
        policy rollouts, say); ``max_episodes`` counts over all of them, in order."""
        cfg = model_config

        def check(r, info):
            if info["action_dim"] != cfg.action_dim or info["state_dim"] != cfg.state_dim:
                raise ValueError(f"{r}: dataset action/state dims {info['action_dim']}/{info['state_dim']} "
                                 f"!= model's {cfg.action_dim}/{cfg.state_dim}")
            if list(info["image_size"]) != [cfg.image_size, cfg.image_size]:
                raise ValueError(f"{r}: images are {info['image_size']}, the model takes {cfg.image_size}")
            absent = [c for c in cfg.cameras if c not in info["cameras"]]
            if absent:
                raise ValueError(f"{r}: the model needs cameras {absent} that the dataset lacks")

        files = _episode_files(root, check)[:max_episodes]  # (path, the dataset info of its directory)
        self.config = cfg
        self.episodes = [read_episode(p, info) for p, info in tqdm(files, desc="loading episodes", disable=not progress)]
        actions = np.concatenate([e["action"] for e in self.episodes])
        states = np.concatenate([e["state"] for e in self.episodes])
        self.action_tokenizer = action_tokenizer or ActionTokenizer.fit(actions, cfg.n_bins, gripper_dims)
        self.state_norm = state_norm or StateNormalizer.fit(states, state_ignore)
        instr = InstructionTokenizer(cfg.instr_vocab, cfg.instr_len)
        self.index = [(e, t) for e, ep in enumerate(self.episodes) for t in chunk_starts(ep, cfg.horizon)]
        self.skipped_after_pushes = sum(len(ep["action"]) for ep in self.episodes) - len(self.index)
        if self.skipped_after_pushes and progress:
            tqdm.write(f"{len(self.index)} samples; {self.skipped_after_pushes} chunks skipped: their later labels "
                       f"follow a recovery push")
        # everything the model sees, precomputed once (small datasets live in memory)
        self._instr = [torch.tensor(instr.encode(ep["instruction"])) for ep in self.episodes]
        self._tokens = []
        for ep in self.episodes:
            T = len(ep["action"])
            idx = np.minimum(np.arange(T)[:, None] + np.arange(cfg.horizon)[None], T - 1)
            self._tokens.append(torch.from_numpy(self.action_tokenizer.encode(ep["action"][idx]).reshape(T, -1)))
        self._states = [torch.from_numpy(self.state_norm(ep["state"]).astype(np.float32)) for ep in self.episodes]
        self._images = [torch.from_numpy(np.stack([ep["images"][c] for c in cfg.cameras], axis=1))
                        if cfg.cameras else None for ep in self.episodes]

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices) -> dict:
        """Model inputs for sample indices: images float [B, n_cam, 3, H, W], instr_ids, state, tokens [B, L]."""
        items = [self.index[int(i)] for i in indices]
        out = {
            "instr_ids": torch.stack([self._instr[e] for e, _ in items]),
            "state": torch.stack([self._states[e][t] for e, t in items]),
            "tokens": torch.stack([self._tokens[e][t] for e, t in items]),
        }
        if self.config.cameras:
            pixels = torch.stack([self._images[e][t] for e, t in items])  # [B, n_cam, H, W, 3] uint8
            out["images"] = pixels.permute(0, 1, 4, 2, 3).float() / 255.0
        else:
            out["images"] = None
        return out


def _episode_files(root, check_info) -> list[tuple[str, dict]]:
    """``(path, dataset info)`` of every episode under ``root`` (a directory or a list of them), each
    directory's info passed to ``check_info(directory, info)`` first."""
    roots = [root] if isinstance(root, str) else list(root)
    if not roots:
        raise ValueError("no episodes directory given")
    files = []
    for r in roots:
        info = read_dataset_info(r)
        check_info(r, info)
        paths = list_episodes(r)
        if not paths:
            raise ValueError(f"{r}: no episode files")
        files.extend((p, info) for p in paths)
    return files


class ObservationChunkDataset:
    """Samples for a model that owns its processing (a :class:`~fast_dvla.policy_model.PolicyModel`):
    the recorded observation at step t as a policy receives it (uint8 images by camera, the raw
    state, the instruction) and the chunk ``a[t : t + horizon]`` as the model's own bins
    (``model.actions_to_bins``). Nothing is fitted: the model's statistics are its own. Chunks are
    chosen as in :class:`ChunkDataset` (:func:`chunk_starts`)."""

    action_tokenizer = None  # the model turns actions into bins itself
    state_norm = None

    def __init__(self, root, model, max_episodes: int | None = None, progress: bool = True):
        def check(directory, info):
            if info["action_dim"] != model.action_dim:
                raise ValueError(f"{directory}: dataset action dim {info['action_dim']} != model's {model.action_dim}")

        files = _episode_files(root, check)[:max_episodes]
        cameras = {tuple(info["cameras"]) for _, info in files}
        if len(cameras) > 1:
            raise ValueError(f"the episodes directories have different cameras {sorted(cameras)}")
        self.cameras = list(next(iter(cameras)))
        self.horizon = model.horizon
        self.episodes = [read_episode(p, info)
                         for p, info in tqdm(files, desc="loading episodes", disable=not progress)]
        self.index = [(e, t) for e, ep in enumerate(self.episodes) for t in chunk_starts(ep, model.horizon)]
        self.skipped_after_pushes = sum(len(ep["action"]) for ep in self.episodes) - len(self.index)
        self._tokens = []
        for ep in self.episodes:
            T = len(ep["action"])
            idx = np.minimum(np.arange(T)[:, None] + np.arange(model.horizon)[None], T - 1)
            bins = np.asarray(model.actions_to_bins(ep["action"][idx]))
            if bins.shape != (T, model.chunk_len) or bins.min() < 0 or bins.max() >= model.n_bins:
                raise ValueError(f"{type(model).__name__}.actions_to_bins gave {bins.shape} bins in "
                                 f"[{bins.min()}, {bins.max()}]; expected {(T, model.chunk_len)} in "
                                 f"[0, {model.n_bins})")
            self._tokens.append(torch.from_numpy(bins.astype(np.int64)))

    def __len__(self) -> int:
        return len(self.index)

    def observation(self, indices) -> dict:
        """A batch of observations in fast-dvla's format: images ``{camera: uint8 [B, H, W, 3]}``,
        ``state [B, S]``, ``instruction`` (a list of B strings)."""
        items = [self.index[int(i)] for i in indices]
        return {"images": {c: np.stack([self.episodes[e]["images"][c][t] for e, t in items]) for c in self.cameras},
                "state": np.stack([self.episodes[e]["state"][t] for e, t in items]),
                "instruction": [self.episodes[e]["instruction"] for e, _ in items]}

    def batch(self, indices) -> dict:
        """``{"obs": observations (see :meth:`observation`), "tokens": [B, L]}``."""
        return {"obs": self.observation(indices),
                "tokens": torch.stack([self._tokens[e][t] for e, t in (self.index[int(i)] for i in indices)])}


def _rows(obs: dict, rows: list[int]) -> dict:
    return {"images": {c: v[rows] for c, v in obs["images"].items()},
            **({"state": obs["state"][rows]} if "state" in obs else {}),
            "instruction": [obs["instruction"][r] for r in rows]}


def batch_prefixes(model: DVLAModel, batch: dict) -> list[tuple[list[int] | None, torch.Tensor]]:
    """Prefix embeddings of a batch, in groups of rows with prefixes of one length: ``[(rows,
    prefix [b, P, H])]``; ``rows`` None means all rows in order.

    A :class:`ChunkDataset` batch is one group (``model.embed_prefix``). An
    :class:`ObservationChunkDataset` batch goes through ``model.observation_prefix``, one call per
    instruction; a model whose prompt length depends on the instruction (Dream-VLA: byte-level
    text) gives groups of different lengths, which the losses take one at a time (rows are never
    padded, so each is computed exactly as it would be alone)."""
    if "obs" not in batch:
        return [(None, model.embed_prefix(batch["images"], batch["instr_ids"], batch["state"]))]
    obs = batch["obs"]
    by_instruction: dict[str, list[int]] = {}
    for row, text in enumerate(obs["instruction"]):
        by_instruction.setdefault(text, []).append(row)
    by_length: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
    for rows in by_instruction.values():
        prefix, _ = model.observation_prefix(_rows(obs, rows))
        group = by_length.setdefault(prefix.shape[1], ([], []))
        group[0].extend(rows)
        group[1].append(prefix)
    groups = [(rows, torch.cat(parts)) for rows, parts in by_length.values()]
    if len(groups) == 1 and groups[0][0] == list(range(len(obs["instruction"]))):
        return [(None, groups[0][1])]
    return groups
