"""A policy directory's files: ``config.json``, ``model.safetensors``, and the files its model needs
besides (the reference model's ``action_stats.json`` and ``state_stats.json``), each read and
checked by name, type and range (a ``ConfigError`` names the file and the field), and written
atomically."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import DecodeConfig, check_method_settings
from .model import ModelConfig
from .processor import StateNormalizer
from .schema import ConfigError, check_entries, read_json, shown
from .tokenizer import ActionTokenizer

FORMAT = "fast-dvla-policy"
CONFIG_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, ACTION_STATS_FILE, STATE_STATS_FILE = (
    "config.json", "model.safetensors", "action_stats.json", "state_stats.json")
# config.json's top-level entries and their kinds; "model_type", "decode", "n_action_steps" and
# "method_settings" may be absent ("reference", the defaults, the model's horizon, none)
CONFIG_ENTRIES = {"format": str, "version": int, "model_type": str, "model": dict, "decode": dict,
                  "n_action_steps": int, "method_settings": dict}
REQUIRED_CONFIG_ENTRIES = ("format", "version", "model")
# directories saved before models were registered hold the reference model (fast_dvla.registry)
DEFAULT_MODEL_TYPE = "reference"


class PolicyConfig(NamedTuple):
    """A policy's ``config.json``, its entries checked. ``model`` is the settings the registered
    ``model_type`` builds from (checked by that builder); ``n_action_steps`` is None when absent (the
    model's horizon), and is checked against the horizon once the model is built."""

    model_type: str
    model: dict
    decode: DecodeConfig
    n_action_steps: int | None
    method_settings: dict


def read_config(config, config_path: str) -> PolicyConfig:
    """A policy's ``config.json`` (parsed), each entry checked by name, type and range; an error
    names ``config_path`` and the field (``config.json: decode.tau_cnf: unknown key; ...``)."""
    try:
        if not isinstance(config, dict):
            raise ConfigError(f"expected a JSON object of settings, got {shown(config)}")
        if config.get("format") != FORMAT:
            raise ConfigError(f"not a {FORMAT} config: expected {FORMAT!r}, got {shown(config.get('format'))}",
                              "format")
        check_entries(config, CONFIG_ENTRIES, REQUIRED_CONFIG_ENTRIES)
        if config["version"] != CONFIG_VERSION:
            raise ConfigError(f"expected {CONFIG_VERSION} (the only version this fast-dvla reads), got "
                              f"{config['version']!r}", "version")
        decode_config = _section(DecodeConfig.from_dict, config.get("decode", {}), "decode")
        n_action_steps = config.get("n_action_steps")
        if n_action_steps is not None and n_action_steps < 1:
            raise ConfigError(f"expected an integer >= 1 (at most the model's horizon), got {n_action_steps!r}",
                              "n_action_steps")
        method_settings = check_method_settings(config.get("method_settings", {}), decode_config)
    except ConfigError as e:
        raise e.within(config_path) from None
    return PolicyConfig(config.get("model_type", DEFAULT_MODEL_TYPE), config["model"], decode_config,
                        n_action_steps, method_settings)


def _section(build, settings, name: str):
    """``build(settings)``, its errors' fields nested under ``name``."""
    try:
        return build(settings)
    except ConfigError as e:
        raise e.within(parent=name) from None


@contextmanager
def errors_in(config_path: str, parent: str | None = None):
    """A ``ConfigError`` raised inside names ``config_path``, its field nested under ``parent``."""
    try:
        yield
    except ConfigError as e:
        raise e.within(config_path, parent) from None


def check_n_action_steps(value, horizon: int) -> None:
    """An action queue takes 1 to ``horizon`` actions of each chunk (0 is not "all of them")."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= horizon:
        raise ConfigError(f"expected an integer in [1, {horizon}] (the model's horizon), got {shown(value)}",
                          "n_action_steps")


def load_weights(weights_path: str, model: nn.Module) -> dict:
    """The tensors of ``weights_path``, checked against ``model`` (names and shapes) and for
    non-finite values; an error names the file and the tensor."""
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no {WEIGHTS_FILE}: {weights_path} does not exist")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"not a readable safetensors file (truncated or corrupt?): {e}", file=weights_path) from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"does not match the model in {CONFIG_FILE}: missing {missing}, unexpected {unexpected}",
                          file=weights_path)
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(f"shape {tuple(tensor.shape)}, but the model in {CONFIG_FILE} has "
                              f"{tuple(expected[name].shape)}", name, weights_path)
    check_finite_weights(state, weights_path)
    return state


def check_finite_weights(state: dict, weights_path: str) -> None:
    """No NaN or inf in any tensor: one poisons every chunk it touches, yet a chunk decoded through
    it can still look plausible."""
    for name, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ConfigError(f"{bad} non-finite value(s) (NaN or inf) in this {tensor.dtype} tensor", name,
                                  weights_path)


def load_state_norm(stats_path: str, model_config: ModelConfig) -> StateNormalizer:
    """The state statistics at ``stats_path``, checked, and against the model's ``state_dim``."""
    try:
        state_norm = StateNormalizer.from_dict(read_json(stats_path))
        check_state_dim(state_norm, model_config)
    except ConfigError as e:
        raise e.within(stats_path) from None
    return state_norm


def state_stats_to_save(state_norm: StateNormalizer, model_config: ModelConfig, stats_path: str) -> dict:
    """``state_norm`` as ``stats_path`` will hold it, refused (naming that file) where
    ``load_state_norm`` would refuse it."""
    try:
        stats = state_norm.to_dict()
        check_state_dim(state_norm, model_config)
    except ConfigError as e:
        raise e.within(stats_path) from None
    return stats


def check_state_dim(state_norm: StateNormalizer, model_config: ModelConfig) -> None:
    entries = state_norm.mean.shape[-1]
    if entries != model_config.state_dim:
        raise ConfigError(f"{entries} entries, but the model in {CONFIG_FILE} has state_dim {model_config.state_dim}",
                          "mean")


def load_action_tokenizer(stats_path: str, model_config: ModelConfig) -> ActionTokenizer:
    """The action statistics at ``stats_path`` (``ActionTokenizer.load`` checks them), checked
    against the model's action dimensions and bins."""
    tokenizer = ActionTokenizer.load(stats_path)
    if tokenizer.action_dim != model_config.action_dim:
        raise ConfigError(f"{tokenizer.action_dim} entries, but the model in {CONFIG_FILE} has action_dim "
                          f"{model_config.action_dim}", "q01", stats_path)
    if tokenizer.n_bins != model_config.n_bins:
        raise ConfigError(f"{tokenizer.n_bins}, but the model in {CONFIG_FILE} has n_bins {model_config.n_bins}",
                          "n_bins", stats_path)
    return tokenizer


def write_json_atomically(path: str, payload: dict) -> None:
    """A kill mid-write leaves the old file, never half of a new one."""
    write_file_atomically(path, payload)


def write_file_atomically(path: str, content: dict | str) -> None:
    """``content`` at ``path``: a mapping as indented JSON, a string as text (UTF-8). A kill mid-write
    leaves the old file, never half of a new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if isinstance(content, str):
            f.write(content)
        else:
            json.dump(content, f, indent=2)
    os.replace(tmp, path)
