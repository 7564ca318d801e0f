"""The user-facing policy: load, predict action chunks, step an action queue."""
from __future__ import annotations

import json
import os
from collections import deque

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import DecodeConfig, check_method_settings
from .decoding import DecodeStats, decode
from .model import ModelConfig, ReferenceDVLA
from .processor import ObservationProcessor, StateNormalizer
from .tokenizer import ActionTokenizer

FORMAT = "fast-dvla-policy"
CONFIG_FILE, WEIGHTS_FILE, ACTION_STATS_FILE, STATE_STATS_FILE = (
    "config.json", "model.safetensors", "action_stats.json", "state_stats.json")


class FastDVLAPolicy:
    """A dVLA with its tokenizer, normaliser and decoding settings.

    ``predict_action_chunk(obs)`` decodes one chunk (``[horizon, action_dim]``,
    or ``[B, horizon, action_dim]`` for a batch); ``select_action(obs)``
    serves actions from a queue refilled with the first ``n_action_steps`` of
    each chunk; ``reset()`` empties it between episodes.

    ``decode_config`` is how it decodes by default; ``method_settings`` holds
    settings for other decoders, used when one is asked for by name
    (``decode_config_for("fast_dvla")``; the benchmarks do).
    """

    def __init__(self, model: ReferenceDVLA, action_tokenizer: ActionTokenizer,
                 state_norm: StateNormalizer | None = None, decode_config: DecodeConfig | None = None,
                 n_action_steps: int | None = None, method_settings: dict | None = None):
        cfg = model.config
        if action_tokenizer.action_dim != cfg.action_dim:
            raise ValueError(f"tokenizer action_dim {action_tokenizer.action_dim} != model's {cfg.action_dim}")
        if action_tokenizer.n_bins != cfg.n_bins:
            raise ValueError(f"tokenizer n_bins {action_tokenizer.n_bins} != model's {cfg.n_bins}")
        self.model = model.eval()
        self.action_tokenizer = action_tokenizer
        self.state_norm = state_norm or StateNormalizer.identity(cfg.state_dim)
        self.decode_config = decode_config or DecodeConfig()
        self.method_settings = check_method_settings(method_settings or {}, self.decode_config)
        self.n_action_steps = n_action_steps or cfg.horizon
        if not 1 <= self.n_action_steps <= cfg.horizon:
            raise ValueError(f"n_action_steps must be in [1, {cfg.horizon}], got {self.n_action_steps}")
        self.processor = ObservationProcessor(cfg, self.state_norm)
        self.last_stats: DecodeStats | None = None
        self._queue: deque = deque()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inference ------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, decode_config: DecodeConfig | None = None) -> np.ndarray:
        inputs, single = self.processor(obs, self.device)
        prefix = self.model.embed_prefix(inputs["images"], inputs["instr_ids"], inputs["state"])
        result = self.decode_prefix(prefix, decode_config or self.decode_config)
        self.last_stats = result.stats
        cfg = self.model.config
        tokens = result.tokens.view(-1, cfg.horizon, cfg.action_dim).cpu().numpy()
        actions = self.action_tokenizer.decode(tokens).astype(np.float32)
        return actions[0] if single else actions

    def decode_config_for(self, method: str) -> DecodeConfig:
        """How this policy decodes with ``method``: its default settings with that decoder's own
        saved settings (``method_settings``) on top."""
        return self.decode_config.for_method(method, self.method_settings)

    def configure_decoding(self, changes: dict, method: str | None = None, for_method: str | None = None) -> None:
        """Changes how this policy decodes (saved by ``save_pretrained``). ``method`` makes that decoder
        the default, taking in the settings saved for it; ``changes`` (``{"tau_conf": 0.3}``) then go to
        ``for_method``'s own settings, or to the default's. Raises ``ValueError`` on a bad setting,
        leaving the policy as it was."""
        decode_config, method_settings = self.decode_config, {m: dict(v) for m, v in self.method_settings.items()}
        if method and method != decode_config.method:
            decode_config = decode_config.replace(method=method, **method_settings.pop(method, {}))
        target = for_method or decode_config.method
        if target == decode_config.method:
            decode_config = decode_config.replace(**changes)
        else:
            method_settings[target] = {**method_settings.get(target, {}), **changes}
        self.method_settings = check_method_settings(method_settings, decode_config)
        self.decode_config = decode_config

    def decode_prefix(self, prefix: torch.Tensor, config: DecodeConfig):
        """One chunk of tokens from the prefix embeddings (a subclass may decode otherwise)."""
        return decode(self.model, prefix, config,
                      categorical=self.action_tokenizer.categorical_slots(self.model.config.horizon))

    @property
    def needs_chunk(self) -> bool:
        """Whether the next ``select_action`` decodes a new chunk (its queue is empty)."""
        return not self._queue

    def select_action(self, obs: dict, decode_config: DecodeConfig | None = None) -> np.ndarray:
        """The next queued action; when the queue is empty, first decodes a chunk from ``obs``
        (with ``decode_config``, or the policy's own) and queues its first ``n_action_steps``."""
        if not self._queue:
            chunk = self.predict_action_chunk(obs, decode_config)
            steps = chunk[: self.n_action_steps] if chunk.ndim == 2 else chunk[:, : self.n_action_steps].swapaxes(0, 1)
            self._queue.extend(steps)
        return self._queue.popleft()

    def reset(self) -> None:
        self._queue.clear()

    # -- persistence ----------------------------------------------------------
    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """``dtype`` (e.g. ``torch.float16``) stores the weights smaller; they load back in the model's dtype."""
        # either may have been set since construction; a default set since replaces that decoder's entry,
        # as a decode_config given to from_pretrained does
        method_settings = check_method_settings(
            {m: v for m, v in self.method_settings.items() if m != self.decode_config.method}, self.decode_config)
        os.makedirs(path, exist_ok=True)
        config = {"format": FORMAT, "version": 1, "model": self.model.config.to_dict(),
                  "decode": self.decode_config.to_dict(), "n_action_steps": self.n_action_steps}
        if method_settings:
            config["method_settings"] = method_settings
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE))
        self.action_tokenizer.save(os.path.join(path, ACTION_STATS_FILE))
        with open(os.path.join(path, STATE_STATS_FILE), "w") as f:
            json.dump(self.state_norm.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, decode_config: DecodeConfig | None = None, device="cpu",
                        n_action_steps: int | None = None) -> "FastDVLAPolicy":
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: not a fast-dvla checkpoint directory")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not a {FORMAT} config (format={config.get('format')!r})")
        model = ReferenceDVLA(ModelConfig.from_dict(config["model"]))
        missing, unexpected = model.load_state_dict(load_file(os.path.join(path, WEIGHTS_FILE)), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing}, unexpected {unexpected}")
        with open(os.path.join(path, STATE_STATS_FILE)) as f:
            state_norm = StateNormalizer.from_dict(json.load(f))
        decode_config = decode_config or DecodeConfig.from_dict(config.get("decode", {}))
        # a decode_config given here replaces the saved default; the other decoders keep theirs
        method_settings = {m: v for m, v in config.get("method_settings", {}).items() if m != decode_config.method}
        return cls(model.to(device), ActionTokenizer.load(os.path.join(path, ACTION_STATS_FILE)), state_norm,
                   decode_config, n_action_steps or config.get("n_action_steps"), method_settings)


def reference_policy_dir(role: str, suite: str = "libero_object") -> str:
    """The directory of the shipped reference ``role`` (``teacher`` or ``student``) for ``suite``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reference", suite, role)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no shipped reference {role} for {suite!r} (looked in {path})")
    return path
