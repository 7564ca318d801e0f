"""Attention backends behind one interface (transformers' AttentionInterface).

Each function has transformers' signature ``(module, query [B, Hq, Q, D],
key [B, Hkv, K, D], value, attention_mask, scaling=..., **kwargs)`` and
returns ``(output [B, Q, Hq, D], None)``. The backbone passes the forward's
:class:`fast_dvla.masks.AttentionLayout` as ``fast_dvla_layout``; each
backend derives what it reads from it (the dense mask, the FlexAttention
block mask, the fused kernels' cache length), so ``attention_mask``, which
only carries the mask through transformers' own code, is not read here.
Fused backends run their kernel on the cached block-causal shape and SDPA
with the dense mask (the same rule) on every other forward. Padded batches
(``layout.pad_lens``): triton skips each row's padding slots (its
``key_starts``); flash has no such argument here, so it runs them on SDPA with
the dense mask, which hides the padding (docs/design.md#padded-batches).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from ..masks import AttentionLayout


def _layout(layout: AttentionLayout | None, backend: str) -> AttentionLayout:
    if layout is None:
        raise RuntimeError(f"the {backend} backend needs the forward's AttentionLayout as fast_dvla_layout "
                           "(run the model through its backbone_forward or fast_dvla.decode)")
    return layout


def _sdpa(query, key, value, layout, scaling):
    mask = layout.dense_mask(query.device)
    # grouped-query heads read their shared kv head directly: no repeated copy of the cache
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    layout = _layout(fast_dvla_layout, "sdpa")
    return _sdpa(query, key, value, layout, scaling).transpose(1, 2).contiguous(), None


def flex_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention as flex

    block_mask = _layout(fast_dvla_layout, "flex").flex_block_mask(query.device)
    groups = query.shape[1] // key.shape[1]
    with warnings.catch_warnings():  # un-compiled flex (CPU, tests) is correct, only slower: don't nag per layer
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _fused(kernel_name, query, key, value, scaling, layout, skips_padding: bool):
    """A fused kernel for cached block-causal windows, SDPA with the same rule otherwise.
    ``skips_padding``: the kernel takes per-row ``key_starts``; one that does not runs padded
    batches on SDPA, whose dense mask hides the padding."""
    cache_len = layout.fused_cache_len
    if cache_len is None or (layout.padded and not skips_padding):
        return _sdpa(query, key, value, layout, scaling).transpose(1, 2).contiguous(), None
    import fast_dvla_kernels

    kernel = getattr(fast_dvla_kernels, kernel_name)
    lens = torch.full((query.shape[0],), cache_len, dtype=torch.int32, device=query.device)
    padding = {"key_starts": layout.pad_lens_tensor(query.device)} if layout.padded else {}
    # lengths fit the buffer by construction: skip the check (a host sync per layer)
    out = kernel(query, key, value, lens, layout.block_size, scale=scaling, check_lengths=False, **padding)
    return out.transpose(1, 2).contiguous(), None


def triton_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    return _fused("triton_block_causal_attention", query, key, value, scaling, _layout(fast_dvla_layout, "triton"),
                  skips_padding=True)


def flash_attention(module, query, key, value, attention_mask, scaling=None, fast_dvla_layout=None, **kwargs):
    return _fused("flash_block_causal_attention", query, key, value, scaling, _layout(fast_dvla_layout, "flash"),
                  skips_padding=False)


def triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton backend needs the 'triton' package (pip install triton==3.7.1)"

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before fast_dvla_kernels is "
                "imported (the interpreter: correct but slow, for tests)")
    return None


def flash_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "the flash backend needs a CUDA GPU (flash-attn has no CPU path)"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash backend needs flash-attn 2: pip install flash-attn --no-build-isolation (on a CUDA machine)"
    return None
