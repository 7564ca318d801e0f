"""Which model a policy directory holds, by name.

A policy's ``config.json`` records the registered name of its model (``"model_type"``; a directory
without it is ``"reference"``, as every one was before models were registered). Loading looks the
name up here and nowhere else: a file names a builder, never a class or module to import. Built in:

- ``reference``: :class:`~fast_dvla.model.ReferenceDVLA` from its ``ModelConfig``;
- ``dream_vla``: :class:`~fast_dvla.adapters.dream_vla.DreamVLA`, which also loads a checkpoint
  directory in Dream-VLA's own published format (``adapter="dream_vla"``, or recognised by its
  ``config.json``).

A UD-VLA checkpoint (:class:`~fast_dvla.adapters.ud_vla.UDVLA`) is a model the engine decodes, not
a policy (its observations are Emu3 VQ codes from a separate image tokenizer, its 69 FAST tokens
are no ``horizon x action_dim`` grid): its ``config.json`` is recognised only to say so.

A user adds a :class:`~fast_dvla.policy_model.PolicyModel` subclass with :func:`register_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .adapters.dream_vla import DreamVLA, is_dream_vla_config
from .adapters.ud_vla import is_ud_vla_config
from .backbone import DVLAModel
from .config import DecodeConfig
from .model import ModelConfig, ReferenceDVLA
from .policy_model import PolicyModel
from .schema import ConfigError, check_choice


@dataclass(frozen=True)
class RegisteredModel:
    """A name's builder. ``build(settings, directory)`` makes the model (weights not loaded yet) from
    ``config.json``'s ``"model"`` settings and the policy directory's other files; ``settings(model)``
    is what ``save_pretrained`` writes there. A model whose project publishes checkpoints in a format
    of its own also has ``load_checkpoint(directory, **options)`` for such a directory,
    ``recognizes(config)`` telling its ``config.json`` apart, and ``default_decode``, how it decodes
    until told otherwise (such a directory carries no decoding settings)."""

    name: str
    model_class: type
    build: Callable[[dict, str], DVLAModel]
    settings: Callable[[DVLAModel], dict]
    load_checkpoint: Callable[..., DVLAModel] | None = None
    recognizes: Callable[[dict], bool] | None = None
    default_decode: DecodeConfig | None = None


_REGISTRY: dict[str, RegisteredModel] = {}
BUILT_IN = ("reference", "dream_vla")


def register_model(name: str, model_class: type, *, load_checkpoint: Callable[..., DVLAModel] | None = None,
                   recognizes: Callable[[dict], bool] | None = None, default_decode: DecodeConfig | None = None,
                   replace: bool = False) -> RegisteredModel:
    """Saves and loads ``model_class`` (a :class:`PolicyModel` subclass) as a policy under ``name``:
    ``save_pretrained`` writes ``name`` and ``model.policy_settings()``, ``from_pretrained`` builds it
    with ``model_class.from_policy_settings``. ``load_checkpoint``, ``recognizes`` and
    ``default_decode``: see :class:`RegisteredModel`. A taken name is refused unless ``replace``
    (built-in names always are)."""
    if not isinstance(name, str) or not name.isidentifier():
        # a plain name, never a dotted path: config.json names a builder, it does not say what to import
        raise ValueError(f"a registered model's name is an identifier such as 'my_vla', got {name!r}")
    if not (isinstance(model_class, type) and issubclass(model_class, PolicyModel)):
        raise TypeError(f"register_model({name!r}, ...): expected a subclass of fast_dvla.policy_model.PolicyModel "
                        f"(a model a policy can run), got {model_class!r}")
    if name in BUILT_IN:
        raise ValueError(f"model name {name!r} is built in: the policies that name it must keep loading")
    if name in _REGISTRY and not replace:
        raise ValueError(f"model name {name!r} is already registered for {_REGISTRY[name].model_class.__name__}; "
                         "pass replace=True to rebind it")
    return _add(RegisteredModel(name, model_class, model_class.from_policy_settings, model_class.policy_settings,
                                load_checkpoint, recognizes, default_decode))


def unregister_model(name: str) -> None:
    """Removes a name :func:`register_model` added (a redefined class, a test's model)."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is built in: the policies that name it must keep loading")
    model_entry(name, "model name")
    del _REGISTRY[name]


def registered_models() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def model_entry(name, field: str = "model_type") -> RegisteredModel:
    """The builder registered as ``name``; an unknown one is a ``ConfigError`` at ``field`` listing
    the registered names and the nearest."""
    check_choice(name, registered_models(), field, "registered model")
    return _REGISTRY[name]


def entry_for_model(model: DVLAModel) -> RegisteredModel:
    """The name ``model`` saves under: the entry of its class, or of its nearest registered base class."""
    by_class = {entry.model_class: entry for entry in _REGISTRY.values()}
    for cls in type(model).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise ConfigError(f"{type(model).__name__} is not a registered model, so a policy directory could not say what "
                      f"builds it: register_model('some_name', {type(model).__name__}) first (registered: "
                      f"{registered_models()})", "model_type")


def checkpoint_adapters() -> tuple[str, ...]:
    """The names that load a directory in their own published format."""
    return tuple(name for name, entry in sorted(_REGISTRY.items()) if entry.load_checkpoint is not None)


def recognize_checkpoint(config) -> RegisteredModel | None:
    """The registered model whose published format this (parsed) ``config.json`` is, if exactly one
    recognises it."""
    if not isinstance(config, dict):
        return None
    found = [entry for name, entry in sorted(_REGISTRY.items()) if entry.recognizes and entry.recognizes(config)]
    if not found and is_ud_vla_config(config):
        raise ConfigError("a UD-VLA checkpoint, which fast-dvla decodes as a model but not as a policy: load it with "
                          "fast_dvla.adapters.UDVLA.from_pretrained(path) and decode model.engine_prefix(...) with "
                          "fast_dvla.decode (docs/ud_vla.md)", "architectures")
    return found[0] if len(found) == 1 else None


def _add(entry: RegisteredModel) -> RegisteredModel:
    _REGISTRY[entry.name] = entry
    return entry


_add(RegisteredModel("reference", ReferenceDVLA, build=lambda settings, directory: ReferenceDVLA(
    ModelConfig.from_dict(settings)), settings=lambda model: model.config.to_dict()))
# Dream-VLA's LIBERO evaluation decodes in one bidirectional step, which the engine's vanilla equals
# (docs/design.md#sequence-layout-and-tokens)
_add(RegisteredModel("dream_vla", DreamVLA, DreamVLA.from_policy_settings, DreamVLA.policy_settings,
                     load_checkpoint=DreamVLA.from_pretrained, recognizes=is_dream_vla_config,
                     default_decode=DecodeConfig(method="vanilla", vanilla_steps=1)))
