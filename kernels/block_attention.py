"""Fused cached block-causal attention in Triton.

Queries are the tokens of the in-flight blocks. For batch row ``b`` the keys
and values live in a preallocated buffer ``[B, Hkv, S, D]``: slots
``[0, cache_lens[b])`` are the cache (prefix + complete blocks), read with no
mask; slots ``[cache_lens[b], cache_lens[b] + Q)`` are the in-flight tokens,
one per query, where query ``i`` sees key ``j`` iff
``j // block_size <= i // block_size``. One pass per query tile runs both
phases with an online softmax (fp32 running max and sum), so neither a dense
mask nor a concatenated K/V is ever built.

Under ``TRITON_INTERPRET=1`` (CPU tests) the interpreter's ``tl.dot`` on bf16
returns garbage, so operands are upcast to fp32 there; it also does not
check bounds, so every load and store below is masked explicitly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _block_causal_fwd(
    Q, K, V, O, CacheLens,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q, n_heads, groups, head_dim, block_size, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // groups  # grouped-query attention: several query heads share one kv head

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < n_q
    d_valid = offs_d < head_dim

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    cache_len = tl.load(CacheLens + b)

    # finite start value: a fully masked tile then gives exp(-inf) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # phase 1: the cache, no mask beyond its length
    for start in range(0, cache_len, BLOCK_N):
        n = start + offs_n
        n_valid = n < cache_len
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # phase 2: the in-flight blocks, block-causal; keys past this tile's last block are never visible
    q_block = offs_m // block_size
    last_block = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_q) - 1) // block_size
    hi = tl.minimum((last_block + 1) * block_size, n_q)
    for start in range(0, hi, BLOCK_N):
        j = start + offs_n
        j_valid = j < n_q
        slot = cache_len + j
        kv_mask = j_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        visible = j_valid[None, :] & ((j // block_size)[None, :] <= q_block[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def check_inputs(q, k, v, cache_lens, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads {Hq} are not a multiple of kv heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cache_lens.device):
        raise ValueError("q, k, v and cache_lens must be on one device")
    if cache_lens.shape != (B,) or cache_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_lens must be an int tensor of shape ({B},), got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if Q == 0:
        raise ValueError("no queries")
    if int(cache_lens.min()) < 0 or int(cache_lens.max()) + Q > k.shape[2]:
        raise ValueError(f"cache_lens + {Q} in-flight tokens exceed the {k.shape[2]} slots of the kv buffer")


def triton_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor,
                                  block_size: int, scale: float | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, Hq, Q, D]`` over ``k, v [B, Hkv, S, D]`` -> ``[B, Hq, Q, D]`` (see the module docstring).
    ``out`` (optional, shaped like ``q``) is written in place, e.g. a preallocated buffer."""
    check_inputs(q, k, v, cache_lens, block_size)
    B, Hq, Q, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    scale = D ** -0.5 if scale is None else float(scale)
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n = 16, 32  # >= 16 in every dot dimension, as a GPU requires
    grid = (triton.cdiv(Q, block_m), B * Hq)
    _block_causal_fwd[grid](
        q, k, v, out, cache_lens.to(torch.int32),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Q, Hq, Hq // k.shape[1], D, block_size, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=INTERPRET, IEEE=q.dtype == torch.float32 and not INTERPRET,
        num_warps=4,
    )
    return out
