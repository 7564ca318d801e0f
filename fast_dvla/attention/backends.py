"""Attention backends behind one interface (transformers' AttentionInterface).

Each function has transformers' signature ``(module, query [B, Hq, Q, D],
key [B, Hkv, K, D], value, attention_mask, scaling=..., **kwargs)`` and
returns ``(output [B, Q, Hq, D], None)``. The engine passes
``fast_dvla_layout`` (an :class:`AttentionLayout`) in the kwargs; fused
backends use it for the cached block-causal shape and fall back to SDPA
with the dense mask (the same rule) for every other forward.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from ..masks import flex_block_mask


def _sdpa(query, key, value, mask, scaling):
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError("fast-dvla backends take the boolean mask")
    # grouped-query heads read their shared kv head directly: no repeated copy of the cache
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    return _sdpa(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


_flex_masks: dict = {}


def flex_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention as flex

    lay = fast_dvla_layout
    if lay is None:
        raise RuntimeError("the flex backend needs the engine's attention layout (run it through fast_dvla.decode)")
    key_ = (lay, str(query.device))
    if key_ not in _flex_masks:
        _flex_masks[key_] = flex_block_mask(lay.prefix_len, lay.block_size, lay.q_start, lay.q_len, lay.kv_len,
                                            lay.kind, device=query.device)
    groups = query.shape[1] // key.shape[1]
    with warnings.catch_warnings():  # un-compiled flex (CPU, tests) is correct, only slower: don't nag per layer
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex(query, key, value, block_mask=_flex_masks[key_], scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _fused(kernel_name, query, key, value, attention_mask, scaling, layout):
    """A fused kernel for cached block-causal windows, SDPA with the same dense mask otherwise."""
    cache_len = None if layout is None else layout.fused_cache_len
    if cache_len is None:
        return sdpa_attention(None, query, key, value, attention_mask, scaling)
    import fast_dvla.kernels

    kernel = getattr(fast_dvla.kernels, kernel_name)
    lens = torch.full((query.shape[0],), cache_len, dtype=torch.int32, device=query.device)
    # lengths fit the buffer by construction: skip the check (a host sync per layer)
    out = kernel(query, key, value, lens, layout.block_size, scale=scaling, check_lengths=False)
    return out.transpose(1, 2).contiguous(), None


def triton_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    return _fused("triton_block_causal_attention", query, key, value, attention_mask, scaling, fast_dvla_layout)


def flash_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    return _fused("flash_block_causal_attention", query, key, value, attention_mask, scaling, fast_dvla_layout)


def triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton backend needs the 'triton' package (pip install triton==3.7.1)"

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before fast_dvla.kernels is "
                "imported (the interpreter: correct but slow, for tests)")
    return None


def flash_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "the flash backend needs a CUDA GPU (flash-attn has no CPU path)"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash backend needs flash-attn 2: pip install flash-attn --no-build-isolation (on a CUDA machine)"
    return None
