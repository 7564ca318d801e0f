"""Fused cached block-causal attention in Triton.

Contract (shared by every backend). Queries are the tokens of the in-flight
action blocks; keys and values live in a preallocated buffer:

- ``q [B, Hq, Q, D]``; ``k, v [B, Hkv, S, D]`` with ``Hq % Hkv == 0`` (query
  head ``h`` reads kv head ``h // (Hq // Hkv)``).
- row ``b``: slots ``[0, cache_lens[b])`` are the cache (prefix + complete
  blocks), seen by every query with no mask; slots
  ``[cache_lens[b], cache_lens[b] + Q)`` are the in-flight keys, one per query,
  and query ``i`` sees in-flight key ``j`` iff ``j // block_size <= i // block_size``.
  Slots past ``cache_lens[b] + Q`` are garbage and never read.
- optional ``key_starts [B]`` (left-padded batches): row ``b``'s slots
  ``[0, key_starts[b])`` are padding, hidden from every query and never read;
  the cache is then ``[key_starts[b], cache_lens[b])``. None: every row's
  cache starts at slot 0.

One program handles one (batch row, kv head, tile of rows). A row is a
(query, query head) pair of the heads sharing that kv head, laid out
query-major, so K/V are read once per kv head rather than once per query
head, and a tile still covers a contiguous range of queries (which bounds
how far into the in-flight keys it has to look). Phase 1 streams the cache
with no mask but its length; phase 2 streams the in-flight keys with the
block-causal mask; both feed one online softmax (fp32 running max and sum).

Under ``TRITON_INTERPRET=1`` (CPU tests) the interpreter's ``tl.dot`` on
bf16 returns garbage, so operands are upcast to fp32 there. ``triton.jit``
reads that variable when this module is imported: set it before.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # a [BLOCK_M, D] fp32 accumulator per program: beyond this it no longer fits in registers
LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """Fold one key tile into the running (max, sum, accumulator); scores in
    log2 units so that exp2 (one instruction) replaces exp."""
    if IEEE:  # fp32 inputs: no tf32 rounding, the result must match fp32 SDPA
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _block_causal_fwd(
    Q, K, V, O, CacheLens, KeyStarts,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q, n_slots, n_kv_heads, groups, block_size, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_KEY_STARTS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)  # int64: a large preallocated buffer overflows int32 offsets
    kv_h = (pid_bh % n_kv_heads).to(tl.int64)

    n_rows = n_q * groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = rows // groups  # query index
    head = kv_h * groups + rows % groups  # query head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh

    # Clamped so that even unchecked, invalid lengths never address outside the buffer.
    cache_len = tl.load(CacheLens + b)
    cache_len = tl.maximum(tl.minimum(cache_len, n_slots - n_q), 0)
    if HAS_KEY_STARTS:  # left padding: slots before the row's first real key are skipped, never read
        key_start = tl.maximum(tl.minimum(tl.load(KeyStarts + b), cache_len), 0)
    else:
        key_start = 0

    # Finite start: a row whose tile is fully masked gets exp2(-inf) = 0, never inf - inf = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Phase 1: the cache. Every query sees every cached key; only its bounds limit it.
    for start in range(key_start, cache_len, BLOCK_N):
        n = start + offs_n
        n_ok = n < cache_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale, IEEE)

    # Phase 2: the in-flight keys, block-causal. Keys past the end of this
    # tile's last query block are invisible to every row here: stop there.
    last_q = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1) // groups
    hi = tl.minimum((last_q // block_size + 1) * block_size, n_q)
    q_block = qi // block_size
    for start in range(0, hi, BLOCK_N):
        j = start + offs_n
        j_ok = j < n_q
        slot = cache_len + j
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        visible = j_ok[None, :] & ((j // block_size)[None, :] <= q_block[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, IEEE)

    # Every real query sees at least its own key, so l_i > 0 there; the guard is for padding rows.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor, block_size: int,
                 check_lengths: bool = True, key_starts: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` naming what is wrong with the arguments.

    ``check_lengths`` reads ``cache_lens`` (and ``key_starts``) on the host (a
    device sync on a GPU) to check that every row's cache + in-flight tokens fit
    the buffer and its padding lies inside its cache."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
    B, Hq, Q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch size differs: q has {B} rows, k/v have {Bk}")
    if Dk != D:
        raise ValueError(f"head dim differs: q has {D}, k/v have {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    if Q == 0 or B == 0:
        raise ValueError(f"nothing to compute: q has shape {tuple(q.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of the dtypes fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.shape != (B,) or cache_lens.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"cache_lens must be an int32/int64 tensor of shape ({B},), got "
                         f"{getattr(cache_lens, 'dtype', type(cache_lens))} {tuple(getattr(cache_lens, 'shape', ()))}")
    if not (q.device == k.device == v.device == cache_lens.device):
        raise ValueError(f"q, k, v, cache_lens must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{cache_lens.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if key_starts is not None:
        check_key_starts(key_starts, cache_lens, check_lengths)
    if check_lengths:
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < 0:
            raise ValueError(f"cache_lens must be >= 0, got min {lo}")
        if hi + Q > S:
            raise ValueError(f"kv buffer too small: max(cache_lens) + Q = {hi} + {Q} exceeds its S = {S} slots")


def check_key_starts(key_starts: torch.Tensor, cache_lens: torch.Tensor, check_lengths: bool) -> None:
    """``key_starts`` like ``cache_lens`` (int32/int64 ``[B]``, same device); with ``check_lengths``,
    ``0 <= key_starts <= cache_lens`` (read on the host)."""
    B = cache_lens.shape[0]
    if not isinstance(key_starts, torch.Tensor) or key_starts.shape != (B,) or key_starts.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"key_starts must be an int32/int64 tensor of shape ({B},), got "
                         f"{getattr(key_starts, 'dtype', type(key_starts))} {tuple(getattr(key_starts, 'shape', ()))}")
    if key_starts.device != cache_lens.device:
        raise ValueError(f"key_starts must be on cache_lens' device {cache_lens.device}, got {key_starts.device}")
    if check_lengths and not bool(((key_starts >= 0) & (key_starts <= cache_lens)).all()):
        raise ValueError(f"key_starts must lie in [0, cache_lens] per row (padding inside the cache), got "
                         f"{key_starts.tolist()} for cache_lens {cache_lens.tolist()}")


def pick_config(n_rows: int, n_programs_per_tile: int, head_dim: int, dtype: torch.dtype,
                n_sm: int | None) -> dict:
    """Tile sizes and launch settings: fixed choices, no autotuning (autotune
    needs a GPU driver, pauses on first call and breaks CUDA-graph capture).
    ``n_sm``: the GPU's multiprocessor count, None for the interpreter.
    Every dot dimension stays >= 16, as a GPU requires. The GPU choices were
    checked to compile for sm_80 and sm_90 without register spills (triton
    3.7.1, compiled ahead of time: no GPU was at hand to time them)."""
    if n_sm is None:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)  # fewer, larger interpreted programs
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:  # exact (ieee) fp32 dots run on FMA units and need many registers
        block_n, choices = (32, (32,)) if block_d <= 64 else (16, ())
    elif block_d > 128:
        block_n, choices = 32, ()
    else:
        block_n, choices = 64, (64, 32)
    # dVLA launches are small (few heads x few queries): prefer more, smaller
    # tiles until the grid fills the GPU; re-read K/V tiles then come from L2.
    block_m = 16
    for candidate in choices:
        if triton.cdiv(n_rows, candidate) * n_programs_per_tile >= n_sm:
            block_m = candidate
            break
    # wide 16-bit tiles on 4 warps need > 168 registers per thread and start spilling on sm_80
    num_warps = 8 if dtype != torch.float32 and block_d >= 128 and (block_m >= 32 or block_d > 128) else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=2)


def launch(q, k, v, cache_lens, block_size, scale, out, config, key_starts=None) -> torch.Tensor:
    """Launch the kernel with explicit tile sizes (the tests use this to run
    tile edges at several sizes). Arguments must already be checked."""
    B, Hq, Q, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    if cache_lens.dtype != torch.int32:
        cache_lens = cache_lens.to(torch.int32)
    if key_starts is not None and key_starts.dtype != torch.int32:
        key_starts = key_starts.to(torch.int32)
    launch_opts = {key: config[key] for key in ("num_warps", "num_stages") if key in config}
    grid = (triton.cdiv(Q * groups, config["BLOCK_M"]), B * Hkv)
    # Triton launches on the current CUDA device: make it q's
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _block_causal_fwd[grid](
            q, k, v, out, cache_lens, cache_lens if key_starts is None else key_starts,  # unread without them
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Q, S, Hkv, groups, block_size, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
            BLOCK_D=max(16, triton.next_power_of_2(D)),
            UPCAST=INTERPRET, IEEE=q.dtype == torch.float32 and not INTERPRET,
            HAS_KEY_STARTS=key_starts is not None,
            **launch_opts,
        )
    return out


def triton_block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_lens: torch.Tensor,
                                  block_size: int, scale: float | None = None, *, key_starts: torch.Tensor | None = None,
                                  out: torch.Tensor | None = None, check_lengths: bool = True) -> torch.Tensor:
    """Cached block-causal attention: ``q [B, Hq, Q, D]`` over the buffer
    ``k, v [B, Hkv, S, D]`` -> ``[B, Hq, Q, D]`` in ``q``'s dtype (contract in
    the module docstring).

    ``key_starts``: optional ``[B]``, each row's first real cache slot (left
    padding before it is skipped).
    ``out``: optional preallocated output shaped like ``q``, written in place.
    ``check_lengths=False`` skips the host read of ``cache_lens`` (a device
    sync; also not allowed inside CUDA-graph capture). The kernel clamps the
    lengths to the buffer, so unchecked bad lengths give wrong numbers, never
    an out-of-bounds read.
    """
    check_inputs(q, k, v, cache_lens, block_size, check_lengths, key_starts)
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "fast_dvla_kernels.triton_block_attention is imported (the interpreter: slow, for tests)")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
                         f"{tuple(out.shape)}, {out.dtype}, {out.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    B, Hq, Q, _ = q.shape
    n_sm = None if INTERPRET else torch.cuda.get_device_properties(q.device).multi_processor_count
    config = pick_config(Q * (Hq // k.shape[1]), B * k.shape[1], q.shape[-1], q.dtype, n_sm)
    return launch(q, k, v, cache_lens, block_size, scale, out, config, key_starts)
