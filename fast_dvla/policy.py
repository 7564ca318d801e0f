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
from .policy_files import (ACTION_STATS_FILE, CONFIG_FILE, CONFIG_VERSION, DEFAULT_MODEL_TYPE, FORMAT,
                           STATE_STATS_FILE, WEIGHTS_FILE, check_finite_weights, check_n_action_steps, errors_in,
                           load_action_tokenizer, load_state_norm, load_weights, read_config, write_file_atomically,
                           write_json_atomically)
from .policy_model import ReferencePolicyIO, policy_io
from .processor import StateNormalizer, describe_batch
from .registry import RegisteredModel, checkpoint_adapters, entry_for_model, model_entry, recognize_checkpoint
from .schema import ConfigError, read_json
from .tokenizer import ActionTokenizer


class FastDVLAPolicy:
    """A dVLA with its processing and decoding settings.

    ``model`` is the reference model with its ``action_tokenizer`` and ``state_norm``, or any
    :class:`~fast_dvla.policy_model.PolicyModel` (the Dream-VLA adapter, a model of your own), which
    turns observations into its prefix and bins into actions itself and takes neither.

    ``predict_action_chunk(obs)`` decodes one chunk (``[horizon, action_dim]``,
    or ``[B, horizon, action_dim]`` for a batch); ``select_action(obs)``
    serves actions from a queue refilled with the first ``n_action_steps`` of
    each chunk; ``reset()`` empties it between episodes.

    ``decode_config`` is how it decodes by default; ``method_settings`` holds
    settings for other decoders, used when one is asked for by name
    (``decode_config_for("fast_dvla")``; the benchmarks do).
    """

    def __init__(self, model, action_tokenizer: ActionTokenizer | None = None,
                 state_norm: StateNormalizer | None = None, decode_config: DecodeConfig | None = None,
                 n_action_steps: int | None = None, method_settings: dict | None = None):
        # observation -> prefix and bins -> actions, whatever the model: all the policy calls
        self.io = policy_io(model, action_tokenizer, state_norm)
        self.model = model.eval()
        if isinstance(self.io, ReferencePolicyIO):
            self.action_tokenizer, self.state_norm = self.io.action_tokenizer, self.io.state_norm
            self.processor = self.io.processor
        else:  # a PolicyModel owns these steps
            self.action_tokenizer = self.state_norm = self.processor = None
        self.decode_config = decode_config or DecodeConfig()
        self.method_settings = check_method_settings(method_settings or {}, self.decode_config)
        self.n_action_steps = self.io.horizon if n_action_steps is None else n_action_steps
        check_n_action_steps(self.n_action_steps, self.io.horizon)
        self.last_stats: DecodeStats | None = None
        self._queue: deque = deque()
        self._queue_batch_shape: tuple[int, ...] = ()  # () for a single observation's actions, (B,) for a batch's

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inference ------------------------------------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, obs: dict, decode_config: DecodeConfig | None = None) -> np.ndarray:
        prefix, single = self.io.observation_prefix(obs)
        result = self.decode_prefix(prefix, decode_config or self.decode_config)
        self.last_stats = result.stats
        actions = np.asarray(self.io.bins_to_actions(result.tokens.cpu().numpy()), dtype=np.float32)
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
        return decode(self.model, prefix, config, categorical=self.io.categorical_slots())

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
            shape = self.io.batch_shape(obs)
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
        """What ``config.json`` holds for this policy: the registered name of its model and the
        settings that build it, the default decoder's settings, those kept for other decoders, and
        ``n_action_steps``."""
        # either may have been set since construction; a default set since replaces that decoder's entry,
        # as a decode_config given to from_pretrained does
        method_settings = check_method_settings(
            {m: v for m, v in self.method_settings.items() if m != self.decode_config.method}, self.decode_config)
        entry = entry_for_model(self.model)
        config = {"format": FORMAT, "version": CONFIG_VERSION, "model_type": entry.name,
                  "model": entry.settings(self.model), "decode": self.decode_config.to_dict(),
                  "n_action_steps": self.n_action_steps}
        if method_settings:
            config["method_settings"] = method_settings
        return config

    def _check_config(self, config: dict, config_path: str) -> None:
        """``config`` as ``from_pretrained`` will check it, before anything is written."""
        read_config(config, config_path)
        try:
            check_n_action_steps(self.n_action_steps, self.io.horizon)
            json.dumps(config["model"], allow_nan=False)
        except ConfigError as e:
            raise e.within(config_path) from None
        except (TypeError, ValueError) as e:  # a registered model's settings that JSON cannot hold
            raise ConfigError(f"{type(self.model).__name__}.policy_settings() is not JSON: {e}", "model",
                              config_path) from None

    def save_config(self, path: str) -> None:
        """Rewrite only ``path/config.json`` (how the policy decodes), checked as ``from_pretrained``
        will check it; the weights and statistics already there stay as they are."""
        config = self.config_dict()
        self._check_config(config, os.path.join(path, CONFIG_FILE))
        write_json_atomically(os.path.join(path, CONFIG_FILE), config)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """``config.json`` (which registered model, its settings, how to decode), ``model.safetensors``
        and the files the model needs besides (the reference model's action and state statistics).
        ``dtype`` (e.g. ``torch.float16``) stores the weights smaller; they load back in the model's dtype.
        Everything is checked as ``from_pretrained`` will check it before any file is written: a
        directory that would not load is not made."""
        config = self.config_dict()
        config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        self._check_config(config, config_path)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.model.state_dict().items()}
        check_finite_weights(state, weights_path)
        files = self.io.policy_files(path)
        taken = sorted(set(files) & {CONFIG_FILE, WEIGHTS_FILE})
        if taken:
            raise ValueError(f"{type(self.model).__name__}.policy_files() would overwrite the policy's own {taken}")
        os.makedirs(path, exist_ok=True)
        for name, content in files.items():
            write_file_atomically(os.path.join(path, name), content)
        write_json_atomically(config_path, config)
        save_file(state, weights_path)

    @classmethod
    def from_pretrained(cls, path: str, decode_config: DecodeConfig | None = None, device="cpu",
                        n_action_steps: int | None = None, adapter: str | None = None,
                        adapter_options: dict | None = None) -> "FastDVLAPolicy":
        """A policy directory, every file checked: a bad entry, tensor or statistic raises
        ``ConfigError`` (a ``ValueError``) naming the file and the field. Its ``config.json`` names the
        registered model that builds it (``"model_type"``; none: ``"reference"``). ``decode_config`` and
        ``n_action_steps`` replace the saved ones.

        ``adapter`` (a registered name, e.g. ``"dream_vla"``) loads instead a checkpoint directory in
        that model's own published format, with ``adapter_options`` for its loader (Dream-VLA:
        ``horizon``, ``block_size``, ``dtype``, ``cameras``, ``unnorm_key``); a directory whose
        ``config.json`` a registered model recognises loads so without it. Such a directory carries no
        decoding settings: the model's default applies unless ``decode_config`` is given."""
        config_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path!r}: not a fast-dvla checkpoint directory")
        config = read_json(config_path)
        published = _published_format(config, adapter, config_path)
        if published is not None:
            model = published.load_checkpoint(path, **(adapter_options or {}))
            return cls(model.to(device), decode_config=decode_config or published.default_decode,
                       n_action_steps=n_action_steps)
        if adapter_options:
            raise ValueError(f"adapter_options are for a checkpoint in a model's own format; {path!r} is a fast-dvla "
                             "policy directory, whose config.json holds its model's settings")
        saved = read_config(config, config_path)
        with errors_in(config_path):
            entry = model_entry(saved.model_type)
        with errors_in(config_path, "model"):
            model = entry.build(saved.model, path)
        model.load_state_dict(load_weights(os.path.join(path, WEIGHTS_FILE), model))
        action_tokenizer = state_norm = None
        if isinstance(model, ReferenceDVLA):  # its processing lives in statistics files of its own
            state_norm = load_state_norm(os.path.join(path, STATE_STATS_FILE), model.config)
            action_tokenizer = load_action_tokenizer(os.path.join(path, ACTION_STATS_FILE), model.config)
        if n_action_steps is None and saved.n_action_steps is not None:
            with errors_in(config_path):  # the saved value, checked against the horizon of the model just built
                check_n_action_steps(saved.n_action_steps, policy_io(model, action_tokenizer, state_norm).horizon)
        decode_config = decode_config or saved.decode
        # a decode_config given here replaces the saved default; the other decoders keep theirs
        method_settings = {m: v for m, v in saved.method_settings.items() if m != decode_config.method}
        steps = saved.n_action_steps if n_action_steps is None else n_action_steps
        return cls(model.to(device), action_tokenizer, state_norm, decode_config, steps, method_settings)


