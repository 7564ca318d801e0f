"""Attention kernels for cached block-causal attention.

Importing this package needs neither a GPU nor flash-attn: the submodules
load on first use of a name. The Triton kernel runs on CUDA tensors, or on
the CPU under ``TRITON_INTERPRET=1`` (set before the first use: ``triton.jit``
reads it when the kernel module is imported); the flash path raises an
``ImportError`` saying what to install when flash-attn is missing.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "triton_block_causal_attention": "triton_block_attention",
    "check_inputs": "triton_block_attention",
    "flash_block_causal_attention": "flash_block_attention",
    "merge_partials": "flash_block_attention",
    "inflight_partial": "flash_block_attention",
    "gather_inflight": "flash_block_attention",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
