"""The user-facing policy: load, predict action chunks, step an action queue."""
from __future__ import annotations

import json
import os
from collections import deque

import numpy as np
import torch
from safetensors.torch import save_file

from .config import DecodeConfig, check_method_settings
from .decoding import DecodeStats, decode
from .model import ReferenceDVLA
from .processor import ObservationProcessor, StateNormalizer, batch_shape, describe_batch
from .policy_files import (ACTION_STATS_FILE, CONFIG_FILE, CONFIG_VERSION, FORMAT, STATE_STATS_FILE, WEIGHTS_FILE,
                           check_finite_weights, check_n_action_steps, load_action_tokenizer, load_state_norm,
                           load_weights, read_config, state_stats_to_save, write_json_atomically)
from .schema import read_json
from .tokenizer import ActionTokenizer

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
        self.n_action_steps = cfg.horizon if n_action_steps is None else n_action_steps
        check_n_action_steps(self.n_action_steps, cfg.horizon)
        self.processor = ObservationProcessor(cfg, self.state_norm)
        self.last_stats: DecodeStats | None = None
        self._queue: deque = deque()
        self._queue_batch_shape: tuple[int, ...] = ()  # () for a single observation's actions, (B,) for a batch's

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
        (with ``decode_config``, or the policy's own) and queues its first ``n_action_steps``.

        The queue belongs to the observations that filled it: while it holds actions, ``obs`` must
        be as batched as they were (single, or a batch of the same size), else ``ValueError``;
        call ``reset()`` first to start over with another batch."""
        if self._queue:
            # serving a batch's queued actions to another batch size would hand one robot another's actions
            shape = batch_shape(obs)
            if shape != self._queue_batch_shape:
                raise ValueError(f"select_action(obs): obs is {describe_batch(shape)}, but the queued actions are "
                                 f"for {describe_batch(self._queue_batch_shape)}; call policy.reset() first "
                                 f"(the queue keeps the batch it was filled for)")
        else:
            chunk = self.predict_action_chunk(obs, decode_config)
            steps = chunk[: self.n_action_steps] if chunk.ndim == 2 else chunk[:, : self.n_action_steps].swapaxes(0, 1)
            self._queue.extend(steps)
            self._queue_batch_shape = chunk.shape[:-2]
        return self._queue.popleft()

    def reset(self) -> None:
        """Empties the action queue (between episodes, or before a change of batch size)."""
        self._queue.clear()
        self._queue_batch_shape = ()

    # -- persistence ----------------------------------------------------------
    def config_dict(self) -> dict:
        """What ``config.json`` holds for this policy: the model, the default decoder's settings,
        those kept for other decoders, and ``n_action_steps``."""
        # either may have been set since construction; a default set since replaces that decoder's entry,
        # as a decode_config given to from_pretrained does
        method_settings = check_method_settings(
            {m: v for m, v in self.method_settings.items() if m != self.decode_config.method}, self.decode_config)
        config = {"format": FORMAT, "version": CONFIG_VERSION, "model": self.model.config.to_dict(),
                  "decode": self.decode_config.to_dict(), "n_action_steps": self.n_action_steps}
        if method_settings:
            config["method_settings"] = method_settings
        return config

    def save_config(self, path: str) -> None:
        """Rewrite only ``path/config.json`` (how the policy decodes), checked as ``from_pretrained``
        will check it; the weights and statistics already there stay as they are."""
        config = self.config_dict()
        read_config(config, os.path.join(path, CONFIG_FILE))
        write_json_atomically(os.path.join(path, CONFIG_FILE), config)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """``dtype`` (e.g. ``torch.float16``) stores the weights smaller; they load back in the model's dtype.
        Everything is checked as ``from_pretrained`` will check it before any file is written: a
        directory that would not load is not made."""
        config = self.config_dict()
        model_config = read_config(config, os.path.join(path, CONFIG_FILE))[0]
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.model.state_dict().items()}
        check_finite_weights(state, os.path.join(path, WEIGHTS_FILE))
        state_stats = state_stats_to_save(self.state_norm, model_config, os.path.join(path, STATE_STATS_FILE))
        os.makedirs(path, exist_ok=True)
        self.action_tokenizer.save(os.path.join(path, ACTION_STATS_FILE))  # checks its statistics first
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        save_file(state, os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, STATE_STATS_FILE), "w") as f:
            json.dump(state_stats, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, decode_config: DecodeConfig | None = None, device="cpu",
                        n_action_steps: int | None = None) -> "FastDVLAPolicy":
        """A policy directory, every file checked: a bad entry, tensor or statistic raises
        ``ConfigError`` (a ``ValueError``) naming the file and the field. ``decode_config`` and
        ``n_action_steps`` replace the saved ones."""
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: not a fast-dvla checkpoint directory")
        model_config, saved_decode, saved_steps, saved_settings = read_config(read_json(config_path), config_path)
        if n_action_steps is not None:
            check_n_action_steps(n_action_steps, model_config.horizon)
        model = ReferenceDVLA(model_config)
        model.load_state_dict(load_weights(os.path.join(path, WEIGHTS_FILE), model))
        state_norm = load_state_norm(os.path.join(path, STATE_STATS_FILE), model_config)
        action_tokenizer = load_action_tokenizer(os.path.join(path, ACTION_STATS_FILE), model_config)
        decode_config = decode_config or saved_decode
        # a decode_config given here replaces the saved default; the other decoders keep theirs
        method_settings = {m: v for m, v in saved_settings.items() if m != decode_config.method}
        return cls(model.to(device), action_tokenizer, state_norm, decode_config,
                   saved_steps if n_action_steps is None else n_action_steps, method_settings)


def reference_policy_dir(role: str, suite: str = "libero_object") -> str:
    """The directory of the shipped reference ``role`` (``teacher`` or ``student``) for ``suite``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reference", suite, role)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no shipped reference {role} for {suite!r} (looked in {path})")
    return path