def _published_format(config, adapter: str | None, config_path: str) -> RegisteredModel | None:
    """The registered model whose own published format the directory is in, or None for a fast-dvla
    policy directory. ``adapter`` names it; without it, a registered model that recognises the
    ``config.json`` is taken."""
    is_policy = isinstance(config, dict) and config.get("format") == FORMAT
    if adapter is None:
        if is_policy or not isinstance(config, dict):  # not a JSON object: read_config says so
            return None
        entry = recognize_checkpoint(config)
        if entry is None:
            raise ConfigError(f"neither a {FORMAT} config (no \"format\": {FORMAT!r}) nor a checkpoint a registered "
                              f"model recognises; for a model's own checkpoint format pass adapter=, one of "
                              f"{checkpoint_adapters()}", "format", config_path)
        return entry
    entry = model_entry(adapter, "adapter")
    if is_policy:
        saved = config.get("model_type", DEFAULT_MODEL_TYPE)
        if saved != adapter:
            raise ConfigError(f"this fast-dvla policy directory holds a {saved!r} model, not {adapter!r}; load it "
                              "without adapter=", "model_type", config_path)
        return None
    if entry.load_checkpoint is None:
        raise ConfigError(f"{adapter!r} has no checkpoint format of its own to load; adapters that do: "
                          f"{checkpoint_adapters()}", "adapter")
    return entry


def reference_policy_dir(role: str, suite: str = "libero_object") -> str:
    """The directory of the shipped reference ``role`` (``teacher`` or ``student``) for ``suite``."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "reference", suite, role)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no shipped reference {role} for {suite!r} (looked in {path})")
    return path
