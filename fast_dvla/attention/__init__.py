"""Attention backends, picked by name: ``sdpa`` (the reference, fastest on
CPU), ``eager`` (transformers' own, additive mask), ``flex``
(FlexAttention), ``triton`` (the project's fused cached block-causal
kernel), ``flash`` (flash-attn 2, GPU only).

    from fast_dvla.attention import use_backend
    use_backend(model, "triton")

A backend that cannot run here raises :class:`BackendUnavailable` saying
why; nothing falls back silently to another mask. Every backend reads the
forward's :class:`fast_dvla.masks.AttentionLayout` (see
docs/design.md#attention-backends).
"""
from __future__ import annotations

from transformers import AttentionInterface

from . import backends
from ..masks import AttentionLayout

# name -> (attention function or a transformers built-in name, reason-it-cannot-run or None)
_BACKENDS = {
    "sdpa": (backends.sdpa_attention, lambda: None),
    "eager": ("eager", lambda: None),
    "flex": (backends.flex_attention, lambda: None),
    "triton": (backends.triton_attention, backends.triton_unavailable),
    "flash": (backends.flash_attention, backends.flash_unavailable),
}
BACKEND_NAMES = tuple(_BACKENDS)


class BackendUnavailable(RuntimeError):
    pass


def unavailable_reason(name: str) -> str | None:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKEND_NAMES}")
    return _BACKENDS[name][1]()


def transformers_name(name: str) -> str:
    """Register the backend with transformers (once) and return its name there."""
    unavailable = unavailable_reason(name)
    if unavailable:
        raise BackendUnavailable(unavailable)
    fn = _BACKENDS[name][0]
    if isinstance(fn, str):
        return fn
    registered = f"fast_dvla_{name}"
    AttentionInterface.register(registered, fn)
    return registered


def use_backend(model, name: str) -> None:
    """Switch a model (anything with ``set_attn_backend``, e.g. ReferenceDVLA) to a backend."""
    unavailable = unavailable_reason(name)
    if unavailable:
        raise BackendUnavailable(unavailable)
    model.set_attn_backend(name)


__all__ = ["AttentionLayout", "BACKEND_NAMES", "BackendUnavailable", "unavailable_reason", "use_backend"]
