"""What a policy needs from its model beyond decoding: an observation turned into the prefix, the
decoded bins turned into actions, and the files that rebuild it.

:class:`PolicyModel` is that contract for a model that owns its own processing (the Dream-VLA
adapter, a model a user registers). The reference model keeps its statistics in policy files of
their own (``action_stats.json``, ``state_stats.json``), so :class:`ReferencePolicyIO` puts its
tokenizer and state normaliser around it behind the same methods. :func:`policy_io` picks one;
``FastDVLAPolicy`` calls only these methods, whatever the model.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import torch

from .backbone import DVLAModel
from .model import ReferenceDVLA
from .policy_files import ACTION_STATS_FILE, STATE_STATS_FILE, state_stats_to_save
from .processor import ObservationProcessor, StateNormalizer, batch_shape
from .schema import ConfigError, unknown_key_problem
from .tokenizer import ActionTokenizer


class PolicyModel(DVLAModel):
    """A :class:`DVLAModel` that ``FastDVLAPolicy`` runs by itself.

    Subclasses set ``horizon`` and ``action_dim`` (``chunk_len == horizon * action_dim``) besides
    the engine's attributes, and implement :meth:`observation_prefix` and :meth:`bins_to_actions`.
    Registered under a name (``fast_dvla.registry.register_model``), it is saved and loaded as a
    policy directory: :meth:`policy_settings` is what ``config.json``'s ``"model"`` holds,
    :meth:`from_policy_settings` builds the model again from it (the policy then loads the weights
    from ``model.safetensors``), :meth:`policy_files` names any other file it needs.
    """

    horizon: int
    action_dim: int

    def observation_prefix(self, obs: dict) -> tuple[torch.Tensor, bool]:
        """An observation (or a batch of them, in this model's own format) -> the prefix embeddings
        ``[B, P, H]`` on the model's device and dtype, and whether ``obs`` was a single observation."""
        raise NotImplementedError

    def bins_to_actions(self, bins: np.ndarray) -> np.ndarray:
        """Decoded bins ``[B, chunk_len]`` (time-major) -> actions ``[B, horizon, action_dim]``."""
        raise NotImplementedError

    def actions_to_bins(self, actions: np.ndarray) -> np.ndarray:
        """Actions ``[B, horizon, action_dim]`` -> bins ``[B, chunk_len]``: the labels training and
        distillation read from recorded demonstrations, and how token agreement scores decoded actions.
        Optional: a model that is only decoded need not implement it."""
        raise NotImplementedError(f"{type(self).__name__}.actions_to_bins(): training on demonstrations (and "
                                  "token agreement) needs the model's actions -> bins")

    def observation_spec(self) -> dict:
        """What a made-up observation for this model looks like (timing without data): ``{"cameras": [names],
        "image_size": (H, W), "state_dim": int}``. Optional."""
        raise NotImplementedError(f"{type(self).__name__}.observation_spec(): say which cameras, image size and "
                                  "state size a random observation needs, or time it on recorded frames")

    def batch_shape(self, obs: dict) -> tuple[int, ...]:
        """``()`` for a single observation, ``(B,)`` for a batch, read without processing it (an action
        queue checks it before serving queued actions). By default ``obs["instruction"]`` says, a ``str``
        or a list of ``B``, as for every fast-dvla observation; override it for a format without one."""
        return batch_shape(obs)

    def categorical_slots(self) -> np.ndarray | None:
        """``[chunk_len]`` bool, true where bins are categories rather than ordered values (a binary
        gripper's); None: every slot is ordinal. The token rules ``mean``/``majority`` read it."""
        return None

    def policy_settings(self) -> dict:
        """The JSON settings :meth:`from_policy_settings` builds this model from (saved as ``config.json``'s
        ``"model"``)."""
        raise NotImplementedError(f"{type(self).__name__}.policy_settings(): a model saved as a policy must say "
                                  "which settings build it again")

    @classmethod
    def from_policy_settings(cls, settings: dict, directory: str) -> "PolicyModel":
        """The model :meth:`policy_settings` described, weights not loaded yet; ``directory`` holds
        its :meth:`policy_files`. By default ``cls(**settings)``, a setting its constructor does not
        take refused by name (a misspelt one would otherwise build another model, or fail unnamed)."""
        check_constructor_settings(cls, settings)
        return cls(**settings)

    def policy_files(self, directory: str) -> dict:
        """Files besides ``config.json`` and ``model.safetensors`` that :meth:`from_policy_settings` reads
        from ``directory``: ``{name: JSON object or text}``, checked, since a policy checks every file
        before it writes any."""
        return {}


def check_constructor_settings(cls, settings: dict) -> None:
    """``settings`` bind to ``cls``'s constructor: every key one of its parameters, every required
    parameter given; else ``ConfigError`` naming the key."""
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for key in settings:
            if key not in parameters:
                raise ConfigError(unknown_key_problem(key, list(parameters)), str(key))
    try:
        inspect.signature(cls).bind(**settings)
    except TypeError as e:  # a required argument missing
        raise ConfigError(f"{cls.__name__}'s settings do not build it: {e}") from None


class ReferencePolicyIO:
    """The reference model's side of a policy: checked observations (:class:`ObservationProcessor`:
    cameras, hashed instruction, normalised state) into ``embed_prefix``, and the action tokenizer's
    bins into actions. The tokenizer and the state statistics are the policy's files."""

    def __init__(self, model: ReferenceDVLA, action_tokenizer: ActionTokenizer,
                 state_norm: StateNormalizer | None = None):
        cfg = model.config
        if action_tokenizer is None:
            raise ValueError("a ReferenceDVLA policy needs an action_tokenizer (its bins -> actions)")
        if action_tokenizer.action_dim != cfg.action_dim:
            raise ValueError(f"tokenizer action_dim {action_tokenizer.action_dim} != model's {cfg.action_dim}")
        if action_tokenizer.n_bins != cfg.n_bins:
            raise ValueError(f"tokenizer n_bins {action_tokenizer.n_bins} != model's {cfg.n_bins}")
        self.model = model
        self.action_tokenizer = action_tokenizer
        self.state_norm = state_norm or StateNormalizer.identity(cfg.state_dim)
        self.processor = ObservationProcessor(cfg, self.state_norm)
        self.horizon, self.action_dim = cfg.horizon, cfg.action_dim

    def observation_prefix(self, obs: dict) -> tuple[torch.Tensor, bool]:
        inputs, single = self.processor(obs, next(self.model.parameters()).device)
        return self.model.embed_prefix(inputs["images"], inputs["instr_ids"], inputs["state"]), single

    def bins_to_actions(self, bins: np.ndarray) -> np.ndarray:
        return self.action_tokenizer.decode(bins.reshape(-1, self.horizon, self.action_dim))

    def actions_to_bins(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        return self.action_tokenizer.encode(actions).reshape(*actions.shape[:-2], -1)

    def observation_spec(self) -> dict:
        cfg = self.model.config
        return {"cameras": list(cfg.cameras), "image_size": (cfg.image_size, cfg.image_size),
                "state_dim": cfg.state_dim}

    def batch_shape(self, obs: dict) -> tuple[int, ...]:
        return batch_shape(obs)

    def categorical_slots(self) -> np.ndarray:
        return self.action_tokenizer.categorical_slots(self.horizon)

    def policy_files(self, directory: str) -> dict:
        action_path, state_path = (os.path.join(directory, name) for name in (ACTION_STATS_FILE, STATE_STATS_FILE))
        return {ACTION_STATS_FILE: self.action_tokenizer.to_saved_dict(action_path),
                STATE_STATS_FILE: state_stats_to_save(self.state_norm, self.model.config, state_path)}


def policy_io(model: DVLAModel, action_tokenizer: ActionTokenizer | None = None,
              state_norm: StateNormalizer | None = None) -> PolicyModel | ReferencePolicyIO:
    """What a policy calls to turn observations into a prefix and bins into actions: a
    :class:`PolicyModel` itself, the reference model with its tokenizer and normaliser."""
    if isinstance(model, PolicyModel):
        given = [name for name, value in (("action_tokenizer", action_tokenizer), ("state_norm", state_norm))
                 if value is not None]
        if given:
            # two owners of the same step would silently disagree on which one ran
            raise ValueError(f"{type(model).__name__} is a PolicyModel: it turns observations into its prefix and "
                             f"bins into actions itself, so the policy takes no {' or '.join(given)}")
        if model.chunk_len != model.horizon * model.action_dim:
            raise ValueError(f"{type(model).__name__}: chunk_len {model.chunk_len} != horizon {model.horizon} x "
                             f"action_dim {model.action_dim}")
        return model
    if isinstance(model, ReferenceDVLA):
        return ReferencePolicyIO(model, action_tokenizer, state_norm)
    raise TypeError(f"{type(model).__name__} can be decoded but not run as a policy: subclass "
                    "fast_dvla.policy_model.PolicyModel (observation_prefix, bins_to_actions) and register it "
                    "with fast_dvla.registry.register_model to save and load it")
