"""flash-attn 2 path for cached block-causal attention (CUDA only, optional).

flash-attn has no block-causal mask, but the rule decomposes into calls it
does have (same contract as :mod:`.triton_block_attention`):

- ``per_block``: in-flight block ``i`` sees exactly keys
  ``[0, cache_lens[b] + end_i)`` of the buffer, so one
  ``flash_attn_with_kvcache(causal=False, cache_seqlens=cache_lens + end_i)``
  per block is exact, ragged lengths included. Simple; the cache is read once
  per block.
- ``split``: one ``flash_attn_with_kvcache`` call over the cache for all
  queries (the big read, done once), the in-flight part (Q x Q, tiny) in plain
  torch, and the two partial results merged exactly by their log-sum-exps.

``auto`` takes ``per_block`` for one block in flight (a single call, nothing
to merge) and ``split`` otherwise. The merge and the in-flight partial are
pure torch, so they are unit-tested on the CPU.
"""
from __future__ import annotations

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MODES = ("auto", "per_block", "split")


def _flash_with_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as err:  # no wheel on PyPI, and it does not build without CUDA
        raise ImportError(
            "the flash backend needs flash-attn 2 (>= 2.5, for flash_attn_with_kvcache with per-row cache_seqlens) "
            "on a CUDA machine: pip install flash-attn --no-build-isolation (builds against the installed torch "
            f"and CUDA toolkit). Import failed with: {err}") from err
    return flash_attn_with_kvcache


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two softmax-attention results computed over disjoint key sets.

    ``out_*``: ``[..., Q, D]`` each normalised over its own keys; ``lse_*``:
    ``[..., Q]`` the log-sum-exp of its (scaled) scores, ``-inf`` where a part
    saw no key. Returns ``(out, lse)`` over the union, ``out`` in ``out_a``'s
    dtype (weights and sum in fp32). Rows where neither part saw a key get 0.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - -inf) would be NaN: measure both weights from a finite reference instead
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - ref)[..., None]
    w_b = torch.exp(lse_b - ref)[..., None]
    # a part that saw no key may hold anything (SDPA gives NaN there): weight 0 must mean "ignored"
    out = torch.where(w_a > 0, out_a.float() * w_a, 0.0) + torch.where(w_b > 0, out_b.float() * w_b, 0.0)
    return out.to(out_a.dtype), lse


def gather_inflight(k: torch.Tensor, cache_lens: torch.Tensor, n_q: int) -> torch.Tensor:
    """The in-flight slots ``[cache_lens[b], cache_lens[b] + n_q)`` of each row
    of a ``[B, H, S, D]`` buffer -> ``[B, H, n_q, D]`` (small: one copy)."""
    B, H, _, D = k.shape
    idx = cache_lens.long()[:, None] + torch.arange(n_q, device=k.device)[None, :]
    return torch.gather(k, 2, idx[:, None, :, None].expand(B, H, n_q, D))


def inflight_partial(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, block_size: int, scale: float):
    """Attention of ``q [B, Hq, Q, D]`` over the in-flight keys only
    (``k_new, v_new [B, Hkv, Q, D]``), block-causal, in fp32.
    Returns ``(out [B, Hq, Q, D] fp32, lse [B, Hq, Q])``."""
    B, Hq, Q, D = q.shape
    Hkv = k_new.shape[1]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, Q, D)  # query heads grouped under their kv head
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k_new.float()) * scale
    blk = torch.arange(Q, device=q.device) // block_size
    scores = scores.masked_fill(blk[None, :] > blk[:, None], float("-inf"))  # every query sees its own block
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", torch.exp(scores - lse[..., None]), v_new.float())
    return out.reshape(B, Hq, Q, D), lse.reshape(B, Hq, Q)


def flash_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor,
                                 block_size: int, scale: float | None = None, *, mode: str = "auto",
                                 check_lengths: bool = True) -> torch.Tensor:
    """Same contract and result as ``triton_block_causal_attention``, via
    flash-attn 2 (fp16/bf16 on CUDA). ``mode``: ``auto``, ``per_block`` or
    ``split`` (module docstring)."""
    from .triton_block_attention import check_inputs  # shared validation (imports triton, never launches it)

    flash_attn_with_kvcache = _flash_with_kvcache()  # first: without flash-attn nothing else matters
    check_inputs(q, k, v, cache_lens, block_size, check_lengths)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.dtype not in FLASH_DTYPES:
        raise ValueError(f"flash-attn takes fp16/bf16, got {q.dtype}")
    if q.shape[-1] % 8:
        raise ValueError(f"flash-attn needs a head dim divisible by 8, got {q.shape[-1]}")
    B, Hq, Q, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    lens = cache_lens.to(torch.int32)
    # flash-attn's layout is [B, N, H, D]; these are views (it needs only a unit last stride)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    n_blocks = -(-Q // block_size)
    if mode == "per_block" or (mode == "auto" and n_blocks == 1):
        out = torch.empty_like(qt)
        for start in range(0, Q, block_size):
            end = min(Q, start + block_size)
            out[:, start:end] = flash_attn_with_kvcache(qt[:, start:end], kt, vt, cache_seqlens=lens + end,
                                                        softmax_scale=scale, causal=False)
        return out.transpose(1, 2)

    o_cache, lse_cache = flash_attn_with_kvcache(qt, kt, vt, cache_seqlens=lens, softmax_scale=scale, causal=False,
                                                 return_softmax_lse=True)
    # A row with an empty cache has no cache part; flash-attn may report +inf there, the merge needs -inf.
    lse_cache = torch.where(lens[:, None, None] > 0, lse_cache.float(), float("-inf"))
    o_new, lse_new = inflight_partial(q, gather_inflight(k, lens, Q), gather_inflight(v, lens, Q), block_size, scale)
    out, _ = merge_partials(o_cache.transpose(1, 2), lse_cache, o_new, lse_new)
    return out
