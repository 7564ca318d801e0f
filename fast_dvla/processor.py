"""Turns robot observations into model inputs, with clear errors for bad input.

An observation is ``{"images": {camera: uint8 [H, W, 3]}, "state": float [S],
"instruction": str}``; a batch stacks them: images ``[B, H, W, 3]``, state
``[B, S]``, instruction a list of ``B`` strings.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .model import ModelConfig
from .schema import ConfigError, check_entries
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
        """The statistics as ``state_stats.json`` holds them; refuses (``ConfigError``) what
        ``from_dict`` would refuse, so that a policy is never saved unloadable."""
        d = {"mean": self.mean.tolist(), "std": self.std.tolist(), "ignore": list(self.ignore)}
        self.from_dict(d)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StateNormalizer":
        """Statistics as ``to_dict`` writes them (without ``ignore``: every entry is read). A missing,
        unknown or mistyped entry, a non-finite or negative value, or a ``std`` of another length
        than ``mean`` raises ``ConfigError`` naming the entry."""
        check_entries(d, {"mean": list[float], "std": list[float], "ignore": list[int]}, required=("mean", "std"))
        if len(d["std"]) != len(d["mean"]):
            raise ConfigError(f"{len(d['std'])} entries, but mean has {len(d['mean'])}", "std")
        negative = [i for i, s in enumerate(d["std"]) if s < 0]
        if negative:
            first = negative[0]
            raise ConfigError(f"expected a standard deviation >= 0, got {d['std'][first]!r}", f"std[{first}]")
        try:
            return cls(np.array(d["mean"]), np.array(d["std"]), d.get("ignore", ()))
        except ValueError as e:  # an ignored entry out of range
            raise ConfigError(str(e), "ignore") from None


class InstructionError(ValueError, TypeError):
    """``obs['instruction']`` is not a str or a list/tuple of str matching the batch. A ``ValueError``,
    and a ``TypeError`` as this error was before it had a class of its own."""


class InstructionWarning(UserWarning):
    """The model will read little or nothing of an instruction (see :class:`ObservationProcessor`)."""


def check_instructions(instruction) -> tuple[list[str], bool]:
    """``obs['instruction']`` as a list of strings, and whether it was a single one: a ``str``, or a
    non-empty list or tuple of ``str`` (one per observation of a batch); else :class:`InstructionError`."""
    if isinstance(instruction, str):
        return [instruction], True
    if not isinstance(instruction, (list, tuple)):
        raise InstructionError(f"obs['instruction'] must be a str (or a list/tuple of str for a batch), "
                               f"got {type(instruction).__name__}")
    if not instruction:
        raise InstructionError(f"obs['instruction'] must be a str or a non-empty list/tuple of str, "
                               f"got an empty {type(instruction).__name__}")
    wrong = [i for i, text in enumerate(instruction) if not isinstance(text, str)]
    if wrong:
        raise InstructionError(f"obs['instruction'][{wrong[0]}] must be a str, "
                               f"got {type(instruction[wrong[0]]).__name__}")
    return list(instruction), False


def batch_shape(obs: dict) -> tuple[int, ...]:
    """``()`` for a single observation, ``(B,)`` for a batch of ``B``, as ``obs['instruction']`` says."""
    if not isinstance(obs, dict) or "instruction" not in obs:
        raise KeyError("observation is missing 'instruction'; expected keys 'images', 'state', 'instruction'")
    instructions, single = check_instructions(obs["instruction"])
    return () if single else (len(instructions),)


def describe_batch(shape: tuple[int, ...]) -> str:
    """``batch_shape``'s answer in words."""
    return f"a batch of {shape[0]}" if shape else "a single observation"


class ObservationProcessor:
    """Checks an observation and turns it into model inputs.

    An instruction the model would read little or nothing of is acted on, with an
    :class:`InstructionWarning`: one that is empty or whitespace only, one with no character
    the instruction tokenizer reads (it reads the words of ``a-z``/``0-9``, case-insensitive,
    so the model sees padding only), and one that loses a letter or digit it does not read
    (a non-ASCII one: ``"café"`` reads as ``caf``). Punctuation and spaces separate words by
    design and warn of nothing. Each reason warns once per processor, i.e. once per policy:
    an episode run with one bad instruction warns at its first chunk, not at every one.
    """

    def __init__(self, config: ModelConfig, state_norm: StateNormalizer):
        self.config = config
        self.state_norm = state_norm
        self.instr_tok = InstructionTokenizer(config.instr_vocab, config.instr_len)
        self._warned: set[str] = set()  # the InstructionWarning reasons already given

    def __call__(self, obs: dict, device="cpu") -> tuple[dict, bool]:
        """Returns the model inputs and whether ``obs`` was a single observation."""
        if not isinstance(obs, dict):
            raise TypeError(f"observation must be a dict, got {type(obs).__name__}")
        missing = [k for k in ("images", "state", "instruction") if k not in obs]
        if missing:
            raise KeyError(f"observation is missing {missing}; expected keys 'images', 'state', 'instruction'")
        instructions, single = check_instructions(obs["instruction"])
        batch = len(instructions)

        state = np.asarray(obs["state"])
        if not single and state.ndim == 2 and state.shape[0] != batch:
            raise InstructionError(f"obs['instruction'] has {batch} strings but obs['state'] a batch of "
                                   f"{state.shape[0]}: expected one instruction per observation")
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

        instr_ids = [self.instr_tok.encode(t) for t in instructions]
        for text, ids in zip(instructions, instr_ids):
            self._warn_if_unread(text, ids)
        inputs = {
            "images": torch.from_numpy(pixels).to(device).permute(0, 1, 4, 2, 3).float() / 255.0,
            "instr_ids": torch.tensor(instr_ids, device=device),
            "state": torch.from_numpy(self.state_norm(state.astype(np.float32))).float().to(device),
        }
        return inputs, single

    def _warn_if_unread(self, text: str, ids: list[int]) -> None:
        """An :class:`InstructionWarning` if the model reads little or nothing of ``text`` (encoded as
        ``ids``), once per reason (see the class docstring)."""
        if not ids:  # a model without instruction tokens reads none, by design
            return
        if not text.strip():
            self._warn_once("empty", f"obs['instruction'] is {text!r}, empty or whitespace only: "
                                     "the model acts with no instruction (padding only)")
        elif not any(ids):
            self._warn_once("unreadable", f"obs['instruction'] {text!r} has no letter or digit the "
                                          "instruction tokenizer reads (a-z, 0-9): the model acts with no "
                                          "instruction (padding only)")
        elif not text.isascii():
            dropped = sorted({c for c in text if c.isalnum() and not any(self.instr_tok.encode(c))})
            if dropped:
                self._warn_once("dropped", f"obs['instruction'] {text!r}: the instruction tokenizer reads a-z "
                                           f"and 0-9 only and drops {''.join(dropped)!r}, splitting or "
                                           "shortening the words around them")

    def _warn_once(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(message, InstructionWarning, stacklevel=4)
