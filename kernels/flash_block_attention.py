"""flash-attn 2 path for cached block-causal attention (GPU only).

flash-attn has no block-causal mask, but the rule splits into pieces it does
have: every query sees the cache unmasked (one ``causal=False`` call over
the cache), and in-flight block ``i`` sees in-flight blocks ``0..i`` (one
``causal=False`` call per block over the in-flight keys up to its end). The
partial results are merged exactly with their log-sum-exps.
"""
from __future__ import annotations

import torch

from .block_attention import check_inputs


def _flash():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:  # no wheel on PyPI, and it does not build without CUDA
        raise ImportError("the flash backend needs flash-attn 2 on a CUDA machine: "
                          "pip install flash-attn --no-build-isolation") from err
    return flash_attn_func


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two softmax-attention results over disjoint key sets.

    ``out_*``: ``[..., Q, D]`` normalised outputs; ``lse_*``: ``[..., Q]``
    log-sum-exp of their scores (``-inf`` where a part saw no key).
    Returns the merged output and log-sum-exp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - safe).nan_to_num(0.0)[..., None]
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse


def flash_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor,
                                 block_size: int, scale: float | None = None) -> torch.Tensor:
    """Same contract as :func:`triton_block_causal_attention`; needs equal cache lengths across the batch."""
    check_inputs(q, k, v, cache_lens, block_size)
    flash_attn_func = _flash()
    if int(cache_lens.min()) != int(cache_lens.max()):
        raise ValueError("the flash path takes one cache length for the whole batch")
    c = int(cache_lens[0])
    B, Hq, Q, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    # flash-attn wants [B, N, H, D]; it handles grouped-query heads itself
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = torch.empty_like(qt)
    for start in range(0, Q, block_size):
        end = min(Q, start + block_size)
        o_new, lse_new, _ = flash_attn_func(qt[:, start:end], kt[:, c:c + end], vt[:, c:c + end],
                                            softmax_scale=scale, causal=False, return_attn_probs=True)
        if c == 0:
            out[:, start:end] = o_new
            continue
        o_cache, lse_cache, _ = flash_attn_func(qt[:, start:end], kt[:, :c], vt[:, :c], softmax_scale=scale,
                                                causal=False, return_attn_probs=True)
        # lse comes as [B, H, n]; outputs as [B, n, H, D]
        merged, _ = merge_partials(o_cache.transpose(1, 2), lse_cache, o_new.transpose(1, 2), lse_new)
        out[:, start:end] = merged.transpose(1, 2)
    return out.transpose(1, 2)
