"""Action and instruction tokenizers.

Actions follow the OpenVLA convention: per-dimension quantile normalisation
to [-1, 1] with the 1st/99th percentiles, 256 uniform bins, and a binary
gripper (bin 0 = open/-1, last bin = close/+1). A chunk ``[T, A]`` is
flattened time-major into ``T * A`` tokens, so with ``block_size = A`` one
block is one timestep.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .schema import ConfigError, check_entries, read_json

EPS = 1e-8


@dataclass
class ActionTokenizer:
    q01: np.ndarray
    q99: np.ndarray
    n_bins: int = 256
    gripper_dims: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.q01 = np.asarray(self.q01, dtype=np.float64)
        self.q99 = np.asarray(self.q99, dtype=np.float64)
        self.gripper_dims = tuple(int(d) for d in self.gripper_dims)
        if self.q01.shape != self.q99.shape or self.q01.ndim != 1:
            raise ValueError(f"q01 and q99 must be 1-D of equal length, got {self.q01.shape} and {self.q99.shape}")
        if not (np.isfinite(self.q01).all() and np.isfinite(self.q99).all()):
            raise ValueError("action statistics contain NaN or inf")
        if (self.q99 < self.q01).any():
            raise ValueError("action statistics have q99 < q01")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        for d in self.gripper_dims:
            if not 0 <= d < self.action_dim:
                raise ValueError(f"gripper dim {d} out of range for action_dim {self.action_dim}")

    @property
    def action_dim(self) -> int:
        return int(self.q01.shape[0])

    @classmethod
    def fit(cls, actions: np.ndarray, n_bins: int = 256, gripper_dims=()) -> "ActionTokenizer":
        """Statistics from demonstration actions ``[N, A]``."""
        actions = np.asarray(actions, dtype=np.float64).reshape(-1, np.shape(actions)[-1])
        if actions.shape[0] == 0:
            raise ValueError("cannot fit action statistics on zero actions")
        if not np.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        return cls(np.quantile(actions, 0.01, axis=0), np.quantile(actions, 0.99, axis=0), n_bins, tuple(gripper_dims))

    def _check(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"expected actions with last dim {self.action_dim}, got shape {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        return actions

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        actions = self._check(actions)
        norm = 2.0 * (actions - self.q01) / (self.q99 - self.q01 + EPS) - 1.0
        return np.clip(norm, -1.0, 1.0)

    def unnormalize(self, norm: np.ndarray) -> np.ndarray:
        return (np.asarray(norm, dtype=np.float64) + 1.0) / 2.0 * (self.q99 - self.q01 + EPS) + self.q01

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Continuous ``[..., A]`` -> integer tokens ``[..., A]`` in ``[0, n_bins)``."""
        actions = self._check(actions)
        norm = self.normalize(actions)
        tokens = np.floor((norm + 1.0) / 2.0 * self.n_bins).astype(np.int64)
        tokens = np.clip(tokens, 0, self.n_bins - 1)
        for d in self.gripper_dims:  # binary: sign of the raw command
            tokens[..., d] = np.where(actions[..., d] > 0, self.n_bins - 1, 0)
        return tokens

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Integer tokens ``[..., A]`` -> continuous actions at bin centres."""
        tokens = np.asarray(tokens)
        if tokens.shape[-1] != self.action_dim:
            raise ValueError(f"expected tokens with last dim {self.action_dim}, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.n_bins):
            raise ValueError(f"tokens outside [0, {self.n_bins}) (a [MASK] left undecoded?)")
        centres = -1.0 + (tokens.astype(np.float64) + 0.5) * 2.0 / self.n_bins
        actions = self.unnormalize(centres)
        for d in self.gripper_dims:
            actions[..., d] = np.where(tokens[..., d] >= self.n_bins // 2, 1.0, -1.0)
        return actions

    def categorical_slots(self, horizon: int) -> np.ndarray:
        """``[horizon * A]`` bool over a chunk's token slots (time-major): those
        whose bins are categories, not ordered values (the gripper's)."""
        dims = np.zeros(self.action_dim, dtype=bool)
        dims[list(self.gripper_dims)] = True
        return np.tile(dims, horizon)

    def to_dict(self) -> dict:
        return {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "n_bins": self.n_bins,
                "gripper_dims": list(self.gripper_dims)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionTokenizer":
        return cls(np.array(d["q01"]), np.array(d["q99"]), int(d["n_bins"]), tuple(d.get("gripper_dims", ())))

    def save(self, path: str) -> None:
        """Writes ``path`` (``action_stats.json``), refusing first, naming it, what ``load`` would refuse."""
        data = self.to_saved_dict(path)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)

    def to_saved_dict(self, path: str) -> dict:
        """The statistics as ``path`` will hold them, refused (naming it) where ``load`` would refuse
        them: a policy checks every file before it writes any."""
        data = self.to_dict()
        self._check_saved(data, path)
        return data

    @classmethod
    def load(cls, path: str) -> "ActionTokenizer":
        """Statistics written by ``save``; an entry missing, unknown, mistyped, non-finite or of
        another length than its pair raises ``ConfigError`` naming ``path`` and the entry."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"action statistics not found: {path}")
        data = read_json(path)
        cls._check_saved(data, path)
        try:
            return cls.from_dict(data)
        except ValueError as e:  # what only the statistics together can say (q99 < q01, a gripper dim out of range)
            raise ConfigError(str(e), file=path) from None

    @staticmethod
    def _check_saved(data, path: str) -> None:
        try:
            check_entries(data, {"q01": list[float], "q99": list[float], "n_bins": int, "gripper_dims": list[int]},
                          required=("q01", "q99", "n_bins"))
            if len(data["q99"]) != len(data["q01"]):
                raise ConfigError(f"{len(data['q99'])} entries, but q01 has {len(data['q01'])}", "q99")
        except ConfigError as e:
            raise e.within(path) from None


def _fnv1a(word: str) -> int:
    h = 0x811C9DC5
    for byte in word.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


@dataclass
class InstructionTokenizer:
    """Hashed bag-of-words with order: a vocabulary-free, deterministic
    tokenizer for the small reference model (id 0 is padding)."""

    vocab_size: int = 1024
    max_len: int = 16

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"instruction must be a str, got {type(text).__name__}")
        words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_len]
        ids = [1 + _fnv1a(w) % (self.vocab_size - 1) for w in words]
        return ids + [0] * (self.max_len - len(ids))
