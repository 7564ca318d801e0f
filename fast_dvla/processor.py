"""Turns robot observations into model inputs, with clear errors for bad input.

An observation is ``{"images": {camera: uint8 [H, W, 3]}, "state": float [S],
"instruction": str}``; a batch stacks them: images ``[B, H, W, 3]``, state
``[B, S]``, instruction a list of ``B`` strings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import ModelConfig
from .tokenizer import InstructionTokenizer


@dataclass
class StateNormalizer:
    """Per-entry standardisation of the robot state. Entries listed in
    ``ignore`` are zeroed after it: the policy never reads them. (A scripted
    expert that holds the hand's orientation leaves it almost constant in the
    demos, std ~0.003 rad, so the few milliradians it does vary become a
    spurious cue; in closed loop a policy that never commands rotation lets it
    drift to 10-20 std, far outside anything it was trained on.)"""

    mean: np.ndarray
    std: np.ndarray
    ignore: tuple = ()

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.std = np.maximum(np.asarray(self.std, dtype=np.float32), 1e-6)
        self.ignore = tuple(int(i) for i in self.ignore)
        bad = [i for i in self.ignore if not 0 <= i < self.mean.shape[-1]]
        if bad:
            raise ValueError(f"state entries to ignore {bad} are out of range for a {self.mean.shape[-1]}-D state")
        self._keep = np.ones(self.mean.shape[-1], dtype=np.float32)
        self._keep[list(self.ignore)] = 0.0

    @classmethod
    def fit(cls, states: np.ndarray, ignore=()) -> "StateNormalizer":
        states = np.asarray(states, dtype=np.float64).reshape(-1, np.shape(states)[-1])
        return cls(states.mean(0), states.std(0), ignore)

    @classmethod
    def identity(cls, dim: int) -> "StateNormalizer":
        return cls(np.zeros(dim), np.ones(dim))

    def __call__(self, state: np.ndarray) -> np.ndarray:
        normed = (state - self.mean) / self.std
        return normed * self._keep if self.ignore else normed

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "ignore": list(self.ignore)}

    @classmethod
    def from_dict(cls, d: dict) -> "StateNormalizer":
        return cls(np.array(d["mean"]), np.array(d["std"]), d.get("ignore", ()))


class ObservationProcessor:
    def __init__(self, config: ModelConfig, state_norm: StateNormalizer):
        self.config = config
        self.state_norm = state_norm
        self.instr_tok = InstructionTokenizer(config.instr_vocab, config.instr_len)

    def __call__(self, obs: dict, device="cpu") -> tuple[dict, bool]:
        """Returns the model inputs and whether ``obs`` was a single observation."""
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        missing = [k for k in ("images", "state", "instruction") if k not in obs]
        if missing:
            raise KeyError(f"observation is missing {missing}; expected keys 'images', 'state', 'instruction'")
        instruction = obs["instruction"]
        single = isinstance(instruction, str)
        instructions = [instruction] if single else list(instruction)
        if not instructions or not all(isinstance(t, str) for t in instructions):
            raise TypeError("instruction must be a str or a non-empty list of str")
        batch = len(instructions)

        state = np.asarray(obs["state"])
        if single:
            state = state[None]
        cfg = self.config
        if state.shape != (batch, cfg.state_dim):
            raise ValueError(f"state must have shape {(cfg.state_dim,) if single else (batch, cfg.state_dim)}, "
                             f"got {np.shape(obs['state'])}")
        if not np.issubdtype(state.dtype, np.number) or not np.isfinite(state).all():
            raise ValueError("state contains NaN, inf or non-numeric values")

        images = obs["images"]
        if not isinstance(images, dict):
            raise TypeError("images must be a dict {camera name: uint8 [H, W, 3] array}")
        absent = [c for c in cfg.cameras if c not in images]
        if absent:
            raise KeyError(f"images are missing cameras {absent}; the model expects {list(cfg.cameras)}")
        stacked = []
        want = (cfg.image_size, cfg.image_size, 3)
        for cam in cfg.cameras:
            img = images[cam]
            img = img.cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            if single:
                img = img[None]
            if img.dtype != np.uint8:
                raise TypeError(f"image {cam!r} must be uint8 (0-255), got {img.dtype}")
            if img.shape != (batch, *want):
                raise ValueError(f"image {cam!r} must have shape {want if single else (batch, *want)}, got {img.shape}")
            stacked.append(img)
        pixels = np.stack(stacked, axis=1) if stacked else np.zeros((batch, 0, *want), np.uint8)

        inputs = {
            "images": torch.from_numpy(pixels).to(device).permute(0, 1, 4, 2, 3).float() / 255.0,
            "instr_ids": torch.tensor([self.instr_tok.encode(t) for t in instructions], device=device),
            "state": torch.from_numpy(self.state_norm(state.astype(np.float32))).float().to(device),
        }
        return inputs, single
